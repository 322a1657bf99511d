"""Pooling of token states into one vector per sequence, and L2 norming.

Numerics follow sentence-transformers, whose checkpoints we import: the masked
mean divides by max(count, 1e-9); `l2_normalize` is torch's `F.normalize`.
"""

import jax
import jax.numpy as jnp

POOLING_KINDS = ("cls", "mean")


def pool(hidden_bld: jax.Array, mask_bl: jax.Array, kind: str) -> jax.Array:
  """Pools token states into one vector per sequence.

  Args:
    hidden_bld: [B, L, D] token states, any float dtype.
    mask_bl: [B, L] attention mask (bool or int; nonzero marks a real token).
    kind: "cls" (the state at position 0, the [CLS] token for BERT inputs)
      or "mean" (average over the real tokens).

  Returns:
    [B, D] float32 pooled vectors. A row whose mask is all zero pools to
    zeros under "mean" (the count is clamped, as in sentence-transformers).
  """
  if kind == "cls":
    return hidden_bld[:, 0, :].astype(jnp.float32)
  if kind == "mean":
    # float32 sums; multiply-and-reduce, not an einsum, so accelerators with a
    # lower default matmul precision keep full float32.
    mask_bl = mask_bl.astype(jnp.float32)
    sum_bd = jnp.sum(hidden_bld.astype(jnp.float32) * mask_bl[..., None],
                     axis=1)
    count_b1 = jnp.sum(mask_bl, axis=1, keepdims=True)
    return sum_bd / jnp.maximum(count_b1, 1e-9)
  raise ValueError(f"unknown pooling kind {kind!r}; expected one of "
                   f"{POOLING_KINDS}")


def l2_normalize(x_bd: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Scales each row to unit L2 norm: x / max(||x||, eps).

  Args:
    x_bd: [..., D] vectors, any float dtype.
    eps: lower bound on the norm, so a zero row stays zero instead of NaN.

  Returns:
    Array of the shape and dtype of `x_bd`; the norm is taken in float32.
  """
  x32_bd = x_bd.astype(jnp.float32)
  # Clamp the norm, not its square, as torch does.
  norm_b1 = jnp.sqrt(jnp.sum(jnp.square(x32_bd), axis=-1, keepdims=True))
  return (x32_bd / jnp.maximum(norm_b1, eps)).astype(x_bd.dtype)
