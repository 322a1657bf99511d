r"""LIMIT: critical n against the embedding dimension, fitted and plotted.

`critical_n(config, workdir)` runs the released search (search.py) for every
d in `config.dims`, fits a cubic, extrapolates it and writes the results; the
`:evaluate` variant runs the library's evaluate mode on LIMIT-small instead.
Protocol, commands and results: README.md beside this file.

  python -m experiments.limit_critical_n.run \
      --config experiments/limit_critical_n/config.py --workdir /tmp/rj_limit
"""

import dataclasses
import pathlib
import time
from typing import Sequence

import numpy as np

from experiments import entry
from experiments import plotting
from experiments.limit_critical_n import search
from retrieval_jax import errors
from retrieval_jax import io
from retrieval_jax.analysis import embedding_dimension as ed


def fit_cubic(dims: Sequence[int], critical: Sequence[float]) -> np.ndarray:
  """Least-squares cubic n*(d) = c0 + c1 d + c2 d² + c3 d³.

  Args:
    dims: at least four distinct dimensions.
    critical: the critical n measured at each.

  Returns:
    float64 [4], the coefficients of d^0 ... d^3 (as search.PAPER_CUBIC).
  """
  d = np.asarray(dims, np.float64)
  if len(set(d.tolist())) < 4:
    raise ValueError(
        "a cubic needs at least 4 distinct dimensions, got "
        f"{sorted(set(d.tolist()))}"
    )
  return np.polynomial.polynomial.polyfit(d, np.asarray(critical, float), 3)


def r_squared(coefficients, dims, critical) -> float:
  """Coefficient of determination of a polynomial fit."""
  y = np.asarray(critical, np.float64)
  fitted = np.polynomial.polynomial.polyval(
      np.asarray(dims, float), coefficients
  )
  total = ((y - y.mean()) ** 2).sum()
  return float(1.0 - ((y - fitted) ** 2).sum() / total) if total else 1.0


def write_plot(
    path,
    dims,
    critical,
    coefficients,
    paper=search.PAPER_CUBIC,
    title: str = "",
):
  """Plots measured critical n and the cubic fits to <path>.png and .svg.

  The measured points, our cubic (solid) and the paper's cubic (dashed)
  over the measured range of d, one unit beyond on each side.

  Returns:
    (PNG path, SVG path).
  """
  dims = np.asarray(dims, float)
  lo, hi = dims.min() - 1, dims.max() + 1
  grid = np.linspace(lo, hi, 200)
  series = [
      plotting.Series(
          "this run, cubic fit",
          grid,
          np.polynomial.polynomial.polyval(grid, coefficients),
          color="#1f77b4",
      )
  ]
  if paper is not None:
    series.append(
        plotting.Series(
            "paper's cubic fit",
            grid,
            np.polynomial.polynomial.polyval(grid, paper),
            color="#d62728",
            dashed=True,
        )
    )
  series.append(
      plotting.Series(
          "measured (largest solved n)",
          dims,
          np.asarray(critical, float),
          color="black",
          line=False,
          markers=True,
      )
  )
  return plotting.line_plot(
      path,
      series,
      title=title or "critical n against d",
      xlabel="embedding dimension d",
      ylabel="critical n",
      x_range=(lo, hi),
      legend="upper left",
  )


