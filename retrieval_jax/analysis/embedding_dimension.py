"""Free-embedding optimisation against qrels (the LIMIT protocol), batched.

Weller et al. (arXiv 2508.21038) give every query and document a free unit
vector optimised against the qrels: full-batch InfoNCE, Adam, rows
re-normalised per update, loss patience, periodic top-k checks (`Protocol`;
rules in experiments/limit_critical_n/README.md). `optimize_free_embeddings`
runs many problems as one jitted lockstep `lax.while_loop`, zero-padded
exactly: each run matches a lone run up to float32 summation order.
"""

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
  """One run: relevant_mk int [m, k], num_docs (all embedded), dim, seed."""

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

  `stop` is "accuracy", "patience" or "max_iterations"; best_loss is over
  pre-update losses; batch_* describe the batched call the run shared.
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


def initial_embeddings(
    num_queries: int, num_docs: int, dim: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Unit-norm N(0, 1) float32 queries [m, d] and docs [n, d], as released."""
  q_md = _raw_normals(seed, 0, num_queries, dim)
  d_nd = _raw_normals(seed, 1, num_docs, dim)
  return (
      np.asarray(_normalize_rows(jnp.asarray(q_md))),
      np.asarray(_normalize_rows(jnp.asarray(d_nd))),
  )


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

  Partitionable threefry makes a draw a prefix of any longer one, so slicing
  one power-of-two draw per seed saves a compile per shape (most of set-up).
  """
  size = rows * dim
  if not jax.config.jax_threefry_partitionable:
    key = jax.random.split(jax.random.PRNGKey(seed))[which]
    return np.asarray(jax.random.normal(key, (rows, dim), jnp.float32))
  bucket = 1 << max(10, (size - 1).bit_length())
  return _draw_prefix(seed, which, bucket)[:size].reshape(rows, dim)


def infonce_loss(
    q_md: jax.Array,
    d_nd: jax.Array,
    positive_mn: jax.Array,
    doc_valid_n: jax.Array,
    temperature: float,
) -> jax.Array:
  """InfoNCE, every positive in one softmax over valid docs: scalar float.

  Each query's part is >= ln k (its k positives share the mass), so at k = 2
  the loss stays >= ln 2 even when every top-2 is right. positive_mn float
  [m, n] is 1 where relevant; doc_valid_n bool [n] masks padding.
  """
  logits_mn = jnp.einsum("md,nd->mn", q_md, d_nd) / temperature
  logits_mn = jnp.where(doc_valid_n, logits_mn, -jnp.inf)
  log_p_mn = jax.nn.log_softmax(logits_mn, axis=-1)
  # where, not a product: 0 * (−∞) at padded columns would be NaN.
  picked_mn = jnp.where(positive_mn > 0, log_p_mn * positive_mn, 0.0)
  return -picked_mn.sum() / jnp.maximum(positive_mn.sum(), 1.0)


def top_k_hits(
    q_md: jax.Array,
    d_nd: jax.Array,
    positive_mn: jax.Array,
    doc_valid_n: jax.Array,
    k: int,
) -> jax.Array:
  """Relevant docs in each top k (ties to lower index), summed: int32 scalar."""
  scores_mn = jnp.einsum("md,nd->mn", q_md, d_nd)
  scores_mn = jnp.where(doc_valid_n, scores_mn, -jnp.inf)
  _, top_mk = jax.lax.top_k(scores_mn, k)
  hits_mk = jnp.take_along_axis(positive_mn, top_mk, axis=-1)
  return (hits_mk > 0).sum(dtype=jnp.int32)


_RUNNING, _ACCURACY, _PATIENCE, _MAX_ITERATIONS = 0, 1, 2, 3
_STOP_NAMES = {
    _ACCURACY: "accuracy",
    _PATIENCE: "patience",
    _MAX_ITERATIONS: "max_iterations",
}


def _normalize_rows(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _optimize_batch(
    q_bmd,
    d_bnd,
    positive_bmn,
    doc_valid_bn,
    *,
    k: int,
    protocol: Protocol,
    progress_every: int,
):
  """The jitted lockstep loop over a batch of padded problems."""
  optimizer = optax.adam(protocol.learning_rate)
  num_problems = q_bmd.shape[0]
  total_b = (positive_bmn > 0).sum(axis=(1, 2), dtype=jnp.int32)
  # `best − loss > δ` in float32 agrees bit for bit with the release's float64
  # `loss < best − δ`: close float32s subtract exactly (Sterbenz), and no
  # float32 lies strictly between float32(δ) and δ.
  min_delta = jnp.float32(protocol.min_delta)
  loss_grad = jax.vmap(
      jax.value_and_grad(
          lambda q, d, p, v: infonce_loss(q, d, p, v, protocol.temperature),
          argnums=(0, 1),
      )
  )
  hits_fn = jax.vmap(lambda q, d, p, v: top_k_hits(q, d, p, v, k))
  last = protocol.max_iterations - 1

  def freeze(active_b, new, old):
    return jax.tree.map(
        lambda a, b: jnp.where(
            active_b.reshape((-1,) + (1,) * (a.ndim - 1)), a, b
        )
        if a.ndim and a.shape[0] == num_problems
        else a,
        new,
        old,
    )

  def body(carry):
    i, params, opt_state, s = carry
    active = s["stop"] == _RUNNING
    loss_b, grads = loss_grad(*params, positive_bmn, doc_valid_bn)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = jax.tree.map(
        _normalize_rows, optax.apply_updates(params, updates)
    )
    params = freeze(active, new_params, params)
    opt_state = freeze(active, new_opt_state, opt_state)
    improved = (s["best_loss"] - loss_b) > min_delta
    s = dict(
        s,
        best_loss=jnp.where(active & improved, loss_b, s["best_loss"]),
        patience=jnp.where(
            active, jnp.where(improved, 0, s["patience"] + 1), s["patience"]
        ),
        final_loss=jnp.where(active, loss_b, s["final_loss"]),
        iterations=jnp.where(active, i + 1, s["iterations"]),
    )
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
          max_hits=jnp.where(
              active, jnp.maximum(s["max_hits"], hits_b), s["max_hits"]
          ),
          stop=jnp.where(solved, _ACCURACY, s["stop"]),
      )

    # The predicate is shared by the batch, so this is a real branch.
    s = jax.lax.cond(
        (i % protocol.log_interval == 0) | (i == last), check, lambda s: s, s
    )
    s["stop"] = jnp.where(
        (i == last) & (s["stop"] == _RUNNING), _MAX_ITERATIONS, s["stop"]
    )
    if progress_every:
      jax.lax.cond(
          (i + 1) % progress_every == 0,
          lambda: jax.debug.callback(
              _print_progress,
              i + 1,
              (s["stop"] == _RUNNING).sum(),
              num_problems,
          ),
          lambda: None,
      )
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
      patience=zeros,
      iterations=zeros,
      stop=zeros,
      last_hits=zeros,
      max_hits=zeros,
  )
  carry = (jnp.int32(0), params, optimizer.init(params), state)
  _, _, _, state = jax.lax.while_loop(cond, body, carry)
  return dict(state, total=total_b)


