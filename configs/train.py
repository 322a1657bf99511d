r"""Fine-tune a bi-encoder (all-MiniLM-L6-v2 by default) with a contrastive loss.

The default is the repository's quick start: fine-tune on LIMIT-small's
train queries (800 queries, 2 relevant documents each, shipped in
data/limit-small) and report Recall@2 / nDCG@10 on its 200 held-out dev
queries before and after training:

  python -m retrieval_jax.main --config configs/train.py --workdir /tmp/rj_train

Expected on 2 CPU cores: a few minutes; dev Recall@2 rises from 0.17 (see
README for the measured numbers).

SciFact (needs ../shared/data; in-batch + BM25 hard negatives, eval on the
300 test queries at max length 256):

  python -m retrieval_jax.main --config configs/train.py:scifact,loss=lse_pair \
      --workdir /tmp/rj_scifact_lse_pair

Cross-encoder re-ranker from all-MiniLM-L6-v2 on SciFact (each training
pair's group: its positive and 3 BM25 negatives, InfoNCE over the group;
evaluated by re-ranking the pretrained bi-encoder's top 20 on SciFact test):

  python -m retrieval_jax.main \
      --config configs/train.py:scifact,cross_encoder --workdir /tmp/rj_ce

Self-supervised pretraining on a corpus's texts alone (no queries; data/
spans.py): Contriever cropping with a MoCo queue, or the Inverse Cloze Task
with in-batch negatives, evaluated zero-shot on SciFact and Cranfield test:

  python -m retrieval_jax.main --config configs/train.py:pretrain_crop \
      --workdir /tmp/rj_crop

Arguments (`configs/train.py:a=1,b`):
  smoke      tiny run (4 steps, short sequences, 16 eval queries): seconds
  scifact    SciFact train pairs -> SciFact test
  cross_encoder  train a cross-encoder (model.kind) and evaluate it as a
             re-ranker; `loss=bce` for pointwise BCE, `head=emb` for the
             [EMB]-marker head, `loss=kl_distillation,teacher=bm25` to
             distil BM25's scores of each group
  splade / inference_free / colbert  train a SPLADE encoder, an
             inference-free (document-only) SPLADE, or ColBERT; evaluate
             with configs/evaluate.py:retriever=<kind>
  loss=NAME  a key of retrieval_jax.losses.LOSSES (infonce, rand1_lh,
             joint_lh, sum_marg_lh, lse_pair, symmetric_infonce)
  pretrain_crop / pretrain_ict  pretrain on `data.path`'s corpus.jsonl
             (default SciFact's) with cropping or ICT pairs
  moco=on|off  MoCo queue and momentum encoder (model.kind "moco"); default:
             on for cropping (Contriever), off for ICT (in-batch, as the
             ICT paper)
  seed=N     data order, negatives and dropout seed
  shared=DIR where the shared collections live (default ../shared/data)

Resume order: the latest checkpoint in <workdir>/checkpoints, then
`checkpoint.init_from`, then the pretrained weights (see retrieval_jax/train.py).
"""

import ml_collections

from configs import common


def _eval_block(
    path: str, split: str, measures, *, max_queries: int = 0, top_k: int = 1000
) -> ml_collections.ConfigDict:
  ev = ml_collections.ConfigDict()
  # BEIR directory with corpus.jsonl, queries.jsonl and qrels/<split>.tsv.
  ev.path = path
  # Qrels split to evaluate.
  ev.split = split
  # Measures to report (see retrieval_jax.evaluation.ir_metrics).
  ev.measures = tuple(measures)
  # Evaluate only the first N judged queries (0 = all).
  ev.max_queries = max_queries
  # Documents retrieved per query.
  ev.top_k = top_k
  # Texts per encoder call during evaluation.
  ev.batch_size = 64
  return ev


