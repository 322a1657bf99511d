r"""ANN benchmark: exact search vs faiss HNSW and IVF-PQ on one thread.

`run(config, workdir)` (config.py; protocol in README.md): draws the seeded
mixture (`make_data`), computes the exact top-k with NumPy (`exact_neighbours`,
the ground truth), then in one process on the same thread count times
faiss IndexFlatIP, `search/exact_topk.py` (JAX), faiss HNSW and IVF-PQ
(`search/compression.py`) at each efSearch / nprobe: build seconds, index
bytes, QPS (all queries per call, fastest of `config.repeats`) and
recall@k against the ground truth. Writes results.json and table.md.

  OMP_NUM_THREADS=1 taskset -c 0 python -m experiments.ann.run \
      --config experiments/ann/config.py --workdir /tmp/rj_ann
"""

import datetime
import functools
import gc
import os
import pathlib
import platform
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from experiments import entry
from retrieval_jax import io
from retrieval_jax import sharding
from retrieval_jax.search import compression
from retrieval_jax.search import exact_topk

# Rows drawn (and normalised) per step: bounds the float32 temporaries.
_BLOCK = 65536
# Recall a HNSW setting must reach to be the reported operating point.
TARGET_RECALL = 0.95
# The exact rows, which the operating point's speed-up is measured against.
EXACT_METHODS = ("faiss IndexFlatIP", "JAX exact_topk")


def mixture(num, centres_cd, spread, rng) -> np.ndarray:
  """[num, D] float32 unit vectors: normalise(centre + spread·g/√D).

  Each row picks a centre uniformly; g ~ N(0, I), so the offset's norm is
  about `spread` and a point's cosine to its centre about 1/√(1+spread²).
  """
  dim = centres_cd.shape[1]
  out_nd = np.empty((num, dim), np.float32)
  for lo in range(0, num, _BLOCK):
    n = min(_BLOCK, num - lo)
    which_n = rng.integers(0, len(centres_cd), n)
    noise_nd = rng.standard_normal((n, dim), dtype=np.float32)
    # A Python float keeps the sum float32 (a NumPy float64 would not).
    x_nd = centres_cd[which_n] + float(spread / np.sqrt(dim)) * noise_nd
    out_nd[lo : lo + n] = x_nd / np.linalg.norm(x_nd, axis=1, keepdims=True)
  return out_nd


