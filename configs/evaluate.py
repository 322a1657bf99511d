r"""Zero-shot dense retrieval on a BEIR-layout directory (evaluate / encode).

Encodes the corpus and the judged queries of one split with a pretrained
encoder, runs exact top-k search and scores the run with trec_eval's
conventions. Writes metrics.json, metrics_per_query.json, run.trec and
timing.json to the workdir; `--mode=encode` writes corpus_shards/ (rerun to
resume) and corpus_embeddings.npy, corpus_ids.json instead (the directory
may then hold only corpus.jsonl).

Launch (LIMIT-small ships with the repository):

  python -m retrieval_jax.main --config configs/evaluate.py \
      --workdir /tmp/rj_eval_limit

Other collections are a data path away, e.g.

  python -m retrieval_jax.main --config configs/evaluate.py \
      --workdir /tmp/rj_eval_scifact --config.data.path=../shared/data/scifact

Expected with all-MiniLM-L6-v2 (max length 256, cosine): LIMIT-small
recall@2 = 0.162, SciFact ndcg@10 = 0.645, Cranfield ndcg@10 = 0.382.

Retrievers (`configs/evaluate.py:retriever=NAME`, see
retrieval_jax/evaluation/retrievers.py): dense (default), bm25, hybrid,
dense_prf, splade, inference_free, colbert, rerank (the last four read a
trained run or a published checkpoint: `--config.retriever.splade_workdir=
WORKDIR_OR_CHECKPOINT`); e.g. BM25 on SciFact (nDCG@10 0.671, DATA.md's
baseline):

  python -m retrieval_jax.main --config configs/evaluate.py:retriever=bm25 \
      --workdir /tmp/rj_bm25_scifact --config.data.path=../shared/data/scifact

Checkpoints as users have them (nothing is downloaded): a hub id resolves
from the local Hugging Face cache, e.g. `--config.model.pretrained=
intfloat/e5-small-v2` (its prompts and similarity apply); a SPLADE
checkpoint (BertForMaskedLM with its MLM head) evaluates zero-shot:

  python -m retrieval_jax.main --config configs/evaluate.py:retriever=splade \
      --workdir /tmp/rj_splade_zs --config.model.pretrained=naver/splade-v3

Compressed / approximate dense search (`configs/evaluate.py:index=NAME`,
parameters under config.retriever.index_params.NAME), e.g. HNSW:

  python -m retrieval_jax.main --config configs/evaluate.py:index=hnsw \
      --workdir /tmp/rj_hnsw --config.retriever.index_params.hnsw.ef_search=256

Variants: `configs/evaluate.py:smoke` (64 queries, max length 32: seconds).
"""

import ml_collections

from configs import common


