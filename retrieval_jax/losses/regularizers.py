"""Sparsity regularisers for SPLADE-style [N, V] term weights (|w| is used).

L = L_rank + λ_q(t) R(q) + λ_d(t) R(d) with λ(t) from `quadratic_warmup`.
Rows with `valid_n` False (any content, NaN too) are excluded; float32 out.
"""

import jax
import jax.numpy as jnp


def _abs_weights(weights_nv, valid_n):
  # float32: FLOPS squares means of many small bf16 values.
  w_nv = jnp.abs(
      weights_nv.astype(jnp.promote_types(weights_nv.dtype, jnp.float32))
  )
  if valid_n is None:
    return w_nv, jnp.asarray(weights_nv.shape[0], w_nv.dtype)
  w_nv = jnp.where(valid_n[:, None], w_nv, 0.0)
  return w_nv, jnp.sum(valid_n).astype(w_nv.dtype)


def flops(weights_nv: jax.Array, valid_n: jax.Array | None = None) -> jax.Array:
  """FLOPS (Paria et al. 2020): `Σ_j ((1/N) Σ_i |w_ij|)²`."""
  w_nv, n = _abs_weights(weights_nv, valid_n)
  mean_v = jnp.sum(w_nv, axis=0) / jnp.maximum(n, 1.0)
  return jnp.sum(mean_v**2)


def l1(weights_nv: jax.Array, valid_n: jax.Array | None = None) -> jax.Array:
  """L1: `(1/N) Σ_i Σ_j |w_ij|`, the mean per-text weight mass."""
  w_nv, n = _abs_weights(weights_nv, valid_n)
  return jnp.sum(w_nv) / jnp.maximum(n, 1.0)


def idf_flops(
    weights_nv: jax.Array, idf_v: jax.Array, valid_n: jax.Array | None = None
) -> jax.Array:
  """FLOPS of u/idf for idf-scaled u [N, V]: Σ_j (mean_i |u_ij| / idf_j)²."""
  w_nv, n = _abs_weights(weights_nv, valid_n)
  idf_v = idf_v.astype(w_nv.dtype)
  positive_v = idf_v > 0
  # Double `where`: no 1/0 is ever formed, so gradients stay finite.
  safe_idf_v = jnp.where(positive_v, idf_v, 1.0)
  mean_v = jnp.sum(w_nv, axis=0) / jnp.maximum(n, 1.0)
  return jnp.sum(jnp.where(positive_v, (mean_v / safe_idf_v) ** 2, 0.0))


def quadratic_warmup(step: jax.Array | int, total_steps: int) -> jax.Array:
  """Regulariser factor `min(1, (step / T)²)` (SPLADE); 1.0 when T ≤ 0."""
  step = jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)
  if total_steps <= 0:
    return jnp.ones_like(step)
  return jnp.minimum(1.0, (step / total_steps) ** 2)
