"""Encoder building blocks: annotated parameters, LayerNorm, dropout keys.

Parameters carry logical axis names as `out_sharding` metadata, eager sharding
off: shardings are derived from `jax.eval_shape(init)`, nothing is placed here.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import sharding


def param(
    init_fn,
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    dtype: Any,
    axes: tuple[str | None, ...],
) -> nnx.Param:
  """Param from `init_fn(key, shape, dtype)`; `axes`: a logical name per dim."""
  assert len(axes) == len(shape), (axes, shape)
  return nnx.Param(
      init_fn(rngs.params(), shape, dtype),
      out_sharding=axes,
      eager_sharding=False,
  )


def uniform(bound: float):
  """U(-bound, bound); bound 1/sqrt(fan_in) is PyTorch's Linear/Conv default."""

  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def layer_norm(
    x_bld: jax.Array, scale_d: jax.Array, bias_d: jax.Array, eps: float
) -> jax.Array:
  """LayerNorm of [..., D] over D with >= float32 statistics; same dtype out.

  Two-pass variance as torch's; E[x^2] - E[x]^2 cancels badly if |mean| >> std.
  """
  # float32 for bf16/fp16 inputs; float64 stays float64 (x64 references).
  x32 = x_bld.astype(jnp.promote_types(x_bld.dtype, jnp.float32))
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  centered = x32 - mean
  var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
  y = centered * jax.lax.rsqrt(var + eps)
  y = y * scale_d.astype(x32.dtype) + bias_d.astype(x32.dtype)
  return y.astype(x_bld.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale (`scale_d`) and bias (`bias_d`) over the width."""

  def __init__(
      self, size: int, eps: float, param_dtype: Any, *, rngs: nnx.Rngs
  ):
    self.eps = eps
    self.scale_d = param(
        nnx.initializers.ones, rngs, (size,), param_dtype, (sharding.EMBED,)
    )
    self.bias_d = param(
        nnx.initializers.zeros, rngs, (size,), param_dtype, (sharding.EMBED,)
    )

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    """[..., D] -> [..., D], same dtype."""
    return layer_norm(x_bld, self.scale_d[...], self.bias_d[...], self.eps)


def dropout(
    layer: nnx.Dropout, x: jax.Array, deterministic: bool, rng: jax.Array | None
) -> jax.Array:
  """Applies `layer`; an explicit `rng` spares a pure train_step RNG state."""
  return layer(x, deterministic=deterministic, rngs=rng)


def dropout_keys(
    rng: jax.Array | None, count: int, deterministic: bool
) -> list[jax.Array | None]:
  """`count` independent dropout keys, or Nones (no key / deterministic)."""
  if rng is None or deterministic:
    return [None] * count
  return list(jax.random.split(rng, count))
