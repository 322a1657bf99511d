"""The released critical-n search, replayed and advanced in batched rounds.

The LIMIT authors' search for the critical n of a dimension d (the largest n
whose every top-k set the free-embedding protocol reproduces): gallop from a
start n, binary search, then a sweep around the result, for reporting.
`critical_n_search` replays it from a table of finished runs and each round
runs every search's next n, plus the n each outcome would ask for next
(speculation), in one `embedding_dimension.optimize_free_embeddings` call.
A search never runs an n twice, so its decisions are the one-at-a-time
released search's.
"""

import dataclasses
import itertools
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from retrieval_jax.analysis import embedding_dimension as ed
from retrieval_jax.analysis import qrel_patterns

# The paper's cubic fit of the critical n against d (coefficients of d^0..d^3).
PAPER_CUBIC = (-10.5322, 4.0309, 0.0520, 0.0037)


def paper_critical_n(d) -> np.ndarray:
  """The paper's fitted critical n at dimension(s) d (float)."""
  return np.polynomial.polynomial.polyval(np.asarray(d, float), PAPER_CUBIC)


def initial_n(d: int, k: int = 2) -> int:
  """Where a search starts by default: the paper's fit, rounded."""
  return max(k + 1, int(round(float(paper_critical_n(d)))))


def _released_search(
    start_n: int, sweep: tuple[int, int]
) -> Iterator[list[int]]:
  """The released critical-n search as a generator of requests.

  Yields lists of n to run; is sent back {n: solved}; returns the critical
  n (the largest n the binary search confirmed, None if none was solved).
  Gallop from `start_n` (up by 1, 2, 4, ... while solved, else down), binary
  search between the last success and the first failure, then the sweep
  critical + sweep[0] ... critical + sweep[1] (reporting only).
  """
  min_n = 1

  def solved(n):
    return (yield [n])[n]

  n_low = n_high = None
  if (yield from solved(start_n)):
    n_low, step = start_n, 1
    while True:
      if (yield from solved(n_low + step)):
        n_low += step
        step *= 2
      else:
        n_high = n_low + step
        break
  else:
    n_high, step = start_n, 1
    while n_high > min_n:
      n_test = max(n_high - step, min_n)
      if not (yield from solved(n_test)):
        n_high = n_test
        step *= 2
        if n_test == min_n:
          break
      else:
        n_low = n_test
        break
  critical = n_low
  if n_low is not None and n_high is not None:
    low, high = n_low, n_high
    while low <= high:
      mid = (low + high) // 2
      if mid < min_n:
        break
      if (yield from solved(mid)):
        critical, low = mid, mid + 1
      else:
        high = mid - 1
  if critical is not None and sweep[1] >= sweep[0]:
    yield sorted(
        {max(critical + o, min_n) for o in range(sweep[0], sweep[1] + 1)}
    )
  return critical


def _replay(
    start_n: int, sweep: tuple[int, int], known: Mapping[int, bool]
) -> tuple[bool, object]:
  """Runs the search against known outcomes.

  Returns (True, critical_n) when it finishes, else (False, [n, ...]): the
  unknown n it asks for next.
  """
  steps = _released_search(start_n, sweep)
  try:
    request = next(steps)
    while True:
      missing = [n for n in request if n not in known]
      if missing:
        return False, missing
      request = steps.send({n: known[n] for n in request})
  except StopIteration as stop:
    return True, stop.value


def _speculate(
    start_n, sweep, known, depth: int, hypothetical: bool = False
) -> set[int]:
  """The n the search asks for now, and for `depth` more outcomes ahead.

  A sweep (a request for several n) is run only once it is real, not on a
  guessed outcome: it is ten runs, most of them slow failures.
  """
  done, request = _replay(start_n, sweep, known)
  if done or (hypothetical and len(request) > 1):
    return set()
  wanted = set(request)
  if depth > 0 and len(request) == 1:
    for outcome in (True, False):
      wanted |= _speculate(
          start_n,
          sweep,
          {**known, request[0]: outcome},
          depth - 1,
          hypothetical=True,
      )
  return wanted


@dataclasses.dataclass
class SearchResult:
  """The critical-n search of one (d, seed).

  Attributes:
    d, k, seed: what was searched.
    start_n: where the gallop started.
    critical_n: the largest n the search confirmed solved (None: none).
    runs: every run made for this (d, seed), by n (speculative runs too).
    asked: the n the released search itself asked for, in order.
  """

  d: int
  k: int
  seed: int
  start_n: int
  critical_n: int | None = None
  runs: dict[int, ed.RunResult] = dataclasses.field(default_factory=dict)
  asked: list[int] = dataclasses.field(default_factory=list)

  def solved_n(self) -> list[int]:
    return sorted(n for n, r in self.runs.items() if r.solved)

  def failed_n(self) -> list[int]:
    return sorted(n for n, r in self.runs.items() if not r.solved)

  def to_json(self) -> dict:
    return dict(
        d=self.d,
        k=self.k,
        seed=self.seed,
        start_n=self.start_n,
        critical_n=self.critical_n,
        solved=self.solved_n(),
        failed=self.failed_n(),
        asked=self.asked,
        runs={str(n): r.to_json() for n, r in sorted(self.runs.items())},
    )


