r"""Vector compression baselines on SciFact and Cranfield (README.md here).

Every method indexes the same all-MiniLM-L6-v2 embeddings (the evaluate
mode's dense cache, `configs/evaluate.py`), searches the judged test queries
for the top 1,000 and is scored by the evaluate mode's trec_eval-compatible
metrics:

  python -m experiments.compression.run \
      --config experiments/compression/config.py --workdir /tmp/rj_compress

Expected (README.md, SciFact nDCG@10): float32 exact 0.6451; PCA-128
0.6283 (3x smaller); PQ m=48 0.6282 and sign bits + re-rank 0.6228 (both
48 B/doc, 32x smaller); sign bits alone 0.5864; HNSW 0.6451.

Arguments (`config.py:smoke`): smoke = LIMIT-small (shipped), 16 queries,
max length 32, small PCA / PQ / IVF settings: a minute on CPU.
"""

import ml_collections

from configs import common
from configs import evaluate


def _method(kind: str, **params) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(kind=kind, **params))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The evaluate config plus the datasets and index methods to compare."""
  arg = common.parse_arg(
      arg, smoke=False, shared=str(common.REPO_ROOT.parent / "shared" / "data")
  )
  config = evaluate.get_config("smoke" if arg.smoke else None)
  config.unlock()
  # BEIR directories searched one after the other (names or paths).
  config.datasets = (f"{arg.shared}/scifact", f"{arg.shared}/cranfield")
  # Queries searched one at a time for ms/query, after one warm-up query.
  config.latency_queries = 100
  # faiss OpenMP threads (1: comparable with one-core JAX search).
  config.faiss_threads = 1
  # Each method: a `search.compression.INDEXES` kind and that kind's
  # parameters; its index is saved under <workdir>/<dataset>/<name>/ and
  # reused by a rerun while its content key matches (as the evaluate
  # mode's config.retriever.index).
  config.methods = ml_collections.ConfigDict()
  m = config.methods
  # float32 exact search (the reference row).
  m.flat = _method("flat")
  # PCA to 128 dimensions, fitted on the corpus.
  m.pca128 = _method("pca", dims=128)
  # Product quantisation, 48 sub-vectors x 8 bits (faiss IndexPQ, ADC).
  m.pq48 = _method("pq", m=48, nbits=8)
  # The same codes searched by the library's JAX ADC (JPQ's search).
  m.pq48_jax = _method("pq", m=48, nbits=8, engine="jax")
  # Sign bits of each dimension, Hamming search only.
  m.sign = _method("sign", rerank_depth=0)
  # BPR's second stage on untrained codes: <q, sign d> over the top 1000.
  m.sign_rerank = _method("sign", rerank_depth=1000)
  # faiss HNSW over float32 vectors.
  m.hnsw = _method("hnsw", m=32, ef_search=128)
  # faiss IVF-PQ: sqrt(N) lists, the PQ48 codes, 8 lists probed.
  m.ivf_pq = _method("ivf_pq", m=48, nbits=8, nprobe=8)
  # The methods run and tabulated, in this order (keys of config.methods).
  config.order = (
      "flat",
      "pca128",
      "pq48",
      "pq48_jax",
      "sign",
      "sign_rerank",
      "hnsw",
      "ivf_pq",
  )
  if arg.smoke:
    config.datasets = (str(common.REPO_ROOT / "data" / "limit-small"),)
    config.data.max_queries = 16
    config.latency_queries = 4
    m.pca128.dims = 16
    for name in ("pq48", "pq48_jax"):
      m[name].update(m=8, nbits=4)  # 46 documents: 16 centroids each
    m.sign_rerank.rerank_depth = 20
    m.ivf_pq.update(m=8, nbits=4, nprobe=2)
  config.lock()
  return config
