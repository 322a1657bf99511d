"""Tests for retrieval_jax.layers.monarch.

Oracles: the fast reshape/einsum products against dense matrices built from
explicit block-diagonal and permutation matrices, against index-level
closed forms, and against a loop over the definition; exact projection via
rank-1 slices; the four-step DFT against `jnp.fft.fft` and the convolution
theorem against `np.convolve`; block-diagonal layers against
`scipy.linalg.block_diag`.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from retrieval_jax import sharding
from retrieval_jax.layers import monarch as mo
import test_util

# Jitted once per shape; eager dispatch would compile every primitive.
apply = jax.jit(mo.monarch_apply)
to_dense = jax.jit(mo.monarch_to_dense)
to_monarch = jax.jit(mo.dense_to_monarch, static_argnums=1)
p_apply = jax.jit(mo.order_p_apply)
p_dense = jax.jit(mo.order_p_to_dense)
dft = jax.jit(mo.monarch_dft, static_argnums=(1, 2))
bd_apply = jax.jit(mo.blockdiag_apply, static_argnums=2)


def _rngs(seed):
  # The "rbg" generator compiles far faster than threefry; the layers'
  # init laws do not depend on which bit generator feeds them.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _normal(rng, shape, scale=1.0, dtype=np.float64):
  return (rng.normal(size=shape) * scale).astype(dtype)


def _factors(rng, k, q, p, l, s, r, dtype=np.float64):
  """Random factors scaled by 1/sqrt(fan-in), so outputs stay O(1)."""
  return (
      _normal(rng, (k, q, p), p**-0.5, dtype),
      _normal(rng, (l, s, r), r**-0.5, dtype),
  )


def _loop_dense(w1, w2):
  """M straight from the definition: one output at a time, plain loops."""
  k, q, p = w1.shape
  l, s, r = w2.shape
  m = np.zeros((l * s, k * p))
  for kk in range(k):
    for qq in range(q):
      # Middle index j = kk*q + qq, read as (r, l) and moved to (l, r).
      rr, ll = divmod(kk * q + qq, l)
      for ss in range(s):
        m[ss * l + ll, kk * p : (kk + 1) * p] += w2[ll, ss, rr] * w1[kk, qq]
  return m


def _avals(jaxpr):
  """Every value produced anywhere in a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield eqn.primitive.name, var.aval
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jex.ClosedJaxpr):
          yield from _avals(sub.jaxpr)
        elif isinstance(sub, jex.Jaxpr):
          yield from _avals(sub)


def _x64(fn, *args):
  """Runs `fn` in float64 and returns NumPy arrays (tree)."""
  with jax.enable_x64(True):
    out = fn(*[jax.tree.map(jnp.asarray, a) for a in args])
    return jax.tree.map(np.asarray, out)


def _dense_c(w1, w2):
  """Complex dense matrix through the loop oracle (M is bilinear)."""
  return (
      _loop_dense(w1.real, w2.real)
      - _loop_dense(w1.imag, w2.imag)
      + 1j * (_loop_dense(w1.real, w2.imag) + _loop_dense(w1.imag, w2.real))
  )


