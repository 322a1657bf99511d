r"""Embedding-dimension limits of single-vector retrieval (LIMIT).

The free-embedding experiment of "On the Theoretical Limitations of
Embedding-Based Retrieval" (Weller et al., arXiv 2508.21038): for n
documents, make every k-subset a query, give every query and document its own
free d-dimensional unit vector, and optimise them directly against the qrels.
The largest n whose every top-k set is reproduced exactly is the *critical
n* of d; the paper fits it with a cubic in d and extrapolates.

The protocol, exactly as released:

* queries: all C(n, k) k-subsets of n documents, in lexicographic order;
* init: `key = PRNGKey(seed)`, split into (query key, doc key), i.i.d. N(0, 1)
  float32 of shapes [C(n, k), d] and [n, d], rows L2-normalised;
* loss: full-batch InfoNCE over all n documents at temperature 0.1, every
  positive of a query sharing one softmax, averaged over the positive pairs;
* optimiser: Adam(0.01), and both matrices' rows re-normalised after every
  update (projected steps on the sphere);
* iteration i (from 0): one update (the loss is the one before it); then the
  loss patience (stop once 1,000 consecutive iterations failed to beat the
  best loss by more than 1e-5); then, if i % 50 == 0 or i is the last
  allowed iteration, the top-k accuracy of the updated embeddings
  (|relevant ∩ top-k| summed over queries / number of positives), stopping
  at 1.0; at most 100,000 iterations;
* n counts as solved iff the accuracy reached 1.0.

Here the whole run is one jitted `lax.while_loop`, and many runs (different
n, d, seeds or qrel patterns) share it: they are zero-padded to common
shapes and stepped in lockstep, each frozen once it stops. Padding is exact:
padded documents get score −∞, padded queries have no positives, padded
dimensions stay zero (zero gradient, zero Adam update) and padded rows are
fixed unit vectors. The results are those of one run on its own up to
float32 summation order, which can move a run that sits on the edge of
success; a search never evaluates one n twice.

The critical-n search (`critical_n_search`) is the released gallop, binary
search and sweep, replayed from a table of finished runs; each round it runs
every dimension's next n together, with the n that each outcome would ask
for next (speculation), in one call.
"""

import dataclasses
import functools
import itertools
import json
import pathlib
import time
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retrieval_jax import plotting
from retrieval_jax.analysis import qrel_patterns

class ConfigError(ValueError):
  """A config value of the critical_n mode is wrong; names the key."""