def critical_n(config, workdir) -> dict:
  """The critical-n searches, fit, plot and table (config.py).

  Writes to the workdir:
    critical_n.json  {d: {critical_n, paper_fit, by_seed: {seed: search}}},
                     each search with its solved / failed n and every run;
    summary.json     the fitted cubic, r², extrapolations, protocol, timing;
    critical_n.png, critical_n.svg
                     measured points with this run's and the paper's cubic.

  Returns:
    The critical_n.json content.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  dims = tuple(int(d) for d in config.dims)
  if not dims or min(dims) < 1:
    raise errors.ConfigError(
        f"config.dims={config.dims!r}: expected dimensions >= 1"
    )
  if config.k < 1:
    raise errors.ConfigError(f"config.k={config.k}: expected >= 1")
  start_n = (
      dict(zip(dims, config.search.start_n)) if config.search.start_n else None
  )
  if start_n is not None and len(config.search.start_n) != len(dims):
    raise errors.ConfigError(
        f"config.search.start_n={config.search.start_n!r} must give one "
        f"start per dimension in config.dims={dims!r} (or be empty)"
    )
  protocol = ed.Protocol(**config.protocol.to_dict())
  print(
      f"critical-n search: d = {', '.join(map(str, dims))}, k = {config.k}, "
      f"seeds {tuple(config.seeds)}; {protocol}",
      flush=True,
  )
  start = time.perf_counter()
  searches = search.critical_n_search(
      dims,
      k=config.k,
      seeds=tuple(config.seeds),
      protocol=protocol,
      start_n=start_n,
      sweep=tuple(config.search.sweep),
      speculate=config.search.speculate,
      max_batch=config.search.max_batch,
      progress_every=config.search.progress_every,
  )
  seconds = time.perf_counter() - start
  table = {}
  for d in dims:
    by_seed = {seed: searches[(d, seed)] for seed in config.seeds}
    found = [s.critical_n for s in by_seed.values() if s.critical_n]
    table[str(d)] = dict(
        critical_n=int(np.median(found))
        if len(found) == len(by_seed)
        else None,
        paper_fit=float(search.paper_critical_n(d)),
        by_seed={str(seed): s.to_json() for seed, s in by_seed.items()},
    )
  io.write_json_atomic(workdir / "critical_n.json", table)
  measured = [
      (int(d), v["critical_n"])
      for d, v in table.items()
      if v["critical_n"] is not None
  ]
  summary = dict(
      dims=list(dims),
      k=config.k,
      seeds=list(config.seeds),
      protocol=dataclasses.asdict(protocol),
      seconds=seconds,
      runs=sum(len(s.runs) for s in searches.values()),
  )
  print(search.format_table(searches))
  if len({d for d, _ in measured}) >= 4:
    coefficients = fit_cubic(*zip(*measured))
    r2 = r_squared(coefficients, *zip(*measured))
    targets = [int(x) for x in config.output.extrapolate]
    summary.update(
        cubic=coefficients.tolist(),
        r_squared=r2,
        extrapolated={
            str(t): float(np.polynomial.polynomial.polyval(t, coefficients))
            for t in targets
        },
        paper_extrapolated={
            str(t): float(search.paper_critical_n(t)) for t in targets
        },
    )
    print(
        "cubic fit: n*(d) = "
        + " + ".join(f"{c:.4f}·d^{i}" for i, c in enumerate(coefficients))
        + f" (r² {r2:.4f}); paper: "
        + " + ".join(f"{c:.4f}·d^{i}" for i, c in enumerate(search.PAPER_CUBIC))
    )
    for t in targets:
      print(
          f"  d = {t}: {summary['extrapolated'][str(t)]:,.0f} "
          f"(paper's fit {summary['paper_extrapolated'][str(t)]:,.0f})"
      )
    write_plot(
        workdir / "critical_n",
        *zip(*measured),
        coefficients,
        title=f"free-embedding critical n, k = {config.k}",
    )
  else:
    print("fewer than 4 dimensions with a critical n: no cubic fit or plot")
  io.write_json_atomic(workdir / "summary.json", summary)
  print(
      f"{summary['runs']} runs in {seconds:.1f} s; wrote "
      f"{workdir}/critical_n.json, summary.json"
      + (", critical_n.png, critical_n.svg" if "cubic" in summary else "")
  )
  return table


def run(config, workdir):
  """The critical-n job, or (`:evaluate`) the evaluate mode on LIMIT."""
  if "protocol" in config:
    return critical_n(config, workdir)
  # pylint: disable-next=g-import-not-at-top
  from retrieval_jax import evaluate

  return evaluate.evaluate(config, workdir)


if __name__ == "__main__":
  entry.main(run)
