r"""Vector compression baselines: size, effectiveness and latency per index.

`run(config, workdir)` (config.py; protocol in README.md): per dataset, the
evaluate mode's run (float32 exact; its dense cache in
<workdir>/cache_<dataset> holds the embeddings), then for every method of
`config.methods`: build the `search.compression` index and save it (or
reload it, on a rerun, as the evaluate mode's `config.retriever.index`
does: `compression.build_or_load`), search the judged queries for the top
`config.search.top_k`, score the run with the evaluate mode's metrics and
time one-query searches. Writes results.json and table.md to the workdir.
One method on any BEIR directory is also the evaluate mode itself:
`configs/evaluate.py:index=pq`.

  python -m experiments.compression.run \
      --config experiments/compression/config.py --workdir /tmp/rj_compress
"""

import json
import pathlib
import time

from absl import logging
import ml_collections
import numpy as np

from experiments import entry
from retrieval_jax import errors
from retrieval_jax import evaluate
from retrieval_jax import io
from retrieval_jax.evaluation import evaluators
from retrieval_jax.search import compression


def dense_inputs(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """(evaluator, docs_nd, queries_qd, evaluate-mode metrics) of one dataset.

  Runs the evaluate mode (float32 exact search; skipped when its workdir
  <workdir>/<dataset>_dense already holds metrics.json), whose encoder writes
  the dense cache this reads: one encoding path, done once.
  """
  name = pathlib.Path(config.data.path).name
  eval_dir = workdir / f"{name}_dense"
  cache_dir = pathlib.Path(config.encode.cache_dir)
  if not (eval_dir / "metrics.json").is_file():
    evaluate.evaluate(config, eval_dir)
  caches = sorted(cache_dir.glob("dense_*.npz"))
  if len(caches) != 1:
    raise errors.ConfigError(
        f"expected one dense cache in {cache_dir} (config.encode.cache_dir),"
        f" found {[c.name for c in caches]}"
    )
  with np.load(caches[0]) as f:
    docs_nd, queries_qd = f["docs_nd"], f["queries_qd"]
  evaluator = evaluators.RetrievalEvaluator(
      evaluate.load_collection(config),
      measures=config.eval.measures,
      relevance_level=config.eval.relevance_level,
      top_k=config.search.top_k,
      max_queries=config.data.max_queries,
      name=name,
  )
  # Rows are the judged queries in query-file order, as the evaluate mode's.
  if len(queries_qd) != len(evaluator.query_ids):
    raise errors.DataError(
        f"{caches[0]}: {len(queries_qd)} cached queries, "
        f"{len(evaluator.query_ids)} judged queries"
    )
  reference = json.loads((eval_dir / "metrics.json").read_text())
  return evaluator, docs_nd, queries_qd, reference


def latency_ms(index, queries_qd, k: int, num_queries: int) -> float:
  """Mean ms of one-query searches over the first `num_queries`, warmed up.

  As `retrievers._latency_ms`: the query is already encoded.
  """
  n = min(num_queries, len(queries_qd))
  index.search(queries_qd[:1], k)  # compiles (JAX) / touches the index
  start = time.perf_counter()
  for i in range(n):
    index.search(queries_qd[i : i + 1], k)
  return 1e3 * (time.perf_counter() - start) / n


def run_dataset(config, path: str, workdir: pathlib.Path) -> dict:
  """Every method on one BEIR directory: {method name: row}."""
  name = pathlib.Path(path).name
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  config.data.path = path
  if not config.encode.cache_dir:
    config.encode.cache_dir = str(workdir / f"cache_{name}")
  evaluator, docs_nd, queries_qd, reference = dense_inputs(config, workdir)
  config_path = workdir / f"{name}_dense" / "config.json"
  # The metric the evaluate mode resolved (the checkpoint's similarity).
  metric = json.loads(config_path.read_text())["search"]["metric"]
  k = evaluator.top_k
  logging.info(
      "%s: %d docs x %d dims, %d queries, %s, top %d",
      name,
      *docs_nd.shape,
      len(queries_qd),
      metric,
      k,
  )
  rows = {}
  for method in config.order:
    spec = config.methods[method]
    params = {key: v for key, v in spec.items() if key != "kind"}
    # As the evaluate mode's config.retriever.index: saved, and reused by a
    # rerun while its content key (vectors, metric, parameters) matches.
    index, info = compression.build_or_load(
        workdir / name / method, spec.kind, docs_nd, metric=metric, **params
    )
    start = time.perf_counter()
    scores_qk, ids_qk = index.search(queries_qd, k)
    search_s = time.perf_counter() - start
    result = evaluator.score_ranking(scores_qk, ids_qk)
    rows[method] = {
        "label": label(index.config),
        "kind": spec.kind,
        "config": index.config,
        "bytes_per_doc": index.bytes_per_doc,
        "index_bytes": index.nbytes,
        "build_s": info["build_s"],
        "index_reused": info["reused"],
        "search_all_s": search_s,
        "ms_per_query": latency_ms(
            index, queries_qd, k, config.latency_queries
        ),
        "metrics": result.metrics,
    }
    logging.info("%s %s: %s", name, method, rows[method])
  # The float32 row re-scores what the evaluate mode scored: same numbers.
  rows["evaluate_mode_reference"] = reference
  return rows


def label(c: dict) -> str:
  """A table row's name from an index's config."""
  kind = c["kind"]
  if kind == "flat":
    return "float32 exact"
  if kind == "pca":
    return f"PCA-{c['dims']}"
  if kind == "pq":
    return f"PQ m={c['m']}, {c['nbits']} bits ({c['engine']} ADC)"
  if kind == "sign":
    if not c["rerank_depth"]:
      return "sign bits, Hamming top-k"
    return f"sign bits + re-rank of Hamming top {c['rerank_depth']}"
  if kind == "hnsw":
    return f"HNSW (faiss, M={c['m']}, efSearch=max({c['ef_search']}, k))"
  return (
      f"IVF-PQ (faiss, nlist={c['nlist']}, m={c['m']}, {c['nbits']} bits,"
      f" nprobe={c['nprobe']})"
  )


def table(results: dict) -> str:
  """Markdown tables, one per dataset."""
  lines = []
  for dataset, rows in results.items():
    lines += [
        f"\n{dataset} (test)\n",
        "| method | bytes/doc | index MiB | nDCG@10 | R@100 | ms/query |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, row in rows.items():
      if method == "evaluate_mode_reference":
        continue
      m = row["metrics"]
      lines.append(
          f"| {row['label']} | {row['bytes_per_doc']:.0f} |"
          f" {row['index_bytes'] / 2**20:.2f} | {m['ndcg@10']:.4f} |"
          f" {m['recall@100']:.4f} | {row['ms_per_query']:.2f} |"
      )
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every dataset; writes results.json and table.md to `workdir`."""
  import faiss  # pylint: disable=g-import-not-at-top

  faiss.omp_set_num_threads(config.faiss_threads)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results = {}
  for path in config.datasets:
    results[pathlib.Path(path).name] = run_dataset(config, path, workdir)
  io.write_json_atomic(workdir / "results.json", results)
  text = table(results)
  (workdir / "table.md").write_text(text)
  print(text)
  return results


if __name__ == "__main__":
  entry.main(run)