# The paper's cubic fit of the critical n against d (coefficients of d^0..d^3).
PAPER_CUBIC = (-10.5322, 4.0309, 0.0520, 0.0037)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Hyper-parameters of the free-embedding runs (the paper's defaults)."""
  learning_rate: float = 0.01  # Adam step size.
  temperature: float = 0.1  # InfoNCE temperature.
  max_iterations: int = 100_000  # Hard cap on updates per run.
  log_interval: int = 50  # Accuracy is checked when i % log_interval == 0.
  patience: int = 1_000  # Updates without a loss improvement before stopping.
  min_delta: float = 1e-5  # An improvement must beat the best loss by this.


@dataclasses.dataclass(frozen=True)
class Problem:
  """One free-embedding run: a qrel pattern, a dimension and a seed.

  Attributes:
    relevant_mk: int [m, k], the documents relevant to each query.
    num_docs: n; documents that no query names still get embeddings.
    dim: d, the embedding dimension.
    seed: PRNG seed of the initial embeddings.
  """
  relevant_mk: np.ndarray
  num_docs: int
  dim: int
  seed: int = 42

  @property
  def num_queries(self) -> int:
    return int(self.relevant_mk.shape[0])

  @property
  def k(self) -> int:
    return int(self.relevant_mk.shape[1])


@dataclasses.dataclass(frozen=True)
class RunResult:
  """The outcome of one free-embedding run.

  Attributes:
    n, d, k, seed, num_queries: the problem.
    solved: the top-k accuracy reached 1.0.
    max_accuracy: best top-k accuracy seen at the checks.
    final_accuracy: accuracy at the last check.
    best_loss: lowest loss seen (the loss before each update).
    final_loss: loss of the last update.
    iterations: updates made.
    stop: "accuracy", "patience" or "max_iterations".
    batch_seconds: wall time of the batched call the run was part of.
    batch_size: how many runs shared that call.
  """
  n: int
  d: int
  k: int
  seed: int
  num_queries: int
  solved: bool
  max_accuracy: float
  final_accuracy: float
  best_loss: float
  final_loss: float
  iterations: int
  stop: str
  batch_seconds: float
  batch_size: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def initial_embeddings(num_queries: int, num_docs: int, dim: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The protocol's start: unit-norm N(0, 1) rows, float32.

  Returns:
    (queries [m, d], docs [n, d]) float32, drawn exactly as the released
    experiment draws them (one key per matrix, split from PRNGKey(seed)).
  """
  q_md = _raw_normals(seed, 0, num_queries, dim)
  d_nd = _raw_normals(seed, 1, num_docs, dim)
  return (np.asarray(_normalize_rows(jnp.asarray(q_md))),
          np.asarray(_normalize_rows(jnp.asarray(d_nd))))


@functools.lru_cache(maxsize=None)
def _draw_prefix(seed: int, which: int, size: int) -> np.ndarray:
  """float32 [size]: N(0, 1) draws of key `which` of split(PRNGKey(seed))."""
  key = jax.random.split(jax.random.PRNGKey(seed))[which]
  return np.asarray(_normal_1d(key, size))


@functools.partial(jax.jit, static_argnums=1)
def _normal_1d(key, size):
  return jax.random.normal(key, (size,), jnp.float32)


def _raw_normals(seed: int, which: int, rows: int, dim: int) -> np.ndarray:
  """float32 [rows, dim], equal to `jax.random.normal(key, (rows, dim))`.

  With partitionable threefry (JAX's default) element i of a draw depends
  only on the key and i, so a [rows, dim] draw is the first rows * dim
  values of any longer 1-D draw. Drawing power-of-two lengths once per seed
  and slicing avoids one compile per shape (most of a search's set-up).
  """
  size = rows * dim
  if not jax.config.jax_threefry_partitionable:
    key = jax.random.split(jax.random.PRNGKey(seed))[which]
    return np.asarray(jax.random.normal(key, (rows, dim), jnp.float32))
  bucket = 1 << max(10, (size - 1).bit_length())
  return _draw_prefix(seed, which, bucket)[:size].reshape(rows, dim)


def infonce_loss(q_md: jax.Array, d_nd: jax.Array, positive_mn: jax.Array,
                 doc_valid_n: jax.Array, temperature: float) -> jax.Array:
  """InfoNCE over all documents, every positive in one softmax.

  −Σ_{(i,j) positive} log softmax_j(q_i·d_j / T) / (number of positives).
  Each query's part is at least ln k (its k positives share the mass), so
  with k = 2 the loss never drops below ln 2 even when every top-2 is right.

  Args:
    q_md: float [m, d] query embeddings.
    d_nd: float [n, d] document embeddings.
    positive_mn: float [m, n], 1 where doc j is relevant to query i.
    doc_valid_n: bool [n]; False columns (padding) leave the softmax.
    temperature: softmax temperature.

  Returns:
    Scalar float loss.
  """
  logits_mn = jnp.einsum("md,nd->mn", q_md, d_nd) / temperature
  logits_mn = jnp.where(doc_valid_n, logits_mn, -jnp.inf)
  log_p_mn = jax.nn.log_softmax(logits_mn, axis=-1)
  # where, not a product: 0 * (−∞) at padded columns would be NaN.
  picked_mn = jnp.where(positive_mn > 0, log_p_mn * positive_mn, 0.0)
  return -picked_mn.sum() / jnp.maximum(positive_mn.sum(), 1.0)


def top_k_hits(q_md: jax.Array, d_nd: jax.Array, positive_mn: jax.Array,
               doc_valid_n: jax.Array, k: int) -> jax.Array:
  """Relevant documents among each query's top k by dot product, summed.

  Ties go to the lower document index. Returns an int32 scalar; dividing by
  the number of positives gives the protocol's top-k accuracy.
  """
  scores_mn = jnp.einsum("md,nd->mn", q_md, d_nd)
  scores_mn = jnp.where(doc_valid_n, scores_mn, -jnp.inf)
  _, top_mk = jax.lax.top_k(scores_mn, k)
  hits_mk = jnp.take_along_axis(positive_mn, top_mk, axis=-1)
  return (hits_mk > 0).sum(dtype=jnp.int32)


# Stop codes carried through the loop.
_RUNNING, _ACCURACY, _PATIENCE, _MAX_ITERATIONS = 0, 1, 2, 3
_STOP_NAMES = {_ACCURACY: "accuracy", _PATIENCE: "patience",
               _MAX_ITERATIONS: "max_iterations"}


def _normalize_rows(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _optimize_batch(q_bmd, d_bnd, positive_bmn, doc_valid_bn, *, k: int,
                    protocol: Protocol, progress_every: int):
  """The jitted lockstep loop over a batch of padded problems."""
  optimizer = optax.adam(protocol.learning_rate)
  num_problems = q_bmd.shape[0]
  total_b = (positive_bmn > 0).sum(axis=(1, 2), dtype=jnp.int32)
  # `best − loss > δ` rather than the released `loss < best − δ` in float64:
  # both losses are float32 and close, so their float32 difference is exact
  # (Sterbenz), and no float32 lies strictly between float32(δ) and δ, so
  # the two tests agree bit for bit.
  min_delta = jnp.float32(protocol.min_delta)
  loss_grad = jax.vmap(jax.value_and_grad(
      lambda q, d, p, v: infonce_loss(q, d, p, v, protocol.temperature),
      argnums=(0, 1)))
  hits_fn = jax.vmap(lambda q, d, p, v: top_k_hits(q, d, p, v, k))
  last = protocol.max_iterations - 1

  def freeze(active_b, new, old):
    return jax.tree.map(
        lambda a, b: jnp.where(
            active_b.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
        if a.ndim and a.shape[0] == num_problems else a, new, old)

  def body(carry):
    i, params, opt_state, s = carry
    active = s["stop"] == _RUNNING
    loss_b, grads = loss_grad(*params, positive_bmn, doc_valid_bn)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = jax.tree.map(_normalize_rows,
                              optax.apply_updates(params, updates))
    params = freeze(active, new_params, params)
    opt_state = freeze(active, new_opt_state, opt_state)
    improved = (s["best_loss"] - loss_b) > min_delta
    s = dict(
        s,
        best_loss=jnp.where(active & improved, loss_b, s["best_loss"]),
        patience=jnp.where(active, jnp.where(improved, 0, s["patience"] + 1),
                           s["patience"]),
        final_loss=jnp.where(active, loss_b, s["final_loss"]),
        iterations=jnp.where(active, i + 1, s["iterations"]))
    # The patience stop comes before this iteration's accuracy check.
    out_of_patience = active & (s["patience"] >= protocol.patience)
    s["stop"] = jnp.where(out_of_patience, _PATIENCE, s["stop"])
    active &= ~out_of_patience

    def check(s):
      hits_b = hits_fn(*params, positive_bmn, doc_valid_bn)
      solved = active & (hits_b >= total_b)
      return dict(
          s,
          last_hits=jnp.where(active, hits_b, s["last_hits"]),
          max_hits=jnp.where(active, jnp.maximum(s["max_hits"], hits_b),
                             s["max_hits"]),
          stop=jnp.where(solved, _ACCURACY, s["stop"]))

    # The predicate is shared by the batch, so this is a real branch.
    s = jax.lax.cond((i % protocol.log_interval == 0) | (i == last), check,
                     lambda s: s, s)
    s["stop"] = jnp.where((i == last) & (s["stop"] == _RUNNING),
                          _MAX_ITERATIONS, s["stop"])
    if progress_every:
      jax.lax.cond(
          (i + 1) % progress_every == 0,
          lambda: jax.debug.callback(
              _print_progress, i + 1, (s["stop"] == _RUNNING).sum(),
              num_problems),
          lambda: None)
    return i + 1, params, opt_state, s

  def cond(carry):
    i, _, _, s = carry
    return (i < protocol.max_iterations) & jnp.any(s["stop"] == _RUNNING)

  # The protocol's start: unit rows (padded rows are unit already).
  params = (_normalize_rows(q_bmd), _normalize_rows(d_bnd))
  zeros = jnp.zeros((num_problems,), jnp.int32)
  state = dict(
      best_loss=jnp.full((num_problems,), jnp.inf, jnp.float32),
      final_loss=jnp.full((num_problems,), jnp.nan, jnp.float32),
      patience=zeros, iterations=zeros, stop=zeros, last_hits=zeros,
      max_hits=zeros)
  carry = (jnp.int32(0), params, optimizer.init(params), state)
  _, _, _, state = jax.lax.while_loop(cond, body, carry)
  return dict(state, total=total_b)


def _print_progress(iteration, active, total) -> None:
  print(f"  iteration {int(iteration):,}: {int(active)} of {int(total)} runs "
        "still going", flush=True)


_optimize_batch_jit = jax.jit(
    _optimize_batch, static_argnames=("k", "protocol", "progress_every"))


def _pad_problems(problems: Sequence[Problem]):
  """Stacks problems into zero-padded float32 arrays (see module doc)."""
  m = max(p.num_queries for p in problems)
  n = max(p.num_docs for p in problems)
  d = max(p.dim for p in problems)
  b = len(problems)
  # Padded rows are the unit vector e_0: no gradient reaches them (their
  # scores are masked or carry no positives) and normalising keeps them.
  q_bmd = np.zeros((b, m, d), np.float32)
  q_bmd[:, :, 0] = 1.0
  d_bnd = np.zeros((b, n, d), np.float32)
  d_bnd[:, :, 0] = 1.0
  positive_bmn = np.zeros((b, m, n), np.float32)
  doc_valid_bn = np.zeros((b, n), bool)
  for i, p in enumerate(problems):
    # Raw draws; the loop normalises them first, as the protocol does.
    q_md = _raw_normals(p.seed, 0, p.num_queries, p.dim)
    d_nd = _raw_normals(p.seed, 1, p.num_docs, p.dim)
    q_bmd[i, :p.num_queries] = 0.0
    q_bmd[i, :p.num_queries, :p.dim] = q_md
    d_bnd[i, :p.num_docs] = 0.0
    d_bnd[i, :p.num_docs, :p.dim] = d_nd
    rows = np.repeat(np.arange(p.num_queries), p.k)
    positive_bmn[i, rows, p.relevant_mk.reshape(-1)] = 1.0
    doc_valid_bn[i, :p.num_docs] = True
  return q_bmd, d_bnd, positive_bmn, doc_valid_bn


def _work(p: Problem) -> int:
  # One update touches every (query, doc, dim) triple a few times.
  return p.num_queries * p.num_docs * p.dim


# Work that costs about as much as the fixed cost of one loop iteration
# (measured on CPU: ~20 µs per update, ~1.3 µs per 1,000 work units); a
# batch may pad up to this much for free.
_FREE_WORK = 20_000


def group_by_size(problems: Sequence[Problem], max_batch: int = 64,
                  max_waste: float = 1.5) -> list[list[int]]:
  """Splits problems into batches whose padding wastes little work.

  A batch costs its size times the work of its padded shape per update, and
  runs until its slowest member stops, so one large problem makes every
  small one beside it as expensive as itself. On CPU an update's time is
  close to linear in that work above a small fixed cost, so batching saves
  little there beyond the fixed cost; on accelerators a batch of small
  problems costs about as much as one. Problems are taken in order of
  size and a batch is closed when adding the next would make its padded
  work exceed `max_waste` times the sum of its members' own work, or when it
  holds `max_batch` problems.

  Returns:
    Lists of indices into `problems`, smallest problems first.
  """
  if max_batch < 1 or max_waste < 1:
    raise ValueError(f"need max_batch >= 1 and max_waste >= 1, got "
                     f"{max_batch}, {max_waste}")
  order = sorted(range(len(problems)), key=lambda i: _work(problems[i]))
  groups, current = [], []
  for i in order:
    trial = [problems[j] for j in current + [i]]
    padded = len(trial) * (max(p.num_queries for p in trial) *
                           max(p.num_docs for p in trial) *
                           max(p.dim for p in trial))
    if current and (len(current) >= max_batch or padded > max_waste * sum(
        map(_work, trial)) + _FREE_WORK):
      groups.append(current)
      current = []
    current.append(i)
  if current:
    groups.append(current)
  return groups


def _check_problem(p: Problem) -> None:
  rel = np.asarray(p.relevant_mk)
  if rel.ndim != 2 or rel.shape[0] < 1 or rel.shape[1] < 1:
    raise ValueError(f"relevant_mk must be [m >= 1, k >= 1], got {rel.shape}")
  if p.num_docs <= p.k:
    raise ValueError(f"num_docs={p.num_docs} must exceed k={p.k}")
  if rel.min() < 0 or rel.max() >= p.num_docs:
    raise ValueError(f"relevant_mk names documents outside [0, {p.num_docs})")
  if any(len(set(row)) != p.k for row in rel.tolist()):
    raise ValueError("relevant_mk repeats a document within a query")
  if p.dim < 1:
    raise ValueError(f"dim={p.dim} must be >= 1")


def optimize_free_embeddings(problems: Sequence[Problem],
                             protocol: Protocol = Protocol(),
                             progress_every: int = 0) -> list[RunResult]:
  """Runs the free-embedding protocol on every problem in one jitted call.

  Args:
    problems: runs to make; all must share k (the top-k being checked).
    protocol: hyper-parameters (the paper's by default).
    progress_every: print the number of unfinished runs every this many
      iterations (0: silent).

  Returns:
    One RunResult per problem, in order.
  """
  if not problems:
    return []
  for p in problems:
    _check_problem(p)
  k = problems[0].k
  if any(p.k != k for p in problems):
    raise ValueError(f"problems mix k values {sorted({p.k for p in problems})}"
                     "; run each k in its own call")
  arrays = _pad_problems(problems)
  start = time.perf_counter()
  out = jax.device_get(_optimize_batch_jit(
      *arrays, k=k, protocol=protocol, progress_every=progress_every))
  seconds = time.perf_counter() - start
  results = []
  for i, p in enumerate(problems):
    total = int(out["total"][i])
    results.append(RunResult(
        n=p.num_docs, d=p.dim, k=k, seed=p.seed, num_queries=p.num_queries,
        solved=bool(out["max_hits"][i] >= total),
        max_accuracy=float(out["max_hits"][i]) / total,
        final_accuracy=float(out["last_hits"][i]) / total,
        best_loss=float(out["best_loss"][i]),
        final_loss=float(out["final_loss"][i]),
        iterations=int(out["iterations"][i]),
        stop=_STOP_NAMES[int(out["stop"][i])],
        batch_seconds=seconds, batch_size=len(problems)))
  return results


def paper_critical_n(d) -> np.ndarray:
  """The paper's fitted critical n at dimension(s) d (float)."""
  return np.polynomial.polynomial.polyval(np.asarray(d, float), PAPER_CUBIC)


def initial_n(d: int, k: int = 2) -> int:
  """Where a search starts by default: the paper's fit, rounded."""
  return max(k + 1, int(round(float(paper_critical_n(d)))))


# A search step asks for the outcomes of some n and receives them.
_SearchSteps = Iterator[list[int]]


def _released_search(start_n: int, sweep: tuple[int, int]
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
    yield sorted({max(critical + o, min_n)
                  for o in range(sweep[0], sweep[1] + 1)})
  return critical


def _replay(start_n: int, sweep: tuple[int, int],
            known: Mapping[int, bool]) -> tuple[bool, object]:
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


def _speculate(start_n, sweep, known, depth: int,
               hypothetical: bool = False) -> set[int]:
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
      wanted |= _speculate(start_n, sweep, {**known, request[0]: outcome},
                           depth - 1, hypothetical=True)
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
  runs: dict[int, RunResult] = dataclasses.field(default_factory=dict)
  asked: list[int] = dataclasses.field(default_factory=list)

  def solved_n(self) -> list[int]:
    return sorted(n for n, r in self.runs.items() if r.solved)

  def failed_n(self) -> list[int]:
    return sorted(n for n, r in self.runs.items() if not r.solved)

  def to_json(self) -> dict:
    return dict(d=self.d, k=self.k, seed=self.seed, start_n=self.start_n,
                critical_n=self.critical_n, solved=self.solved_n(),
                failed=self.failed_n(), asked=self.asked,
                runs={str(n): r.to_json() for n, r in sorted(self.runs.items())})


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
    dims: Sequence[int], k: int = 2, seeds: Sequence[int] = (42,),
    protocol: Protocol = Protocol(), start_n: Mapping[int, int] | None = None,
    sweep: tuple[int, int] = (-4, 5), speculate: int = 1,
    max_batch: int = 64, max_waste: float = 1.5, progress_every: int = 0,
    log: Callable[[str], None] = print) -> dict[tuple[int, int], SearchResult]:
  """Critical n for every (d, seed), all searches advancing together.

  Each round collects, for every unfinished search, the n the released
  search asks for next plus (with `speculate` > 0) the n it would ask for
  after each possible outcome, `speculate` outcomes deep; they run in
  batched calls of similar sizes (`group_by_size`). The outcomes are those the one-at-a-time search would
  see, so the critical n is the released search's; speculation only trades
  extra runs for fewer rounds.

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
    progress_every: passed to `optimize_free_embeddings`.
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
      for n in sorted(_speculate(search.start_n, sweep, known[key],
                                 speculate)):
        if n <= k:
          # n = k: one query, every document relevant, solved at the first
          # check. n < k: no k-subsets; the released script records an
          # error row with accuracy 0, i.e. not solved.
          known[key][n] = n == k
        else:
          wanted.append((key, n))
    if not wanted:
      if any(not _replay(s.start_n, sweep, known[key])[0]
             for key, s in searches.items()):
        continue  # Trivial n were filled in; ask again.
      break
    round_index += 1
    problems = [Problem(qrel_patterns.dense(n, k), n, key[0], key[1])
                for key, n in wanted]
    for group in group_by_size(problems, max_batch, max_waste):
      results = optimize_free_embeddings([problems[i] for i in group],
                                         protocol, progress_every)
      for i, result in zip(group, results):
        key, n = wanted[i]
        known[key][n] = result.solved
        searches[key].runs[n] = result
      log(f"round {round_index}: {len(group)} runs in "
          f"{results[0].batch_seconds:.1f} s: " + ", ".join(
              f"d={r.d} n={r.n} {'ok' if r.solved else 'x'}({r.iterations})"
              for r in results))
  for key, search in searches.items():
    search.critical_n = _replay(search.start_n, sweep, known[key])[1]
    search.asked = _asked_order(search.start_n, sweep, known[key])
  return searches


def fit_cubic(dims: Sequence[int], critical: Sequence[float]) -> np.ndarray:
  """Least-squares cubic n*(d) = c0 + c1 d + c2 d² + c3 d³.

  Args:
    dims: at least four distinct dimensions.
    critical: the critical n measured at each.

  Returns:
    float64 [4], the coefficients of d^0 ... d^3 (PAPER_CUBIC's layout).
  """
  d = np.asarray(dims, np.float64)
  if len(set(d.tolist())) < 4:
    raise ValueError(f"a cubic needs at least 4 distinct dimensions, got "
                     f"{sorted(set(d.tolist()))}")
  return np.polynomial.polynomial.polyfit(d, np.asarray(critical, float), 3)


def r_squared(coefficients, dims, critical) -> float:
  """Coefficient of determination of a polynomial fit."""
  y = np.asarray(critical, np.float64)
  fitted = np.polynomial.polynomial.polyval(np.asarray(dims, float),
                                            coefficients)
  total = ((y - y.mean()) ** 2).sum()
  return float(1.0 - ((y - fitted) ** 2).sum() / total) if total else 1.0


def write_plot_svg(path, dims, critical, coefficients,
                   paper=PAPER_CUBIC, title: str = "") -> None:
  """Writes an SVG plot of measured critical n and the cubic fits.

  The measured points, our cubic (solid) and the paper's cubic (dashed)
  over the measured range of d, one unit beyond on each side.
  """
  dims = np.asarray(dims, float)
  lo, hi = dims.min() - 1, dims.max() + 1
  grid = np.linspace(lo, hi, 200)
  series = [plotting.Series(
      "this run, cubic fit", grid,
      np.polynomial.polynomial.polyval(grid, coefficients), color="#1f77b4")]
  if paper is not None:
    series.append(plotting.Series(
        "paper's cubic fit", grid,
        np.polynomial.polynomial.polyval(grid, paper), color="#d62728",
        dash="6,4"))
  series.append(plotting.Series("measured (largest solved n)", dims,
                                np.asarray(critical, float), color="black",
                                line=False, markers=True))
  plotting.line_plot_svg(path, series, title=title or "critical n against d",
                         xlabel="embedding dimension d", ylabel="critical n",
                         x_range=(lo, hi))


def format_table(searches: Mapping[tuple[int, int], SearchResult]) -> str:
  """A text table: d, seed, critical n, the paper's fit, solved/failed n."""
  lines = [f"{'d':>3} {'seed':>5} {'critical n':>10} {'paper fit':>9} "
           f"{'runs':>4}  solved n / failed n",
           "-" * 72]
  for (d, seed), s in sorted(searches.items()):
    solved, failed = s.solved_n(), s.failed_n()
    lines.append(
        f"{d:>3} {seed:>5} {str(s.critical_n):>10} "
        f"{float(paper_critical_n(d)):>9.1f} {len(s.runs):>4}  "
        f"{_ranges(solved)} / {_ranges(failed)}")
  return "\n".join(lines)


def _ranges(values: Sequence[int]) -> str:
  """[5, 6, 7, 9] -> '5-7,9'."""
  out = []
  for _, group in itertools.groupby(enumerate(values), lambda t: t[1] - t[0]):
    group = [v for _, v in group]
    out.append(f"{group[0]}-{group[-1]}" if len(group) > 1 else f"{group[0]}")
  return ",".join(out) or "-"


def _write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  tmp.replace(path)


def run(config, workdir) -> dict:
  """The `critical_n` mode: searches, fit, plot and table (configs/limit.py).

  Writes to the workdir:
    critical_n.json  {d: {critical_n, paper_fit, by_seed: {seed: search}}},
                     each search with its solved / failed n and every run;
    summary.json     the fitted cubic, r², extrapolations, protocol, timing;
    critical_n.svg   measured points with this run's and the paper's cubic.

  Returns:
    The critical_n.json content.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  dims = tuple(int(d) for d in config.dims)
  if not dims or min(dims) < 1:
    raise ConfigError(f"config.dims={config.dims!r}: expected dimensions >= 1")
  if config.k < 1:
    raise ConfigError(f"config.k={config.k}: expected >= 1")
  start_n = dict(zip(dims, config.search.start_n)) if config.search.start_n \
      else None
  if start_n is not None and len(config.search.start_n) != len(dims):
    raise ConfigError(
        f"config.search.start_n={config.search.start_n!r} must give one "
        f"start per dimension in config.dims={dims!r} (or be empty)")
  protocol = Protocol(**config.protocol.to_dict())
  print(f"critical-n search: d = {', '.join(map(str, dims))}, k = {config.k}, "
        f"seeds {tuple(config.seeds)}; {protocol}", flush=True)
  start = time.perf_counter()
  searches = critical_n_search(
      dims, k=config.k, seeds=tuple(config.seeds), protocol=protocol,
      start_n=start_n, sweep=tuple(config.search.sweep),
      speculate=config.search.speculate, max_batch=config.search.max_batch,
      progress_every=config.search.progress_every)
  seconds = time.perf_counter() - start
  table = {}
  for d in dims:
    by_seed = {seed: searches[(d, seed)] for seed in config.seeds}
    found = [s.critical_n for s in by_seed.values() if s.critical_n]
    table[str(d)] = dict(
        critical_n=int(np.median(found)) if len(found) == len(by_seed)
        else None,
        paper_fit=float(paper_critical_n(d)),
        by_seed={str(seed): s.to_json() for seed, s in by_seed.items()})
  _write_json(workdir / "critical_n.json", table)
  measured = [(int(d), v["critical_n"]) for d, v in table.items()
              if v["critical_n"] is not None]
  summary = dict(dims=list(dims), k=config.k, seeds=list(config.seeds),
                 protocol=dataclasses.asdict(protocol), seconds=seconds,
                 runs=sum(len(s.runs) for s in searches.values()))
  print(format_table(searches))
  if len({d for d, _ in measured}) >= 4:
    coefficients = fit_cubic(*zip(*measured))
    r2 = r_squared(coefficients, *zip(*measured))
    targets = [int(x) for x in config.output.extrapolate]
    summary.update(
        cubic=coefficients.tolist(), r_squared=r2,
        extrapolated={str(t): float(np.polynomial.polynomial.polyval(
            t, coefficients)) for t in targets},
        paper_extrapolated={str(t): float(paper_critical_n(t))
                            for t in targets})
    print("cubic fit: n*(d) = " + " + ".join(
        f"{c:.4f}·d^{i}" for i, c in enumerate(coefficients)) +
          f" (r² {r2:.4f}); paper: " + " + ".join(
              f"{c:.4f}·d^{i}" for i, c in enumerate(PAPER_CUBIC)))
    for t in targets:
      print(f"  d = {t}: {summary['extrapolated'][str(t)]:,.0f} "
            f"(paper's fit {summary['paper_extrapolated'][str(t)]:,.0f})")
    write_plot_svg(workdir / "critical_n.svg", *zip(*measured), coefficients,
                   title=f"free-embedding critical n, k = {config.k}")
  else:
    print("fewer than 4 dimensions with a critical n: no cubic fit or plot")
  _write_json(workdir / "summary.json", summary)
  print(f"{summary['runs']} runs in {seconds:.1f} s; wrote "
        f"{workdir}/critical_n.json, summary.json" +
        (", critical_n.svg" if "cubic" in summary else ""))
  return table
