r"""Times the released free-embedding script's critical-n search, per d.

The released script (`code/free_embedding_experiment.py` of the LIMIT
authors' repository) is not part of this repository; pass the path of a
local copy. As released it fails every run: `main` forwards every absl flag
(`device`, `results_output_path`, absl's own flags, ...) as keyword arguments
to `optimize_embeddings`, which raises TypeError, and the search then
"finishes" with error rows. This runner fixes that here, at run time, by
passing `optimize_embeddings` only the keyword arguments it declares; the
script itself is not modified.

  python experiments/limit_critical_n/run_reference.py \
      --script /path/to/free_embedding_experiment.py --dims 4,5,6,7,8 \
      --out /tmp/limit_reference

Each d runs in its own process, as the script is meant to be launched
(`--d=D --k=2 --enable_critical_n_search=N0 --device=cpu`), with the same
starting n as `config.py:critical_n` (the paper's cubic, rounded).
Writes <out>/d=<d>_k=2.json (the script's own results), <out>/d=<d>.log and
<out>/timing.json ({d: {wall_s, critical_n, solved, failed}}).

`--resume` continues an interrupted d from the rows already in its results
file (the script skips the n it has cached). Its wall_s is then the resumed
process's wall time plus the cached rows' own optimisation time
(`cached_s`), which leaves out the few seconds per run the script spends
outside `optimize_embeddings`, so a resumed timing is a slight undercount.
"""

import argparse
import importlib.util
import inspect
import json
import pathlib
import re
import subprocess
import sys
import time


def _run_patched(script: str, argv: list[str]) -> None:
  """Imports the released script, fixes the kwargs bug, runs its main."""
  from absl import app  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("free_embedding", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  optimize = module.optimize_embeddings
  declared = set(inspect.signature(optimize).parameters)

  def optimize_declared_kwargs(**kwargs):
    return optimize(**{k: v for k, v in kwargs.items() if k in declared})

  module.optimize_embeddings = optimize_declared_kwargs
  app.run(module.main, argv=[script] + argv)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--script",
      required=True,
      help="path of the released free_embedding_experiment.py",
  )
  parser.add_argument("--dims", default="4,5,6,7,8")
  parser.add_argument("--k", type=int, default=2)
  parser.add_argument("--out", required=True)
  parser.add_argument(
      "--resume",
      action="store_true",
      help="keep the cached rows of an interrupted run",
  )
  parser.add_argument(
      "--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS
  )
  args = parser.parse_args()
  if args.child is not None:
    _run_patched(args.script, args.child)
    return
  # Run as a script: the repository root is not on the path by itself.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  # pylint: disable-next=g-import-not-at-top
  from experiments.limit_critical_n import search

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  timing_path = out / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
  for d in (int(x) for x in args.dims.split(",")):
    initial_n = search.initial_n(d, args.k)
    results = out / f"d={d}_k={args.k}.json"
    cached_s = 0.0
    if args.resume and results.exists():
      cached_s = sum(
          r["metrics"]["optimization_duration_seconds"]
          for r in json.loads(results.read_text())
      )
    else:
      results.unlink(missing_ok=True)  # A rerun must not reuse cached rows.
    log = out / f"d={d}.log"
    cmd = [
        sys.executable,
        __file__,
        "--script",
        args.script,
        "--out",
        args.out,
        "--child",
        f"--d={d}",
        f"--k={args.k}",
        f"--enable_critical_n_search={initial_n}",
        "--device=cpu",
        f"--results_output_path={results}",
    ]
    print(f"d={d}: initial n {initial_n} ...", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
      subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start + cached_s
    text = log.read_text()
    found = re.findall(r"Critical N is likely (\S+)", text)
    rows = json.loads(results.read_text())
    errors = [r for r in rows if "error" in r.get("metrics", {})]
    if errors:
      sys.exit(
          f"d={d}: {len(errors)} runs failed: {errors[0]['metrics']['error']}"
      )
    solved = sorted(
        r["parameters"]["n"]
        for r in rows
        if r["metrics"]["max_accuracy_observed"] >= 1.0
    )
    failed = sorted(
        r["parameters"]["n"]
        for r in rows
        if r["metrics"]["max_accuracy_observed"] < 1.0
    )
    timing[str(d)] = dict(
        wall_s=wall,
        cached_s=cached_s,
        initial_n=initial_n,
        critical_n=None if not found or found[-1] == "None" else int(found[-1]),
        solved=solved,
        failed=failed,
        run_s={
            str(r["parameters"]["n"]): r["metrics"][
                "optimization_duration_seconds"
            ]
            for r in rows
        },
    )
    timing_path.write_text(json.dumps(timing, indent=1) + "\n")
    print(
        f"d={d}: critical n {timing[str(d)]['critical_n']}, solved "
        f"{solved}, failed {failed}, {wall:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
  main()
