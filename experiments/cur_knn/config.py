r"""CUR k-NN search for a cross-encoder: recall of the exact top-k per budget.

annCUR and adaptive CUR (ADACUR) against dual-encoder and BM25 retrieve +
re-rank on SciFact (README.md beside this file). First train the
cross-encoder, then run the experiment on its workdir:

  python -m retrieval_jax.main \
      --config configs/train.py:scifact,cross_encoder --workdir /tmp/rj_ce
  python -m experiments.cur_knn.run --config experiments/cur_knn/config.py \
      --config.cross_encoder.workdir=/tmp/rj_ce --workdir /tmp/rj_cur

Expected (README.md): adaptive CUR finds 0.903 of the exact top 10 with 100
CE calls per query (dual encoder + re-rank 0.617, BM25 + re-rank 0.427).

Scoring the exact matrices is the cost: (anchor + test queries) × items
cross-encoder pairs, 40,000 by default (about 25 minutes on 2 CPU cores at
13 pairs/s/core); a stopped run resumes from <workdir>/scores.npz.

Arguments (`experiments/cur_knn/config.py:a=1,b`):
  smoke      4 test and 8 anchor queries, 60 items: a minute or two
  shared=DIR where the shared collections live (default ../shared/data)
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` selects variants (see docstring)."""
  arg = common.parse_arg(
      arg, smoke=False, shared=str(common.REPO_ROOT.parent / "shared" / "data")
  )
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  # BEIR directory with corpus, queries, and test and train qrels.
  config.data.path = f"{arg.shared}/scifact"
  # Qrels split of the test queries (their relevant docs join the items).
  config.data.test_split = "test"
  # Qrels split the anchor queries are drawn from (disjoint from the test).
  config.data.train_split = "train"

  config.subset = ml_collections.ConfigDict()
  # Test queries (a seeded sample of the judged ones).
  config.subset.num_test_queries = 30
  # Anchor queries: the rows of R (k_q), from the training split.
  config.subset.num_anchor_queries = 50
  # Items: the test queries' relevant docs plus a seeded sample of the rest.
  config.subset.num_items = 500
  # Seed of the three samples.
  config.subset.seed = 0

  config.cross_encoder = ml_collections.ConfigDict()
  # Workdir of a configs/train.py:...,cross_encoder run (its checkpoints/).
  config.cross_encoder.workdir = ""
  # Pairs per scorer call (split over the mesh's data axis).
  config.cross_encoder.batch_size = 32
  # Query rows scored between two saves of scores.npz.
  config.cross_encoder.chunk_queries = 4

  config.dual_encoder = ml_collections.ConfigDict()
  # The bi-encoder of the "dual encoder + re-rank" baseline.
  config.dual_encoder.pretrained = "all-MiniLM-L6-v2"
  # Its token budget per text.
  config.dual_encoder.max_length = 256

  config.search = ml_collections.ConfigDict()
  # CE calls per test query.
  config.search.budgets = (50, 100, 150, 200, 300)
  # Top-k recall against the exact cross-encoder, for each k.
  config.search.ks = (1, 10)
  # annCUR's anchor items k_i = fraction x budget (k_r = the rest).
  config.search.anchor_fractions = (0.25, 0.5)
  # ADACUR's rounds of anchor selection.
  config.search.rounds = 5
  # Seed of the random anchor items.
  config.search.seed = 0

  config.mesh = common.mesh_block()

  if arg.smoke:
    config.subset.num_test_queries = 4
    config.subset.num_anchor_queries = 8
    config.subset.num_items = 60
    config.search.budgets = (10, 20, 40)
    config.search.rounds = 2

  config.lock()
  return config