def _asked_order(start_n, sweep, known) -> list[int]:
  """The n the released search asks for, in order, given all outcomes."""
  steps, asked = _released_search(start_n, sweep), []
  try:
    request = next(steps)
    while True:
      asked += [n for n in request if n not in asked]
      request = steps.send({n: known[n] for n in request})
  except StopIteration:
    return asked


def critical_n_search(
    dims: Sequence[int],
    k: int = 2,
    seeds: Sequence[int] = (42,),
    protocol: ed.Protocol = ed.Protocol(),
    start_n: Mapping[int, int] | None = None,
    sweep: tuple[int, int] = (-4, 5),
    speculate: int = 1,
    max_batch: int = 64,
    max_waste: float = 1.5,
    progress_every: int = 0,
    log: Callable[[str], None] = print,
) -> dict[tuple[int, int], SearchResult]:
  """Critical n for every (d, seed), all searches advancing together.

  Each round collects, for every unfinished search, the n the released
  search asks for next plus (with `speculate` > 0) the n it would ask for
  after each possible outcome, `speculate` outcomes deep; they run in
  batched calls of similar sizes (`ed.group_by_size`). The outcomes are
  those the one-at-a-time search would see, so the critical n is the
  released search's; speculation only trades extra runs for fewer rounds.

  Args:
    dims: embedding dimensions d.
    k: relevant documents per query (queries are all k-subsets).
    seeds: seeds of the initial embeddings; one search per (d, seed).
    protocol: free-embedding hyper-parameters.
    start_n: gallop start per d (default `initial_n(d, k)`).
    sweep: offsets around the critical n also run for reporting.
    speculate: outcomes to look ahead per round.
    max_batch: most runs per batched call.
    max_waste: padded work a call may spend per unit of real work.
    progress_every: passed to `ed.optimize_free_embeddings`.
    log: where one line per round goes.

  Returns:
    {(d, seed): SearchResult}.
  """
  searches = {}
  for d in dims:
    first = (start_n or {}).get(d, initial_n(d, k))
    if first < 1:
      raise ValueError(f"start n for d={d} must be >= 1, got {first}")
    for seed in seeds:
      searches[(d, seed)] = SearchResult(d=d, k=k, seed=seed, start_n=first)
  known = {key: {} for key in searches}
  round_index = 0
  while True:
    wanted = []
    for key, search in searches.items():
      for n in sorted(_speculate(search.start_n, sweep, known[key], speculate)):
        if n <= k:
          # n = k: one query, every document relevant, solved at the first
          # check. n < k: no k-subsets; the released script records an
          # error row with accuracy 0, i.e. not solved.
          known[key][n] = n == k
        else:
          wanted.append((key, n))
    if not wanted:
      if any(
          not _replay(s.start_n, sweep, known[key])[0]
          for key, s in searches.items()
      ):
        continue  # Trivial n were filled in; ask again.
      break
    round_index += 1
    problems = [
        ed.Problem(qrel_patterns.dense(n, k), n, key[0], key[1])
        for key, n in wanted
    ]
    for group in ed.group_by_size(problems, max_batch, max_waste):
      results = ed.optimize_free_embeddings(
          [problems[i] for i in group], protocol, progress_every
      )
      for i, result in zip(group, results):
        key, n = wanted[i]
        known[key][n] = result.solved
        searches[key].runs[n] = result
      log(
          f"round {round_index}: {len(group)} runs in "
          f"{results[0].batch_seconds:.1f} s: "
          + ", ".join(
              f"d={r.d} n={r.n} {'ok' if r.solved else 'x'}({r.iterations})"
              for r in results
          )
      )
  for key, search in searches.items():
    search.critical_n = _replay(search.start_n, sweep, known[key])[1]
    search.asked = _asked_order(search.start_n, sweep, known[key])
  return searches


def format_table(searches: Mapping[tuple[int, int], SearchResult]) -> str:
  """A text table: d, seed, critical n, the paper's fit, solved/failed n."""
  lines = [
      (
          f"{'d':>3} {'seed':>5} {'critical n':>10} {'paper fit':>9} "
          f"{'runs':>4}  solved n / failed n"
      ),
      "-" * 72,
  ]
  for (d, seed), s in sorted(searches.items()):
    solved, failed = s.solved_n(), s.failed_n()
    lines.append(
        f"{d:>3} {seed:>5} {str(s.critical_n):>10} "
        f"{float(paper_critical_n(d)):>9.1f} {len(s.runs):>4}  "
        f"{_ranges(solved)} / {_ranges(failed)}"
    )
  return "\n".join(lines)


def _ranges(values: Sequence[int]) -> str:
  """[5, 6, 7, 9] -> '5-7,9'."""
  out = []
  for _, group in itertools.groupby(enumerate(values), lambda t: t[1] - t[0]):
    group = [v for _, v in group]
    out.append(f"{group[0]}-{group[-1]}" if len(group) > 1 else f"{group[0]}")
  return ",".join(out) or "-"