def _index_params() -> ml_collections.ConfigDict:
  """`config.retriever.index_params`: one block per compression index kind."""
  p = ml_collections.ConfigDict()
  # flat: float32 vectors, exact top-k (no parameters).
  p.flat = ml_collections.ConfigDict()
  p.pca = ml_collections.ConfigDict()
  # pca: principal axes kept (<= the embedding dimension).
  p.pca.dims = 128
  p.pq = ml_collections.ConfigDict()
  # pq: sub-quantisers (must divide the embedding dimension).
  p.pq.m = 48
  # pq: bits per sub-quantiser code (2**nbits centroids <= corpus size).
  p.pq.nbits = 8
  # pq: "faiss" ADC search or "jax" (search/product_quantization.py).
  p.pq.engine = "faiss"
  p.sign = ml_collections.ConfigDict()
  # sign: re-rank the Hamming top max(k, rerank_depth) by <q, sign d>
  # (BPR's second stage); 0 = Hamming order only.
  p.sign.rerank_depth = 0
  # sign: packed word, "uint8" or "uint32" (same distances).
  p.sign.word = "uint8"
  p.hnsw = ml_collections.ConfigDict()
  # hnsw: graph neighbours per node (faiss M).
  p.hnsw.m = 32
  # hnsw: candidate list while building (faiss efConstruction).
  p.hnsw.ef_construction = 200
  # hnsw: candidate list while searching; faiss uses max(ef_search, k).
  p.hnsw.ef_search = 128
  p.ivf_pq = ml_collections.ConfigDict()
  # ivf_pq: coarse lists (0 = round(sqrt(N))).
  p.ivf_pq.nlist = 0
  # ivf_pq: sub-quantisers of the residual codes (divides the dimension).
  p.ivf_pq.m = 48
  # ivf_pq: bits per sub-quantiser code.
  p.ivf_pq.nbits = 8
  # ivf_pq: lists searched per query.
  p.ivf_pq.nprobe = 8
  return p


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the evaluation config; `arg` selects variants (`smoke`)."""
  arg = common.parse_arg(arg, smoke=False, retriever="dense", index="exact")
  config = ml_collections.ConfigDict()

  config.model = common.model_block()
  # Prepended to every query / document before the dense encoder; None =
  # the checkpoint's config_sentence_transformers.json prompts ("query";
  # "document", "passage" or "corpus"; else its default prompt; none for
  # a trained run), "" = no prompt.
  config.model.query_prompt = ml_collections.FieldReference(
      None, field_type=str
  )
  # The documents' prompt; None = the checkpoint's (see query_prompt).
  config.model.doc_prompt = ml_collections.FieldReference(None, field_type=str)
  # A train-mode workdir: evaluate its checkpoint (the step its
  # train.select_metric selected, else the latest), whatever its kind
  # (a bi-encoder through the dense retrievers, SPLADE / ColBERT / a
  # cross-encoder through theirs). "" = the pretrained `model.pretrained`.
  config.run = ""

  config.data = ml_collections.ConfigDict()
  # BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.
  config.data.path = str(common.REPO_ROOT / "data" / "limit-small")
  # Qrels split to evaluate (qrels/<split>.tsv).
  config.data.split = "test"
  # Qrels rows naming unknown queries/docs: "warn" (drop, count), "error".
  config.data.on_unknown = "warn"
  # Evaluate only the first N judged queries (0 = all of them).
  config.data.max_queries = 0

  config.encode = ml_collections.ConfigDict()
  # Texts per encoder call (rounded up to a multiple of the data axes).
  config.encode.batch_size = 64
  # Padded lengths are rounded up to a multiple of this (fewer compiles).
  config.encode.pad_multiple = 16
  # Encode in length order so batches carry little padding.
  config.encode.sort_by_length = True
  # Where the dense, hybrid and PRF retrievers cache the dense embeddings
  # ("" = the workdir); runs sharing it encode a collection once. A
  # finished float32 `--mode=encode` set in its corpus_shards/ (same weights,
  # settings, corpus) serves the corpus half.
  config.encode.cache_dir = ""
  # --mode=encode: documents per shard of <workdir>/corpus_shards/ (a rerun
  # encodes only unfinished shards; processes split them).
  config.encode.shard_size = 100_000
  # --mode=encode: shard storage, "float32" or "float16" (half the bytes,
  # components rounded to 11 significant bits).
  config.encode.dtype = "float32"
  # --mode=encode: also write corpus_embeddings.npy (float32) and
  # corpus_ids.json, what `retrieval_jax.serve` and JPQ read.
  config.encode.consolidate = True

  config.search = ml_collections.ConfigDict()
  # Documents retrieved per query (BEIR's 1,000; clipped to the corpus size).
  config.search.top_k = 1000
  # "cosine" or "dot" (cosine normalises both sides before the dot
  # product); "" = the checkpoint's similarity_fn_name (cosine if unset), or
  # for a trained run what its training evaluations used.
  config.search.metric = ""
  # Corpus rows scored per step of the chunked search (bounds memory).
  config.search.chunk_size = 16384

  config.retriever = ml_collections.ConfigDict()
  # "dense" (the encoder of config.model), "bm25" (Lucene BM25 with the
  # shared data's settings), "hybrid" (dense + BM25 interpolation),
  # "dense_prf" (dense, then vector PRF and a second search).
  config.retriever.kind = arg.retriever
  # Queries searched one at a time to measure latency (stats.json).
  config.retriever.latency_queries = 100
  # hybrid: score = alpha * bm25 + dense (sparse + alpha * dense with
  # weight_on_dense) over the union of the two systems' lists; a document
  # missing from one list takes that list's minimum. 1 weighs both equally
  # once normalised (Pyserini's 0.1 is meant for raw scores, with
  # normalization "none"); see experiments/retrievers/README.md.
  config.retriever.alpha = 1.0
  # hybrid: per-query score normalisation, "none" | "minmax_center" |
  # "zscore".
  config.retriever.normalization = "minmax_center"
  # hybrid: put alpha on the dense scores instead of the sparse ones.
  config.retriever.weight_on_dense = False
  # hybrid: each system's top fusion_depth are fused (0 = search.top_k).
  config.retriever.fusion_depth = 1000
  # dense_prf: "average" ((q + sum of the top prf_k) / (prf_k + 1)) or
  # "rocchio" (alpha q + beta mean(top prf_k) - gamma mean(bottom k)).
  config.retriever.prf_method = "rocchio"
  # dense_prf: feedback documents (the first pass's top prf_k).
  config.retriever.prf_k = 3
  # dense_prf, rocchio: weight of the original query.
  config.retriever.prf_alpha = 0.9
  # dense_prf, rocchio: weight of the mean of the top prf_k.
  config.retriever.prf_beta = 0.1
  # dense_prf, rocchio: weight of the mean of the bottom prf_k_bottom.
  config.retriever.prf_gamma = 0.1
  # dense_prf, rocchio: negative feedback documents (0 = none), the last
  # prf_k_bottom of the first pass's top prf_depth.
  config.retriever.prf_k_bottom = 0
  # dense_prf, rocchio: depth of the feedback list (0 = prf_k).
  config.retriever.prf_depth = 0
  # The dense search (dense, both dense_prf passes, hybrid's dense half, a
  # dense first_stage): "exact" (float32, search/exact_topk.py) or a
  # search/compression.py index over the cached corpus embeddings, saved
  # in <workdir>/index/ and reused while its content key matches: "flat",
  # "pca", "pq", "sign", "hnsw", "ivf_pq" (pq / hnsw / ivf_pq need faiss:
  # pip install -e ".[index]").
  config.retriever.index = arg.index
  # Each index kind's parameters (experiments/compression/config.py's).
  config.retriever.index_params = _index_params()

  # splade / inference_free / colbert / rerank: the workdirs of trained runs
  # (configs/train.py:scifact,splade etc.; their latest checkpoint), or
  # published checkpoints (directory or cached hub id): SPLADE with its MLM
  # head; "" for splade / inference_free = config.model.pretrained if it
  # has one.
  config.retriever.splade_workdir = ""
  # The inference-free run's workdir or checkpoint.
  config.retriever.inference_free_workdir = ""
  # The ColBERT run's workdir, or a colbert-ir checkpoint (linear.weight).
  config.retriever.colbert_workdir = ""
  # rerank: a cross-encoder run's workdir, or a checkpoint with its
  # classifier (BertForSequenceClassification, sentence-transformers
  # CrossEncoder).
  config.retriever.rerank_workdir = ""
  # splade / inference_free: keep each document's t largest weights (0 =
  # every non-zero one).
  config.retriever.top_terms = 0
  # colbert / rerank: where the candidates come from: "bm25" | "dense" | "splade" |
  # "inference_free" (the last two need their workdir set).
  config.retriever.first_stage = "bm25"
  # colbert / rerank: first-stage candidates re-ranked per query.
  config.retriever.rerank_depth = 100
  # colbert: drop candidates scoring below prune_ratio x the query's top
  # first-stage score before re-ranking (0 = keep all).
  config.retriever.prune_ratio = 0.0

  config.eval = ml_collections.ConfigDict()
  # Measures to report: ndcg@K, recall@K, mrr@K, map, map@K, p@K, ndcg, mrr.
  config.eval.measures = (
      "ndcg@10",
      "recall@2",
      "recall@10",
      "recall@100",
      "mrr@10",
      "map",
      "p@10",
  )
  # Label at or above which a judged document counts as relevant (binary
  # measures only; nDCG always uses the raw labels, as trec_eval does).
  config.eval.relevance_level = 1
  # Tag written in the last column of run.trec.
  config.eval.run_tag = "retrieval_jax"

  config.mesh = common.mesh_block()

  if arg.smoke:
    config.model.max_length = 32
    config.data.max_queries = 64
    config.search.top_k = 100
    config.encode.batch_size = 32

  config.lock()
  return config
