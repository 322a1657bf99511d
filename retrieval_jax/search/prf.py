"""Vector pseudo-relevance feedback (PRF) for dense query embeddings.

Li et al., arXiv:2108.11044: move q towards the first pass's documents and
search again. `feedback_qk` [Q, K] holds first-pass corpus rows, best first;
entries < 0 are skipped, a mean over no rows is 0, and an index >= N raises
eagerly but gathers NaN under `jit`. q' is not unit length; for cosine models
that rescales each query's scores without changing its ranking.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# q' / max(|q'|, eps): a zero q' stays zero instead of becoming NaN.
_NORM_EPS = 1e-12


def _check_inputs(queries_qd, docs_nd, feedback_qk) -> None:
  if jnp.ndim(queries_qd) != 2:
    raise ValueError(
        f"queries_qd must be [Q, D], got shape {jnp.shape(queries_qd)}"
    )
  if jnp.ndim(docs_nd) != 2:
    raise ValueError(f"docs_nd must be [N, D], got shape {jnp.shape(docs_nd)}")
  if jnp.shape(docs_nd)[1] != jnp.shape(queries_qd)[1]:
    raise ValueError(
        f"docs_nd has dimension {jnp.shape(docs_nd)[1]} but "
        f"queries_qd has {jnp.shape(queries_qd)[1]}"
    )
  if jnp.ndim(feedback_qk) != 2 or (
      jnp.shape(feedback_qk)[0] != jnp.shape(queries_qd)[0]
  ):
    raise ValueError(
        f"feedback_qk must be [Q={jnp.shape(queries_qd)[0]}, K],"
        f" got shape {jnp.shape(feedback_qk)}"
    )
  if not jnp.issubdtype(jnp.result_type(feedback_qk), jnp.integer):
    raise ValueError(
        "feedback_qk must hold integer corpus indices, got "
        f"dtype {jnp.result_type(feedback_qk)}"
    )
  if not isinstance(feedback_qk, jax.core.Tracer) and jnp.size(feedback_qk):
    max_index = int(np.max(np.asarray(feedback_qk)))
    if max_index >= jnp.shape(docs_nd)[0]:
      raise ValueError(
          f"feedback_qk holds index {max_index}, but docs_nd "
          f"has only {jnp.shape(docs_nd)[0]} rows"
      )


def _check_count(name: str, value: int) -> None:
  if (
      isinstance(value, bool)
      or not isinstance(value, (int, np.integer))
      or (value < 0)
  ):
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _masked_sum(
    docs_nd: jax.Array, feedback_qk: jax.Array, use_qk: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """[Q, D] sum and [Q] float32 count of the rows `use_qk` selects."""
  # `where`, not a multiply: a NaN row gathered for a bad index cannot leak.
  docs_qkd = jnp.take(docs_nd, jnp.where(use_qk, feedback_qk, 0), axis=0)
  sum_qd = jnp.sum(jnp.where(use_qk[..., None], docs_qkd, 0.0), axis=1)
  return sum_qd, jnp.sum(use_qk, axis=1, dtype=jnp.float32)


def _first_valid(valid_qk: jax.Array, k: int) -> jax.Array:
  """[Q, K] bool: the first k True entries of each row."""
  return valid_qk & (jnp.cumsum(valid_qk, axis=1) <= k)


def _last_valid(valid_qk: jax.Array, k: int) -> jax.Array:
  """[Q, K] bool: the last k True entries of each row."""
  from_end_qk = jnp.flip(jnp.cumsum(jnp.flip(valid_qk, 1), axis=1), 1)
  return valid_qk & (from_end_qk <= k)


def _maybe_renormalize(q_qd: jax.Array, renormalize: bool) -> jax.Array:
  if not renormalize:
    return q_qd
  norm_q1 = jnp.linalg.norm(q_qd, axis=1, keepdims=True)
  return q_qd / jnp.maximum(norm_q1, _NORM_EPS)


@functools.partial(jax.jit, static_argnames=("k", "renormalize"))
def _average(queries_qd, docs_nd, feedback_qk, k, renormalize):
  valid_qk = feedback_qk >= 0
  sum_qd, count_q = _masked_sum(docs_nd, feedback_qk, _first_valid(valid_qk, k))
  q_qd = (queries_qd + sum_qd) / (1.0 + count_q)[:, None]
  return _maybe_renormalize(q_qd, renormalize)


def average_prf(
    queries_qd: jax.Array,
    docs_nd: jax.Array,
    feedback_qk: jax.Array,
    *,
    k: int,
    renormalize: bool = False,
) -> jax.Array:
  """Average PRF: q' = (q + Σ first k valid feedback rows) / (1 + rows used).

  queries_qd [Q, D] and docs_nd [N, D] are cast to float32; k >= 0 (0 returns
  q); `renormalize` returns q' / |q'|. Returns [Q, D] float32.
  """
  _check_inputs(queries_qd, docs_nd, feedback_qk)
  _check_count("k", k)
  return _average(
      jnp.asarray(queries_qd, jnp.float32),
      jnp.asarray(docs_nd, jnp.float32),
      jnp.asarray(feedback_qk),
      k=int(k),
      renormalize=bool(renormalize),
  )


@functools.partial(
    jax.jit, static_argnames=("k_top", "k_bottom", "renormalize")
)
def _rocchio(
    queries_qd,
    docs_nd,
    feedback_qk,
    alpha,
    beta,
    gamma,
    k_top,
    k_bottom,
    renormalize,
):
  valid_qk = feedback_qk >= 0
  top_qd, top_q = _masked_sum(
      docs_nd, feedback_qk, _first_valid(valid_qk, k_top)
  )
  q_qd = alpha * queries_qd + beta * (top_qd / jnp.maximum(top_q, 1)[:, None])
  if k_bottom:
    bottom_qd, bottom_q = _masked_sum(
        docs_nd, feedback_qk, _last_valid(valid_qk, k_bottom)
    )
    q_qd = q_qd - gamma * (bottom_qd / jnp.maximum(bottom_q, 1)[:, None])
  return _maybe_renormalize(q_qd, renormalize)


def rocchio_prf(
    queries_qd: jax.Array,
    docs_nd: jax.Array,
    feedback_qk: jax.Array,
    *,
    alpha: float = 0.9,
    beta: float = 0.1,
    gamma: float = 0.1,
    k_top: int = 3,
    k_bottom: int = 0,
    renormalize: bool = False,
) -> jax.Array:
  """Rocchio PRF: q' = alpha q + beta mean(top) - gamma mean(bottom).

  top / bottom: the first k_top / last k_bottom valid feedback rows (k_bottom
  = 0: no negative term); shapes, dtypes, `renormalize` as in `average_prf`.
  """
  _check_inputs(queries_qd, docs_nd, feedback_qk)
  _check_count("k_top", k_top)
  _check_count("k_bottom", k_bottom)
  weights = [jnp.asarray(w, jnp.float32) for w in (alpha, beta, gamma)]
  return _rocchio(
      jnp.asarray(queries_qd, jnp.float32),
      jnp.asarray(docs_nd, jnp.float32),
      jnp.asarray(feedback_qk),
      *weights,
      k_top=int(k_top),
      k_bottom=int(k_bottom),
      renormalize=bool(renormalize),
  )
