"""Pooling of token states into one vector per sequence, and L2 norming.

Numerics follow sentence-transformers, whose checkpoints we import.
"""

import jax
import jax.numpy as jnp

POOLING_KINDS = ("cls", "mean")


def pool(hidden_bld: jax.Array, mask_bl: jax.Array, kind: str) -> jax.Array:
  """[B, L, D], mask [B, L] -> [B, D] float32: position 0 or the masked mean."""
  if kind == "cls":
    return hidden_bld[:, 0, :].astype(jnp.float32)
  if kind == "mean":
    # Not an einsum: stays float32 under a lower default matmul precision.
    mask_bl = mask_bl.astype(jnp.float32)
    sum_bd = jnp.sum(
        hidden_bld.astype(jnp.float32) * mask_bl[..., None], axis=1
    )
    count_b1 = jnp.sum(mask_bl, axis=1, keepdims=True)
    return sum_bd / jnp.maximum(count_b1, 1e-9)
  raise ValueError(
      f"unknown pooling kind {kind!r}; expected one of {POOLING_KINDS}"
  )


def l2_normalize(x_bd: jax.Array, eps: float = 1e-12) -> jax.Array:
  """[..., D] -> x / max(||x||, eps) (torch's F.normalize), same dtype."""
  x32_bd = x_bd.astype(jnp.float32)
  # Clamp the norm, not its square, as torch does.
  norm_b1 = jnp.sqrt(jnp.sum(jnp.square(x32_bd), axis=-1, keepdims=True))
  return (x32_bd / jnp.maximum(norm_b1, eps)).astype(x_bd.dtype)
