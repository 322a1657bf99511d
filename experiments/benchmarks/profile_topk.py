r"""Where exact top-k time goes, and levers, against faiss.IndexFlatIP; 1 thread.

Same corpus as `topk_vs_faiss.py` (seeded random normal float32 [N, D],
queries [Q, D], inner product). Times, interleaved rounds, best of
`--repeats`, one thread (the process pinned to one core, one XLA CPU device,
faiss.omp_set_num_threads(1)):

  faiss            IndexFlatIP.search (sgemm in blocks + heaps)
  ours             exact_topk.search at the library defaults
  ours chunk=C     exact_topk.search with encode_corpus(chunk_size=C)
  ours group=1     exact_topk.search without the two-stage selection
  matmul only      the same chunked lax.scan, selection replaced by a
                   running max (one pass over the scores): the floor of any
                   selection scheme built on XLA's dot
  approx_max_k     per chunk lax.approx_max_k(recall_target=1.0) + merge
  selection only   _update_topk on one precomputed [Q, chunk] score block,
                   times the number of chunks

Every variant's ids are compared with the library's default output.

  taskset -c 0 env PYTHONPATH=. python experiments/benchmarks/profile_topk.py \
      --num_docs 1000000 --k 100 --repeats 3 --out /tmp/profile_topk
"""

import argparse
import functools
import json
import os
import pathlib
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--num_docs", type=int, default=1_000_000)
p.add_argument("--dim", type=int, default=384)
p.add_argument("--num_queries", type=int, default=1000)
p.add_argument("--k", type=int, default=100)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--chunks", default="2048,4096")
p.add_argument(
    "--variants", default="faiss,ours,chunks,group1,matmul,approx,selection"
)
p.add_argument("--out", default="/tmp/profile_topk")
p.add_argument("--core", type=int, default=None)
ARGS = p.parse_args()
_core = ARGS.core if ARGS.core is not None else min(os.sched_getaffinity(0))
os.sched_setaffinity(0, [_core])

# pylint: disable=g-import-not-at-top,wrong-import-position
import faiss
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from retrieval_jax.search import exact_topk as et  # noqa: E402

# pylint: enable=g-import-not-at-top,wrong-import-position


