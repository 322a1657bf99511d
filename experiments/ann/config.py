r"""ANN benchmark at 1M x 384: exact search vs faiss HNSW and IVF-PQ.

Seeded clustered unit vectors (a Gaussian mixture), held-out queries drawn
the same way, exact top-10 ground truth; then faiss IndexFlatIP and the
library's JAX exact search (QPS), and faiss HNSW / IVF-PQ through
retrieval_jax/search/compression.py (recall@10 against exact, QPS per
efSearch / nprobe), with build times and index bytes (README.md here):

  OMP_NUM_THREADS=1 taskset -c 0 python -m experiments.ann.run \
      --config experiments/ann/config.py --workdir /tmp/rj_ann

Expected (README.md, 1 thread of a shared 2-core CPU): exact search 116-118
queries per CPU second (faiss and JAX alike); HNSW M=16 builds in ~10 CPU
minutes and reaches recall@10 0.972 at efSearch 128, 17x faster per CPU
second; IVF-PQ (48-byte codes) stays at recall 0.25 at any nprobe.

Arguments (`config.py:smoke`): 20,000 documents, 100 queries, smaller
graphs and lists: seconds.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the benchmark config; `arg` selects variants (`smoke`)."""
  arg = common.parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  # Corpus vectors (rows of the index).
  config.data.num_docs = 1_000_000
  # Held-out query vectors, drawn like the documents.
  config.data.num_queries = 1000
  # Vector dimension (all-MiniLM-L6-v2's).
  config.data.dim = 384
  # Mixture components (unit-norm random centres).
  config.data.num_centres = 2000
  # Norm of a point's Gaussian offset from its unit centre, before the
  # point is L2-normalised (1.0: cosine to its centre about 0.7).
  config.data.spread = 1.0
  # Seed of the centres, the documents and the queries.
  config.data.seed = 0

  # Neighbours per query: recall@k against the exact top k.
  config.k = 10
  # Timed repetitions of each search (all queries per call); the fastest
  # counts (the CPU is shared).
  config.repeats = 3
  # faiss OpenMP threads (1: the same one core as JAX's CPU matmuls).
  config.faiss_threads = 1

  config.hnsw = ml_collections.ConfigDict()
  # Graph neighbours per node (faiss M; 2M on the bottom layer). 16, not
  # 32: at 100k documents M=16 already finds 0.994 of the top 10 at
  # efSearch 32 and builds in 3/4 of the time (README.md, "Choosing").
  config.hnsw.m = 16
  # Candidate list while inserting (faiss efConstruction).
  config.hnsw.ef_construction = 100
  # Candidate lists searched, one row of the table each (efSearch).
  config.hnsw.ef_search = (16, 32, 64, 128, 256, 512)

  config.ivf_pq = ml_collections.ConfigDict()
  # Coarse lists (0 = round(sqrt(N))).
  config.ivf_pq.nlist = 0
  # Sub-quantisers of the residual (8 dimensions each at 384).
  config.ivf_pq.m = 48
  # Bits per sub-quantiser code.
  config.ivf_pq.nbits = 8
  # Lists probed per query, one row of the table each.
  config.ivf_pq.nprobe = (1, 4, 16, 64, 256)

  config.mesh = common.mesh_block()
  # One XLA CPU device: JAX exact search on the one pinned core.
  config.mesh.cpu_devices = 1

  if arg.smoke:
    config.data.num_docs = 20_000
    config.data.num_queries = 100
    config.data.num_centres = 100
    config.repeats = 1
    config.hnsw.m = 16
    config.hnsw.ef_construction = 64
    config.hnsw.ef_search = (16, 64, 256)
    config.ivf_pq.m = 16
    config.ivf_pq.nprobe = (1, 16)
  config.lock()
  return config
