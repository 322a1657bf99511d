r"""Learning-to-hash (BPR, JPQ) as compressed indexes on SciFact and Cranfield.

Trains (or reuses) each run of `config.runs` with configs/train.py, then
searches the judged test queries of its datasets with the run's index
(`Kind.build_index`) next to the untrained baselines of
experiments/compression, scored by the evaluate mode's metrics
(README.md here):

  python -m experiments.lth.run \
      --config experiments/lth/config.py --workdir /tmp/rj_lth

The full run takes about 3 h on 2 CPU cores (README.md, "To run").
Arguments (`config.py:smoke`): smoke = LIMIT-small
(shipped), 2-step trainings of each run, 16 queries: minutes on CPU.
"""

import ml_collections

from configs import common
from configs import evaluate


def _run(train_arg: str, datasets, label: str, adapt: str = "", overrides=()):
  run = ml_collections.ConfigDict()
  # configs/train.py argument of the training (kind and data).
  run.train_arg = train_arg
  # Datasets (keys of config.datasets) its index is evaluated on.
  run.datasets = tuple(datasets)
  # Table label.
  run.label = label
  # Domain adaptation: the dataset whose corpus gives the pseudo-queries.
  run.adapt = adapt
  # Training config overrides, "key=value" (a Python literal), in order.
  run.overrides = tuple(overrides)
  return run


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The evaluate config plus the runs, datasets and baselines."""
  arg = common.parse_arg(
      arg, smoke=False, shared=str(common.REPO_ROOT.parent / "shared" / "data")
  )
  config = evaluate.get_config("smoke" if arg.smoke else None)
  config.unlock()
  # BEIR directories by name; each run names the ones it is evaluated on.
  config.datasets = ml_collections.ConfigDict({
      "scifact": f"{arg.shared}/scifact",
      "cranfield": f"{arg.shared}/cranfield",
  })
  # Queries searched one at a time for ms/query, after one warm-up query.
  config.latency_queries = 100
  # faiss OpenMP threads (1: comparable with one-core JAX search).
  config.faiss_threads = 1
  # BPR: Hamming candidates re-ranked with the float query (also the
  # untrained sign baseline's).
  config.rerank_depth = 1000
  # The untrained PQ baseline's sub-spaces and bits (JPQ's defaults).
  config.pq = ml_collections.ConfigDict({"m": 48, "nbits": 8})
  # Pseudo-queries of a target corpus (experiments/lth/pseudo_queries.py).
  config.pseudo_queries = ml_collections.ConfigDict()
  # "title" | "sentence" | "crop": pieces of the documents, not generated.
  config.pseudo_queries.method = "sentence"
  # Pseudo-queries per document.
  config.pseudo_queries.per_doc = 1
  # Seed of the sentence / crop draws.
  config.pseudo_queries.seed = 0
  # The trainings; names are their workdirs' (<workdir>/runs/<name>).
  config.runs = ml_collections.ConfigDict()
  r = config.runs
  # BPR on SciFact's train pairs (1 BM25 negative), both test sets.
  r.bpr = _run(
      "scifact,bpr", ("scifact", "cranfield"), "BPR (SciFact train pairs)"
  )
  # JPQ on SciFact's train pairs: its own codes on SciFact; Cranfield's
  # documents (starting encoder) assigned to its trained centroids.
  r.jpq = _run(
      "scifact,jpq", ("scifact", "cranfield"), "JPQ (SciFact train pairs)"
  )
  # BPR trained three times as long (87 steps): does its hashed index come
  # closer to its own float32 search?
  r.bpr_3ep = _run(
      "scifact,bpr",
      ("scifact", "cranfield"),
      "BPR (SciFact train pairs, 3 epochs)",
      overrides=("train.num_epochs=3.0",),
  )
  # GPL-style adaptation on each target's own corpus, no labels.
  r.bpr_adapt_scifact = _run(
      "bpr,adapt,target=scifact",
      ("scifact",),
      "BPR + adaptation (SciFact pseudo-queries)",
      adapt="scifact",
  )
  # The same on Cranfield.
  r.bpr_adapt_cranfield = _run(
      "bpr,adapt,target=cranfield",
      ("cranfield",),
      "BPR + adaptation (Cranfield pseudo-queries)",
      adapt="cranfield",
  )
  # JPQ adapted to SciFact.
  r.jpq_adapt_scifact = _run(
      "jpq,adapt,target=scifact",
      ("scifact",),
      "JPQ + adaptation (SciFact pseudo-queries)",
      adapt="scifact",
  )
  # JPQ adapted to Cranfield.
  r.jpq_adapt_cranfield = _run(
      "jpq,adapt,target=cranfield",
      ("cranfield",),
      "JPQ + adaptation (Cranfield pseudo-queries)",
      adapt="cranfield",
  )
  # Runs trained and tabulated, in this order (keys of config.runs).
  config.order = (
      "bpr",
      "jpq",
      "bpr_3ep",
      "bpr_adapt_scifact",
      "bpr_adapt_cranfield",
      "jpq_adapt_scifact",
      "jpq_adapt_cranfield",
  )
  if arg.smoke:
    limit = str(common.REPO_ROOT / "data" / "limit-small")
    config.datasets = ml_collections.ConfigDict({"limit-small": limit})
    config.data.max_queries = 16
    config.latency_queries = 4
    config.rerank_depth = 20
    config.pq.update(m=8, nbits=4)  # 46 documents: 16 centroids each
    # LIMIT's documents are one sentence each: crops.
    config.pseudo_queries.method = "crop"
    config.runs = ml_collections.ConfigDict()
    for kind in ("bpr", "jpq"):
      config.runs[kind] = _run(
          f"{kind},smoke", ("limit-small",), f"{kind.upper()} (smoke)"
      )
      config.runs[f"{kind}_adapt"] = _run(
          f"{kind},adapt,smoke",
          ("limit-small",),
          f"{kind.upper()} + adaptation (smoke)",
          adapt="limit-small",
      )
    config.order = ("bpr", "jpq", "bpr_adapt", "jpq_adapt")
  config.lock()
  return config
