"""Long convolutions for the M2 sequence mixer, and their implicit filters.

FFT convolutions are linear (size 2L; size L would be circular, its wrapped
taps O(1) wrong) and run in float32 (float64 for float64 inputs): bf16 products
summed over thousands of taps lose most of their digits. `HyenaFilter` makes
the filters: a sine MLP over positional features damped by exp(-t_n |delta_c|);
a length-L input uses the first L of `l_max` taps (positions / `l_max`).
"""

import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.layers import core


def _compute_dtype(*arrays) -> jnp.dtype:
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def fft_causal_conv(u_hl: jax.Array, k_hl: jax.Array) -> jax.Array:
  """Causal linear conv on the last axis: [..., L], [..., K <= L] -> [..., L].

  y[..., t] = sum_{s=0}^{t} k[..., s] u[..., t-s]; u's dtype, k broadcasts.
  """
  length, taps = u_hl.shape[-1], k_hl.shape[-1]
  if taps > length:
    raise ValueError(f"kernel has {taps} taps, more than the length {length}")
  dt = _compute_dtype(u_hl, k_hl)
  n = 2 * length
  k_f = jnp.fft.rfft(k_hl.astype(dt), n=n)
  u_f = jnp.fft.rfft(u_hl.astype(dt), n=n)
  y = jnp.fft.irfft(u_f * k_f, n=n)[..., :length]
  return y.astype(u_hl.dtype)


def bidirectional_kernel(k_fwd_hl: jax.Array, k_rev_hl: jax.Array) -> jax.Array:
  """[..., 2L] kernel [k_fwd, 0_L] + [0_L, rev(k_rev)] of both [..., L] taps.

  In the size-2L circular conv a lag t-j < 0 wraps to 2L+t-j, landing on
  rev(k_rev)[L+t-j] = k_rev[j-t-1]: reverse taps start at lag 1.
  """
  zeros = jnp.zeros_like(k_fwd_hl)
  return jnp.concatenate([k_fwd_hl, zeros], axis=-1) + jnp.concatenate(
      [jnp.zeros_like(k_rev_hl), jnp.flip(k_rev_hl, axis=-1)], axis=-1
  )


def bidirectional_conv(
    v_bhl: jax.Array, k_fwd_hl: jax.Array, k_rev_hl: jax.Array, d_h: jax.Array
) -> jax.Array:
  """[B, H, L] -> [B, H, L] (v's dtype) with filters [H, L] and skip d_h [H].

  y[t] = sum_{s<=t} k_fwd[s] v[t-s] + sum_{j>t} k_rev[j-t-1] v[j] + D v[t].
  """
  length = v_bhl.shape[-1]
  if k_fwd_hl.shape[-1] != length or k_rev_hl.shape[-1] != length:
    raise ValueError(
        f"filters {k_fwd_hl.shape}, {k_rev_hl.shape} do not "
        f"match the length {length}; slice them first"
    )
  dt = _compute_dtype(v_bhl, k_fwd_hl, k_rev_hl, d_h)
  n = 2 * length
  kappa_hl = bidirectional_kernel(k_fwd_hl.astype(dt), k_rev_hl.astype(dt))
  k_f = jnp.fft.rfft(kappa_hl, n=n)
  v = v_bhl.astype(dt)
  y = jnp.fft.irfft(jnp.fft.rfft(v, n=n) * k_f, n=n)[..., :length]
  y = y + d_h.astype(dt)[:, None] * v
  return y.astype(v_bhl.dtype)


def toeplitz_operator(
    k_fwd_l: jax.Array, k_rev_l: jax.Array, d: Any, length: int
) -> jax.Array:
  """Dense [L, L] matrix of `bidirectional_conv` for one channel, for tests."""
  k_fwd_l = jnp.asarray(k_fwd_l)[:length]
  k_rev_l = jnp.asarray(k_rev_l)[:length]
  idx = np.arange(length)
  lag_ll = idx[:, None] - idx[None, :]  # t - j
  lower = k_fwd_l[np.clip(lag_ll, 0, length - 1)]
  upper = k_rev_l[np.clip(-lag_ll - 1, 0, length - 1)]
  op_ll = jnp.where(lag_ll >= 0, lower, upper)
  eye_ll = jnp.eye(length, dtype=op_ll.dtype)
  return op_ll + jnp.asarray(d, op_ll.dtype) * eye_ll


