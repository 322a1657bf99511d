"""Tests for retrieval_jax.models.key_value_memory.

Oracles: gradient sparsity (only fetched value rows move; keys,
projections and inputs get exactly zero gradient); the closed form of EMA
k-means under fixed assignments, K_t - mu = g^t N_0 / N_t (K_0 - mu);
the known-answer reduction to a nearest-centroid classifier (scikit-learn)
on real data; invariance to permuting codebook entries and heads; top-k
against an explicit numpy computation; sharded forward against unsharded.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets
from sklearn import neighbors

from retrieval_jax import sharding
from retrieval_jax import train_state
from retrieval_jax.models import key_value_memory as kvm
import test_util


def _memory(seed=0, **kwargs):
  args = dict(input_dim=12, num_heads=8, num_keys=64, key_dim=4, value_dim=10)
  args.update(kwargs)
  return kvm.KeyValueMemory(**args, rngs=nnx.Rngs(seed))


def _random_memory(seed=0, **kwargs):
  """A memory with normal values and keys spread like the data."""
  kwargs.setdefault("value_init", "normal")
  return _memory(seed, **kwargs)


def _explicit_topk(model, z_be, k):
  """Numpy float64: explicit distances, argsort, mean of the k values."""
  z = np.asarray(z_be, np.float64)
  keys = np.asarray(model.keys_cmd[...], np.float64)
  values = np.asarray(model.values_cmv[...], np.float64)
  if model.projection == "random":
    h = np.einsum(
        "be,ced->bcd", z, np.asarray(model.projection_ced[...], np.float64)
    )
  else:
    h = z.reshape(len(z), model.num_heads, model.key_dim)
  dist = ((h[:, :, None, :] - keys[None]) ** 2).sum(-1)
  idx = np.argsort(dist, axis=-1, kind="stable")[..., :k]
  fetched = values[np.arange(model.num_heads)[None, :, None], idx]
  return idx, fetched.mean(2).mean(1)


class GradientTest(parameterized.TestCase):

  @parameterized.parameters("mean", "linear")
  def test_only_fetched_value_rows_get_gradient(self, decoder):
    # K1: B=16, C=8, M=64, d_k=4, d_v=10.
    kwargs = dict(decoder=decoder)
    if decoder == "linear":
      kwargs["num_outputs"] = 5
    model = _random_memory(1, **kwargs)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_outputs, 16))
    graphdef, state = nnx.split(model)

    def loss(state, z):
      logits = nnx.merge(graphdef, state)(z)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels
      ).mean()

    grad_state, grad_z = jax.grad(loss, argnums=(0, 1))(state, z)
    idx_bc = np.asarray(model.select(z))[..., 0]
    fetched = {(c, int(idx_bc[b, c])) for b in range(16) for c in range(8)}
    g_values = np.asarray(grad_state["values_cmv"][...])
    nonzero = {
        tuple(map(int, p)) for p in np.argwhere(np.abs(g_values).sum(-1) > 0)
    }
    self.assertEqual(nonzero, fetched)
    # Some cells are fetched by several rows (their gradients accumulate).
    self.assertLess(len(fetched), 16 * 8)
    np.testing.assert_array_equal(np.asarray(grad_state["keys_cmd"][...]), 0)
    np.testing.assert_array_equal(
        np.asarray(grad_state["projection_ced"][...]), 0
    )
    np.testing.assert_array_equal(np.asarray(grad_z), 0)

  def test_frozen_arrays_are_not_params_and_do_not_move(self):
    model = _random_memory(2)
    self.assertIsInstance(model.keys_cmd, kvm.Frozen)
    self.assertIsInstance(model.projection_ced, kvm.Frozen)
    self.assertNotIsInstance(model.keys_cmd, nnx.Param)
    params = nnx.state(model, nnx.Param)
    self.assertEqual(set(params.keys()), {"values_cmv"})
    self.assertEqual(
        set(nnx.state(model, kvm.Frozen).keys()), {"keys_cmd", "projection_ced"}
    )
    keys = np.asarray(model.keys_cmd[...])
    proj = np.asarray(model.projection_ced[...])
    values = np.asarray(model.values_cmv[...])
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    z = jnp.asarray(np.random.default_rng(3).normal(size=(4, 12)), jnp.float32)

    @nnx.jit
    def step(model, optimizer):
      grads = nnx.grad(lambda m: jnp.sum(m(z)[:, 0]))(model)
      optimizer.update(model, grads)

    step(model, optimizer)
    np.testing.assert_array_equal(np.asarray(model.keys_cmd[...]), keys)
    np.testing.assert_array_equal(np.asarray(model.projection_ced[...]), proj)
    changed = np.abs(np.asarray(model.values_cmv[...]) - values).sum(-1) > 0
    idx = np.asarray(model.select(z))[..., 0]
    expected = np.zeros_like(changed)
    expected[np.arange(8)[None], idx] = True
    np.testing.assert_array_equal(changed, expected)


class EmaTest(absltest.TestCase):

  def _clusters(self):
    """2 heads, 5 well-separated clusters of 40 rows (distinct per head),
    starting keys near the means plus 2 far-away keys no row picks."""
    rng = np.random.default_rng(0)
    mu_cjd = rng.normal(size=(2, 5, 3)) * 30.0
    h_njcd = (
        mu_cjd.transpose(1, 0, 2)[None] + rng.normal(size=(40, 5, 2, 3)) * 0.5
    )
    h_ncd = h_njcd.reshape(200, 2, 3)
    mean_cjd = h_njcd.mean(0).transpose(1, 0, 2)  # the exact empirical means
    keys_cmd = np.concatenate(
        [
            mean_cjd + rng.normal(size=(2, 5, 3)),
            np.full((2, 2, 3), 1e3) + rng.normal(size=(2, 2, 3)),
        ],
        axis=1,
    )
    return h_ncd, mean_cjd, keys_cmd

  def _run(self, initial_count, steps, check):
    h_ncd, mean_cjd, keys0 = self._clusters()
    keys = jnp.asarray(keys0)
    counts, sums = kvm.ema_init_state(keys, initial_count)
    for t in range(1, steps + 1):
      keys, counts, sums = kvm.ema_update(
          keys, counts, sums, jnp.asarray(h_ncd), 0.9
      )
      check(t, np.asarray(keys), np.asarray(counts), keys0, mean_cjd)
    return h_ncd, keys, counts, sums

  def test_keys_approach_means_geometrically(self):
    # N_0 = n_j (40 rows per cluster): K_t - mu = 0.9^t (K_0 - mu) exactly.
    errors = []

    def check(t, keys, counts, keys0, mean_cjd):
      if t in (1, 2, 10, 50, 200):
        expected = mean_cjd + 0.9**t * (keys0[:, :5] - mean_cjd)
        errors.append(np.abs(keys[:, :5] - expected).max())
      # No row reaches the far keys: bit for bit unchanged.
      np.testing.assert_array_equal(keys[:, 5:], keys0[:, 5:])
      np.testing.assert_allclose(counts[:, :5], 40.0, rtol=1e-12)

    with jax.enable_x64(True):
      _, keys, _, _ = self._run(40.0, 200, check)
    self.assertLen(errors, 5)
    self.assertLess(max(errors), 1e-9)

  def test_unit_start_count_follows_closed_form_and_limit(self):
    # N_0 = 1: K_t - mu = g^t N_0 / N_t (K_0 - mu), N_t -> n_j, K_t -> mu.
    def check(t, keys, counts, keys0, mean_cjd):
      n_t = 0.9**t + (1 - 0.9**t) * 40.0
      np.testing.assert_allclose(counts[:, :5], n_t, rtol=1e-12)
      np.testing.assert_allclose(counts[:, 5:], 0.9**t, rtol=1e-12)
      if t in (1, 3, 30):
        expected = mean_cjd + 0.9**t / n_t * (keys0[:, :5] - mean_cjd)
        np.testing.assert_allclose(keys[:, :5], expected, atol=1e-10)

    with jax.enable_x64(True):
      h_ncd, keys, counts, sums = self._run(1.0, 200, check)
      _, mean_cjd, keys0 = self._clusters()
      np.testing.assert_allclose(np.asarray(keys)[:, :5], mean_cjd, atol=1e-10)
      # Dead keys (count 0.9^200 ~ 7e-10): exactly those two get data rows
      # of their own head; live keys and statistics stay as they were.
      new_keys, new_counts, new_sums = kvm.reinit_dead_keys(
          keys, counts, sums, jnp.asarray(h_ncd), 1e-3, 7
      )
      new_keys, new_counts = np.asarray(new_keys), np.asarray(new_counts)
      np.testing.assert_array_equal(new_keys[:, :5], np.asarray(keys)[:, :5])
      np.testing.assert_array_equal(
          new_counts[:, :5], np.asarray(counts)[:, :5]
      )
      np.testing.assert_array_equal(
          np.asarray(new_sums)[:, :5], np.asarray(sums)[:, :5]
      )
      np.testing.assert_array_equal(new_counts[:, 5:], 1e-3)
      np.testing.assert_allclose(
          np.asarray(new_sums)[:, 5:], 1e-3 * new_keys[:, 5:], rtol=1e-15
      )
      for c in range(2):
        for j in (5, 6):
          self.assertTrue(
              (np.abs(h_ncd[:, c] - new_keys[c, j]).sum(-1) == 0).any()
          )
      again = kvm.reinit_dead_keys(
          keys, counts, sums, jnp.asarray(h_ncd), 1e-3, 7
      )[0]
      np.testing.assert_array_equal(np.asarray(again), new_keys)
      # A threshold below every count changes nothing.
      same = kvm.reinit_dead_keys(
          keys, counts, sums, jnp.asarray(h_ncd), 1e-12, 7
      )[0]
      np.testing.assert_array_equal(np.asarray(same), np.asarray(keys))

  def test_initialize_keys(self):
    rng = np.random.default_rng(4)
    model = _random_memory(3)
    data = rng.normal(size=(100, 12)).astype(np.float32)
    h_ncd = np.asarray(model.project(jnp.asarray(data)))
    # No EMA step: every key is a distinct projected row of its own head.
    kvm.initialize_keys(model, data, steps=0, seed=5)
    keys = np.asarray(model.keys_cmd[...])
    for c in range(8):
      match = np.abs(keys[c][:, None] - h_ncd[None, :, c]).sum(-1) == 0
      self.assertTrue(match.any(1).all())
      self.assertLen(set(np.argmax(match, 1)), 64)
    # The array form equals the same array given as an iterable of batches.
    kvm.initialize_keys(model, data, steps=6, seed=5)
    from_array = np.asarray(model.keys_cmd[...])
    counts = kvm.initialize_keys(model, [data] * 6, steps=6, seed=5)
    np.testing.assert_array_equal(np.asarray(model.keys_cmd[...]), from_array)
    # EMA counts sum to the rows per step, up to the start counts' share.
    np.testing.assert_allclose(
        np.asarray(counts).sum(1), 0.9**6 * 64 + (1 - 0.9**6) * 100, rtol=1e-5
    )
    self.assertFalse(np.array_equal(from_array, keys))
    # 10 distinct rows, each 10 times: most keys start as duplicates, lose
    # every tie (lowest index wins) and die; re-drawing them keeps every
    # count at or above the threshold.
    repeated = np.repeat(data[:10], 10, axis=0)
    counts = kvm.initialize_keys(model, repeated, steps=6, seed=5)
    self.assertLess(np.asarray(counts).min(), 0.6)
    counts = kvm.initialize_keys(
        model, repeated, steps=6, seed=5, dead_threshold=0.6
    )
    self.assertGreaterEqual(np.asarray(counts).min(), 0.6)
    with self.assertRaisesRegex(ValueError, "decay"):
      kvm.initialize_keys(model, data, steps=1, decay=1.0)
    with self.assertRaisesRegex(ValueError, "no batch"):
      kvm.initialize_keys(model, [], steps=1)


class KnownAnswerTest(absltest.TestCase):

  def test_equals_nearest_centroid_on_digits(self):
    x, y = datasets.load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1200], order[1200:]
    reference = neighbors.NearestCentroid().fit(x[train], y[train])
    with jax.enable_x64(True):
      model = kvm.KeyValueMemory(
          64,
          1,
          10,
          64,
          10,
          projection="none",
          dtype=jnp.float64,
          rngs=nnx.Rngs(0),
      )
      model.keys_cmd[...] = jnp.asarray(reference.centroids_[None])
      model.values_cmv[...] = jnp.eye(10, dtype=jnp.float64)[None]
      logits = np.asarray(model(jnp.asarray(x[test], jnp.float64)))
    predicted = logits.argmax(1)
    np.testing.assert_array_equal(predicted, reference.predict(x[test]))
    # One-hot values: the output is exactly the chosen key's row.
    np.testing.assert_array_equal(logits.max(1), 1.0)
    self.assertGreater((predicted == y[test]).mean(), 0.85)


class InvarianceTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.z = jnp.asarray(
        np.random.default_rng(7).normal(size=(32, 12)), jnp.float32
    )

  @parameterized.parameters("mean", "linear")
  def test_permuting_codebook_entries(self, decoder):
    kwargs = {"decoder": decoder}
    if decoder == "linear":
      kwargs["num_outputs"] = 3
    model = _random_memory(4, **kwargs)
    expected = np.asarray(model(self.z))
    perm_cm = np.stack(
        [np.random.default_rng(c).permutation(64) for c in range(8)]
    )
    heads = np.arange(8)[:, None]
    model.keys_cmd[...] = model.keys_cmd[...][heads, perm_cm]
    model.values_cmv[...] = model.values_cmv[...][heads, perm_cm]
    np.testing.assert_allclose(
        np.asarray(model(self.z)), expected, rtol=1e-6, atol=1e-6
    )

  @parameterized.parameters(1, 3)
  def test_permuting_heads_under_mean_decoder(self, top_k):
    model = _random_memory(5, top_k=top_k)
    expected = np.asarray(model(self.z))
    perm = np.random.default_rng(1).permutation(8)
    for name in ("projection_ced", "keys_cmd", "values_cmv"):
      variable = getattr(model, name)
      variable[...] = variable[...][perm]
    # The mean over heads now sums in another order: float32 rounding.
    np.testing.assert_allclose(
        np.asarray(model(self.z)),
        expected,
        rtol=test_util.FP32_RTOL,
        atol=test_util.FP32_ATOL,
    )

  @parameterized.parameters(1, 2, 5)
  def test_top_k_against_numpy(self, k):
    model = _random_memory(6, top_k=k)
    idx, expected = _explicit_topk(model, self.z, k)
    np.testing.assert_array_equal(np.asarray(model.select(self.z)), idx)
    np.testing.assert_allclose(
        np.asarray(model(self.z)), expected, rtol=1e-5, atol=1e-6
    )

  def test_first_of_top_k_is_top_1(self):
    model = _random_memory(7)
    h = model.project(self.z)
    keys = model.keys_cmd[...]
    top1 = np.asarray(kvm.nearest_keys(keys, h, 1))
    for k in (2, 7, 64):
      np.testing.assert_array_equal(
          np.asarray(kvm.nearest_keys(keys, h, k))[..., :1], top1
      )

  def test_split_projection_is_contiguous_slices(self):
    model = _random_memory(8, input_dim=32, projection="split")
    self.assertIsNone(model.projection_ced)
    z = jnp.asarray(np.random.default_rng(9).normal(size=(32, 32)), jnp.float32)
    idx, expected = _explicit_topk(model, z, 1)
    np.testing.assert_array_equal(np.asarray(model.select(z)), idx)
    np.testing.assert_allclose(
        np.asarray(model(z)), expected, rtol=1e-5, atol=1e-6
    )

  def test_bad_arguments(self):
    for kwargs, pattern in (
        ({"projection": "pca"}, "projection='pca'"),
        ({"decoder": "mlp"}, "decoder='mlp'"),
        ({"value_init": "ones"}, "value_init='ones'"),
        ({"projection": "split"}, "input_dim = num_heads"),
        ({"projection": "none"}, "num_heads=1"),
        ({"top_k": 65}, "top_k=65"),
        ({"num_keys": 0}, "num_keys=0"),
        ({"decoder": "linear"}, "num_outputs=None"),
        ({"num_outputs": 3}, "num_outputs=3"),
    ):
      with self.assertRaisesRegex(ValueError, pattern):
        _memory(0, **kwargs)
    with self.assertRaisesRegex(ValueError, "z_be.shape"):
      _memory(0)(jnp.zeros((2, 11)))


class ShardingTest(parameterized.TestCase):

  @parameterized.parameters(
      ((1, 1, 8), "mean", 1),
      ((1, 1, 8), "linear", 2),
      ((1, 1, 8), "mean", 3),
      ((2, 1, 4), "linear", 1),
  )
  def test_sharded_forward_equals_unsharded(self, mesh_shape, decoder, top_k):
    kwargs = {"decoder": decoder, "top_k": top_k, "num_heads": 16}
    if decoder == "linear":
      kwargs["num_outputs"] = 6
    model = _random_memory(9, **kwargs)
    z = jnp.asarray(np.random.default_rng(8).normal(size=(24, 12)), jnp.float32)
    expected = np.asarray(model(z))
    expected_idx = np.asarray(model.select(z))
    mesh = sharding.make_mesh(mesh_shape)
    graphdef, state = nnx.split(model)
    state = jax.device_put(
        state, train_state.variable_shardings(nnx.state(model), mesh)
    )
    # The codebooks really are split along the heads over the model axis.
    for name in ("keys_cmd", "values_cmv", "projection_ced"):
      array = state[name][...]
      self.assertEqual(
          array.addressable_shards[0].data.shape[0],
          16 // mesh_shape[2],
          msg=name,
      )
    z = jax.device_put(z, sharding.named_sharding(mesh, (sharding.BATCH, None)))

    @jax.jit
    def forward(state, z):
      model = nnx.merge(graphdef, state)
      return model(z), model.select(z)

    out, idx = forward(state, z)
    # The nearest and next-nearest keys differ by >= 2.5e-4 here (scores
    # ~18, rounding ~1e-6), so the ids are exact. The sums over 16 heads
    # are reduced over devices in another order: 3.6e-7 seen on outputs of
    # ~0.1, where a lost head shard moves them by 1e-2 or more.
    np.testing.assert_array_equal(np.asarray(idx), expected_idx)
    np.testing.assert_allclose(
        np.asarray(out),
        expected,
        rtol=test_util.FP32_RTOL,
        atol=test_util.FP32_LONG_ATOL,
    )


if __name__ == "__main__":
  absltest.main()
