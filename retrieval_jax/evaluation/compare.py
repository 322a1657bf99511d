r"""Paired significance tests between two runs' per-query values.

  python -m retrieval_jax.evaluation.compare A B [--measure ndcg@10]

A and B are `metrics_per_query.json` files or dirs holding one (an evaluate
workdir, a train run's eval/step_<n>/<name>/), paired by query id. Tests:
paired t-test and paired randomization (sign-flip) test.
"""

import itertools
import json
import pathlib
import sys

import numpy as np


def load_per_query(path) -> dict[str, dict[str, float]]:
  """{measure: {query id: value}} from a file or a directory holding one."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics_per_query.json"
  return json.loads(path.read_text())


def randomization_p(
    diff_n: np.ndarray, *, samples: int = 100_000, seed: int = 0
) -> float:
  """Two-sided p of the paired sign-flip test on differences `diff_n`.

  p = P(|mean(s * diff)| >= |mean(diff)|) over random signs s; exact for
  n <= 16 (every sign pattern), else Monte Carlo with the observed
  statistic counted once (p is never 0).
  """
  diff_n = np.asarray(diff_n, np.float64)
  n = len(diff_n)
  observed = abs(diff_n.mean()) - 1e-12  # Ties count as extreme.
  if n <= 16:
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    return float(np.mean(np.abs(signs @ diff_n / n) >= observed))
  rng = np.random.default_rng(seed)
  hits = 0
  for start in range(0, samples, 10_000):
    signs = rng.choice((1.0, -1.0), size=(min(10_000, samples - start), n))
    hits += int(np.sum(np.abs(signs @ diff_n / n) >= observed))
  return (hits + 1) / (samples + 1)


def compare(
    a: dict[str, float], b: dict[str, float], *, samples: int = 100_000
) -> dict[str, float]:
  """Paired comparison of per-query values {query id: value} of A and B.

  Returns:
    {"queries", "mean_a", "mean_b", "delta" (B - A), "p_ttest",
     "p_randomization"}; p values are 1 when the runs agree everywhere,
    and the t-test's is nan for a single query.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  common = sorted(set(a) & set(b))
  if not common:
    raise ValueError("the two runs share no query")
  a_n = np.array([a[q] for q in common], np.float64)
  b_n = np.array([b[q] for q in common], np.float64)
  diff_n = b_n - a_n
  same = not np.any(diff_n)
  return {
      "queries": len(common),
      "mean_a": float(a_n.mean()),
      "mean_b": float(b_n.mean()),
      "delta": float(diff_n.mean()),
      "p_ttest": (
          1.0
          if same
          else float("nan")
          if len(common) < 2
          else float(stats.ttest_rel(b_n, a_n).pvalue)
      ),
      "p_randomization": (
          1.0 if same else randomization_p(diff_n, samples=samples)
      ),
  }


def main(argv: list[str]) -> int:
  args = [x for x in argv if not x.startswith("--")]
  measures = [x.split("=", 1)[1] for x in argv if x.startswith("--measure=")]
  if len(args) != 2:
    print(__doc__.strip().splitlines()[2], file=sys.stderr)
    return 2
  a, b = (load_per_query(x) for x in args)
  for measure in measures or sorted(set(a) & set(b)):
    if measure not in a or measure not in b:
      print(f"error: measure {measure!r} is not in both runs", file=sys.stderr)
      return 2
    r = compare(a[measure], b[measure])
    print(
        f"{measure:<12} A {r['mean_a']:.4f}  B {r['mean_b']:.4f}  "
        f"B-A {r['delta']:+.4f}  p(t) {r['p_ttest']:.4g}  "
        f"p(rand) {r['p_randomization']:.4g}  ({r['queries']} queries)"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