class MonarchApplyTest(parameterized.TestCase):

  @parameterized.product(n=(4, 16, 64, 256), x64=(False, True))
  def test_square_matches_dense(self, n, x64):
    m = int(round(n**0.5))
    rng = np.random.default_rng(n)
    w1, w2 = _factors(rng, m, m, m, m, m, m)
    x = _normal(rng, (2, 3, n))
    loop = _loop_dense(w1, w2)
    if x64:
      y, dense = _x64(lambda *a: (apply(*a), to_dense(*a[1:])), x, w1, w2)
      self.assertEqual(y.dtype, np.float64)
      tol = 1e-12
    else:
      args = [jnp.asarray(a, jnp.float32) for a in (x, w1, w2)]
      y, dense = apply(*args), to_dense(*args[1:])
      self.assertEqual(y.dtype, jnp.float32)
      tol = 1e-5
    self.assertEqual(y.shape, (2, 3, n))
    self.assertLessEqual(
        np.abs(np.asarray(y, np.float64) - x @ loop.T).max(), tol
    )
    # The permutation-matrix construction agrees with the loop definition.
    self.assertLessEqual(
        np.abs(np.asarray(dense, np.float64) - loop).max(), tol
    )

  @parameterized.parameters(
      (4, 3, 5, 6, 7, 2),  # 20 -> 42
      (2, 8, 3, 4, 5, 4),  # 6 -> 20
      (3, 4, 4, 2, 9, 6),  # 12 -> 18
      (4, 8, 8, 4, 16, 8),  # 32 -> 64, the MonarchLinear layout
  )
  def test_rectangular_matches_dense(self, k, q, p, l, s, r):
    rng = np.random.default_rng(k * q * p + s)
    w1, w2 = _factors(rng, k, q, p, l, s, r)
    x = _normal(rng, (5, k * p))
    loop = _loop_dense(w1, w2)
    y64, dense = _x64(lambda *a: (apply(*a), to_dense(*a[1:])), x, w1, w2)
    self.assertEqual(dense.shape, (l * s, k * p))
    self.assertLessEqual(np.abs(dense - loop).max(), 1e-13)
    self.assertLessEqual(np.abs(y64 - x @ loop.T).max(), 1e-12)
    y32 = apply(*[jnp.asarray(a, jnp.float32) for a in (x, w1, w2)])
    self.assertEqual(y32.dtype, jnp.float32)
    self.assertLessEqual(np.abs(np.asarray(y32) - x @ loop.T).max(), 1e-5)

  @parameterized.parameters((4, 4), (8, 8), (2, 8), (8, 2))
  def test_square_closed_form(self, n0, n1):
    # w1 (n0, n1, n1), w2 (n1, n0, n0): M[(s,l),(k,p)] = w2[l,s,k] w1[k,l,p].
    rng = np.random.default_rng(n0 + 10 * n1)
    w1, w2 = _factors(rng, n0, n1, n1, n1, n0, n0)
    closed = np.einsum("lsk,klp->slkp", w2, w1).reshape(n0 * n1, n0 * n1)
    self.assertLessEqual(np.abs(_x64(to_dense, w1, w2) - closed).max(), 1e-14)

  def test_complex_and_low_precision_dtypes(self):
    rng = np.random.default_rng(3)
    w1 = _normal(rng, (4, 4, 4)) + 1j * _normal(rng, (4, 4, 4))
    w2 = _normal(rng, (4, 4, 4)) + 1j * _normal(rng, (4, 4, 4))
    x = _normal(rng, (16,)) + 1j * _normal(rng, (16,))
    y = apply(*[jnp.asarray(a, jnp.complex64) for a in (x, w1, w2)])
    self.assertEqual(y.dtype, jnp.complex64)
    # Unscaled complex factors: outputs up to ~19, so float32 rounding is
    # relative to that scale (2e-6 seen against a fixed 1e-5 before).
    want = _dense_c(w1, w2) @ x
    np.testing.assert_allclose(
        y, want, rtol=0, atol=test_util.FP32_RTOL * np.abs(want).max()
    )
    bf = [jnp.asarray(a.real, jnp.bfloat16) for a in (x, w1, w2)]
    self.assertEqual(apply(*bf).dtype, jnp.bfloat16)

  def test_rejects_inconsistent_shapes(self):
    w1 = jnp.ones((4, 3, 5))
    with self.assertRaises(ValueError):  # l*r = 10 != k*q = 12
      mo.monarch_apply(jnp.ones(20), w1, jnp.ones((5, 2, 2)))
    with self.assertRaises(ValueError):  # input width 21 != k*p = 20
      mo.monarch_apply(jnp.ones(21), w1, jnp.ones((6, 2, 2)))

  def test_no_dense_intermediate(self):
    n, m = 1024, 32
    x = jax.ShapeDtypeStruct((2, n), jnp.float32)
    w = jax.ShapeDtypeStruct((m, m, m), jnp.float32)
    found = list(_avals(jax.make_jaxpr(mo.monarch_apply)(x, w, w).jaxpr))
    self.assertIn("dot_general", [name for name, _ in found])
    biggest = max(int(np.prod(aval.shape)) for _, aval in found)
    self.assertLess(biggest, n * n)
    self.assertLessEqual(biggest, 2 * n)
    # The walker does see an N x N array when one is built.
    n, m = 64, 8
    w = jax.ShapeDtypeStruct((m, m, m), jnp.float32)
    found = _avals(jax.make_jaxpr(mo.monarch_to_dense)(w, w).jaxpr)
    self.assertGreaterEqual(
        max(int(np.prod(aval.shape)) for _, aval in found), n * n
    )


