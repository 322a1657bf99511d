"""BPR's hash layer: ±1 codes with a scaled-tanh gradient (Yamada et al. 2021).

`sign_codes` is the inference hash (x < 0 -> -1, else +1, as the reference
implementation: 0 maps to +1, matching `search.hamming.pack_signs`).
`hash_codes` is the training hash: sign in the forward pass, the gradient of
tanh(β·x) in the backward pass (straight-through), or with
`straight_through=False` the relaxed tanh(β·x) itself (HashNet's
continuation, BPR's default). β grows with the step: `hashnet_beta`.
Parameter-free, so plain functions (STYLE.md convention 1).
"""

import jax
import jax.numpy as jnp


def sign_codes(x_nd: jax.Array) -> jax.Array:
  """[..., D] float -> ±1 in x's dtype; 0 maps to +1 (no zero codes)."""
  return jnp.where(x_nd < 0, -1.0, 1.0).astype(x_nd.dtype)


@jax.custom_jvp
def _sign_tanh_ste(x_nd, beta):
  return sign_codes(x_nd)


@_sign_tanh_ste.defjvp
def _sign_tanh_ste_jvp(primals, tangents):
  x_nd, beta = primals
  x_dot, _ = tangents  # β is a schedule, not trained: no tangent through it
  beta = jnp.asarray(beta, x_nd.dtype)
  t_nd = jnp.tanh(beta * x_nd)
  # d/dx tanh(βx) = β (1 − tanh²(βx)); the value stays exactly ±1.
  return sign_codes(x_nd), beta * (1.0 - t_nd * t_nd) * x_dot


def hash_codes(
    x_nd: jax.Array, beta: float | jax.Array, *, straight_through: bool = True
) -> jax.Array:
  """[..., D] -> training-time codes, same shape and dtype.

  straight_through: value sign(x) (exactly ±1), gradient β(1 − tanh²(βx));
  else tanh(βx), value and gradient (the relaxation BPR trains with).
  beta: scalar, may be traced (a function of the step).
  """
  if straight_through:
    return _sign_tanh_ste(x_nd, beta)
  return jnp.tanh(jnp.asarray(beta, x_nd.dtype) * x_nd)


def hashnet_beta(step: int | jax.Array, gamma: float = 0.1) -> jax.Array:
  """β = sqrt(1 + γ·step), float32: HashNet's schedule (BPR: γ = 0.1)."""
  return jnp.sqrt(1.0 + gamma * jnp.asarray(step, jnp.float32))
