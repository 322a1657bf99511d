"""Long convolutions and implicit filters: direct-convolution and dense
Toeplitz oracles (float64), causality probes, the Hyena constants, and the
filter module's slicing, parameters and numerics."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.layers import long_conv
import test_util

# Jitted once per shape: eager dispatch compiles every primitive on its own,
# which dominates the run time of small tests.
_causal = jax.jit(long_conv.fft_causal_conv)
_bidirectional = jax.jit(long_conv.bidirectional_conv)
_short = jax.jit(long_conv.short_causal_conv)
_toeplitz = jax.jit(long_conv.toeplitz_operator, static_argnums=3)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _generate(graphdef, state, length):
  return nnx.merge(graphdef, state)(length)


def _filters(f, length):
  """`f(length)`, jitted."""
  graphdef, state = nnx.split(f)
  return _generate(graphdef, state, length)


def _bidirectional_sum(v_l, k_fwd_l, k_rev_l, d):
  """The bidirectional convolution written as its defining double sum."""
  length = len(v_l)
  y = np.zeros(length)
  for t in range(length):
    y[t] = sum(k_fwd_l[s] * v_l[t - s] for s in range(t + 1))
    y[t] += sum(k_rev_l[j - t - 1] * v_l[j] for j in range(t + 1, length))
    y[t] += d * v_l[t]
  return y


class FftCausalConvTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 5, 16, 17, 100, 257)
  def test_matches_direct_convolution(self, length):
    rng = np.random.default_rng(length)
    u, k = rng.normal(size=(2, length))
    with jax.enable_x64(True):
      y = np.asarray(_causal(jnp.asarray(u), jnp.asarray(k)))
    self.assertEqual(y.dtype, np.float64)
    np.testing.assert_allclose(
        y, np.convolve(u, k)[:length], rtol=0, atol=1e-12
    )

  def test_size_l_fft_is_circular_not_linear(self):
    # Negative test: without the padding to 2L the long taps wrap around.
    length = 64
    rng = np.random.default_rng(0)
    u, k = rng.normal(size=(2, length))
    circular = np.fft.irfft(np.fft.rfft(u) * np.fft.rfft(k), n=length)
    err = np.max(np.abs(circular - np.convolve(u, k)[:length]))
    self.assertGreater(err, 0.1)

  def test_broadcasts_kernel_over_batch(self):
    rng = np.random.default_rng(1)
    u_bhl = rng.normal(size=(3, 4, 20))
    k_hl = rng.normal(size=(4, 20))
    with jax.enable_x64(True):
      y = np.asarray(_causal(jnp.asarray(u_bhl), jnp.asarray(k_hl)))
    for b in range(3):
      for h in range(4):
        np.testing.assert_allclose(
            y[b, h], np.convolve(u_bhl[b, h], k_hl[h])[:20], atol=1e-12
        )

  def test_short_kernel_and_too_long_kernel(self):
    rng = np.random.default_rng(2)
    u, k = rng.normal(size=12), rng.normal(size=3)
    with jax.enable_x64(True):
      y = _causal(jnp.asarray(u), jnp.asarray(k))
      np.testing.assert_allclose(y, np.convolve(u, k)[:12], atol=1e-12)
      with self.assertRaisesRegex(ValueError, "taps"):
        long_conv.fft_causal_conv(jnp.asarray(k), jnp.asarray(u))

  def test_bfloat16_in_bfloat16_out(self):
    rng = np.random.default_rng(3)
    u, k = rng.normal(size=(2, 4, 64)).astype(np.float32)
    y = _causal(jnp.asarray(u, jnp.bfloat16), jnp.asarray(k))
    self.assertEqual(y.dtype, jnp.bfloat16)
    ref = np.stack([np.convolve(u[i], k[i])[:64] for i in range(4)])
    # Only the bf16 rounding of u and of y: relative to the output scale.
    np.testing.assert_allclose(
        np.asarray(y, np.float32), ref, atol=0.02 * np.abs(ref).max()
    )


class BidirectionalConvTest(parameterized.TestCase):

  def test_kernel_layout(self):
    k_fwd = jnp.array([1.0, 2.0, 3.0])
    k_rev = jnp.array([4.0, 5.0, 6.0])
    np.testing.assert_array_equal(
        long_conv.bidirectional_kernel(k_fwd, k_rev),
        [1.0, 2.0, 3.0, 6.0, 5.0, 4.0],
    )

  @parameterized.parameters(1, 2, 7, 32, 50)
  def test_matches_toeplitz_operator_and_sum(self, length):
    rng = np.random.default_rng(length)
    hidden = 3
    v_bhl = rng.normal(size=(2, hidden, length))
    k_fwd_hl, k_rev_hl = rng.normal(size=(2, hidden, length))
    d_h = rng.normal(size=hidden)
    with jax.enable_x64(True):
      y = np.asarray(
          _bidirectional(
              jnp.asarray(v_bhl),
              jnp.asarray(k_fwd_hl),
              jnp.asarray(k_rev_hl),
              jnp.asarray(d_h),
          )
      )
      ops = [
          np.asarray(_toeplitz(k_fwd_hl[h], k_rev_hl[h], d_h[h], length))
          for h in range(hidden)
      ]
    self.assertEqual(y.dtype, np.float64)
    for b in range(2):
      for h in range(hidden):
        np.testing.assert_allclose(
            y[b, h], ops[h] @ v_bhl[b, h], rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(
            y[b, h],
            _bidirectional_sum(v_bhl[b, h], k_fwd_hl[h], k_rev_hl[h], d_h[h]),
            rtol=0,
            atol=1e-12,
        )

  def test_toeplitz_entries(self):
    op = np.asarray(
        _toeplitz(
            jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]), 10.0, 3
        )
    )
    # Lower triangle k_fwd[t-j] (+ D on the diagonal), upper k_rev[j-t-1].
    np.testing.assert_array_equal(
        op, [[11.0, 4.0, 5.0], [2.0, 11.0, 4.0], [3.0, 2.0, 11.0]]
    )

  def _probe(self, k_fwd, k_rev, d, t0, length=40):
    """|y(v + e_t0) - y(v)| for one channel, float64."""
    rng = np.random.default_rng(t0)
    v = rng.normal(size=(1, 1, length))
    bump = np.zeros_like(v)
    bump[..., t0] = 1.0
    with jax.enable_x64(True):
      run = lambda x: np.asarray(
          _bidirectional(
              jnp.asarray(x),
              jnp.asarray(k_fwd)[None],
              jnp.asarray(k_rev)[None],
              jnp.asarray([d]),
          )
      )[0, 0]
      return np.abs(run(v + bump) - run(v))

  def test_forward_filter_is_causal(self):
    rng = np.random.default_rng(5)
    k_fwd = rng.normal(size=40)
    t0 = 17
    delta = self._probe(k_fwd, np.zeros(40), 0.7, t0)
    self.assertLess(delta[:t0].max(), 1e-12)
    # Lag 0 and the later outputs do see the bump.
    self.assertGreater(delta[t0:].min(), 1e-6)

  def test_reverse_filter_is_strictly_anticausal(self):
    rng = np.random.default_rng(6)
    k_rev = rng.normal(size=40)
    t0 = 17
    delta = self._probe(np.zeros(40), k_rev, 0.0, t0)
    # y[t] reads only v[j > t]: the bump at t0 reaches t < t0 only.
    self.assertLess(delta[t0:].max(), 1e-12)
    self.assertGreater(delta[:t0].min(), 1e-6)

  def test_bfloat16_close_to_float32(self):
    rng = np.random.default_rng(7)
    v = rng.normal(size=(2, 8, 256)).astype(np.float32)
    k_fwd, k_rev = (
        rng.normal(size=(2, 8, 256)) * np.exp(-np.arange(256) / 30)
    ).astype(np.float32)
    d = rng.normal(size=8).astype(np.float32)
    ref = np.asarray(_bidirectional(v, k_fwd, k_rev, d))
    y = _bidirectional(
        jnp.asarray(v, jnp.bfloat16),
        jnp.asarray(k_fwd, jnp.bfloat16),
        jnp.asarray(k_rev, jnp.bfloat16),
        jnp.asarray(d, jnp.bfloat16),
    )
    self.assertEqual(y.dtype, jnp.bfloat16)
    err = np.abs(np.asarray(y, np.float32) - ref).max()
    # bf16 has 8 bits of mantissa: ~1% of the output scale.
    self.assertLess(err, 0.02 * np.abs(ref).max())

  def test_rejects_unsliced_filters(self):
    v = jnp.zeros((1, 2, 8))
    k = jnp.zeros((2, 16))
    with self.assertRaisesRegex(ValueError, "slice"):
      long_conv.bidirectional_conv(v, k, k, jnp.zeros(2))


class ShortCausalConvTest(absltest.TestCase):

  def _inputs(self, seed=0, b=2, c=5, length=11, taps=3):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(b, c, length)),
        rng.normal(size=(c, taps)),
        rng.normal(size=c),
    )

  def test_matches_explicit_loop(self):
    x, w, bias = self._inputs()
    b, c, length = x.shape
    taps = w.shape[1]
    ref = np.zeros_like(x) + bias[None, :, None]
    for t in range(length):
      for k in range(taps):
        src = t - (taps - 1) + k  # tap K-1 multiplies x[t]
        if src >= 0:
          ref[:, :, t] += w[None, :, k] * x[:, :, src]
    with jax.enable_x64(True):
      y = np.asarray(_short(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias)))
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)

  def test_depends_only_on_last_three_positions(self):
    x, w, bias = self._inputs(seed=1, b=1, c=3, length=16)
    t0 = 6
    bumped = x.copy()
    bumped[..., t0] += 1.0
    with jax.enable_x64(True):
      run = lambda a: np.asarray(
          _short(jnp.asarray(a), jnp.asarray(w), jnp.asarray(bias))
      )
      delta = np.abs(run(bumped) - run(x))[0]
    changed = np.flatnonzero(delta.max(axis=0) > 1e-12)
    np.testing.assert_array_equal(changed, [t0, t0 + 1, t0 + 2])

  def test_matches_torch_grouped_conv1d(self):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.skipTest("torch not installed")
    x, w, bias = self._inputs(seed=2)
    c, taps = w.shape
    conv = torch.nn.Conv1d(
        c, c, taps, groups=c, padding=taps - 1, dtype=torch.float64
    )
    with torch.no_grad():
      conv.weight.copy_(torch.from_numpy(w[:, None, :]))
      conv.bias.copy_(torch.from_numpy(bias))
      ref = conv(torch.from_numpy(x))[..., : x.shape[-1]].numpy()
    with jax.enable_x64(True):
      y = np.asarray(_short(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias)))
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)


class ConstantsTest(absltest.TestCase):

  def test_decay_rates_for_768_channels(self):
    delta = np.abs(long_conv.decay_rates(768))
    self.assertEqual(delta.shape, (768,))
    self.assertAlmostEqual(delta.min(), 3.0701, places=4)
    self.assertAlmostEqual(delta.max(), 15.3506, places=4)
    # Channel 0 decays slowest, the last one fastest: it reaches 0.01 at
    # t = 0.3 and the slowest at t = 1.5.
    self.assertAlmostEqual(delta[0], 3.0701, places=4)
    self.assertAlmostEqual(float(np.exp(-0.3 * delta[-1])), 0.0100, places=4)
    self.assertAlmostEqual(float(np.exp(-1.5 * delta[0])), 0.0100, places=4)

  def test_exponential_modulation(self):
    t_l1 = np.array([[0.0], [0.3], [1.0]])
    delta_h = long_conv.decay_rates(768, dtype=np.float64)
    env = np.asarray(long_conv.exponential_modulation(t_l1, delta_h))
    self.assertEqual(env.shape, (3, 768))
    np.testing.assert_allclose(env[0], 1.0)
    self.assertAlmostEqual(float(env[1, -1]), 0.01, places=6)
    # float32 exp(-delta) with delta up to 15.4: rounding delta alone moves
    # the result by 15.4 * 6e-8 relative (5e-7 seen).
    np.testing.assert_allclose(
        env[2], np.exp(-np.abs(delta_h)), rtol=test_util.FP32_RTOL
    )

  def test_positional_features(self):
    z, t = long_conv.positional_features(8)
    self.assertEqual((z.shape, t.shape), ((8, 5), (8, 1)))
    self.assertEqual(z.dtype, np.float32)
    # -sin(2 pi 1e-4 / 8) = -7.854e-5 (printed as -7.9e-5).
    np.testing.assert_allclose(
        z[1], [0.142857, 1.0, 0.707107, -7.9e-5, -0.707107], atol=1e-6
    )
    self.assertAlmostEqual(
        float(z[1, 3]), -np.sin(2 * np.pi * 1e-4 / 8), places=9
    )
    np.testing.assert_allclose(t[:, 0], np.arange(8) / 7, rtol=1e-6)
    np.testing.assert_array_equal(z[:, 0], t[:, 0])
    z0, _ = long_conv.positional_features(8, dtype=np.float64)
    np.testing.assert_allclose(z0[0], [0, 1, 1, 0, 0])

  def test_positional_features_wider_and_invalid(self):
    z, _ = long_conv.positional_features(16, 7, dtype=np.float64)
    # Three bands: f = [1e-4, 1.00005, 2]; cosines first, then negated sines.
    n = 3
    f = np.linspace(1e-4, 2, 3)
    np.testing.assert_allclose(
        z[n],
        np.concatenate([
            [n / 15],
            np.cos(2 * np.pi * f * n / 16),
            -np.sin(2 * np.pi * f * n / 16),
        ]),
        atol=1e-15,
    )
    for bad in (2, 4, 1):
      with self.assertRaisesRegex(ValueError, "odd"):
        long_conv.positional_features(8, bad)


def _numpy_filter(f, length):
  """The filter as float64 numpy math on the module's parameters."""
  get = lambda name: np.asarray(getattr(f, name)[...], np.float64)
  z = get("pos_emb_le")[:length]
  phi = get("sin_freq_o")
  t = np.arange(length)[:, None] / (f.l_max - 1)
  env = np.exp(-t * np.abs(long_conv.decay_rates(f.hidden, dtype=np.float64)))

  def mlp(p):
    h = np.sin(phi * (z @ get(p + "_w0_eo") + get(p + "_b0_o")))
    h = np.sin(phi * (h @ get(p + "_w1_oo") + get(p + "_b1_o")))
    h = np.sin(phi * (h @ get(p + "_w2_oo") + get(p + "_b2_o")))
    return ((h @ get(p + "_w3_oh")) * env).T

  return mlp("fwd"), mlp("rev"), get("bias_h")