def short_causal_conv(
    x_bcl: jax.Array, w_ck: jax.Array, b_c: jax.Array
) -> jax.Array:
  """Depthwise causal K-tap conv plus bias, [B, C, L] -> [B, C, L], x's dtype.

  y[b, c, t] = b[c] + sum_k w[c, k] x[b, c, t-(K-1)+k], x = 0 before the start:
  a PyTorch `Conv1d(C, C, K, groups=C, padding=K-1)` weight loads as w[:, 0].
  """
  length, taps = x_bcl.shape[-1], w_ck.shape[-1]
  dt = _compute_dtype(x_bcl, w_ck, b_c)
  x = x_bcl.astype(dt)
  pad = [(0, 0)] * (x.ndim - 1) + [(taps - 1, 0)]
  x_pad = jnp.pad(x, pad)
  w = w_ck.astype(dt)
  y = b_c.astype(dt)[:, None] + w[:, 0, None] * x_pad[..., 0:length]
  for k in range(1, taps):
    y = y + w[:, k, None] * x_pad[..., k : k + length]
  return y.astype(x_bcl.dtype)


def positional_features(
    l_max: int, emb_dim: int = 5, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
  """Fourier features (z_le [l_max, e], t_l1 [l_max, 1]), numpy, odd e >= 3.

  b = (e-1)/2 bands, f = linspace(1e-4, b-1, b), t_n = n / (l_max - 1):
  z[n] = [t_n, cos(2 pi f n / l_max), -sin(2 pi f n / l_max)].
  """
  if emb_dim < 3 or emb_dim % 2 == 0:
    raise ValueError(
        f"emb_dim must be odd and >= 3 (time, cosines, sines), got {emb_dim}"
    )
  bands = (emb_dim - 1) // 2
  n_l1 = np.arange(l_max, dtype=np.float64)[:, None]
  t_l1 = n_l1 / max(l_max - 1, 1)
  f_b = np.linspace(1e-4, bands - 1, bands)[None, :]
  angle_lb = 2 * math.pi * f_b * n_l1 / l_max
  z_le = np.concatenate([t_l1, np.cos(angle_lb), -np.sin(angle_lb)], axis=1)
  return z_le.astype(dtype), t_l1.astype(dtype)


def decay_rates(
    hidden: int,
    fast_decay_pct: float = 0.3,
    slow_decay_pct: float = 1.5,
    target: float = 1e-2,
    dtype: Any = np.float32,
) -> np.ndarray:
  """[H] numpy decay rates, linspace(ln(target) / slow, ln(target) / fast).

  Channel 0's envelope exp(-t |delta|) reaches `target` at t = slow_decay_pct.
  """
  return np.linspace(
      math.log(target) / slow_decay_pct,
      math.log(target) / fast_decay_pct,
      hidden,
  ).astype(dtype)


def exponential_modulation(t_l1: Any, delta_h: Any) -> jax.Array:
  """Envelope exp(-t_n |delta_c|), [L, 1] x [H] -> [L, H] (input dtype)."""
  return jnp.exp(-jnp.asarray(t_l1) * jnp.abs(jnp.asarray(delta_h)))


class HyenaFilter(nnx.Module):
  """Implicit bidirectional long-convolution filters for H channels.

  k_fwd[c, n] = MLP_fwd(z_n)[c] exp(-t_n |delta_c|) (k_rev likewise), z =
  `pos_emb_le`, MLP(z) = Sin(Sin(Sin(z W0 + b0) W1 + b1) W2 + b2) W3 with
  Sin(x) = sin(phi x); weights are [in, out]; `bias_h` is the skip D.
  """

  def __init__(
      self,
      hidden: int,
      l_max: int,
      *,
      emb_dim: int = 5,
      order: int = 128,
      w: float = 10.0,
      bidirectional: bool = True,
      fast_decay_pct: float = 0.3,
      slow_decay_pct: float = 1.5,
      target: float = 1e-2,
      mlp_init_std: float | None = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """`mlp_init_std`: None for PyTorch Linear inits, else N(0, std), 0 bias."""
    z_le, _ = positional_features(l_max, emb_dim, np.float64)
    self.hidden, self.l_max, self.order = hidden, l_max, order
    self.bidirectional = bidirectional
    self.fast_decay_pct = fast_decay_pct
    self.slow_decay_pct = slow_decay_pct
    self.target = target
    pd = param_dtype
    self.pos_emb_le = core.param(
        lambda key, shape, dtype: jnp.asarray(z_le, dtype),
        rngs,
        (l_max, emb_dim),
        pd,
        (None, None),
    )
    self.sin_freq_o = core.param(
        nnx.initializers.constant(w), rngs, (order,), pd, (None,)
    )
    self.bias_h = core.param(
        nnx.initializers.normal(1.0), rngs, (hidden,), pd, (sharding.EMBED,)
    )

    def linear(fan_in, shape):
      if mlp_init_std is None:
        return core.uniform(1.0 / math.sqrt(fan_in))
      if len(shape) == 1:
        return nnx.initializers.zeros
      return nnx.initializers.normal(mlp_init_std)

    layout = (
        ("w0_eo", (emb_dim, order), (None, None), emb_dim),
        ("b0_o", (order,), (None,), emb_dim),
        ("w1_oo", (order, order), (None, None), order),
        ("b1_o", (order,), (None,), order),
        ("w2_oo", (order, order), (None, None), order),
        ("b2_o", (order,), (None,), order),
        ("w3_oh", (order, hidden), (None, sharding.EMBED), order),
    )
    for prefix in ("fwd", "rev") if bidirectional else ("fwd",):
      for name, shape, axes, fan_in in layout:
        setattr(
            self,
            f"{prefix}_{name}",
            core.param(linear(fan_in, shape), rngs, shape, pd, axes),
        )

  def _mlp(
      self, prefix: str, z_le: jax.Array, phi_o: jax.Array, dt: Any
  ) -> jax.Array:
    """[L, e] features -> [L, H] raw taps of the `prefix` MLP."""
    get = lambda name: getattr(self, f"{prefix}_{name}")[...].astype(dt)
    # Tiny next to the convolutions: HIGHEST avoids bf16 passes on accelerators.
    hi = jax.lax.Precision.HIGHEST
    h = jnp.sin(
        phi_o * (jnp.dot(z_le, get("w0_eo"), precision=hi) + get("b0_o"))
    )
    h = jnp.sin(phi_o * (jnp.dot(h, get("w1_oo"), precision=hi) + get("b1_o")))
    h = jnp.sin(phi_o * (jnp.dot(h, get("w2_oo"), precision=hi) + get("b2_o")))
    return jnp.dot(h, get("w3_oh"), precision=hi)

  def __call__(self, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k_fwd_hl, k_rev_hl [H, L], d_h [H]) for a static length L <= l_max."""
    if length > self.l_max:
      raise ValueError(
          f"input length {length} exceeds the filter length l_max={self.l_max}"
      )
    dt = _compute_dtype(self.pos_emb_le[...])
    t_l1 = jnp.asarray(np.arange(length)[:, None] / max(self.l_max - 1, 1), dt)
    delta_h = jnp.asarray(
        decay_rates(
            self.hidden,
            self.fast_decay_pct,
            self.slow_decay_pct,
            self.target,
            np.float64,
        ),
        dt,
    )
    envelope_lh = exponential_modulation(t_l1, delta_h)
    z_le = self.pos_emb_le[...][:length].astype(dt)
    phi_o = self.sin_freq_o[...].astype(dt)
    k_fwd_hl = (self._mlp("fwd", z_le, phi_o, dt) * envelope_lh).T
    if self.bidirectional:
      k_rev_hl = (self._mlp("rev", z_le, phi_o, dt) * envelope_lh).T
    else:
      k_rev_hl = jnp.zeros_like(k_fwd_hl)
    return k_fwd_hl, k_rev_hl, self.bias_h[...].astype(dt)
