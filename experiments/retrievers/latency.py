r"""Sparse inverted index vs dense exact search: latency and size, one run.

Reads what the evaluate mode left in its workdirs (run.py ran them):
the dense embeddings cache, the learned sparse indexes and their encoded
queries; builds BM25 from the collection. Then, in this one process and on
the same core, times each index answering the same judged queries:

  one at a time   mean / median ms per query (after one warm-up query)
  batched         ms per query when all queries are searched in one call

Query encoding is not timed here (the evaluate runs' stats.json report it).

  taskset -c 1 python experiments/retrievers/latency.py \
      --workdirs /tmp/rj8 --datasets scifact,cranfield \
      --out experiments/retrievers/latency.json
"""

import argparse
import glob
import json
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from retrieval_jax.data import beir  # pylint: disable=g-import-not-at-top
from retrieval_jax.search import bm25  # pylint: disable=g-import-not-at-top
from retrieval_jax.search import exact_topk  # pylint: disable=g-import-not-at-top
from retrieval_jax.search import sparse_index  # pylint: disable=g-import-not-at-top

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"


def _time(search_one, search_all, num_queries):
  search_one(0)
  times = []
  for i in range(num_queries):
    start = time.perf_counter()
    search_one(i)
    times.append(1e3 * (time.perf_counter() - start))
  search_all()
  start = time.perf_counter()
  search_all()
  batched = 1e3 * (time.perf_counter() - start) / num_queries
  return {
      "one_at_a_time_ms": statistics.fmean(times),
      "one_at_a_time_median_ms": statistics.median(times),
      "batched_ms": batched,
  }


def measure(workdirs: pathlib.Path, dataset: str, k: int) -> dict:
  """Every index of one collection, timed side by side."""
  out = {}
  caches = glob.glob(str(workdirs / f"cache_{dataset}" / "dense_*.npz"))
  if len(caches) != 1:
    raise SystemExit(
        f"expected one dense cache in {workdirs}/cache_"
        f"{dataset}, found {caches}"
    )
  with np.load(caches[0]) as f:
    docs_nd, queries_qd = f["docs_nd"], f["queries_qd"]
  corpus = exact_topk.encode_corpus(docs_nd, metric="cosine")
  out["dense exact (jax, fp32)"] = dict(
      _time(
          lambda i: exact_topk.search(corpus, queries_qd[i : i + 1], k),
          lambda: exact_topk.search(corpus, queries_qd, k),
          len(queries_qd),
      ),
      index_bytes=int(docs_nd.nbytes),
  )
  collection = beir.load_beir(str(SHARED / dataset), split="test")
  _, texts = collection.judged_queries()
  if len(texts) != len(queries_qd):
    raise SystemExit(
        f"{dataset}: {len(texts)} judged queries but "
        f"{len(queries_qd)} cached dense queries"
    )
  index = bm25.Bm25Index.build(collection.doc_texts())
  out["BM25 (bm25s)"] = dict(
      _time(
          lambda i: index.search(texts[i : i + 1], k),
          lambda: index.search(texts, k),
          len(texts),
      ),
      index_bytes=index.size_bytes(),
  )
  import scipy.sparse  # pylint: disable=g-import-not-at-top

  for kind in ("splade", "inference_free"):
    workdir = workdirs / f"{dataset}_{kind}"
    if not (workdir / "queries_sparse.npz").is_file():
      print(f"{dataset}: no {kind} run in {workdir}, skipped")
      continue
    sparse = sparse_index.load(
        (workdir / "sparse_index_path.txt").read_text().strip()
    )
    queries_qv = scipy.sparse.load_npz(workdir / "queries_sparse.npz")
    out[f"{kind} (scipy inverted index)"] = dict(
        _time(
            lambda i: sparse_index.search(sparse, queries_qv[i : i + 1], k),
            lambda: sparse_index.search(sparse, queries_qv, k),
            queries_qv.shape[0],
        ),
        index_bytes=sparse_index.index_size_bytes(sparse),
        **{
            key: v
            for key, v in sparse_index.stats(sparse).items()
            if key in ("avg_terms_per_doc", "nnz")
        },
        avg_terms_per_query=float(np.diff(queries_qv.indptr).mean()),
    )
  dense = out["dense exact (jax, fp32)"]
  for row in out.values():
    row["one_at_a_time_vs_dense"] = (
        dense["one_at_a_time_ms"] / row["one_at_a_time_ms"]
    )
    row["size_vs_dense"] = row["index_bytes"] / dense["index_bytes"]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdirs", type=pathlib.Path, required=True)
  parser.add_argument("--datasets", default="scifact,cranfield")
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  results = {}
  for dataset in args.datasets.split(","):
    results[dataset] = measure(args.workdirs, dataset, args.k)
    print(f"\n{dataset} (top {args.k})")
    print(
        f"{'index':<34} {'MiB':>7} {'ms/q 1-by-1':>12} {'ms/q batch':>11}"
        f" {'vs dense':>9}"
    )
    for name, row in results[dataset].items():
      print(
          f"{name:<34} {row['index_bytes'] / 2**20:7.2f} "
          f"{row['one_at_a_time_ms']:12.3f} {row['batched_ms']:11.3f} "
          f"{row['one_at_a_time_vs_dense']:8.1f}x"
      )
  if args.out:
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
