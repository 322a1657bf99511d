r"""Self-supervised pretraining of a small retriever (README.md here).

(a) BM25 and an untrained small BERT (random init, MiniLM's vocabulary)
zero-shot on SciFact and Cranfield test; (b) that model pretrained from
random init with ICT, cropping + MoCo and Revela on the union of the
shipped corpora; (c) all-MiniLM-L6-v2 further pretrained (cropping + MoCo)
on SciFact's corpus against the untouched model. Every step is a printed
`retrieval_jax.main` command, skipped when its workdir is finished:

  python -m experiments.pretraining.run \
      --config experiments/pretraining/config.py --workdir /tmp/rj_pretraining

Arguments (`config.py:smoke`): smoke = the whole runner with 4 training
steps per run and evaluations at max length 64 on 32 queries per set
(every corpus is still encoded).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The runs of the comparison; `arg`: smoke, shared=DIR."""
  arg = common.parse_arg(
      arg, smoke=False, shared=str(common.REPO_ROOT.parent / "shared" / "data")
  )
  config = ml_collections.ConfigDict()
  # The shared collections (configs/train.py's `shared=`: its evals' paths).
  config.shared = arg.shared
  # Zero-shot test collections (BEIR directories), in the table's column
  # order; a column is named by its directory.
  config.eval_sets = (f"{arg.shared}/scifact", f"{arg.shared}/cranfield")
  # Corpora written once, ids prefixed by their directory's name, to
  # <workdir>/union/corpus.jsonl: the from-scratch runs pretrain on it.
  config.union = (
      f"{arg.shared}/scifact",
      f"{arg.shared}/cranfield",
      str(common.REPO_ROOT / "data" / "limit-small"),
  )

  # The small model, written once (random init) to <workdir>/small_random
  # as a sentence-transformers directory (mean pooling, normalised).
  config.small = ml_collections.ConfigDict()
  # Transformer layers.
  config.small.num_layers = 4
  # Width.
  config.small.hidden_size = 256
  # Attention heads.
  config.small.num_heads = 4
  # Feed-forward width.
  config.small.intermediate_size = 1024
  # Seed of the random initialisation (BERT's: normal(0, 0.02)).
  config.small.seed = 0
  # Checkpoint whose vocabulary, tokenizer and config the model takes.
  config.small.template = "all-MiniLM-L6-v2"

  # (b) pretraining from random init (configs/train.py:pretrain_<x>).
  config.scratch = ml_collections.ConfigDict()
  # Objectives, in order: "ict", "crop" (+ MoCo), "revela".
  config.scratch.objectives = ("ict", "crop", "revela")
  # Optimizer steps per run (README.md, second table; about 3 CPU-s a step).
  config.scratch.num_steps = 600
  # Peak learning rate (10 % warm-up, linear decay): from scratch.
  config.scratch.learning_rate = 5e-4
  # Checkpoint every N steps (a killed run resumes from there).
  config.scratch.checkpoint_every = 100
  # Extra `--config.` overrides per objective ("key=value").
  config.scratch.overrides = ml_collections.ConfigDict()
  # ICT: 64 pairs a step.
  config.scratch.overrides.ict = ("train.batch_size=64",)
  # Cropping + MoCo: 64 pairs a step, a queue of 16 batches.
  config.scratch.overrides.crop = (
      "train.batch_size=64",
      "model.moco_queue_size=1024",
  )
  # Revela: 32 chunks of 62 tokens (8 documents x 4) a step.
  config.scratch.overrides.revela = ("train.batch_size=32",)

  # (c) continued pretraining of all-MiniLM-L6-v2 on SciFact's corpus.
  config.continued = ml_collections.ConfigDict()
  # "crop" (+ MoCo, Contriever) or "ict".
  config.continued.objective = "crop"
  # The pretrained checkpoint.
  config.continued.pretrained = "all-MiniLM-L6-v2"
  # Corpus of the continued pretraining.
  config.continued.corpus = f"{arg.shared}/scifact"
  # Optimizer steps (0.6 epochs of SciFact's corpus at batch 32).
  config.continued.num_steps = 100
  # Peak learning rate (Contriever's for a pretrained BERT).
  config.continued.learning_rate = 5e-5
  # Checkpoint every N steps.
  config.continued.checkpoint_every = 50

  # The evaluate mode's settings for every row.
  config.evaluate = ml_collections.ConfigDict()
  # Tokens per text.
  config.evaluate.max_length = 256
  # Judged queries per set (0 = all).
  config.evaluate.max_queries = 0
  # Documents retrieved per query.
  config.evaluate.top_k = 1000

  # Devices of the runner itself (it builds the random checkpoint).
  config.mesh = common.mesh_block()

  if arg.smoke:
    config.scratch.num_steps = 4
    config.scratch.checkpoint_every = 2
    config.continued.num_steps = 4
    config.continued.checkpoint_every = 2
    config.evaluate.max_length = 64
    config.evaluate.max_queries = 32
    config.evaluate.top_k = 100

  config.lock()
  return config