@functools.partial(jax.jit, static_argnames=("chunk_size", "mode", "k"))
def _scan(queries_qd, corpus_nd, num_docs, *, chunk_size, mode, k):
  rows, dim = corpus_nd.shape
  n_chunks = rows // chunk_size
  chunks = corpus_nd.reshape(n_chunks, chunk_size, dim)
  starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size
  q = queries_qd.shape[0]

  def step(carry, xs):
    chunk_cd, start = xs
    s_qc = jnp.einsum(
        "qd,cd->qc",
        queries_qd,
        chunk_cd,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if mode == "matmul":
      return jnp.maximum(carry, jnp.max(s_qc, axis=1, keepdims=True)), None
    # approx_max_k on CPU is exact top-k (recall_target=1.0), then a merge.
    valid = start + jnp.arange(chunk_size, dtype=jnp.int32) < num_docs
    s_qc = jnp.where(valid[None], s_qc, -jnp.inf)
    sc, pos = lax.approx_max_k(s_qc, k, recall_target=1.0)
    best_s, best_i = carry
    return et._merge(best_s, best_i, sc, start + pos.astype(jnp.int32), k), None  # pylint: disable=protected-access

  if mode == "matmul":
    init = jnp.full((q, 1), -jnp.inf, jnp.float32)
  else:
    init = (
        jnp.full((q, k), -jnp.inf, jnp.float32),
        jnp.full((q, k), et._EMPTY_INDEX, jnp.int32),
    )  # pylint: disable=protected-access
  out, _ = lax.scan(step, init, (chunks, starts))
  return out


def main():
  args = ARGS
  faiss.omp_set_num_threads(1)
  rng = np.random.default_rng(0)
  corpus_nd = rng.standard_normal((args.num_docs, args.dim), np.float32)
  queries_qd = rng.standard_normal((args.num_queries, args.dim), np.float32)
  k = args.k
  variants = set(args.variants.split(","))
  index = faiss.IndexFlatIP(args.dim)
  index.add(corpus_nd)
  default = et.encode_corpus(corpus_nd)
  fns = {}
  corpora = {"default": default}
  if "faiss" in variants:
    fns["faiss"] = lambda: index.search(queries_qd, k)[1]
  if "ours" in variants:
    fns["ours"] = lambda: et.search(default, queries_qd, k)[1]
  if "chunks" in variants:
    for c in map(int, args.chunks.split(",")):
      corpora[c] = et.encode_corpus(corpus_nd, chunk_size=c)
      fns[f"ours chunk={c}"] = functools.partial(
          lambda c: et.search(corpora[c], queries_qd, k)[1], c
      )
  if "group1" in variants:
    fns["ours group=1"] = lambda: et.search(
        default, queries_qd, k, group_size=1
    )[1]
  qj = jnp.asarray(queries_qd)
  nd = jnp.int32(args.num_docs)
  if "matmul" in variants:
    fns["matmul only"] = lambda: _scan(
        qj,
        default.embeddings_nd,
        nd,
        chunk_size=default.chunk_size,
        mode="matmul",
        k=k,
    )
  if "approx" in variants:
    fns["approx_max_k"] = lambda: np.asarray(
        _scan(
            qj,
            default.embeddings_nd,
            nd,
            chunk_size=default.chunk_size,
            mode="approx",
            k=k,
        )[1]
    )
  sel = None
  if "selection" in variants:
    c = default.chunk_size
    s_qc = jnp.einsum("qd,cd->qc", qj, default.embeddings_nd[:c])
    g = et.default_group_size(k, c)
    # A realistic running top-k: the one after the first half of the corpus.
    half = et.encode_corpus(corpus_nd[: args.num_docs // 2])
    run_s, _ = et.search(half, queries_qd, k)
    run_s = jnp.asarray(run_s)
    run_i = jnp.zeros((args.num_queries, k), jnp.int32)
    upd = jax.jit(
        lambda a, b, s: et._update_topk(  # pylint: disable=protected-access
            a, b, s, jnp.int32(args.num_docs - c), nd, g
        )
    )
    n_chunks = default.embeddings_nd.shape[0] // c
    sel = n_chunks
    fns["selection only (x chunks)"] = lambda: upd(run_s, run_i, s_qc)
    mm = jax.jit(lambda a, b: jnp.einsum("qd,cd->qc", a, b))
    blk = default.embeddings_nd[:c]
    fns["one chunk matmul (x chunks)"] = lambda: mm(qj, blk)

  print(
      f"jax {jax.__version__} faiss {faiss.__version__} core {_core} "
      f"chunk {default.chunk_size} group "
      f"{et.default_group_size(k, default.chunk_size)} "
      f"loadavg {os.getloadavg()}",
      flush=True,
  )
  outs = {}
  for name, fn in fns.items():  # warm-up, compile, ids
    outs[name] = jax.block_until_ready(fn())
  times = {n: [] for n in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
    print({n: round(t[-1], 3) for n, t in times.items()}, flush=True)
  best = {n: min(t) for n, t in times.items()}
  for n in list(best):
    if n.endswith("(x chunks)"):
      best[n] *= sel
  ref = np.asarray(outs["ours"]) if "ours" in outs else None
  rows = []
  for name, t in best.items():
    same = None
    if ref is not None and not name.startswith(("matmul", "selection", "one")):
      same = float(
          (np.asarray(outs[name]).astype(np.int64) == ref).all(1).mean()
      )
    rows.append({
        "variant": name,
        "s": t,
        "faiss_over_this": best.get("faiss", np.nan) / t,
        "identical_rows_vs_ours": same,
    })
  report = {
      "args": vars(args),
      "loadavg_end": os.getloadavg(),
      "chunk_size": default.chunk_size,
      "rows": rows,
  }
  md = [
      "| variant | s | faiss/this | identical rows vs ours |",
      "|---|---:|---:|---:|",
  ]
  for r in rows:
    same = r["identical_rows_vs_ours"]
    md.append(
        f"| {r['variant']} | {r['s']:.3f} | {r['faiss_over_this']:.2f} "
        f"| {'' if same is None else f'{same:.4f}'} |"
    )
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=1))
  out.with_suffix(".md").write_text("\n".join(md))
  print("\n".join(md))


if __name__ == "__main__":
  main()
