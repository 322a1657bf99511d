r"""Baselines on the long-document task, next to a trained M2 run.

Given the workdir of a `configs/m2_long_docs.py` run (which built the
collection in <workdir>/long_docs and evaluated the trained M2 encoder), this
scores on the same test queries:

  * BM25 (bm25s, Lucene BM25 with the shared data's settings) over the
    whole documents;
  * all-MiniLM-L6-v2 with documents truncated to 512 tokens (its position
    table ends there), through the evaluate mode;

and prints one table with the M2 row from the run's results.json.

  python -m retrieval_jax.main --config configs/m2_long_docs.py \
      --workdir /tmp/rj_m2_long_docs
  PYTHONPATH=. python experiments/m2_long_docs/run_baselines.py \
      --workdir /tmp/rj_m2_long_docs
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

from retrieval_jax.data import beir
from retrieval_jax.data import negatives
from retrieval_jax.evaluation import ir_metrics

MEASURES = ("ndcg@10", "recall@1", "recall@10", "mrr@10")
REPO = pathlib.Path(__file__).resolve().parents[2]


def bm25_row(collection_dir: pathlib.Path, split: str) -> dict[str, float]:
  """BM25 over whole documents, top 100 per judged query."""
  collection = beir.load_beir(str(collection_dir), split=split)
  judged = [q for q in collection.query_ids if q in collection.qrels]
  text_of = dict(zip(collection.query_ids, collection.queries))
  start = time.perf_counter()
  ranked = negatives.bm25_negatives(
      [text_of[q] for q in judged],
      collection.doc_ids,
      collection.doc_texts(),
      [set() for _ in judged],
      depth=100,
  )
  elapsed = time.perf_counter() - start
  # Scores only need to order the list: 1/rank keeps BM25's order.
  run = {
      q: {d: 1.0 / (r + 1) for r, d in enumerate(docs)}
      for q, docs in zip(judged, ranked)
  }
  # A query BM25 cannot score (no term shared with any document) keeps a
  # single unjudged placeholder, so it counts with 0 on every measure.
  run = {q: docs or {"<no match>": 0.0} for q, docs in run.items()}
  means, _ = ir_metrics.evaluate(
      {q: collection.qrels[q] for q in judged}, run, MEASURES
  )
  means["seconds"] = elapsed
  return means


def minilm_row(
    collection_dir: pathlib.Path, split: str, out: pathlib.Path, max_length: int
) -> dict[str, float]:
  """all-MiniLM-L6-v2 at `max_length` tokens through the evaluate mode."""
  workdir = out / f"minilm_{max_length}"
  cmd = [
      sys.executable,
      "-m",
      "retrieval_jax.main",
      "--config",
      str(REPO / "configs" / "evaluate.py"),
      "--workdir",
      str(workdir),
      "--mode",
      "evaluate",
      f"--config.data.path={collection_dir}",
      f"--config.data.split={split}",
      f"--config.model.max_length={max_length}",
      "--config.search.top_k=100",
      "--config.encode.batch_size=16",
      f"--config.eval.measures={MEASURES!r}",
  ]
  start = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO)
  metrics = json.loads((workdir / "metrics.json").read_text())
  metrics = metrics.get("metrics", metrics)
  row = {k: metrics[k] for k in MEASURES if k in metrics}
  row["seconds"] = time.perf_counter() - start
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--workdir",
      required=True,
      help="workdir of a configs/m2_long_docs.py run",
  )
  parser.add_argument("--split", default="test")
  parser.add_argument("--minilm_max_length", type=int, default=512)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  collection_dir = workdir / "long_docs"
  manifest = json.loads((collection_dir / "manifest.json").read_text())
  rows = {}
  results_file = workdir / "results.json"
  if results_file.is_file():
    after = json.loads(results_file.read_text()).get("after", {})
    rows["M2 (this run)"] = {
        k: after.get(f"eval/long_docs/{k}") for k in MEASURES
    }
  rows["BM25"] = bm25_row(collection_dir, args.split)
  rows[f"all-MiniLM-L6-v2 @ {args.minilm_max_length}"] = minilm_row(
      collection_dir, args.split, workdir / "baselines", args.minilm_max_length
  )
  out = {"collection": manifest.get("summary", {}), "rows": rows}
  (workdir / "baselines.json").write_text(json.dumps(out, indent=1) + "\n")
  print("| model | " + " | ".join(MEASURES) + " |")
  print("|---|" + "---:|" * len(MEASURES))
  for name, row in rows.items():
    cells = [
        f"{row[k]:.4f}" if row.get(k) is not None else "-" for k in MEASURES
    ]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