def _pretrain(config, arg) -> None:
  """Pairs cut from a corpus (data/spans.py), optionally a MoCo queue."""
  task = "crop" if arg.pretrain_crop else "ict"
  moco = {"": task == "crop", "on": True, "off": False}[arg.moco]
  # "corpus": pairs cut from data.path's corpus.jsonl (no queries needed).
  config.data.format = "corpus"
  # Pretrain on SciFact's 5,183 abstracts.
  config.data.path = f"{arg.shared}/scifact"
  # Settings of the span pairs (format "corpus" only).
  config.data.spans = ml_collections.ConfigDict()
  # "ict": a sentence vs its passage; "crop": two independent spans.
  config.data.spans.task = task
  # ICT: probability that the query sentence stays in its passage.
  config.data.spans.keep_prob = 0.1
  # Cropping: span lengths are min_crop..max_crop of the document's tokens.
  config.data.spans.min_crop = 0.1
  # Largest span, as a fraction of the document's tokens.
  config.data.spans.max_crop = 0.5
  # One positive per example, in-batch (and queue) negatives only.
  config.data.group_size = 1
  # One positive per example.
  config.data.max_positives = 1
  # No mining: there are no queries to mine for.
  config.data.negatives = "none"
  # The query side of ICT is one sentence; crops share the window.
  config.data.query_max_length = 64 if task == "ict" else 128
  # The window crops come from, and the ICT passage.
  config.data.passage_max_length = 128
  # Evaluation reads up to 256 tokens of a document.
  config.model.max_length = 256
  # Pairs per step.
  config.train.batch_size = 32
  # About 1.2 epochs of SciFact's corpus.
  config.train.num_steps = 200
  # The untrained (pretrained-checkpoint) row of the comparison.
  config.train.eval_before = True
  # Checkpoint every N steps.
  config.checkpoint.every_steps = 50
  # Contriever's rate for continued pretraining of a BERT-size model.
  config.optim.learning_rate = 5e-5
  if moco:
    config.model.kind = "moco"
    # Key encoder = EMA of the query encoder with this momentum (MoCo's τ).
    config.model.moco_momentum = 0.999
    # Past keys kept as negatives (a multiple of train.batch_size).
    config.model.moco_queue_size = 1024
    # Other in-batch keys are negatives too (else the queue alone is).
    config.model.moco_in_batch = True
  # Zero-shot: SciFact and Cranfield test.
  config.evals = ml_collections.ConfigDict()
  # SciFact test, 300 queries.
  config.evals.scifact = _eval_block(
      f"{arg.shared}/scifact", "test", ("ndcg@10", "recall@100")
  )
  # Cranfield test, 225 queries.
  config.evals.cranfield = _eval_block(
      f"{arg.shared}/cranfield", "test", ("ndcg@10", "recall@100")
  )


