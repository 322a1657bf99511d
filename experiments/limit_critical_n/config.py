r"""LIMIT: the embedding-dimension analysis and LIMIT retrieval evaluation.

Variants (README.md beside this file):

* `critical_n` (the default): the free-embedding critical-n search of "On
  the Theoretical Limitations of Embedding-Based Retrieval" (Weller et al.,
  2025) over `config.dims`, with the paper's protocol (all k-subsets as
  queries, unit vectors, InfoNCE at T = 0.1, Adam 0.01, seed 42), a cubic
  fit and a plot:

    python -m experiments.limit_critical_n.run \
        --config experiments/limit_critical_n/config.py \
        --workdir /tmp/rj_limit --config.dims=4,5,6,7,8

  Writes critical_n.json, summary.json and critical_n.png/.svg to the
  workdir and prints a table. Expected (seed 42, CPU): critical n 9, 14, 19
  at d = 4, 5, 6; about a minute for d = 4 ... 8 on 2 cores.

* `evaluate`: any encoder on LIMIT-small (shipped) or LIMIT (a local copy,
  `--config.data.path=...`) through the library's evaluate mode, reporting
  Recall@2/10/100:

    python -m experiments.limit_critical_n.run \
        --config experiments/limit_critical_n/config.py:evaluate \
        --workdir /tmp/rj_limit_eval

  Expected with all-MiniLM-L6-v2: LIMIT-small Recall@2 = 0.162.

* `smoke`: d = 2 ... 5 with a 1,000-iteration cap, seconds (with `evaluate`:
  64 queries).
"""

import ml_collections

from configs import common
from configs import evaluate as evaluate_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks `critical_n` / `evaluate`, `smoke`."""
  arg = common.parse_arg(arg, critical_n=False, evaluate=False, smoke=False)
  if arg.evaluate:
    config = evaluate_config.get_config("smoke" if arg.smoke else None)
    config.unlock()
    # LIMIT's main measure is Recall@2 (MTEB's main score), then @10, @100.
    config.eval.measures = ("recall@2", "recall@10", "recall@100", "ndcg@10")
    config.lock()
    return config

  config = ml_collections.ConfigDict()
  # Embedding dimensions to search (`--config.dims=4,5,6`).
  config.dims = (4, 5, 6, 7, 8)
  # Relevant documents per query; the queries are all k-subsets of n docs.
  config.k = 2
  # Seeds of the initial embeddings; one search per (d, seed).
  config.seeds = (42,)

  config.protocol = ml_collections.ConfigDict()
  # Adam step size.
  config.protocol.learning_rate = 0.01
  # InfoNCE temperature.
  config.protocol.temperature = 0.1
  # Most updates per run.
  config.protocol.max_iterations = 100_000
  # Top-k accuracy is checked every this many updates (and stops at 100 %).
  config.protocol.log_interval = 50
  # Updates without a loss improvement of more than min_delta before a run
  # stops as unsolved.
  config.protocol.patience = 1_000
  # Smallest loss decrease that counts as an improvement.
  config.protocol.min_delta = 1e-5

  config.search = ml_collections.ConfigDict()
  # Gallop start per dimension, in config.dims order (() = paper's fit).
  config.search.start_n = ()
  # Offsets around the critical n also run, for reporting (as released).
  config.search.sweep = (-4, 5)
  # Outcomes looked ahead per round (runs more n per call, fewer rounds).
  config.search.speculate = 1
  # Most runs per batched call.
  config.search.max_batch = 64
  # Print the number of unfinished runs every this many updates (0: off).
  config.search.progress_every = 10_000

  config.output = ml_collections.ConfigDict()
  # Dimensions the fitted cubic is extrapolated to.
  config.output.extrapolate = (512, 768, 1024, 3072, 4096)

  config.mesh = common.mesh_block()
  # The runs share one device; their batch is too small to split.
  config.mesh.cpu_devices = 1

  if arg.smoke:
    config.dims = (2, 3, 4, 5)
    config.protocol.max_iterations = 1_000
    config.search.sweep = (0, 1)
    config.search.progress_every = 0
  config.lock()
  return config