def _print_progress(iteration, active, total) -> None:
  print(
      f"  iteration {int(iteration):,}: {int(active)} of {int(total)} runs "
      "still going",
      flush=True,
  )


_optimize_batch_jit = jax.jit(
    _optimize_batch, static_argnames=("k", "protocol", "progress_every")
)


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
    q_bmd[i, : p.num_queries] = 0.0
    q_bmd[i, : p.num_queries, : p.dim] = q_md
    d_bnd[i, : p.num_docs] = 0.0
    d_bnd[i, : p.num_docs, : p.dim] = d_nd
    rows = np.repeat(np.arange(p.num_queries), p.k)
    positive_bmn[i, rows, p.relevant_mk.reshape(-1)] = 1.0
    doc_valid_bn[i, : p.num_docs] = True
  return q_bmd, d_bnd, positive_bmn, doc_valid_bn


def _work(p: Problem) -> int:
  # One update touches every (query, doc, dim) triple a few times.
  return p.num_queries * p.num_docs * p.dim


# About one loop iteration's fixed cost (CPU: ~20 µs per update, ~1.3 µs per
# 1,000 work units); a batch may pad up to this much for free.
_FREE_WORK = 20_000


def group_by_size(
    problems: Sequence[Problem], max_batch: int = 64, max_waste: float = 1.5
) -> list[list[int]]:
  """Splits problems into batches of indices whose padding wastes little work.

  A batch runs until its slowest member stops, at its padded work per update.
  Taking problems by size, a batch closes at `max_batch` members or when its
  padded work would exceed `max_waste` times its members' own + _FREE_WORK.
  On CPU batching saves little beyond the fixed cost; on accelerators a batch
  of small problems costs about one. Returns index lists, smallest first.
  """
  if max_batch < 1 or max_waste < 1:
    raise ValueError(
        f"need max_batch >= 1 and max_waste >= 1, got {max_batch}, {max_waste}"
    )
  order = sorted(range(len(problems)), key=lambda i: _work(problems[i]))
  groups, current = [], []
  for i in order:
    trial = [problems[j] for j in current + [i]]
    padded = len(trial) * (
        max(p.num_queries for p in trial)
        * max(p.num_docs for p in trial)
        * max(p.dim for p in trial)
    )
    if current and (
        len(current) >= max_batch
        or padded > max_waste * sum(map(_work, trial)) + _FREE_WORK
    ):
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


def optimize_free_embeddings(
    problems: Sequence[Problem],
    protocol: Protocol = Protocol(),
    progress_every: int = 0,
) -> list[RunResult]:
  """Runs the protocol on every problem (all sharing k) in one jitted call.

  progress_every: print the unfinished-run count every this many iterations
  (0: silent). Returns one RunResult per problem, in order.
  """
  if not problems:
    return []
  for p in problems:
    _check_problem(p)
  k = problems[0].k
  if any(p.k != k for p in problems):
    raise ValueError(
        f"problems mix k values {sorted({p.k for p in problems})}"
        "; run each k in its own call"
    )
  arrays = _pad_problems(problems)
  start = time.perf_counter()
  out = jax.device_get(
      _optimize_batch_jit(
          *arrays, k=k, protocol=protocol, progress_every=progress_every
      )
  )
  seconds = time.perf_counter() - start
  results = []
  for i, p in enumerate(problems):
    total = int(out["total"][i])
    results.append(
        RunResult(
            n=p.num_docs,
            d=p.dim,
            k=k,
            seed=p.seed,
            num_queries=p.num_queries,
            solved=bool(out["max_hits"][i] >= total),
            max_accuracy=float(out["max_hits"][i]) / total,
            final_accuracy=float(out["last_hits"][i]) / total,
            best_loss=float(out["best_loss"][i]),
            final_loss=float(out["final_loss"][i]),
            iterations=int(out["iterations"][i]),
            stop=_STOP_NAMES[int(out["stop"][i])],
            batch_seconds=seconds,
            batch_size=len(problems),
        )
    )
  return results