def _slices(m_nn, n0):
  """[N, N] -> the (s, p) slices, indexed [l, k, s, p]."""
  n1 = m_nn.shape[0] // n0
  return m_nn.reshape(n0, n1, n0, n1).transpose(1, 2, 0, 3)


class ProjectionTest(parameterized.TestCase):

  def test_slices_are_rank_one(self):
    rng = np.random.default_rng(0)
    w1, w2 = _factors(rng, 8, 8, 8, 8, 8, 8)
    sv = np.linalg.svd(_slices(_loop_dense(w1, w2), 8), compute_uv=False)
    self.assertLess((sv[..., 1] / sv[..., 0]).max(), 1e-12)
    # A dense matrix's slices are full rank (so the check can fail).
    sv = np.linalg.svd(_slices(_normal(rng, (64, 64)), 8), compute_uv=False)
    self.assertGreater((sv[..., 1] / sv[..., 0]).min(), 1e-3)

  @parameterized.parameters((64, 8), (32, 4), (32, 8))
  def test_round_trip(self, n, nblocks):
    n1 = n // nblocks
    rng = np.random.default_rng(n + nblocks)
    w1, w2 = _factors(rng, nblocks, n1, n1, n1, nblocks, nblocks)
    m = _loop_dense(w1, w2)
    v1, v2 = _x64(lambda a: to_monarch(a, nblocks), m)
    self.assertEqual(
        (v1.shape, v2.shape), ((nblocks, n1, n1), (n1, nblocks, nblocks))
    )
    self.assertLessEqual(np.abs(_loop_dense(v1, v2) - m).max(), 1e-12)

  def test_complex_round_trip(self):
    rng = np.random.default_rng(7)
    w1 = _normal(rng, (4, 4, 4)) + 1j * _normal(rng, (4, 4, 4))
    w2 = _normal(rng, (4, 4, 4)) + 1j * _normal(rng, (4, 4, 4))
    m = _dense_c(w1, w2)
    v1, v2 = _x64(lambda a: to_monarch(a, 4), m)
    self.assertEqual(v1.dtype, np.complex128)
    self.assertLessEqual(np.abs(_dense_c(v1, v2) - m).max(), 1e-12)

  def test_random_dense_projects_far_and_optimally(self):
    rng = np.random.default_rng(1)
    a = _normal(rng, (64, 64))
    w1, w2 = _x64(lambda m: to_monarch(m, 8), a)
    proj = _loop_dense(w1, w2)
    err = np.linalg.norm(proj - a)
    # Each 8x8 Gaussian slice keeps only its top singular value (~0.78).
    self.assertGreater(err / np.linalg.norm(a), 0.5)
    self.assertLess(err / np.linalg.norm(a), 0.9)
    # The error is exactly the discarded singular values.
    sv = np.linalg.svd(_slices(a, 8), compute_uv=False)
    self.assertAlmostEqual(
        err, np.sqrt(np.square(sv[..., 1:]).sum()), places=10
    )
    # Best approximation: perturbed factors are never closer.
    for _ in range(5):
      d1 = w1 + 1e-2 * _normal(rng, w1.shape)
      d2 = w2 + 1e-2 * _normal(rng, w2.shape)
      self.assertGreater(np.linalg.norm(_loop_dense(d1, d2) - a), err)

  @parameterized.parameters(16, 64, 256, 1024)
  def test_parameter_count(self, n):
    m = int(round(n**0.5))
    shapes = jax.eval_shape(
        lambda a: mo.dense_to_monarch(a, m),
        jax.ShapeDtypeStruct((n, n), jnp.float32),
    )
    self.assertEqual(sum(s.size for s in shapes), 2 * round(n**1.5))
    layer = nnx.eval_shape(
        lambda: mo.MonarchLinear(n, n, m, use_bias=False, rngs=_rngs(0))
    )
    count = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    self.assertEqual(count, 2 * round(n**1.5))


