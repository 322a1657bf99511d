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

Listwise distillation into the bi-encoder on SciFact (teacher: the evaluate
mode's dense + BM25 hybrid over each query's 30 dense candidates, which the
student re-mines every epoch; KL over groups of 8 plus InfoNCE; the same
29 steps as `scifact`, so one epoch: more epochs re-mine, e.g.
--config.train.num_epochs=3):

  python -m retrieval_jax.main --config configs/train.py:scifact,distill \
      --workdir /tmp/rj_scifact_distill

A cross-encoder that learns the ranking it re-ranks: groups of 8 from the
pretrained bi-encoder's top 20, KL to the hybrid teacher plus InfoNCE,
evaluated every 20 steps on SciFact test and on 100 training queries held
out of training, which select the step (<workdir>/selection.json):

  python -m retrieval_jax.main \
      --config configs/train.py:scifact,cross_encoder,distill \
      --workdir /tmp/rj_ce_distill

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
  distill    learn from a teacher (retrieval_jax/teachers.py): a
             bi-encoder distils the hybrid teacher over dense candidates
             the student re-mines every epoch (KL + InfoNCE); splade /
             inference_free distil the dense + BM25 "ensemble" (KL), the
             inference-free one with IDF-aware FLOPS; a cross_encoder
             distils the hybrid over groups from its dense first stage's
             top 20 (KL + InfoNCE), and with `scifact` 100 held-out
             training queries pick the evaluated step (never test);
             `first_stage=bm25`: groups from BM25's top 100, evaluated
             re-ranking it (150 steps, held-out evaluations every 50)
  tevatron   train from a Tevatron JSONL file (data.format "tevatron";
             smoke: tests/fixtures/tevatron/train.jsonl, its negatives and
             its scores as the teacher)
  pretrain_crop / pretrain_ict  pretrain on `data.path`'s corpus.jsonl
             (default SciFact's) with cropping or ICT pairs
  pretrain_revela  Revela on that corpus's chunks (model.kind "revela":
             the retriever weighs a small causal LM's attention to the
             batch's other chunks; next-token loss)
  ar2        AR2 (model.kind "ar2"): a retriever and a cross-encoder
             ranker (both from model.pretrained) trained in turn on the
             retriever's own top-n, re-mined every data.refresh_steps;
             warm starts: ar2.retriever_init / ranker_init
  bpr / jpq  learning-to-hash (model.kind): BPR's binary codes or JPQ's
             PQ codes with a trained query encoder and centroids; with
             `scifact` on SciFact's train pairs; evaluated by
             experiments/lth (compressed indexes)
  adapt      with bpr / jpq: GPL-style domain adaptation on `target`'s
             corpus: pseudo-queries (pseudo_queries=FILE, written by
             experiments/lth/pseudo_queries.py), BM25 negatives, margin-MSE
             from the frozen starting encoder
  target=NAME  the shared collection adapt trains on (scifact, cranfield)
  moco=on|off  MoCo queue and momentum encoder (model.kind "moco"); default:
             on for cropping (Contriever), off for ICT (in-batch, as the
             ICT paper)
  seed=N     data order, negatives and dropout seed
  shared=DIR where the shared collections live (default ../shared/data)

AR2 on SciFact (retriever and ranker from all-MiniLM-L6-v2; 2 epochs of
cycles of 10 ranker and 10 retriever steps, the retriever's top 7 re-mined
every cycle; evaluated as a dense retriever and as the ranker re-ranking its
top 20; warm starts from trained runs with
--config.ar2.retriever_init=BI_ENCODER_WORKDIR and
--config.ar2.ranker_init=CROSS_ENCODER_WORKDIR):

  python -m retrieval_jax.main --config configs/train.py:scifact,ar2 \
      --workdir /tmp/rj_ar2

AR2 as its paper runs it, from separately trained models (the README's
AR2 results; eval_before evaluates the two starting models on the same
lists):

  python -m retrieval_jax.main --config configs/train.py:scifact \
      --workdir /tmp/rj_scifact
  python -m retrieval_jax.main \
      --config configs/train.py:scifact,cross_encoder,distill,first_stage=bm25 \
      --workdir /tmp/rj_ce_bm25
  python -m retrieval_jax.main --config configs/train.py:scifact,ar2 \
      --workdir /tmp/rj_ar2_warm --config.train.eval_before=True \
      --config.ar2.retriever_init=/tmp/rj_scifact \
      --config.ar2.ranker_init=/tmp/rj_ce_bm25

then each model of the run in the evaluate mode: the retriever
(configs/evaluate.py --config.run=/tmp/rj_ar2), the ranker re-ranking it
(configs/evaluate.py:retriever=rerank --config.run=/tmp/rj_ar2
--config.retriever.first_stage=dense).

Learning-to-hash (BPR, JPQ; experiments/lth/README.md has the whole protocol):

  python -m retrieval_jax.main --config configs/train.py:scifact,bpr \
      --workdir /tmp/rj_bpr

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
  # "all" judged queries of the split, or "holdout": only the training
  # queries config.data.holdout_queries leaves out of training.
  ev.queries = "all"
  return ev


def _pretrain(config, arg) -> None:
  """Pairs cut from a corpus (data/spans.py), optionally a MoCo queue; or
  document chunks (data/chunks.py) for Revela."""
  task = "crop" if arg.pretrain_crop else "ict"
  task = "chunks" if arg.pretrain_revela else task
  if task == "chunks" and arg.moco:
    raise ValueError("moco=... is for pretrain_crop / pretrain_ict")
  moco = {"": task == "crop", "on": True, "off": False}[arg.moco]
  # "corpus": pairs cut from data.path's corpus.jsonl (no queries needed).
  config.data.format = "corpus"
  # Pretrain on SciFact's 5,183 abstracts.
  config.data.path = f"{arg.shared}/scifact"
  # Settings of the span pairs (format "corpus" only).
  config.data.spans = ml_collections.ConfigDict()
  # "ict": a sentence vs its passage; "crop": two independent spans;
  # "chunks": batches of document chunks (Revela).
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
  if task == "chunks":
    _revela(config)
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


def _revela(config) -> None:
  """Revela: a causal LM over chunks reads the other chunks of the batch,
  weighted by the retriever's p(j | i); next-token loss trains both."""
  # The retriever kind trained through the LM (kinds/revela.py).
  config.model.kind = "revela"
  # The LM (random init, the retriever's vocabulary): GPT-2-style blocks.
  config.model.revela_lm = ml_collections.ConfigDict()
  lm = config.model.revela_lm
  # Transformer blocks.
  lm.num_layers = 2
  # Width.
  lm.hidden_size = 256
  # Attention heads (divide hidden_size).
  lm.num_heads = 4
  # Feed-forward width.
  lm.intermediate_size = 1024
  # Positions: at least data.passage_max_length (the chunk width).
  lm.max_length = 64
  # Dropout on embeddings, residual branches and attention probabilities.
  lm.dropout = 0.1
  # Divide each cross-chunk attention output by the attention-weighted
  # norm of its values (the authors' default).
  config.model.revela_v_norm = True
  # Chunks of one document in a batch (fewer if it has fewer).
  config.data.spans.chunks_per_doc = 4
  # Chunk width, [CLS] and [SEP] included (62 tokens of text).
  config.data.passage_max_length = 64
  # Unused (no queries): the chunk width.
  config.data.query_max_length = 64
  # Next-token prediction; p(j | i) = softmax_j(cos / temperature).
  config.loss.name = "next_token"
  # 0.05: sentence-transformers' scale 20 on cosines.
  config.loss.temperature = 0.05
  # Chunks per step (8 documents x 4 chunks).
  config.train.batch_size = 32
  # One rate for the pretrained retriever and the new LM.
  config.optim.learning_rate = 1e-4


def _distill(config, arg) -> None:
  """Distillation from a teacher (retrieval_jax/teachers.py)."""
  # The listwise KL between student and teacher over each group.
  config.loss.name = "kl_distillation"
  if config.model.kind == "bi_encoder":
    # Listwise distillation with LLM-free candidates (Tamber et al. 2025):
    # the evaluate mode's dense + BM25 hybrid scores the candidates the
    # student itself retrieves, re-mined every epoch.
    config.loss.teacher = arg.teacher or "hybrid"
    # Hybrid scores are in [-1, 1]: x 15 spans the 30 logits of the
    # ensemble recipe below.
    config.loss.teacher_scale = 15.0
    # KL plus InfoNCE, equal weights.
    config.loss.infonce_weight = 1.0
    config.data.negatives = "dense"
    config.data.refresh_epochs = 1.0
    # The positive and 7 of its top 30 candidates per query.
    config.data.group_size = 8
    config.data.negative_depth = 30
  elif config.model.kind in ("splade", "inference_free"):
    # The inference-free LSR paper's heterogeneous ensemble: per-query
    # min-max normalised dense and sparse (BM25) teachers, averaged, x 30.
    config.loss.teacher = arg.teacher or "ensemble"
    config.loss.teacher_scale = 30.0
    # The positive and 3 BM25 negatives.
    config.data.group_size = 4
    if config.model.kind == "inference_free":
      config.loss.doc_regularizer = "idf_flops"
  elif config.model.kind == "cross_encoder":
    _cross_encoder_distill(config, arg)
  else:
    raise ValueError(
        "distill is for the bi-encoder, cross-encoder, splade and"
        " inference_free kinds"
    )


def _cross_encoder_distill(config, arg) -> None:
  """A re-ranker trained on the ranking it will re-rank: groups from the
  dense first stage's top 20, the hybrid teacher's scores over them (KL)
  plus InfoNCE, and the step picked on held-out training queries."""
  # The evaluate mode's dense + BM25 hybrid (0.731 on SciFact test).
  config.loss.teacher = arg.teacher or "hybrid"
  # As the bi-encoder's distillation: hybrid scores in [-1, 1] x 15.
  config.loss.teacher_scale = 15.0
  # KL plus InfoNCE over each group, equal weights.
  config.loss.infonce_weight = 1.0
  # Negatives from the first stage (config.model.pretrained).
  config.data.negatives = "dense"
  # Its top 20: the depth the evaluations re-rank.
  config.data.negative_depth = 20
  # The positive and 7 of its top 20.
  config.data.group_size = 8
  # 16 groups of 8: 128 pairs a step, as 32 groups of 4.
  config.train.batch_size = 16
  # A new head: a larger rate than the encoder fine-tunes alone take.
  config.optim.learning_rate = 1e-4
  if not arg.scifact:
    return
  # 100 of SciFact's 809 training queries select the step (never test).
  config.data.holdout_queries = 100
  # Re-ranking of those 100 queries' first stage (SciFact's train qrels).
  config.evals.holdout = _eval_block(
      f"{arg.shared}/scifact", "train", config.evals.scifact.measures
  )
  for ev in config.evals.values():
    ev.first_stage = "dense"
    ev.rerank_depth = 20
    ev.batch_size = 32
  # Only the held-out queries of that split.
  config.evals.holdout.queries = "holdout"
  # The learning curve: both collections every 20 steps.
  config.train.eval_every = 20
  # The held-out training queries pick the step.
  config.train.select_metric = "eval/holdout/ndcg@10"
  # A checkpoint at every evaluated step, all kept: the selected one is
  # the run's model (evaluate mode, export).
  config.checkpoint.every_steps = 20
  # Keep every checkpoint (about 270 MB each with Adam's moments).
  config.checkpoint.max_to_keep = 0
  if arg.first_stage == "bm25":
    # Groups from BM25's top 100, the ranking it will then re-rank.
    config.data.negatives = "bm25"
    # The depth the evaluations re-rank.
    config.data.negative_depth = 100
    for ev in config.evals.values():
      ev.first_stage = "bm25"
      ev.rerank_depth = 100
    # About 3 epochs of 51 steps: deeper lists need more steps.
    config.train.num_steps = 150
    # Re-ranking 100 candidates per query costs 4x the top 20's: fewer
    # evaluations.
    config.train.eval_every = 50
    # A checkpoint at every evaluated step.
    config.checkpoint.every_steps = 50


def _pretrain_smoke(config, arg) -> None:
  """Shipped data: LIMIT-small for cropping; ICT needs >= 2 sentences per
  document, which the tiny test fixture has (title + text), LIMIT not."""
  limit = str(common.REPO_ROOT / "data" / "limit-small")
  tiny = str(common.REPO_ROOT / "tests" / "fixtures" / "tiny_beir")
  # The corpus the pairs are cut from.
  config.data.path = tiny if arg.pretrain_ict else limit
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
  if config.model.kind == "revela":
    # Two documents x 2 chunks of 30 tokens; a 1-block LM of width 32.
    config.data.spans.chunks_per_doc = 2
    config.model.revela_lm.update(
        dict(
            num_layers=1,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            max_length=32,
        )
    )
  # LIMIT-small dev, 16 queries.
  config.evals = ml_collections.ConfigDict()
  # The evaluation of the smoke variants.
  config.evals.limit_dev = _eval_block(
      limit, "dev", ("ndcg@10",), max_queries=16, top_k=100
  )


def _learning_to_hash(config, arg) -> None:
  """BPR or JPQ (model.kind), trained on the chosen pairs; `adapt`: on
  pseudo-queries of a target corpus, distilled from the starting encoder."""
  if arg.bpr == arg.jpq:
    raise ValueError("name one of bpr and jpq")
  # A key of retrieval_jax.kinds.KINDS.
  config.model.kind = "bpr" if arg.bpr else "jpq"
  if arg.bpr:
    _bpr(config)
  else:
    _jpq(config)
  # Weight of the supervised ranking loss (BPR: its re-ranking InfoNCE; the
  # candidate loss on codes is always on; JPQ: config.loss.name on ADC).
  config.loss.ranking_weight = 1.0
  # Weight of margin-MSE against the frozen starting encoder (0 = none).
  config.loss.margin_mse_weight = 0.0
  # The teacher's cosines times this are the student's target margins.
  config.loss.margin_mse_teacher_scale = 1.0
  # Evaluated by experiments/lth (hashed / PQ index), not during training.
  config.evals = ml_collections.ConfigDict()
  # No zero-shot row here: experiments/lth has the untrained indexes.
  config.train.eval_before = False
  if arg.adapt:
    _adapt(config, arg)


def _bpr(config) -> None:
  """BPR's hash-layer settings and its untempered scores."""
  # HashNet's gamma: tanh(beta x) with beta = sqrt(1 + gamma * step) (BPR 0.1).
  config.model.bpr_hashnet_gamma = 0.1
  # Sign forward, d tanh(beta x) backward (False: train on tanh(beta x)).
  config.model.bpr_straight_through = True
  # BPR's losses take raw dot products (unit queries, +-1 codes).
  config.loss.temperature = 1.0


def _jpq(config) -> None:
  """JPQ's product quantiser and centroid learning rate."""
  # Sub-spaces M: 48 x 8 bits = 48 bytes per document, as BPR's 384 bits.
  config.model.jpq_subspaces = 48
  # Bits per sub-space code (2^nbits k-means centroids each).
  config.model.jpq_nbits = 8
  # Centroid learning rate / optim.learning_rate (Adam; 2 x 5e-5 = 1e-4,
  # the centroid rate of the GPL + JPQ reference scripts).
  config.model.jpq_centroid_lr_scale = 2.0
  # The encode mode's corpus_embeddings.npy of the starting encoder ("" =
  # embed the corpus at the start of the run).
  config.model.jpq_init = ""


def _adapt(config, arg) -> None:
  """GPL-style: pseudo-query pairs of the target corpus (experiments/lth/
  pseudo_queries.py: titles, sentences or crops of its documents, not
  generated queries), BM25 negatives, margin-MSE from the frozen teacher."""
  # The pseudo-query pairs file (written by experiments/lth/pseudo_queries).
  config.data.format = "pairs"
  # Its path: required (configs/train.py:...,pseudo_queries=FILE).
  config.data.path = arg.pseudo_queries
  # The target corpus the pseudo-queries come from.
  config.data.corpus_path = (
      str(common.REPO_ROOT / "data" / "limit-small")
      if arg.smoke
      else f"{arg.shared}/{arg.target}"
  )
  # One BM25 hard negative per pseudo-query: one margin each.
  config.data.negatives = "bm25"
  # Negatives from each pseudo-query's BM25 top 30 (its document excluded).
  config.data.negative_depth = 30
  # The positive and one negative.
  config.data.group_size = 2
  # One positive (the source document).
  config.data.max_positives = 1
  # A sentence or a title fits in 64 tokens.
  config.data.query_max_length = 64
  # Passages (student and teacher) read 128 tokens.
  config.data.passage_max_length = 128
  # Pseudo-queries per step.
  config.train.batch_size = 32
  # One pass over the pseudo-queries.
  config.train.num_steps = 0
  # Epochs over the pseudo-query pairs.
  config.train.num_epochs = 1.0
  # Save every N steps.
  config.checkpoint.every_steps = 50
  # The target has no labels: margin-MSE only (BPR keeps its code loss).
  config.loss.ranking_weight = 0.0
  # GPL's objective.
  config.loss.margin_mse_weight = 1.0
  # Teacher cosines to the student's units: <q, sign d> of a unit query is
  # about sqrt(2 D / pi) = 15.6 cosines at D = 384; ADC scores are cosines.
  config.loss.margin_mse_teacher_scale = 16.0 if arg.bpr else 1.0
  # GPL's rate is 2e-5 over 140k steps; a short run moves faster.
  config.optim.learning_rate = 5e-5


def _learning_to_hash_smoke(config, arg) -> None:
  """Two steps on LIMIT-small; JPQ with 8 x 4-bit codes (46 documents)."""
  # Two steps.
  config.train.num_steps = 2
  # Eight queries a step.
  config.train.batch_size = 8
  # Short pseudo-queries and passages.
  config.data.query_max_length = 16
  # 32 tokens.
  config.data.passage_max_length = 32
  if config.model.kind == "jpq":
    # 8 sub-spaces of 48 dims.
    config.model.jpq_subspaces = 8
    # 16 centroids each: k-means needs at least 16 of the 46 documents.
    config.model.jpq_nbits = 4


def _ar2(config, arg) -> None:
  """AR2 (retrieval_jax/kinds/ar2.py): a retriever and a cross-encoder
  ranker, trained in turn on groups of the retriever's own top-n."""
  # A key of retrieval_jax.kinds.KINDS.
  config.model.kind = "ar2"
  # The ranker's score head: "cls" or "emb" (as for cross_encoder).
  config.model.head = arg.head
  # Ids per (query, passage) row of the ranker, specials included.
  config.data.pair_max_length = 128 if arg.scifact else 192
  # The groups' negatives: the retriever's own top-n (mined with it).
  config.data.negatives = "dense"
  # The positive and n = 7 retrieved negatives per query.
  config.data.group_size = 8
  # Exactly the top-n: depth n = group_size - 1 (a deeper list samples n).
  config.data.negative_depth = 7
  # One positive per group (the ranker's reward reads slot 0).
  config.data.max_positives = 1
  # Re-encode the corpus with the retriever every cycle of both phases.
  config.data.refresh_steps = 20
  # Queries per step (each with 8 passages and 8 ranker pairs).
  config.train.batch_size = 16
  config.ar2 = ml_collections.ConfigDict()
  # "ranker" or "retriever": the phase of steps 0 .. its length - 1 (the
  # authors' code starts with the ranker).
  config.ar2.first_phase = "ranker"
  # Ranker steps per cycle (the authors': 500 of a 2,000-step cycle).
  config.ar2.ranker_steps = 10
  # Retriever steps per cycle.
  config.ar2.retriever_steps = 10
  # The ranker's peak learning rate (0 = optim.learning_rate, the
  # retriever's); each model warms up and decays over its own steps.
  config.ar2.ranker_learning_rate = 5e-5
  # p_D = softmax(ranker scores / this) in both KL terms.
  config.ar2.ranker_temperature = 1.0
  # Ranker loss = InfoNCE + this x KL(p_G || p_D) (0: the authors' code,
  # whose ranker trains on cross-entropy alone).
  config.ar2.ranker_kl_weight = 0.0
  # Retriever loss = this x KL(p_D || p_G) + infonce_weight x InfoNCE
  # + adv_weight x the reward-weighted log p_G term.
  config.ar2.retriever_kl_weight = 1.0
  # The retriever's InfoNCE (in-batch and hard negatives).
  config.ar2.infonce_weight = 1.0
  # The authors' code's adversarial term (their adv_lambda, 0.5 with their
  # cross-entropy at 0.5); 0 = off.
  config.ar2.adv_weight = 0.0
  # Warm start of the retriever: a bi-encoder train workdir ("" = none).
  config.ar2.retriever_init = ""
  # Warm start of the ranker: a cross-encoder train workdir, same head.
  config.ar2.ranker_init = ""
  # The retriever's rate (the ranker's is ar2.ranker_learning_rate).
  config.optim.learning_rate = 2e-5
  # Two passes when num_steps is 0 (scifact: 919 pairs, 116 steps).
  config.train.num_epochs = 2.0
  for ev in config.evals.values():
    # The ranker re-ranks the retriever's top 20 ("eval/<name>_ranker/").
    ev.rerank_depth = 20


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
      distill=False,
      tevatron=False,
      splade=False,
      inference_free=False,
      colbert=False,
      pretrain_crop=False,
      pretrain_ict=False,
      pretrain_revela=False,
      moco="",
      bpr=False,
      jpq=False,
      ar2=False,
      first_stage="",
      adapt=False,
      target="scifact",
      pseudo_queries="",
      seed=0,
      shared=str(common.REPO_ROOT.parent / "shared" / "data"),
  )
  if arg.first_stage not in ("", "dense", "bm25"):
    raise ValueError(f"first_stage={arg.first_stage}: expected dense or bm25")
  if arg.first_stage and not (
      arg.scifact and arg.cross_encoder and arg.distill
  ):
    raise ValueError("first_stage=... is for scifact,cross_encoder,distill")
  limit = str(common.REPO_ROOT / "data" / "limit-small")
  config = ml_collections.ConfigDict()

  config.model = common.model_block()
  # Retriever kind, a key of retrieval_jax.kinds.KINDS: "bi_encoder" |
  # "cross_encoder" | "splade" | "inference_free" | "colbert".
  config.model.kind = "bi_encoder"
  # Dropout while training (the checkpoint's rates; off in evaluation).
  config.model.dropout = True

  config.data = ml_collections.ConfigDict()
  # "beir": a BEIR directory's qrels split; "pairs": a pairs JSONL file;
  # "tevatron": a Tevatron JSONL file (query, positive / negative passages).
  config.data.format = "beir"
  # BEIR directory (format beir) or pairs file (format pairs).
  config.data.path = limit
  # Qrels split with the training judgments (format beir).
  config.data.train_split = "train"
  # BEIR directory whose corpus.jsonl supplies negatives ("" = data.path).
  config.data.corpus_path = ""
  # Hard negatives: "bm25" (bm25s, Lucene BM25), "dense" (the starting
  # encoder), "none" (in-batch negatives only), "file" (a Tevatron file's).
  config.data.negatives = "bm25"
  # "dense" negatives: re-mine with the model being trained every N epochs
  # (fractions allowed; 0 = mine once, with the starting encoder).
  config.data.refresh_epochs = 0.0
  # Or every N steps (0 = refresh_epochs decides); one of the two is 0.
  config.data.refresh_steps = 0
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
  # Training queries left out of training (drawn by data.seed) and
  # evaluated by the config.evals block with queries="holdout": model
  # selection without the test queries (0 = none).
  config.data.holdout_queries = 0

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
  # A teacher whose score of every (query, passage) row a distillation loss
  # (kl_distillation, listnet, listmle, approx_ndcg, wasserstein_list,
  # margin_mse) fits: "" none (cross-encoders then train the list losses on
  # 1/0 labels), "bm25", "hybrid", "dense", "cross_encoder", "ensemble",
  # "file" (see retrieval_jax/teachers.py). Targets are the scores times
  # teacher_scale (softmax logits for kl_distillation).
  config.loss.teacher = arg.teacher
  # Multiplies the teacher's scores (BM25's run to about 30 on SciFact).
  config.loss.teacher_scale = 1.0
  # The "dense" / "cross_encoder" teacher (required), the dense half of
  # "hybrid" / "ensemble" ("" = model.pretrained): a train workdir or model.
  config.loss.teacher_workdir = ""
  # The sparse half of "ensemble": a SPLADE train workdir or checkpoint
  # ("" = BM25).
  config.loss.teacher_sparse_workdir = ""
  # With a teacher: plus this times InfoNCE over the batch (0 = off).
  config.loss.infonce_weight = 0.0

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
  # Model selection: "eval/<block>/<measure>" (e.g. of the held-out
  # training queries) picks the best evaluated step, reported as
  # "selected" in results.json and kept in <workdir>/selection.json with
  # the learning curve ("" = off).
  config.train.select_metric = ""
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
  # Another run's checkpoint directory to start from (params only; the step
  # its run's model selection picked, else its latest).
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
      # Document regulariser: "flops", or "idf_flops" (IDF-aware FLOPS of
      # the score contributions, idf of the training corpus).
      config.loss.doc_regularizer = "flops"
      # Quadratic warm-up of both weights over this many steps.
      config.loss.flops_warmup_steps = 20

  if arg.distill:
    _distill(config, arg)

  if arg.tevatron:
    # A Tevatron file: its negatives are the hard negatives and its scores
    # the teacher; no corpus besides the file's passages.
    config.data.format = "tevatron"
    config.data.path = str(
        common.REPO_ROOT / "tests" / "fixtures" / "tevatron" / "train.jsonl"
    )
    config.data.negatives = "file"
    config.loss.name = "kl_distillation"
    config.loss.teacher = "file"

  if arg.pretrain_crop or arg.pretrain_ict or arg.pretrain_revela:
    _pretrain(config, arg)

  if arg.bpr or arg.jpq:
    _learning_to_hash(config, arg)

  if arg.ar2:
    _ar2(config, arg)

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
    if arg.distill:
      # Groups of 4 from the top 5; re-mined after 2 of the 4 steps.
      config.data.group_size = 4
      if config.model.kind == "bi_encoder":
        config.data.refresh_epochs = 0.01
    if arg.tevatron:
      # The fixture's 4 queries, each with 2 given negatives.
      config.data.group_size = 3
      config.train.batch_size = 4
    if arg.pretrain_crop or arg.pretrain_ict or arg.pretrain_revela:
      _pretrain_smoke(config, arg)
    if arg.bpr or arg.jpq:
      _learning_to_hash_smoke(config, arg)
    if arg.ar2:
      # Step 0 trains the retriever; its top 2 are re-mined; step 1 trains
      # the ranker on them. Every loss term on.
      config.train.num_steps = 2
      config.data.group_size = 3
      config.data.negative_depth = 2
      config.data.pair_max_length = 48
      config.data.refresh_steps = 1
      config.checkpoint.every_steps = 1
      config.ar2.first_phase = "retriever"
      config.ar2.ranker_steps = 1
      config.ar2.retriever_steps = 1
      config.ar2.ranker_kl_weight = 0.5
      config.ar2.adv_weight = 0.5
      for ev in config.evals.values():
        ev.rerank_depth = 5

  config.lock()
  return config
