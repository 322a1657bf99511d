r"""Discrete key-value bottleneck experiments (models/key_value_memory.py).

Variants (`experiments/kv_memory/config.py:<variant>`; README.md beside it):

* `digits` (the default): class-incremental learning on scikit-learn's
  bundled 8x8 digits (10 classes as 5 stages of 2, no replay, no task
  boundaries): DKVB vs a linear probe and an MLP trained the same way; a
  table of per-stage and final accuracy. Under a minute on CPU; needs
  scikit-learn (`pip install -e '.[experiments]'`):

    python -m experiments.kv_memory.run \
        --config experiments/kv_memory/config.py --workdir /tmp/rj_kv_digits

  Expected: final all-class accuracy 0.948 (DKVB), 0.676 (linear), 0.285
  (MLP).

* `toy`: the same on 8 Gaussian classes in 2-D (4 stages of 2), seconds.

* `retrieval`: DKVB vs a linear adapter over frozen all-MiniLM-L6-v2 query
  embeddings, trained on SciFact's training queries, then on LIMIT-small's;
  nDCG@10 of both held-out sets after each stage (needs ../shared/data):

    python -m experiments.kv_memory.run \
        --config experiments/kv_memory/config.py:retrieval \
        --workdir /tmp/rj_kv_retrieval

  Expected: DKVB keeps 97 % of its SciFact nDCG@10 gain, linear 83 %.

* `smoke`: fewer steps and smaller memories (with `retrieval`: LIMIT-small
  then LIMIT-small's dev queries, max length 32).

Writes results.json, table.md and accuracy.png/.svg (retrieval:
retrieval.json and retrieval.md) to the workdir and prints the table.
"""

import ml_collections

from configs import common


def _collection(
    name: str, path: str, train_split: str, test_split: str
) -> ml_collections.ConfigDict:
  block = ml_collections.ConfigDict()
  # Short name for tables and cache files.
  block.name = name
  # BEIR directory.
  block.path = path
  # Qrels split the adapter trains on.
  block.train_split = train_split
  # Qrels split evaluated after each stage.
  block.test_split = test_split
  return block


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks `digits` / `toy` / `retrieval`, `smoke`."""
  arg = common.parse_arg(
      arg,
      digits=False,
      toy=False,
      retrieval=False,
      smoke=False,
      shared=str(common.REPO_ROOT.parent / "shared" / "data"),
  )
  config = ml_collections.ConfigDict()
  # "digits", "toy" (class-incremental) or "retrieval" (query adapter).
  config.experiment = (
      "retrieval" if arg.retrieval else "toy" if arg.toy else "digits"
  )

  config.kv = ml_collections.ConfigDict()
  # Codebooks (heads) C, each a random projection of the input.
  config.kv.num_heads = 128
  # Keys (and value rows) per codebook, M.
  config.kv.num_keys = 128
  # Key width d_k.
  config.kv.key_dim = 8
  # Full-batch EMA k-means steps for the keys (on unlabelled inputs).
  config.kv.ema_steps = 50
  # EMA decay of the key statistics.
  config.kv.ema_decay = 0.9
  # SGD steps per 2-class stage (every learner).
  config.kv.steps_per_stage = 1000
  # Rows per SGD step.
  config.kv.batch_size = 32
  # SGD learning rate (DKVB: times num_heads, the mean over heads' 1/C).
  config.kv.learning_rate = 0.1
  # MLP hidden width.
  config.kv.hidden = 64
  # Learners to compare: "dkvb", "linear", "mlp".
  config.kv.learners = ("dkvb", "linear", "mlp")
  # Model initialisation, key initialisation, data split and batch draws.
  config.kv.seed = 0
  if arg.toy:
    # The 2-D toy: 16 heads of 64 keys in 2-D.
    config.kv.num_heads, config.kv.num_keys, config.kv.key_dim = 16, 64, 2

  config.retrieval = ml_collections.ConfigDict()
  # The frozen bi-encoder (packaged name or directory).
  config.retrieval.encoder = "all-MiniLM-L6-v2"
  # Its token budget per text.
  config.retrieval.max_length = 256
  # Collections in training order; the first one's retention is measured.
  config.retrieval.collections = (
      _collection("scifact", f"{arg.shared}/scifact", "train", "test"),
      _collection(
          "limit-small",
          str(common.REPO_ROOT / "data" / "limit-small"),
          "train",
          "dev",
      ),
  )
  # Adapters to compare: "dkvb" (key-value memory) and "linear".
  config.retrieval.adapters = ("dkvb", "linear")
  # DKVB codebooks over the 384-d query embedding.
  config.retrieval.num_heads = 64
  # Keys per codebook.
  config.retrieval.num_keys = 256
  # Key width.
  config.retrieval.key_dim = 8
  # EMA k-means steps and decay for the keys.
  config.retrieval.ema_steps = 30
  # EMA decay.
  config.retrieval.ema_decay = 0.9
  # Adam learning rate (both adapters).
  config.retrieval.learning_rate = 1e-3
  # Optimizer steps per collection.
  config.retrieval.steps = 300
  # Queries per step.
  config.retrieval.batch_size = 32
  # Softmax temperature over cosine scores.
  config.retrieval.temperature = 0.05
  # Seed of the keys and the batch draws.
  config.retrieval.seed = 0

  config.mesh = common.mesh_block()

  if arg.smoke:
    config.kv.steps_per_stage = 100
    config.kv.num_heads = min(config.kv.num_heads, 32)
    config.kv.num_keys = 32
    config.kv.ema_steps = 10
    limit = str(common.REPO_ROOT / "data" / "limit-small")
    config.retrieval.collections = (
        _collection("limit-a", limit, "train", "dev"),
        _collection("limit-b", limit, "dev", "test"),
    )
    config.retrieval.max_length = 32
    config.retrieval.steps = 20
    config.retrieval.num_heads = 8
    config.retrieval.num_keys = 16

  config.lock()
  return config
