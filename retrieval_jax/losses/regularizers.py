"""Sparsity regularisers for learned sparse (SPLADE-style) representations.

Weights are [N, V] (texts x terms); |w| is taken, so signed weights work too.
Objective: L_rank + λ_q(t) R(queries) + λ_d(t) R(docs), λ(t) ramped by
`quadratic_warmup`. Rows with `valid_n` False are absent; returns float32.
"""

import jax
import jax.numpy as jnp


def _abs_weights(weights_nv, valid_n):
  """|w| in float32 with padded rows zeroed, and the valid row count."""
  # bf16 weights are upcast: FLOPS squares means of many small values.
  w_nv = jnp.abs(weights_nv.astype(jnp.promote_types(weights_nv.dtype,
                                                     jnp.float32)))
  if valid_n is None:
    return w_nv, jnp.asarray(weights_nv.shape[0], w_nv.dtype)
  # `where`: padded rows may hold anything, NaN included.
  w_nv = jnp.where(valid_n[:, None], w_nv, 0.0)
  return w_nv, jnp.sum(valid_n).astype(w_nv.dtype)


def flops(weights_nv: jax.Array, valid_n: jax.Array | None = None
          ) -> jax.Array:
  """FLOPS (Paria et al. 2020): `Σ_j ((1/N) Σ_i |w_ij|)²`.

  A smooth proxy for posting-list operations: terms shared by many texts
  cost more than the same mass over distinct terms (N one-hots: 1/N; N
  copies of one term: 1).

  Args:
    weights_nv: [N, V] term weights.
    valid_n: optional [N] bool; padded rows are excluded from the mean.

  Returns:
    float32 scalar (0 when no row is valid).
  """
  w_nv, n = _abs_weights(weights_nv, valid_n)
  mean_v = jnp.sum(w_nv, axis=0) / jnp.maximum(n, 1.0)
  return jnp.sum(mean_v**2)


def l1(weights_nv: jax.Array, valid_n: jax.Array | None = None) -> jax.Array:
  """L1: `(1/N) Σ_i Σ_j |w_ij|`, the mean per-text weight mass.

  Args:
    weights_nv: [N, V] term weights.
    valid_n: optional [N] bool; padded rows are excluded from the mean.

  Returns:
    float32 scalar.
  """
  w_nv, n = _abs_weights(weights_nv, valid_n)
  return jnp.sum(w_nv) / jnp.maximum(n, 1.0)


def idf_flops(weights_nv: jax.Array, idf_v: jax.Array,
              valid_n: jax.Array | None = None) -> jax.Array:
  """IDF-aware FLOPS for inference-free sparse retrieval.

  With idf-weighted query bags the ranking loss sees u_j = idf_j w_j(d);
  this is FLOPS on the raw weights, Σ_j (mean_i |u_ij| / idf_j)², a penalty
  ∝ 1/idf² that prunes frequent terms hardest. Terms with idf ≤ 0 never
  match (the query side ReLUs idf) and add 0.

  Args:
    weights_nv: [N, V] effective (idf-scaled) document contributions u.
    idf_v: [V] idf of every term.
    valid_n: optional [N] bool; padded rows are excluded from the mean.

  Returns:
    float32 scalar, equal to `flops(u / idf)` on the terms with idf > 0.
  """
  w_nv, n = _abs_weights(weights_nv, valid_n)
  idf_v = idf_v.astype(w_nv.dtype)
  positive_v = idf_v > 0
  # Double `where`: no 1/0 is ever formed, so gradients stay finite.
  safe_idf_v = jnp.where(positive_v, idf_v, 1.0)
  mean_v = jnp.sum(w_nv, axis=0) / jnp.maximum(n, 1.0)
  return jnp.sum(jnp.where(positive_v, (mean_v / safe_idf_v)**2, 0.0))


def quadratic_warmup(step: jax.Array | int, total_steps: int) -> jax.Array:
  """Regulariser weight factor `min(1, (step / T)²)` (SPLADE, OpenSearch).

  Sparsity pressure grows slowly while the ranking loss shapes the
  representation. T ≤ 0 means no warm-up (1.0).

  Args:
    step: current step, int or int/float array (traceable).
    total_steps: T, the warm-up length in steps.

  Returns:
    float32 scalar in [0, 1].
  """
  step = jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)
  if total_steps <= 0:
    return jnp.ones_like(step)
  return jnp.minimum(1.0, (step / total_steps)**2)
