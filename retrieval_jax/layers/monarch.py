"""Monarch matrices: block-diagonal factors between stride permutations.

A dense N x N matrix becomes block-diagonal factors between stride
permutations: 2 N^{3/2} parameters and multiply-adds at order 2, as dense
GEMMs on the blocks. Order 2 (`monarch_apply`): M = P_out B2 P_mid B1 with w1
(k, q, p), w2 (l, s, r), l*r = k*q; order p (`order_p_apply`) costs
p N^{1+1/p}; the DFT is a Monarch product (`monarch_dft`, four-step FFT).
Derivations: experiments/m2_scaling/README.md. Refs: Dao et al., Monarch
(ICML 2022); Fu et al., Monarch Mixer (2023).
"""

import math
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.layers import core

_HIGHEST = jax.lax.Precision.HIGHEST


def _stride_perm(a: int, b: int) -> np.ndarray:
  """Gather indices of the (a, b) -> (b, a) transpose: out = x[idx]."""
  return np.arange(a * b).reshape(a, b).T.reshape(-1)


def _perm_matrix(idx: np.ndarray, dtype: Any) -> jax.Array:
  """The matrix P with (P x)[i] = x[idx[i]]."""
  return jnp.eye(len(idx), dtype=dtype)[idx]


def _block_diag_dense(w_gqp: jax.Array) -> jax.Array:
  """[g, q, p] blocks -> the dense (g*q, g*p) block-diagonal matrix."""
  g, q, p = w_gqp.shape
  eye_gh = jnp.eye(g, dtype=w_gqp.dtype)
  return jnp.einsum("gqp,gh->gqhp", w_gqp, eye_gh).reshape(g * q, g * p)


def _check_order2(w1_kqp: jax.Array, w2_lsr: jax.Array) -> None:
  if w1_kqp.ndim != 3 or w2_lsr.ndim != 3:
    raise ValueError(f"factors must be 3-D, got {w1_kqp.shape}, {w2_lsr.shape}")
  k, q, _ = w1_kqp.shape
  l, _, r = w2_lsr.shape
  if l * r != k * q:
    raise ValueError(
        f"w2 (l, s, r) = {w2_lsr.shape} needs l*r = k*q for "
        f"w1 (k, q, p) = {w1_kqp.shape}"
    )