def make_data(
    data: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
  """(docs_nd, queries_qd): float32 unit vectors of one seeded mixture.

  Centres, documents and queries use three streams of `data.seed`, so the
  queries (held out: fresh draws) do not depend on `num_docs`.
  """
  centres_cd = np.random.default_rng([data.seed, 0]).standard_normal(
      (data.num_centres, data.dim), dtype=np.float32
  )
  centres_cd /= np.linalg.norm(centres_cd, axis=1, keepdims=True)
  docs_nd = mixture(
      data.num_docs,
      centres_cd,
      data.spread,
      np.random.default_rng([data.seed, 1]),
  )
  queries_qd = mixture(
      data.num_queries,
      centres_cd,
      data.spread,
      np.random.default_rng([data.seed, 2]),
  )
  return docs_nd, queries_qd


def exact_neighbours(queries_qd, docs_nd, k: int) -> np.ndarray:
  """[Q, k] int64 rows of the k largest inner products, best first (NumPy).

  float32 BLAS products, `_BLOCK` documents at a time, each block's top k
  merged into the running top k (exact up to ties, which continuous
  random vectors do not have).
  """
  num_q = len(queries_qd)
  best_sk = np.full((num_q, 0), -np.inf, np.float32)
  best_ik = np.zeros((num_q, 0), np.int64)
  for lo in range(0, len(docs_nd), _BLOCK):
    scores_qb = queries_qd @ docs_nd[lo : lo + _BLOCK].T
    top = min(k, scores_qb.shape[1])
    part_qk = np.argpartition(-scores_qb, top - 1, axis=1)[:, :top]
    cand_s = np.concatenate(
        [best_sk, np.take_along_axis(scores_qb, part_qk, axis=1)], axis=1
    )
    cand_i = np.concatenate([best_ik, part_qk + lo], axis=1)
    order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
    best_sk = np.take_along_axis(cand_s, order, axis=1)
    best_ik = np.take_along_axis(cand_i, order, axis=1)
  return best_ik


def recall_at_k(found_qk, truth_qk) -> float:
  """Mean over queries of |found ∩ truth| / k (-1 = no hit, never counts)."""
  found_qk = np.asarray(found_qk)[:, : truth_qk.shape[1]]
  hits_q = (found_qk[:, :, None] == truth_qk[:, None, :]).any(-1).sum(1)
  return float(hits_q.mean() / truth_qk.shape[1])


def timed(fn, repeats: int = 1):
  """(wall s, CPU s, fn()'s last result), each time the least of `repeats`.

  CPU seconds are the process's, all threads: with one thread, what an idle
  core would take, however many other jobs share the core.
  """
  wall = cpu = float("inf")
  out = None
  for _ in range(max(1, repeats)):
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    wall = min(wall, time.perf_counter() - wall0)
    cpu = min(cpu, time.process_time() - cpu0)
  return wall, cpu, out


def _row(method, params, build, index_bytes, search, recall, sizes):
  """One table row; build and search are `timed`'s (wall s, CPU s, ...)."""
  num_docs, num_queries = sizes
  row = {
      "method": method,
      "params": params,
      "build_s": build[0],
      "build_cpu_s": build[1],
      "index_bytes": int(index_bytes),
      "bytes_per_doc": index_bytes / num_docs,
      "search_s": search[0],
      "search_cpu_s": search[1],
      "qps": num_queries / search[0],
      "qps_cpu": num_queries / search[1],
      "recall": recall,
  }
  logging.info("%s", row)
  return row


def _machine(config) -> dict:
  model = ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import faiss  # pylint: disable=g-import-not-at-top

  return {
      "cpu": model or platform.processor(),
      "cores": os.cpu_count(),
      "affinity": sorted(os.sched_getaffinity(0)),
      "faiss_threads": config.faiss_threads,
      "jax_devices": jax.device_count(),
      "faiss": faiss.__version__,
      "jax": jax.__version__,
      "numpy": np.__version__,
      "load_average_start": os.getloadavg(),
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the benchmark; writes results.json and table.md to `workdir`."""
  import faiss  # pylint: disable=g-import-not-at-top

  faiss.omp_set_num_threads(config.faiss_threads)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  k, repeats = config.k, config.repeats
  results = {
      "date": datetime.date.today().isoformat(),
      "machine": _machine(config),
      "config": config.to_dict(),
  }
  results["data_s"], _, (docs_nd, queries_qd) = timed(
      lambda: make_data(config.data)
  )
  sizes = (len(docs_nd), len(queries_qd))
  logging.info("data: %s, %d queries", docs_nd.shape, len(queries_qd))
  results["ground_truth_s"], _, truth_qk = timed(
      lambda: exact_neighbours(queries_qd, docs_nd, k)
  )

  def search_row(method, params, build, index_bytes, search_fn):
    search = timed(lambda: search_fn(queries_qd, k), repeats)
    recall = recall_at_k(search[2][1], truth_qk)
    return _row(method, params, build, index_bytes, search, recall, sizes)

  rows = []
  # faiss IndexFlatIP: the exact baseline everyone knows.
  flat = faiss.IndexFlatIP(docs_nd.shape[1])
  build = timed(lambda: flat.add(docs_nd))
  nbytes = flat.ntotal * flat.code_size
  rows.append(search_row("faiss IndexFlatIP", {}, build, nbytes, flat.search))
  del flat
  gc.collect()

  # The library's exact search: corpus placed once, one query batch a call.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])

  def place():
    corpus = exact_topk.encode_corpus(docs_nd, metric="dot", mesh=mesh)
    corpus.embeddings_nd.block_until_ready()
    return corpus

  build = timed(place)
  corpus = build[2]
  exact_topk.search(corpus, queries_qd, k)  # compiles, outside the timing
  rows.append(
      search_row(
          "JAX exact_topk",
          {"chunk_size": corpus.chunk_size},
          build,
          corpus.embeddings_nd.nbytes,
          functools.partial(exact_topk.search, corpus),
      )
  )
  del corpus, build
  gc.collect()

  # faiss HNSW through compression.py; efSearch is a search-time knob.
  h = config.hnsw
  build = timed(
      lambda: compression.build(
          "hnsw", docs_nd, m=h.m, ef_construction=h.ef_construction
      )
  )
  hnsw = build[2]
  hnsw.faiss_index()  # deserialised outside the timing
  for ef in h.ef_search:
    hnsw.config["ef_search"] = ef
    params = {"m": h.m, "ef_construction": h.ef_construction, "ef_search": ef}
    rows.append(
        search_row("faiss HNSW", params, build, hnsw.nbytes, hnsw.search)
    )
  del hnsw, build
  gc.collect()

  # faiss IVF-PQ through compression.py; nprobe is a search-time knob.
  p = config.ivf_pq
  build = timed(
      lambda: compression.build(
          "ivf_pq", docs_nd, nlist=p.nlist, m=p.m, nbits=p.nbits
      )
  )
  ivf = build[2]
  ivf.search(queries_qd[:1], k)  # faiss fills its precomputed tables
  for nprobe in p.nprobe:
    ivf.faiss_index().nprobe = nprobe
    params = {"nlist": ivf.config["nlist"], "m": p.m, "nbits": p.nbits}
    params["nprobe"] = nprobe
    rows.append(
        search_row("faiss IVF-PQ", params, build, ivf.nbytes, ivf.search)
    )
  results["rows"] = rows
  results["machine"]["load_average_end"] = os.getloadavg()
  results["summary"] = summary(rows, k)
  io.write_json_atomic(workdir / "results.json", results)
  text = table(results)
  (workdir / "table.md").write_text(text)
  print(text)
  return results


def summary(rows: list[dict], k: int) -> dict:
  """The HNSW operating point: the smallest efSearch with recall >=
  TARGET_RECALL, and its speed-up over the two exact searches (wall-clock
  QPS, and QPS per CPU second)."""
  exact = [r for r in rows if r["method"] in EXACT_METHODS]
  good = [
      r
      for r in rows
      if r["method"] == "faiss HNSW" and r["recall"] >= TARGET_RECALL
  ]
  if not good:
    return {"target_recall": TARGET_RECALL, "reached": False}
  best = min(good, key=lambda r: r["params"]["ef_search"])
  return {
      "target_recall": TARGET_RECALL,
      "reached": True,
      "ef_search": best["params"]["ef_search"],
      f"recall@{k}": best["recall"],
      "qps": best["qps"],
      "qps_cpu": best["qps_cpu"],
      "speedup": {r["method"]: best["qps"] / r["qps"] for r in exact},
      "speedup_cpu": {
          r["method"]: best["qps_cpu"] / r["qps_cpu"] for r in exact
      },
  }


def _params(params: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def table(results: dict) -> str:
  """A markdown table of every row, then the HNSW operating point."""
  c, m = results["config"], results["machine"]
  k = c["k"]
  lines = [
      (
          f"{c['data']['num_docs']:,} x {c['data']['dim']} (unit vectors,"
          f" {c['data']['num_centres']:,} Gaussian clusters),"
          f" {c['data']['num_queries']:,} held-out queries, top {k};"
          f" {m['faiss_threads']} thread on CPU(s) {m['affinity']} of"
          f" {m['cores']} ({m['cpu']}), {results['date']}; load average"
          f" {m['load_average_start'][0]:.1f} at the start,"
          f" {m['load_average_end'][0]:.1f} at the end.\n"
      ),
      (
          "| method | parameters | build s | build CPU s | index MiB |"
          f" bytes/doc | QPS | QPS per CPU s | recall@{k} |"
      ),
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["rows"]:
    lines.append(
        f"| {r['method']} | {_params(r['params'])} | {r['build_s']:.1f} |"
        f" {r['build_cpu_s']:.1f} | {r['index_bytes'] / 2**20:.1f} |"
        f" {r['bytes_per_doc']:.0f} | {r['qps']:.1f} | {r['qps_cpu']:.1f} |"
        f" {r['recall']:.4f} |"
    )
  s = results["summary"]
  if s["reached"]:
    speedup = ", ".join(
        f"{v:.1f}x {name} ({s['speedup_cpu'][name]:.1f}x per CPU s)"
        for name, v in s["speedup"].items()
    )
    lines.append(
        f"\nHNSW reaches recall@{k} >= {s['target_recall']} at efSearch"
        f" {s['ef_search']} ({s[f'recall@{k}']:.4f}, {s['qps']:.0f} QPS:"
        f" {speedup})."
    )
  else:
    lines.append(f"\nNo HNSW row reaches recall@{k} >= {s['target_recall']}.")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  entry.main(run)
