"""Sparsity regularisers for learned sparse (SPLADE-style) representations.

Term weights are [N, V] (N texts, V vocabulary terms), normally ≥ 0 after
log(1 + ReLU); absolute values are taken so the penalties are also valid for
signed weights. The total objective is
`L_rank + λ_q(t)·R(queries) + λ_d(t)·R(documents)` with λ(t) ramped up by
`quadratic_warmup`. Every function returns a float32 scalar and treats rows
with `valid_n` False (padding) as absent.
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

  A smooth proxy for the expected number of posting-list operations: it
  squares each term's mean activation, so terms shared by many texts cost
  far more than the same mass spread over distinct terms (N distinct
  one-hots give 1/N, N copies of one term give 1).

  Args:
    weights_nv: [N, V] term weights.
    valid_n: optional [N] bool; padded rows are excluded from the mean.

  Returns:
    float32 scalar (0 when no row is valid).
  """
  w_nv, n = _abs_weights(weights_nv, valid_n)
  # Per-term mean first, then the square: the coupling across texts is what
  # makes shared terms expensive (L1 has none).
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

  In inference-free models (SPLADE-doc, OpenSearch's IDF variant) the query
  is a bag of its terms weighted by idf, so a document's score is
  `Σ_{j∈q} u_j` with the effective contribution `u_j = idf_j · w_j(d)`. The
  regulariser is FLOPS on the *raw* document weights w = u / idf:

      Σ_j (mean_i |u_ij| / idf_j)²  =  flops(w),

  i.e. a per-term penalty ∝ 1/idf_j² on the contributions the ranking loss
  sees: frequent (low-idf) terms are pruned hardest, rare terms keep their
  weight. With idf ≡ 1 it is plain FLOPS. Terms with idf ≤ 0 never match a
  query (the query side applies ReLU to idf), so their raw weight cannot be
  recovered from u and they add 0.

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

  Multiply λ_q / λ_d by it: sparsity pressure grows slowly while the
  ranking loss shapes the representation. T ≤ 0 means no warm-up (1.0).

  Args:
    step: current step, int or int/float array (traceable).
    total_steps: T, the warm-up length in steps.

  Returns:
    float32 scalar in [0, 1].
  """
  # Traceable: the train step passes its step counter as an array.
  step = jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)
  if total_steps <= 0:
    return jnp.ones_like(step)
  return jnp.minimum(1.0, (step / total_steps)**2)