def monarch_apply(
    x_bn: jax.Array,
    w1_kqp: jax.Array,
    w2_lsr: jax.Array,
    *,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """y = P_out B2 P_mid B1 x in two block GEMMs, [..., k*p] -> [..., l*s].

  B1 maps x (k blocks of p) to h[k, q]; P_mid reads h flat as (r, l) and
  transposes; B2 gives y[l, s]; P_out emits it as (s, l). Float or complex.
  """
  _check_order2(w1_kqp, w2_lsr)
  k, _, p = w1_kqp.shape
  l, s, r = w2_lsr.shape
  if x_bn.shape[-1] != k * p:
    raise ValueError(f"input width {x_bn.shape[-1]} != k*p = {k * p}")
  lead = x_bn.shape[:-1]
  x_bkp = x_bn.reshape(*lead, k, p)
  h_bkq = jnp.einsum("...kp,kqp->...kq", x_bkp, w1_kqp, precision=precision)
  # P_mid is free: a reshape, with the transpose folded into the einsum.
  h_brl = h_bkq.reshape(*lead, r, l)
  y_bsl = jnp.einsum("...rl,lsr->...sl", h_brl, w2_lsr, precision=precision)
  return y_bsl.reshape(*lead, s * l)


def monarch_to_dense(w1_kqp: jax.Array, w2_lsr: jax.Array) -> jax.Array:
  """[l*s, k*p] M = P_out B2 P_mid B1, built without `monarch_apply` (tests)."""
  _check_order2(w1_kqp, w2_lsr)
  l, s, r = w2_lsr.shape
  dtype = jnp.result_type(w1_kqp.dtype, w2_lsr.dtype)
  b1 = _block_diag_dense(w1_kqp.astype(dtype))
  b2 = _block_diag_dense(w2_lsr.astype(dtype))
  p_mid = _perm_matrix(_stride_perm(r, l), dtype)
  p_out = _perm_matrix(_stride_perm(l, s), dtype)
  # HIGHEST keeps the block products in full float32 on accelerators.
  return jnp.linalg.multi_dot([p_out, b2, p_mid, b1], precision=_HIGHEST)


def dense_to_monarch(
    m_nn: jax.Array, nblocks: int
) -> tuple[jax.Array, jax.Array]:
  """Best square Monarch fit (Frobenius) of [N, N] m_nn; nblocks n0 divides N.

  M[(s, l), (k, p)] = w2[l, s, k] w1[k, l, p]: each (l, k) slice is rank 1,
  so it becomes its leading SVD term, sqrt(σ) to each factor. Returns
  (w1_kqp [n0, n1, n1], w2_lsr [n1, n0, n0]); Monarch matrices round-trip.
  """
  n = m_nn.shape[0]
  if m_nn.shape != (n, n) or n % nblocks:
    raise ValueError(
        "need a square matrix with nblocks | N, got "
        f"{m_nn.shape} and nblocks={nblocks}"
    )
  n0, n1 = nblocks, n // nblocks
  # [s, l, k, p] -> one (s, p) slice per (l, k).
  m_lksp = m_nn.reshape(n0, n1, n0, n1).transpose(1, 2, 0, 3)
  u_lksr, sv_lkr, vh_lkrp = jnp.linalg.svd(m_lksp, full_matrices=False)
  root_lk = jnp.sqrt(sv_lkr[..., 0]).astype(m_nn.dtype)
  w2_lks = u_lksr[..., :, 0] * root_lk[..., None]
  w1_lkp = vh_lkrp[..., 0, :] * root_lk[..., None]
  # w2[l, s, k] and w1[k, l, p], per the closed form.
  return jnp.swapaxes(w1_lkp, 0, 1), jnp.swapaxes(w2_lks, 1, 2)


def _check_order_p(factors: Sequence[jax.Array]) -> tuple[int, int]:
  """Validates order-p factors; returns (N, b)."""
  if not factors:
    raise ValueError("need at least one factor")
  g, b, _ = factors[0].shape
  n = g * b
  for f in factors:
    if f.shape != (g, b, b):
      raise ValueError(
          f"all factors must be (N/b, b, b) = {(g, b, b)}, got {f.shape}"
      )
  if b ** len(factors) != n:
    raise ValueError(
        f"order {len(factors)} with block {b} needs N = "
        f"{b ** len(factors)}, got N = {n}"
    )
  return n, b


def order_p_apply(
    x_bn: jax.Array,
    factors: Sequence[jax.Array],
    *,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """(R F_p) ... (R F_1) x, [..., N = b^p] -> [..., N], p N^{1+1/p} mult-adds.

  factors: p [N/b, b, b] (block, out, in), F_i block-diagonal over b-chunks, R
  the (N/b, b) stride permutation. For p = 3, digits (a, c, d) in, (x, y, z)
  out: M = F_3[y*b + z, x, a] F_2[z*b + a, y, c] F_1[a*b + c, z, d].
  """
  n, b = _check_order_p(factors)
  if x_bn.shape[-1] != n:
    raise ValueError(f"input width {x_bn.shape[-1]} != N = {n}")
  lead = x_bn.shape[:-1]
  y_bn = x_bn
  for f_gqp in factors:
    # Writing the output as (q, g) is the stride permutation R.
    y_bqg = jnp.einsum(
        "...gp,gqp->...qg",
        y_bn.reshape(*lead, n // b, b),
        f_gqp,
        precision=precision,
    )
    y_bn = y_bqg.reshape(*lead, n)
  return y_bn


def order_p_to_dense(factors: Sequence[jax.Array]) -> jax.Array:
  """The explicit [N, N] matrix (R F_p) ... (R F_1) of `order_p_apply`."""
  n, b = _check_order_p(factors)
  dtype = jnp.result_type(*[f.dtype for f in factors])
  r_nn = _perm_matrix(_stride_perm(n // b, b), dtype)
  m_nn = jnp.eye(n, dtype=dtype)
  for f_gqp in factors:
    m_nn = jnp.linalg.multi_dot(
        [r_nn, _block_diag_dense(f_gqp.astype(dtype)), m_nn], precision=_HIGHEST
    )
  return m_nn


def blockdiag_apply(
    x_bi: jax.Array,
    w_gqp: jax.Array,
    out_features: int | None = None,
    *,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """Block-diagonal map [..., in <= g*p] -> [..., out_features <= g*q].

  Block g maps x[g*p:(g+1)*p] to y[g*q:(g+1)*q]; x is zero-padded, y cut.
  """
  g, q, p = w_gqp.shape
  in_features = x_bi.shape[-1]
  out_features = g * q if out_features is None else out_features
  if in_features > g * p or out_features > g * q:
    raise ValueError(
        f"widths {in_features} -> {out_features} exceed the "
        f"blocks {w_gqp.shape}"
    )
  if in_features < g * p:
    pad = [(0, 0)] * (x_bi.ndim - 1) + [(0, g * p - in_features)]
    x_bi = jnp.pad(x_bi, pad)
  lead = x_bi.shape[:-1]
  y_bgq = jnp.einsum(
      "...gp,gqp->...gq", x_bi.reshape(*lead, g, p), w_gqp, precision=precision
  )
  return y_bgq.reshape(*lead, g * q)[..., :out_features]


def _root_of_unity(modulus: int, exponent: np.ndarray) -> np.ndarray:
  """exp(-2 pi i e / M) in complex128; e mod M keeps float64 angles exact."""
  return np.exp(-2j * np.pi * (exponent % modulus) / modulus)


def dft_monarch_factors(
    m1: int, m2: int, dtype: Any = jnp.complex64
) -> tuple[jax.Array, jax.Array]:
  """Monarch factors of the length-N DFT, N = m1*m2 (four-step FFT).

  fft(x) == monarch_apply(P_in x, w1, w2), P_in the (m1, m2) grid transpose;
  w1[n2, k1, n1] = w_N^{k1 (m2 n1 + n2)} ([m2, m1, m1]) folds in the twiddle
  as one exact root of unity; w2[k1, k2, n2] = w_m2^{k2 n2} ([m1, m2, m2]).
  """
  n = m1 * m2
  n2 = np.arange(m2)[:, None, None]
  k1 = np.arange(m1)[None, :, None]
  n1 = np.arange(m1)[None, None, :]
  w1_kqp = _root_of_unity(n, k1 * (m2 * n1 + n2))
  k2 = np.arange(m2)[:, None]
  w2_sr = _root_of_unity(m2, k2 * np.arange(m2)[None, :])
  w2_lsr = np.broadcast_to(w2_sr, (m1, m2, m2))
  return jnp.asarray(w1_kqp, dtype), jnp.asarray(w2_lsr, dtype)


def monarch_dft(
    x_bn: jax.Array,
    m1: int,
    m2: int,
    *,
    precision: jax.lax.PrecisionLike = _HIGHEST,
) -> jax.Array:
  """DFT of [..., N = m1*m2] as a Monarch product; equals `jnp.fft.fft`.

  O(N (m1 + m2)) multiply-adds in two dense block GEMMs, instead of the FFT's
  O(N log N) scalar butterflies; real input is promoted to complex.
  """
  n = m1 * m2
  if x_bn.shape[-1] != n:
    raise ValueError(f"input width {x_bn.shape[-1]} != m1*m2 = {n}")
  dtype = jnp.result_type(x_bn.dtype, jnp.complex64)
  lead = x_bn.shape[:-1]
  x_bn = jnp.swapaxes(x_bn.astype(dtype).reshape(*lead, m1, m2), -1, -2)
  w1_kqp, w2_lsr = dft_monarch_factors(m1, m2, dtype)
  return monarch_apply(
      x_bn.reshape(*lead, n), w1_kqp, w2_lsr, precision=precision
  )


class BlockDiagLinear(nnx.Module):
  """y = blockdiag(W_1..W_g) pad(x) [:out_features] + bias.

  Init as the checkpoints we match: W U(±1/sqrt(in_blk)), bias U(±1/sqrt(out)).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      nblocks: int,
      *,
      use_bias: bool = True,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
      in_axis: str | None = sharding.EMBED,
      out_axis: str | None = sharding.MLP,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    in_blk = -(-in_features // nblocks)
    out_blk = -(-out_features // nblocks)
    self.weight_gqp = core.param(
        core.uniform(1 / math.sqrt(in_blk)),
        rngs,
        (nblocks, out_blk, in_blk),
        param_dtype,
        (None, out_axis, in_axis),
    )
    self.bias_o = (
        core.param(
            core.uniform(1 / math.sqrt(out_features)),
            rngs,
            (out_features,),
            param_dtype,
            (out_axis,),
        )
        if use_bias
        else None
    )

  def __call__(self, x_bi: jax.Array) -> jax.Array:
    """[..., in_features] -> [..., out_features] in `dtype`."""
    y_bo = blockdiag_apply(
        x_bi.astype(self.dtype),
        self.weight_gqp[...].astype(self.dtype),
        self.out_features,
    )
    if self.bias_o is not None:
      y_bo = y_bo + self.bias_o[...].astype(self.dtype)
    return y_bo


class MonarchLinear(nnx.Module):
  """Order-2 Monarch replacement of a dense layer: y = M pad(x) + bias.

  Init matches a PyTorch Linear's Var y = Var x / 3: w1 U(±sqrt(3 g / in)) is
  variance preserving, w2 U(±1/sqrt(q)) (both by fan-in would give Var x / 9).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      nblocks: int,
      *,
      use_bias: bool = True,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
      in_axis: str | None = sharding.EMBED,
      out_axis: str | None = sharding.MLP,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    in_blk = -(-in_features // nblocks)
    out_blk = -(-out_features // nblocks)
    q = min(in_blk, out_blk)
    self.w1_kqp = core.param(
        core.uniform(math.sqrt(3 * nblocks / in_features)),
        rngs,
        (nblocks, q, in_blk),
        param_dtype,
        (None, None, in_axis),
    )
    self.w2_lsr = core.param(
        core.uniform(1 / math.sqrt(q)),
        rngs,
        (nblocks, out_blk, q),
        param_dtype,
        (None, out_axis, None),
    )
    self.bias_o = (
        core.param(
            core.uniform(1 / math.sqrt(in_features)),
            rngs,
            (out_features,),
            param_dtype,
            (out_axis,),
        )
        if use_bias
        else None
    )

  def __call__(self, x_bi: jax.Array) -> jax.Array:
    """[..., in_features] -> [..., out_features] in `dtype`."""
    w1_kqp = self.w1_kqp[...].astype(self.dtype)
    w2_lsr = self.w2_lsr[...].astype(self.dtype)
    g, _, in_blk = w1_kqp.shape
    x_bi = x_bi.astype(self.dtype)
    if self.in_features < g * in_blk:
      pad = [(0, 0)] * (x_bi.ndim - 1) + [(0, g * in_blk - self.in_features)]
      x_bi = jnp.pad(x_bi, pad)
    y_bo = monarch_apply(x_bi, w1_kqp, w2_lsr)[..., : self.out_features]
    if self.bias_o is not None:
      y_bo = y_bo + self.bias_o[...].astype(self.dtype)
    return y_bo
