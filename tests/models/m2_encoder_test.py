"""M2-BERT encoder: parameter counts, a float64 reference of one layer,
padding invariance, the reference (unmasked) mode and mixed precision."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import steps
from retrieval_jax.layers import long_conv
from retrieval_jax.models import m2_encoder

# A small encoder that still has every part of the 80M one.
SMALL = m2_encoder.M2Config(
    vocab_size=512,
    hidden_size=32,
    num_layers=2,
    intermediate_size=64,
    max_position_embeddings=8192,
    filter_order=16,
    hidden_dropout=0.0,
)


def _count(config) -> int:
  abstract = nnx.eval_shape(
      lambda: m2_encoder.M2Encoder(config, rngs=nnx.Rngs(0))
  )
  params = nnx.state(abstract, nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


class ParameterCountTest(parameterized.TestCase):

  @parameterized.parameters(
      ("m2-bert-80m-128", 80_235_264),
      ("m2-bert-80m-2k", 81_940_224),
      ("m2-bert-80m-8k", 87_396_096),
      ("m2-bert-80m-32k", 109_219_584),
  )
  def test_80m_presets(self, preset, expected):
    self.assertEqual(_count(m2_encoder.M2_CONFIGS[preset]), expected)

  def test_without_pooler(self):
    config = dataclasses.replace(
        m2_encoder.M2_CONFIGS["m2-bert-80m-128"], pooler=False
    )
    self.assertEqual(_count(config), 79_644_672)

  def test_shapes(self):
    model = nnx.eval_shape(
        lambda: m2_encoder.M2Encoder(
            m2_encoder.M2_CONFIGS["m2-bert-80m-128"], rngs=nnx.Rngs(0)
        )
    )
    self.assertEqual(model.embeddings.word_vd.shape, (30528, 768))
    glu = model.layers[0].mlp
    self.assertEqual(glu.gate.weight_gqp.shape, (4, 1536, 192))
    self.assertEqual(glu.out.weight_gqp.shape, (4, 192, 768))
    mixer = model.layers[0].mixer
    self.assertEqual(mixer.in_proj_dc.shape, (768, 2304))
    self.assertEqual(mixer.short_conv_ck.shape, (2304, 3))


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _reference_layer(layer, u_ld, eps):
  """One M2 layer in numpy float64 with explicit (Toeplitz) convolutions."""
  mixer, glu = layer.mixer, layer.mlp
  get = lambda p: np.asarray(p[...], np.float64)
  length, d = u_ld.shape
  p_lc = u_ld @ get(mixer.in_proj_dc) + get(mixer.in_bias_c)
  w_ck, b_c = get(mixer.short_conv_ck), get(mixer.short_conv_bias_c)
  taps = w_ck.shape[1]
  conv_lc = np.zeros_like(p_lc)
  for t in range(length):
    for j in range(taps):
      src = t - (taps - 1) + j  # Tap K-1 multiplies the current position.
      if src >= 0:
        conv_lc[t] += w_ck[:, j] * p_lc[src]
  conv_lc += b_c
  x1, x2, v = np.split(conv_lc, 3, axis=1)
  v = v * x1

  def long(filt, x_ld):
    k_fwd, k_rev, dd = (np.asarray(a, np.float64) for a in filt(length))
    out = np.zeros_like(x_ld)
    for c in range(d):
      op = np.asarray(
          long_conv.toeplitz_operator(k_fwd[c], k_rev[c], dd[c], length),
          np.float64,
      )
      out[:, c] = op @ x_ld[:, c]
    return out

  y = long(mixer.filter, v) * x2 + long(mixer.residual_filter, u_ld)
  m_ld = y @ get(mixer.out_proj_dd) + get(mixer.out_bias_d)

  # Block-diagonal GLU written as explicit dense block matrices.
  def blockdiag(x, w_gqp):
    g, q, p = w_gqp.shape
    return np.concatenate(
        [x[:, i * p : (i + 1) * p] @ w_gqp[i].T for i in range(g)], axis=1
    )

  z = blockdiag(m_ld, get(glu.gate.weight_gqp))
  a, b = np.split(z, 2, axis=1)
  gelu = 0.5 * a * (1 + np.vectorize(__import__("math").erf)(a / np.sqrt(2)))
  h = blockdiag(gelu * b, get(glu.out.weight_gqp)) + get(glu.out.bias_o)
  return _layer_norm(m_ld + h, get(glu.norm.scale_d), get(glu.norm.bias_d), eps)


class ReferenceTest(absltest.TestCase):

  def test_layer_matches_float64_reference(self):
    config = dataclasses.replace(
        SMALL,
        hidden_size=8,
        intermediate_size=16,
        max_position_embeddings=24,
        filter_order=8,
        num_layers=1,
        mask_padding=False,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
    )
    with jax.enable_x64(True):
      model = m2_encoder.M2Encoder(config, rngs=nnx.Rngs(3))
      layer = model.layers[0]
      u = np.random.default_rng(0).normal(size=(1, 24, 8))
      ours = np.asarray(
          layer(jnp.asarray(u), None, deterministic=True, rng=None)
      )[0]
      ref = _reference_layer(layer, u[0], config.layer_norm_eps)
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def _embed(model, ids, pad_to, kind="mean"):
  ids_bl = np.zeros((1, pad_to), np.int32)
  ids_bl[0, : len(ids)] = ids
  mask_bl = (ids_bl != 0).astype(np.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids_bl, mask_bl):
    model = nnx.merge(graphdef, state)
    hidden = model(ids_bl, mask_bl)
    return (
        steps.pool_states(model, hidden, mask_bl, kind),
        hidden[:, : len(ids)],
    )

  return run(state, ids_bl, mask_bl)


class PaddingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ids = np.random.default_rng(1).integers(1, 512, size=150)

  @parameterized.parameters("mean", "cls", "pooler", "mean_pooler")
  def test_masked_mode_is_invariant_to_pad_length(self, kind):
    model = m2_encoder.M2Encoder(SMALL, rngs=nnx.Rngs(0))
    emb_2k, hidden_2k = _embed(model, self.ids, 2048, kind)
    emb_8k, hidden_8k = _embed(model, self.ids, 8192, kind)
    np.testing.assert_allclose(emb_2k, emb_8k, atol=1e-5)
    np.testing.assert_allclose(hidden_2k, hidden_8k, atol=1e-4)

  def test_reference_mode_depends_on_pad_length(self):
    # Documented behaviour of the unmasked computation: pads leak in
    # through the reverse filters and the residual long convolution.
    config = dataclasses.replace(SMALL, mask_padding=False)
    model = m2_encoder.M2Encoder(config, rngs=nnx.Rngs(0))
    emb_2k, _ = _embed(model, self.ids, 2048)
    emb_8k, _ = _embed(model, self.ids, 8192)
    self.assertGreater(float(np.abs(emb_2k - emb_8k).max()), 1e-3)

  def test_unpadded_text_is_the_same_in_both_modes(self):
    masked = m2_encoder.M2Encoder(SMALL, rngs=nnx.Rngs(0))
    unmasked = m2_encoder.M2Encoder(
        dataclasses.replace(SMALL, mask_padding=False), rngs=nnx.Rngs(0)
    )
    emb_a, _ = _embed(masked, self.ids, len(self.ids))
    emb_b, _ = _embed(unmasked, self.ids, len(self.ids))
    np.testing.assert_allclose(emb_a, emb_b, atol=1e-6)


class IdentityInitTest(absltest.TestCase):

  def test_mixer_passes_its_input_through_when_the_gated_branch_is_cut(self):
    config = dataclasses.replace(SMALL, identity_init=True)
    mixer = m2_encoder.M2Encoder(config, rngs=nnx.Rngs(0)).layers[0].mixer
    for f in (mixer.filter, mixer.residual_filter):
      k_fwd, k_rev, _ = f(64)
      np.testing.assert_array_equal(k_fwd, 0.0)
      np.testing.assert_array_equal(k_rev, 0.0)
    # Cut the gated branch (in_proj and the short conv's bias at zero make
    # x1, x2 and v zero): the residual path alone must be the identity.
    mixer.in_proj_dc[...] = jnp.zeros_like(mixer.in_proj_dc[...])
    mixer.short_conv_bias_c[...] = jnp.zeros_like(mixer.short_conv_bias_c[...])
    u = np.random.default_rng(0).normal(size=(2, 64, 32)).astype(np.float32)
    mask = np.ones((2, 64), np.int32)
    mask[1, 40:] = 0
    out = np.asarray(mixer(jnp.asarray(u), jnp.asarray(mask)))
    np.testing.assert_allclose(out, u * mask[..., None], atol=1e-5)

  def test_other_draws_match_the_reference_init(self):
    ref = nnx.state(m2_encoder.M2Encoder(SMALL, rngs=nnx.Rngs(0)), nnx.Param)
    ident = nnx.state(
        m2_encoder.M2Encoder(
            dataclasses.replace(SMALL, identity_init=True), rngs=nnx.Rngs(0)
        ),
        nnx.Param,
    )
    changed = set()
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(ref), nnx.to_flat_state(ident)
    ):
      if not np.array_equal(np.asarray(a[...]), np.asarray(b[...])):
        changed.add("/".join(str(p) for p in path[2:]))
    self.assertEqual(
        changed,
        {
            "mixer/filter/fwd_w3_oh",
            "mixer/filter/rev_w3_oh",
            "mixer/residual_filter/fwd_w3_oh",
            "mixer/residual_filter/rev_w3_oh",
            "mixer/residual_filter/bias_h",
            "mixer/out_proj_dd",
        },
    )

  def test_needs_the_residual_long_conv(self):
    with self.assertRaisesRegex(ValueError, "residual_long_conv"):
      dataclasses.replace(SMALL, identity_init=True, residual_long_conv=False)


class TrainabilityTest(absltest.TestCase):

  def test_contrastive_loss_fits_a_fixed_batch(self):
    # Gradients reach every part of the encoder: 4 (query, document) pairs
    # of random tokens, in-batch InfoNCE, Adam; the loss must fall from
    # ln 4 to near zero.
    import optax  # pylint: disable=g-import-not-at-top
    from retrieval_jax.losses import contrastive  # pylint: disable=g-import-not-at-top

    config = dataclasses.replace(SMALL, max_position_embeddings=64)
    model = m2_encoder.M2Encoder(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(4)
    q_ids = rng.integers(1, 512, size=(4, 8)).astype(np.int32)
    d_ids = rng.integers(1, 512, size=(4, 48)).astype(np.int32)
    d_ids[:, 40:] = 0  # Padding inside the batch.
    tx = optax.adam(3e-3)

    def loss_fn(params):
      enc = nnx.merge(graphdef, params, rest)

      def embed(ids):
        mask = (ids != 0).astype(np.int32)
        return steps.pool_states(enc, enc(ids, mask), mask, "mean")

      q, d = embed(q_ids), embed(d_ids)
      q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
      d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
      scores = q @ d.T / 0.05
      return contrastive.info_nce(
          scores, np.eye(4, dtype=bool), np.ones((4, 4), bool)
      )[0]

    @jax.jit
    def step(params, opt_state):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(40):
      params, opt_state, loss = step(params, opt_state)
      losses.append(float(loss))
    self.assertGreater(losses[0], 0.5)
    self.assertLess(losses[-1], 0.05 * losses[0])


class PrecisionTest(absltest.TestCase):

  def test_bfloat16_compute_tracks_float32(self):
    ids = np.random.default_rng(2).integers(1, 512, size=300)
    f32 = m2_encoder.M2Encoder(SMALL, rngs=nnx.Rngs(0))
    bf16 = m2_encoder.M2Encoder(
        dataclasses.replace(SMALL, dtype=jnp.bfloat16), rngs=nnx.Rngs(0)
    )
    a, _ = _embed(f32, ids, 512)
    b, _ = _embed(bf16, ids, 512)
    a, b = np.asarray(a, np.float64)[0], np.asarray(b, np.float64)[0]
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    self.assertGreater(cosine, 0.999)

  def test_too_long_input_is_rejected(self):
    config = dataclasses.replace(SMALL, max_position_embeddings=64)
    model = m2_encoder.M2Encoder(config, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "64"):
      model(jnp.ones((1, 65), jnp.int32), jnp.ones((1, 65), jnp.int32))


if __name__ == "__main__":
  absltest.main()