class OrderPTest(parameterized.TestCase):

  @parameterized.parameters((2, 8), (3, 4), (6, 2))
  def test_apply_matches_dense(self, p, b):
    n = b**p
    rng = np.random.default_rng(p)
    factors = [_normal(rng, (n // b, b, b), b**-0.5) for _ in range(p)]
    x = _normal(rng, (3, n))
    y, dense = _x64(lambda a, fs: (p_apply(a, fs), p_dense(fs)), x, factors)
    self.assertLessEqual(np.abs(y - x @ dense.T).max(), 1e-12)
    y32 = p_apply(
        jnp.asarray(x, jnp.float32),
        [jnp.asarray(f, jnp.float32) for f in factors],
    )
    self.assertEqual(y32.dtype, jnp.float32)
    self.assertLessEqual(np.abs(np.asarray(y32) - x @ dense.T).max(), 1e-5)

  def test_order_three_closed_form(self):
    # M[(x,y,z),(a,c,d)] = F3[yb+z, x, a] F2[zb+a, y, c] F1[ab+c, z, d].
    b = 4
    rng = np.random.default_rng(5)
    f1, f2, f3 = [_normal(rng, (b * b, b, b)) for _ in range(3)]
    closed = np.einsum(
        "yzxa,zayc,aczd->xyzacd",
        f3.reshape(b, b, b, b),
        f2.reshape(b, b, b, b),
        f1.reshape(b, b, b, b),
    )
    dense = _x64(p_dense, [f1, f2, f3])
    self.assertLessEqual(
        np.abs(dense - closed.reshape(b**3, b**3)).max(), 1e-12
    )

  def test_order_two_is_square_monarch(self):
    # With (F1, F2) = (w1, w2) the order-p convention is the order-2 one.
    rng = np.random.default_rng(6)
    w1, w2 = _factors(rng, 8, 8, 8, 8, 8, 8)
    x = _normal(rng, (2, 64))
    yp, dp = _x64(lambda a, fs: (p_apply(a, fs), p_dense(fs)), x, [w1, w2])
    self.assertLessEqual(np.abs(dp - _loop_dense(w1, w2)).max(), 1e-14)
    self.assertLessEqual(np.abs(yp - _x64(apply, x, w1, w2)).max(), 1e-13)

  def test_rejects_wrong_order(self):
    with self.assertRaises(ValueError):  # 3 factors of block 8 need N = 512
      mo.order_p_apply(jnp.ones(64), [jnp.ones((8, 8, 8))] * 3)


class DftTest(parameterized.TestCase):

  @parameterized.parameters((4, 4), (16, 16), (32, 64), (3, 5))
  def test_matches_fft(self, m1, m2):
    n = m1 * m2
    rng = np.random.default_rng(n)
    x = _normal(rng, (2, n)) + 1j * _normal(rng, (2, n))
    ref = np.fft.fft(x)
    y, y_jnp = _x64(lambda a: (dft(a, m1, m2), jnp.fft.fft(a)), x)
    self.assertEqual(y.dtype, np.complex128)
    self.assertLessEqual(np.linalg.norm(y - ref) / np.linalg.norm(ref), 1e-12)
    self.assertLessEqual(np.linalg.norm(y - y_jnp) / np.linalg.norm(ref), 1e-12)
    y64 = dft(jnp.asarray(x, jnp.complex64), m1, m2)
    self.assertEqual(y64.dtype, jnp.complex64)
    self.assertLessEqual(np.linalg.norm(y64 - ref) / np.linalg.norm(ref), 1e-5)

  def test_factors_times_input_stride_is_dft_matrix(self):
    m1, m2 = 3, 4
    n = m1 * m2
    w1, w2 = _x64(lambda: mo.dft_monarch_factors(m1, m2, jnp.complex128))
    self.assertEqual((w1.shape, w2.shape), ((m2, m1, m1), (m1, m2, m2)))
    p_in = np.eye(n)[np.arange(n).reshape(m1, m2).T.reshape(-1)]
    mat = np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)
    self.assertLessEqual(np.abs(_dense_c(w1, w2) @ p_in - mat).max(), 1e-13)

  def test_real_input_is_promoted(self):
    x = np.random.default_rng(2).normal(size=16).astype(np.float32)
    y = dft(jnp.asarray(x), 4, 4)
    self.assertEqual(y.dtype, jnp.complex64)
    np.testing.assert_allclose(y, np.fft.fft(x), atol=1e-5, rtol=0)

  def test_convolution_theorem(self):
    # Linear convolution needs padding to 2L; size L wraps around.
    length, (m1, m2) = 64, (8, 16)
    rng = np.random.default_rng(4)
    u, k = _normal(rng, (length,)), _normal(rng, (length,))
    ref = np.convolve(u, k)[:length]
    zeros = np.zeros(length)

    def conv(u, k):
      spec = dft(jnp.concatenate([k, zeros]), m1, m2) * dft(
          jnp.concatenate([u, zeros]), m1, m2
      )
      # Inverse through the Monarch DFT too: F^-1 z = conj(F conj(z)) / N.
      inv = jnp.conj(dft(jnp.conj(spec), m1, m2)) / (2 * length)
      circ = jnp.fft.ifft(dft(k, 8, 8) * dft(u, 8, 8))
      return jnp.fft.ifft(spec)[:length], inv[:length], circ

    y, y_m, circ = _x64(conv, u, k)
    self.assertLessEqual(np.abs(y - ref).max(), 1e-12)
    self.assertLessEqual(np.abs(y_m - ref).max(), 1e-12)
    # Without padding the product is the circular convolution: wrong.
    self.assertGreater(np.abs(circ - ref).max(), 1.0)


class BlockDiagTest(parameterized.TestCase):

  @parameterized.parameters(
      (32, 48, 4),  # divisible
      (10, 7, 3),  # input padded 10 -> 12, output cut 9 -> 7
      (768, 6144, 4),
  )
  def test_apply_matches_block_diag(self, n_in, n_out, g):
    in_blk, out_blk = -(-n_in // g), -(-n_out // g)
    rng = np.random.default_rng(n_in)
    w = _normal(rng, (g, out_blk, in_blk), in_blk**-0.5)
    x = _normal(rng, (2, 3, n_in))
    dense = scipy.linalg.block_diag(*w)[:n_out, :n_in]
    y = _x64(lambda a, b: bd_apply(a, b, n_out), x, w)
    self.assertEqual(y.shape, (2, 3, n_out))
    self.assertLessEqual(np.abs(y - x @ dense.T).max(), 1e-12)

  @parameterized.parameters(
      (768, 6144, (4, 1536, 192)),  # M2-BERT-80M GLU gate, 768 -> 2 * 3072
      (3072, 768, (4, 192, 768)),  # GLU output
  )
  def test_glu_shapes(self, n_in, n_out, shape):
    layer = nnx.eval_shape(
        lambda: mo.BlockDiagLinear(
            n_in,
            n_out,
            4,
            rngs=_rngs(0),
            in_axis=sharding.EMBED,
            out_axis=sharding.MLP,
        )
    )
    self.assertEqual(layer.weight_gqp.shape, shape)
    self.assertEqual(layer.bias_o.shape, (n_out,))
    self.assertEqual(
        layer.weight_gqp.get_metadata()["out_sharding"],
        (None, sharding.MLP, sharding.EMBED),
    )
    self.assertEqual(
        layer.bias_o.get_metadata()["out_sharding"], (sharding.MLP,)
    )

  def test_init(self):
    layer = mo.BlockDiagLinear(768, 6144, 4, rngs=_rngs(0))
    w = np.asarray(layer.weight_gqp[...])
    b = np.asarray(layer.bias_o[...])
    # U(+-1/sqrt(in_blk)): bounded, filling the range, variance bound^2/3.
    bound = 192**-0.5
    self.assertLessEqual(np.abs(w).max(), bound)
    self.assertGreater(np.abs(w).max(), 0.99 * bound)
    self.assertAlmostEqual(w.var() / (bound**2 / 3), 1.0, delta=0.02)
    self.assertLessEqual(np.abs(b).max(), 6144**-0.5)
    self.assertGreater(np.abs(b).max(), 0.9 * 6144**-0.5)

  def test_layer_forward(self):
    layer = mo.BlockDiagLinear(10, 7, 3, rngs=_rngs(1))
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    w = np.asarray(layer.weight_gqp[...], np.float64)
    b = np.asarray(layer.bias_o[...], np.float64)
    ref = x @ scipy.linalg.block_diag(*w)[:7, :10].T + b
    np.testing.assert_allclose(layer(jnp.asarray(x)), ref, atol=1e-5, rtol=0)
    no_bias = mo.BlockDiagLinear(10, 7, 3, use_bias=False, rngs=_rngs(1))
    self.assertIsNone(no_bias.bias_o)
    self.assertLen(jax.tree.leaves(nnx.state(no_bias, nnx.Param)), 1)
    bf = mo.BlockDiagLinear(10, 7, 3, dtype=jnp.bfloat16, rngs=_rngs(1))
    self.assertEqual(bf(jnp.asarray(x)).dtype, jnp.bfloat16)
    self.assertEqual(bf.weight_gqp[...].dtype, jnp.float32)


class MonarchLinearTest(parameterized.TestCase):

  @parameterized.parameters((64, 32, 4), (30, 50, 4))
  def test_forward_matches_dense(self, n_in, n_out, g):
    layer = mo.MonarchLinear(n_in, n_out, g, rngs=_rngs(2))
    w1 = np.asarray(layer.w1_kqp[...], np.float64)
    w2 = np.asarray(layer.w2_lsr[...], np.float64)
    b = np.asarray(layer.bias_o[...], np.float64)
    in_blk, out_blk = -(-n_in // g), -(-n_out // g)
    q = min(in_blk, out_blk)
    self.assertEqual((w1.shape, w2.shape), ((g, q, in_blk), (g, out_blk, q)))
    dense = _loop_dense(w1, w2)[:n_out, :n_in]
    x = np.random.default_rng(0).normal(size=(2, 3, n_in)).astype(np.float32)
    np.testing.assert_allclose(
        layer(jnp.asarray(x)), x @ dense.T + b, atol=1e-5, rtol=0
    )

  @parameterized.parameters((256, 1024, 4), (250, 300, 4))
  def test_output_variance_matches_dense_linear(self, n_in, n_out, g):
    # For white unit-variance input, Var y_o = sum_i M[o, i]^2; a dense
    # layer with U(+-1/sqrt(n_in)) weights gives 1/3 on average.
    ratios = []
    for seed in range(3):
      layer = mo.MonarchLinear(n_in, n_out, g, use_bias=False, rngs=_rngs(seed))
      dense = to_dense(layer.w1_kqp[...], layer.w2_lsr[...])
      dense = np.asarray(dense, np.float64)[:n_out, :n_in]
      ratios.append(np.square(dense).sum() / n_out / (1 / 3))
    self.assertAlmostEqual(np.mean(ratios), 1.0, delta=0.1)


if __name__ == "__main__":
  absltest.main()