def _pretrain_smoke(config, arg) -> None:
  """Shipped data: LIMIT-small for cropping; ICT needs >= 2 sentences per
  document, which the tiny test fixture has (title + text), LIMIT not."""
  limit = str(common.REPO_ROOT / "data" / "limit-small")
  tiny = str(common.REPO_ROOT / "tests" / "fixtures" / "tiny_beir")
  # The corpus the pairs are cut from.
  config.data.path = limit if arg.pretrain_crop else tiny
  # One positive, no hard negatives (the smoke block set 2).
  config.data.group_size = 1
  # Short spans: seconds per step on CPU.
  config.data.query_max_length = 32
  # Short windows.
  config.data.passage_max_length = 32
  # Four pairs per step.
  config.train.batch_size = 4
  # Two steps.
  config.train.num_steps = 2
  if config.model.kind == "moco":
    config.model.moco_queue_size = 8  # full after 2 steps, then wraps
  # LIMIT-small dev, 16 queries.
  config.evals = ml_collections.ConfigDict()
  # The evaluation of the smoke variants.
  config.evals.limit_dev = _eval_block(
      limit, "dev", ("ndcg@10",), max_queries=16, top_k=100
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the training config; `arg` selects variants (see docstring)."""
  arg = common.parse_arg(
      arg,
      smoke=False,
      scifact=False,
      loss="infonce",
      cross_encoder=False,
      head="cls",
      teacher="",
      splade=False,
      inference_free=False,
      colbert=False,
      pretrain_crop=False,
      pretrain_ict=False,
      moco="",
      seed=0,
      shared=str(common.REPO_ROOT.parent / "shared" / "data"),
  )
  limit = str(common.REPO_ROOT / "data" / "limit-small")
  config = ml_collections.ConfigDict()

  config.model = common.model_block()
  # Retriever kind, a key of retrieval_jax.kinds.KINDS: "bi_encoder" |
  # "cross_encoder" | "splade" | "inference_free" | "colbert".
  config.model.kind = "bi_encoder"
  # Dropout while training (the checkpoint's rates; off in evaluation).
  config.model.dropout = True

  config.data = ml_collections.ConfigDict()
  # "beir": a BEIR directory's qrels split; "pairs": a pairs JSONL file.
  config.data.format = "beir"
  # BEIR directory (format beir) or pairs file (format pairs).
  config.data.path = limit
  # Qrels split with the training judgments (format beir).
  config.data.train_split = "train"
  # BEIR directory whose corpus.jsonl supplies negatives ("" = data.path).
  config.data.corpus_path = ""
  # Hard negatives: "bm25" (bm25s, Lucene BM25), "dense" (the starting
  # encoder), "none" (in-batch negatives only).
  config.data.negatives = "bm25"
  # Hard negatives are drawn from each query's top-N mined list.
  config.data.negative_depth = 30
  # Passages per query in a batch: its positives, then hard negatives.
  config.data.group_size = 2
  # Positives per query for the multi-positive losses (positives="all").
  config.data.max_positives = 2
  # Known relevant documents tracked per query (masked as negatives).
  config.data.max_relevant = 8
  # Query token budget ([CLS] and [SEP] included); queries pad to it.
  config.data.query_max_length = 16
  # LIMIT-small documents are 143-173 tokens: 176 keeps every attribute.
  config.data.passage_max_length = 176
  # Seed of the data order, positive cycling and negative sampling.
  config.data.seed = arg.seed

  config.loss = ml_collections.ConfigDict()
  # A key of retrieval_jax.losses.LOSSES.
  config.loss.name = arg.loss
  # Scores are cosine / temperature (0.05 = sentence-transformers' scale 20).
  config.loss.temperature = 0.05
  # Other queries' hard negatives are negatives too (DPR); False keeps only
  # the query's own hard negatives plus in-batch positives.
  config.loss.share_hard_negatives = True
  # Bi-encoders: compute the loss shard by shard (losses/sharded_contrastive:
  # each device holds its [B/W, B*G] rows of the score matrix, not all).
  config.loss.sharded = False
  # Cross-encoders: "" trains on 1/0 labels; "bm25" distils the BM25 score
  # of every (query, passage) row through a list loss (kl_distillation,
  # listnet, ...): the teacher's scores, times teacher_scale, are its
  # targets (softmax logits for kl_distillation).
  config.loss.teacher = arg.teacher
  # Multiplies the teacher's scores (BM25's run to about 30 on SciFact).
  config.loss.teacher_scale = 1.0

  config.train = ml_collections.ConfigDict()
  # Queries per optimizer step (global, over all devices).
  config.train.batch_size = 16
  # Steps to run; 0 = num_epochs passes over the training examples.
  config.train.num_steps = 24
  # Epochs when num_steps is 0 (fractions allowed).
  config.train.num_epochs = 1.0
  # Seed of the dropout keys (fold_in(step), so resumes replay them).
  config.train.seed = arg.seed
  # Log train metrics every N steps (each log syncs with the device).
  config.train.log_every = 5
  # Evaluate every N steps during training (0 = only before and after).
  config.train.eval_every = 0
  # Evaluate the starting model before the first step.
  config.train.eval_before = True
  # Evaluate the trained model after the last step.
  config.train.eval_after = True
  # GradCache (query chunks, passage chunks); (0, 0) = whole batch at once.
  config.train.grad_cache_chunks = (0, 0)

  config.optim = ml_collections.ConfigDict()
  # "adamw" | "adam" | "sgd".
  config.optim.name = "adamw"
  # Peak learning rate.
  config.optim.learning_rate = 1e-4
  # Linear warm-up steps (0 = use warmup_fraction).
  config.optim.warmup_steps = 0
  # Warm-up as a fraction of all steps.
  config.optim.warmup_fraction = 0.1
  # Decay after warm-up: "linear" | "cosine" | "constant".
  config.optim.decay = "linear"
  # Final learning rate as a fraction of the peak.
  config.optim.end_factor = 0.0
  # Decoupled weight decay (matrices and embeddings only).
  config.optim.weight_decay = 0.01
  # Also decay biases and LayerNorm parameters.
  config.optim.decay_norms_and_biases = False
  # Clip the global gradient norm (0 = off).
  config.optim.clip_norm = 1.0
  # Adam's first-moment decay rate.
  config.optim.b1 = 0.9
  # Adam's second-moment decay rate.
  config.optim.b2 = 0.999
  # Adam's epsilon (added to the root of the second moment).
  config.optim.eps = 1e-8

  config.checkpoint = ml_collections.ConfigDict()
  # Save every N steps (and always at the end).
  config.checkpoint.every_steps = 8
  # Checkpoints kept (0 = all).
  config.checkpoint.max_to_keep = 2
  # Write in the background while training continues.
  config.checkpoint.async_save = True
  # Another run's checkpoint directory to start from (params only).
  config.checkpoint.init_from = ""

  config.evals = ml_collections.ConfigDict()
  # Held-out LIMIT-small queries (disjoint from the train split).
  config.evals.limit_dev = _eval_block(
      limit, "dev", ("recall@2", "recall@10", "ndcg@10", "mrr@10")
  )

  config.export = ml_collections.ConfigDict()
  # "jax": jax.export programs of the kind's towers (retrieval_jax/export.py);
  # "hf": a sentence-transformers directory (BERT bi-encoders only).
  config.export.format = "jax"
  # Where to write ("" = <workdir>/export, or <workdir>/export_hf for hf).
  config.export.out_dir = ""
  # jax.export platforms from cpu, cuda, rocm, tpu; () = this host's
  # backend, then cpu (a GPU-trained export serves on GPU and CPU).
  config.export.platforms = ()
  # Token budget of the exported query tower.
  config.export.query_max_length = 32
  # Token budget of the exported passage tower (hf: max_seq_length).
  config.export.passage_max_length = 256
  # SPLADE towers: 0 = the [B, V] weights; k = the k largest (ids, weights).
  config.export.top_terms = 0
  # Inference-free query idf: a BEIR directory's corpus ("" = the run's
  # training corpus, the idf it trained with).
  config.export.idf_corpus = ""

  config.mesh = common.mesh_block()

  if arg.scifact:
    config.data.format = "pairs"
    config.data.path = f"{arg.shared}/train-scifact/pairs.jsonl"
    config.data.corpus_path = f"{arg.shared}/scifact"
    # One BM25 hard negative per query (two slots for the few queries with
    # several positives under the multi-positive losses).
    config.data.group_size = 2
    config.data.max_positives = 2
    config.data.negative_depth = 50
    config.data.passage_max_length = 128
    config.data.query_max_length = 48
    config.train.batch_size = 32
    config.train.num_steps = 0
    config.train.num_epochs = 1.0
    config.optim.learning_rate = 5e-5
    config.train.eval_before = False  # Zero-shot: configs/evaluate.py.
    config.checkpoint.every_steps = 10
    config.evals = ml_collections.ConfigDict()
    config.evals.scifact = _eval_block(
        f"{arg.shared}/scifact",
        "test",
        ("ndcg@10", "recall@100", "mrr@10", "recall@10"),
    )

  if arg.cross_encoder:
    config.model.kind = "cross_encoder"
    # Score head: "cls" (w . h[CLS] + b) or "emb" (marker dot product).
    config.model.head = arg.head
    # Ids per (query, passage) row, specials (and markers) included;
    # longest-first truncation, as at inference (PairScorer).
    config.data.pair_max_length = 128
    # Candidates per group: the positive and 3 hard negatives.
    config.data.group_size = 4
    config.data.max_positives = 1
    # The listwise losses compare raw pair scores: no temperature.
    config.loss.temperature = 1.0
    config.optim.learning_rate = 5e-5 if arg.scifact else 1e-4
    if arg.scifact:
      # 919 pairs: two passes (58 steps of 32 groups).
      config.train.num_epochs = 2.0
    config.train.eval_before = False
    for ev in config.evals.values():
      # Re-rank the pretrained bi-encoder's ranking ("dense") or BM25's.
      ev.first_stage = "dense"
      # Candidates re-ranked per query.
      ev.rerank_depth = 20
      ev.measures = ("ndcg@10", "mrr@10", "recall@10", "recall@20")
      ev.batch_size = 32

  if arg.splade or arg.inference_free or arg.colbert:
    # Raw scores (no temperature); evaluated by the evaluate mode
    # (configs/evaluate.py with --config.run=<this workdir>).
    config.model.kind = (
        "splade"
        if arg.splade
        else "inference_free"
        if arg.inference_free
        else "colbert"
    )
    config.evals = ml_collections.ConfigDict()
    config.train.eval_before = False
    # The positive and one BM25 negative per query, 16 queries per step.
    config.data.group_size = 2
    config.data.max_positives = 1
    config.train.batch_size = 16
    config.optim.learning_rate = 5e-5
    if arg.colbert:
      # Token vectors projected to this width (random init, no bias).
      config.model.colbert_dim = 128
      # Pad queries with attended-to-nothing, scored [MASK] tokens.
      config.model.colbert_augment = True
      # Query width ([CLS] [Q] ... [SEP] + [MASK]s): ColBERT's 32.
      config.data.query_max_length = 32
    else:
      # Pooling of log(1 + ReLU(MLM logits)) over positions: "max" | "sum".
      config.model.splade_aggregation = "max"
      # Start of the MLM head's output bias: the checkpoint has no MLM head
      # and at 0 an untied-from-training head activates almost every term;
      # -5 starts with tens (the text's own words and their forms).
      config.model.splade_bias_init = -5.0
      # FLOPS weights on queries (splade only) and documents.
      config.loss.flops_q = 0.0 if arg.inference_free else 1e-3
      config.loss.flops_d = 1e-3
      # Quadratic warm-up of both weights over this many steps.
      config.loss.flops_warmup_steps = 20

  if arg.pretrain_crop or arg.pretrain_ict:
    _pretrain(config, arg)

  if arg.smoke:
    config.data.group_size = 2
    config.data.max_positives = 1
    config.data.negative_depth = 5
    config.data.query_max_length = 16
    config.data.passage_max_length = 32
    config.model.max_length = 32
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every = 1
    config.checkpoint.every_steps = 2
    for ev in config.evals.values():
      ev.max_queries = 16
      ev.top_k = 100
    if arg.cross_encoder:
      config.data.pair_max_length = 48
      for ev in config.evals.values():
        ev.rerank_depth = 5
        ev.first_stage = "bm25"
    if arg.pretrain_crop or arg.pretrain_ict:
      _pretrain_smoke(config, arg)

  config.lock()
  return config