def _param_count(module) -> int:
  params = nnx.state(module, nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# Most filter tests share these sizes so that compiled primitives are reused.
H, L_MAX, ORDER = 8, 32, 16


def _small_filter(seed, dtype=None, **kwargs):
  """A float32-initialised filter, its parameters cast to `dtype` if given.

  Casting (instead of `param_dtype=dtype`) reuses the compiled float32
  initialisers, which dominate the time of these tests on CPU.
  """
  f = long_conv.HyenaFilter(
      H, L_MAX, order=ORDER, rngs=nnx.Rngs(seed), **kwargs
  )
  if dtype is not None:
    nnx.update(
        f, jax.tree.map(lambda x: x.astype(dtype), nnx.state(f, nnx.Param))
    )
  return f


class HyenaFilterTest(parameterized.TestCase):

  def test_parameter_count_80m_filter(self):
    f = nnx.eval_shape(
        lambda: long_conv.HyenaFilter(768, 128, rngs=nnx.Rngs(0))
    )
    # z 640 + phi 128 + 2 MLPs x 132,096 + D 768.
    self.assertEqual(_param_count(f), 265_728)
    self.assertEqual(f.pos_emb_le.shape, (128, 5))
    self.assertEqual(f.fwd_w3_oh.shape, (128, 768))
    self.assertEqual(f.rev_w0_eo.shape, (5, 128))

  def test_state_holds_only_parameters(self):
    f = nnx.eval_shape(lambda: _small_filter(0))
    everything = jax.tree.leaves(nnx.state(f))
    params = jax.tree.leaves(nnx.state(f, nnx.Param))
    # No time grid or decay-rate buffers among the variables.
    self.assertLen(everything, len(params))
    names = {
        str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(f, nnx.Param))
    }
    expected = {"pos_emb_le", "sin_freq_o", "bias_h"} | {
        f"{p}_{n}"
        for p in ("fwd", "rev")
        for n in ("w0_eo", "b0_o", "w1_oo", "b1_o", "w2_oo", "b2_o", "w3_oh")
    }
    self.assertEqual(names, expected)

  def test_initial_values(self):
    f = long_conv.HyenaFilter(64, L_MAX, order=ORDER, w=10.0, rngs=nnx.Rngs(1))
    z, _ = long_conv.positional_features(L_MAX)
    np.testing.assert_allclose(f.pos_emb_le[...], z, rtol=1e-6)
    np.testing.assert_array_equal(f.sin_freq_o[...], np.full(ORDER, 10.0))
    for name, fan_in in (
        ("fwd_w0_eo", 5),
        ("fwd_b0_o", 5),
        ("rev_w1_oo", ORDER),
        ("rev_w3_oh", ORDER),
    ):
      x = np.asarray(getattr(f, name)[...])
      self.assertLessEqual(np.abs(x).max(), 1 / np.sqrt(fan_in))
      self.assertGreater(np.abs(x).max(), 0.5 / np.sqrt(fan_in))
    d = np.asarray(f.bias_h[...])
    self.assertTrue(0.6 < d.std() < 1.4, d.std())
    # The two MLPs are drawn independently.
    self.assertFalse(np.allclose(f.fwd_w3_oh[...], f.rev_w3_oh[...]))

  def test_normal_mlp_init(self):
    f = _small_filter(1, mlp_init_std=0.02)
    np.testing.assert_array_equal(f.fwd_b1_o[...], 0.0)
    w = np.concatenate([
        np.ravel(getattr(f, f"{p}_w{i}_oo")[...])
        for p in ("fwd", "rev")
        for i in (1, 2)
    ])
    # 1024 draws: the sample std is within ~0.0005 of 0.02.
    self.assertAlmostEqual(float(np.std(w)), 0.02, delta=0.002)

  def test_matches_float64_numpy(self):
    f = _small_filter(2)  # built outside x64 to reuse compiled inits
    with jax.enable_x64(True):
      nnx.update(
          f,
          jax.tree.map(
              lambda x: x.astype(jnp.float64), nnx.state(f, nnx.Param)
          ),
      )
      self.assertEqual(f.fwd_w1_oo[...].dtype, jnp.float64)
      k_fwd, k_rev, d = _filters(f, 13)
      ref = _numpy_filter(f, 13)
    self.assertEqual(k_fwd.dtype, jnp.float64)
    self.assertEqual(
        (k_fwd.shape, k_rev.shape, d.shape), ((H, 13), (H, 13), (H,))
    )
    for got, want in zip((k_fwd, k_rev, d), ref):
      np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12)

  def test_shared_sin_frequency_reaches_both_directions(self):
    f = _small_filter(3)
    before = _filters(f, L_MAX)
    f.sin_freq_o[...] = f.sin_freq_o[...] * 1.5
    after = _filters(f, L_MAX)
    self.assertFalse(np.allclose(before[0], after[0]))
    self.assertFalse(np.allclose(before[1], after[1]))

  @parameterized.parameters(1, 5, 31)
  def test_short_input_uses_first_taps(self, length):
    f = _small_filter(4)
    full_fwd, full_rev, full_d = _filters(f, L_MAX)
    k_fwd, k_rev, d = _filters(f, length)
    # Four float32 matmuls with sines between, at another number of rows:
    # XLA picks another kernel (a matrix-vector product for one row), so the
    # taps (|k| <= 0.85) move by up to 3.4e-6 here and 7e-7 on another CPU.
    # A wrong slice or time grid moves them by 1e-2 or more.
    for got, full in ((k_fwd, full_fwd), (k_rev, full_rev)):
      np.testing.assert_allclose(
          got,
          full[:, :length],
          rtol=0,
          atol=test_util.FP32_LONG_RTOL * np.abs(full).max(),
      )
    np.testing.assert_array_equal(d, full_d)

  def test_longer_than_l_max_raises(self):
    f = _small_filter(0)
    with self.assertRaisesRegex(ValueError, f"l_max={L_MAX}"):
      f(L_MAX + 1)

  def test_unidirectional(self):
    f = _small_filter(6, bidirectional=False)
    self.assertFalse(hasattr(f, "rev_w0_eo"))
    k_fwd, k_rev, _ = _filters(f, 10)
    np.testing.assert_array_equal(k_rev, np.zeros((H, 10)))
    self.assertGreater(np.abs(k_fwd).max(), 0)
    # z + phi + MLP (e*o + o + 2 (o*o + o) + o*H) + D.
    mlp = 5 * ORDER + ORDER + 2 * (ORDER * ORDER + ORDER) + ORDER * H
    self.assertEqual(_param_count(f), L_MAX * 5 + ORDER + mlp + H)

  def test_bfloat16_params_give_float32_filters(self):
    f = _small_filter(7, jnp.bfloat16)
    self.assertEqual(f.fwd_w1_oo[...].dtype, jnp.bfloat16)
    k_fwd, k_rev, d = _filters(f, L_MAX)
    self.assertEqual((k_fwd.dtype, k_rev.dtype, d.dtype), (jnp.float32,) * 3)

  def test_eager_equals_jitted_mixer(self):
    f = _small_filter(8)
    graphdef, state = nnx.split(f)
    length = 24
    v = jnp.asarray(
        np.random.default_rng(0).normal(size=(2, H, length)), jnp.float32
    )

    @jax.jit
    def mix(state, v_bhl):
      k_fwd, k_rev, d = nnx.merge(graphdef, state)(v_bhl.shape[-1])
      return long_conv.bidirectional_conv(v_bhl, k_fwd, k_rev, d)

    y = mix(state, v)
    k_fwd, k_rev, d = f(length)  # eager
    ops = [
        np.asarray(_toeplitz(k_fwd[h], k_rev[h], d[h], length))
        for h in range(H)
    ]
    ref = np.stack([
        np.stack([ops[h] @ np.asarray(v[b, h]) for h in range(H)])
        for b in range(2)
    ])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
  absltest.main()
