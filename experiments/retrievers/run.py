r"""Every retriever of the evaluate mode on SciFact and Cranfield (test).

Trains SPLADE, inference-free SPLADE and ColBERT on SciFact's training pairs
(configs/train.py:scifact,<kind>), then runs the evaluate mode once per
(collection, retriever) and collects nDCG@10, Recall@100, index size and
query latency into results.json and a markdown table. A step whose workdir
already holds its output is not run again, so an interrupted run resumes.

  python experiments/retrievers/run.py --workdirs /tmp/rj8 \
      --out experiments/retrievers

Cranfield's rows use the SciFact-trained models (zero-shot transfer). Each
command is printed before it runs; on 2 CPU cores the whole grid takes
about 2 hours (the SciFact corpus encodings dominate).
"""

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"

# (row name, retriever kind, extra flags)
ROWS = (
    ("BM25", "bm25", ()),
    ("dense MiniLM", "dense", ()),
    ("SPLADE (trained here)", "splade", ()),
    ("inference-free SPLADE (trained here)", "inference_free", ()),
    (
        "ColBERT re-rank of BM25 top 100",
        "colbert",
        ("--config.retriever.first_stage=bm25",),
    ),
    (
        "two-stage: SPLADE top 100 -> ColBERT",
        "colbert",
        ("--config.retriever.first_stage=splade",),
    ),
    ("dense + Rocchio PRF", "dense_prf", ()),
    ("hybrid dense + BM25", "hybrid", ()),
)
TRAINED = ("splade", "inference_free", "colbert")


def _run(cmd: list[str]) -> None:
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)


def _workdir_name(dataset: str, row: tuple) -> str:
  _, kind, extra = row
  suffix = {"--config.retriever.first_stage=splade": "two_stage"}
  return f"{dataset}_" + next((suffix[e] for e in extra if e in suffix), kind)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdirs", type=pathlib.Path, required=True)
  parser.add_argument("--datasets", default="scifact,cranfield")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument(
      "--collect_only", action="store_true", help="only read existing workdirs"
  )
  args = parser.parse_args()
  w = args.workdirs
  main_cmd = [sys.executable, "-m", "retrieval_jax.main"]
  if not args.collect_only:
    for kind in TRAINED:
      if not (w / f"train_{kind}" / "results.json").is_file():
        _run(
            main_cmd
            + [
                "--config",
                f"configs/train.py:scifact,{kind}",
                "--workdir",
                str(w / f"train_{kind}"),
            ]
        )
  results = {}
  for dataset in args.datasets.split(","):
    results[dataset] = {}
    for row in ROWS:
      name, kind, extra = row
      workdir = w / _workdir_name(dataset, row)
      if not args.collect_only and not (workdir / "stats.json").is_file():
        _run(
            main_cmd
            + [
                "--config",
                f"configs/evaluate.py:retriever={kind}",
                "--workdir",
                str(workdir),
                f"--config.data.path={SHARED / dataset}",
                f"--config.encode.cache_dir={w / ('cache_' + dataset)}",
                *[
                    f"--config.retriever.{k}_workdir={w / ('train_' + k)}"
                    for k in TRAINED
                ],
                *extra,
            ]
        )
      if not (workdir / "stats.json").is_file():
        print(f"missing: {workdir}")
        continue
      metrics = json.loads((workdir / "metrics.json").read_text())
      stats = json.loads((workdir / "stats.json").read_text())
      results[dataset][name] = {
          "metrics": metrics,
          "stats": stats,
          "workdir": str(workdir),
      }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  lines = []
  for dataset, rows in results.items():
    lines += [
        f"\n{dataset} (test)\n",
        (
            "| retriever | nDCG@10 | Recall@100 | index MiB | search ms/q |"
            " query encoding ms/q |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
      m, s = r["metrics"], r["stats"]
      lines.append(
          f"| {name} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | "
          f"{s['index_bytes'] / 2**20:.1f} | {s['search_ms_per_query']:.2f} |"
          f" {s['encode_ms_per_query']:.1f} |"
      )
  table = "\n".join(lines) + "\n"
  (args.out / "table.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
