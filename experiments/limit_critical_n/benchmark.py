r"""Critical-n search, d = 4 ... 8: this repository against the released script.

Runs our search through its command (`python -m
experiments.limit_critical_n.run`, all d in one process, and each d alone
for a per-d time), reads the released script's
timings written by run_reference.py (or runs it, if `--script` is given and
the timing file is missing), and prints both side by side: critical n, the
solved / failed n, the n each search asked for, wall times and the ratio.

  # 1. The released script (about 1.5 h on one core):
  taskset -c 1 python experiments/limit_critical_n/run_reference.py \
      --script /path/to/free_embedding_experiment.py --out /tmp/limit_ref
  # 2. Ours, on the same core, and the comparison:
  taskset -c 1 python experiments/limit_critical_n/benchmark.py \
      --reference /tmp/limit_ref --out /tmp/limit_bench

Pin both to the same core(s) so they run in the same environment. Writes
<out>/benchmark.json.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _ours(dims: list[int], workdir: pathlib.Path) -> tuple[float, dict]:
  """Wall time of the experiment on `dims`, and its critical_n.json."""
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  cmd = [
      sys.executable,
      "-m",
      "experiments.limit_critical_n.run",
      "--config",
      "experiments/limit_critical_n/config.py",
      "--workdir",
      str(workdir),
      f"--config.dims={','.join(map(str, dims))}",
      "--config.search.progress_every=0",
  ]
  start = time.perf_counter()
  with open(workdir.with_suffix(".log"), "w") as log:
    subprocess.run(
        cmd,
        cwd=_REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        check=True,
    )
  wall = time.perf_counter() - start
  return wall, json.loads((workdir / "critical_n.json").read_text())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dims", default="4,5,6,7,8")
  parser.add_argument(
      "--reference", required=True, help="run_reference.py's --out directory"
  )
  parser.add_argument(
      "--script",
      default="",
      help="released script, run if the timings are missing",
  )
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  dims = [int(d) for d in args.dims.split(",")]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reference_dir = pathlib.Path(args.reference)
  timing_path = reference_dir / "timing.json"
  if args.script and not timing_path.exists():
    subprocess.run(
        [
            sys.executable,
            str(pathlib.Path(__file__).parent / "run_reference.py"),
            "--script",
            args.script,
            "--dims",
            args.dims,
            "--out",
            str(reference_dir),
        ],
        check=True,
    )
  reference = json.loads(timing_path.read_text())
  missing = [d for d in dims if str(d) not in reference]
  if missing:
    sys.exit(f"{timing_path} has no timing for d = {missing}")

  together_s, together = _ours(dims, out / "together")
  rows = []
  for d in dims:
    alone_s, alone = _ours([d], out / f"d={d}")
    ours = alone[str(d)]["by_seed"]["42"]
    ref = reference[str(d)]
    rows.append(
        dict(
            d=d,
            ours_critical_n=ours["critical_n"],
            reference_critical_n=ref["critical_n"],
            ours_solved=ours["solved"],
            ours_failed=ours["failed"],
            reference_solved=ref["solved"],
            reference_failed=ref["failed"],
            same_critical_n_together=together[str(d)]["critical_n"]
            == ours["critical_n"],
            ours_s=alone_s,
            reference_s=ref["wall_s"],
            ratio=ref["wall_s"] / alone_s,
        )
    )
  reference_total = sum(reference[str(d)]["wall_s"] for d in dims)
  result = dict(
      dims=dims,
      rows=rows,
      ours_together_s=together_s,
      ours_alone_total_s=sum(r["ours_s"] for r in rows),
      reference_total_s=reference_total,
      ratio=reference_total / together_s,
  )
  (out / "benchmark.json").write_text(json.dumps(result, indent=1) + "\n")
  print(
      f"{'d':>3} {'critical n (ours / released)':>29} "
      f"{'ours s':>8} {'released s':>10} {'ratio':>7}"
  )
  for r in rows:
    print(
        f"{r['d']:>3} {r['ours_critical_n']:>15} / "
        f"{str(r['reference_critical_n']):<11} {r['ours_s']:>8.1f} "
        f"{r['reference_s']:>10.1f} {r['ratio']:>6.1f}x"
    )
  print(
      f"d = {args.dims}: ours {together_s:.1f} s in one process "
      f"(each d alone: {result['ours_alone_total_s']:.1f} s), released "
      f"{reference_total:.1f} s: {result['ratio']:.1f}x"
  )
  for r in rows:
    if (r["ours_solved"], r["ours_failed"]) != (
        r["reference_solved"],
        r["reference_failed"],
    ):
      print(
          f"  d={r['d']}: solved/failed differ: ours {r['ours_solved']} / "
          f"{r['ours_failed']}, released {r['reference_solved']} / "
          f"{r['reference_failed']}"
      )


if __name__ == "__main__":
  main()
