"""Tests for the BERT encoder and for pooling.

The encoder is checked against an independent NumPy implementation of BERT
(float64, per-head loops, -inf masking), for padding invariance, for the
attention mask, for dropout, and sharded over 8 fake CPU devices against the
single-device result.
"""

import dataclasses
import functools
import math
import os

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.layers import pooling
from retrieval_jax.models import transformer_encoder as te

TINY = te.EncoderConfig(
    vocab_size=50,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=24,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    hidden_dropout=0.1,
    attention_dropout=0.1,
)
# A whole float32 forward pass of TINY (LayerNormed states up to ~2.6): the
# numpy reference, another padded length or a sharded matmul order move it
# by up to 2.4e-6 (seen on three x86 code paths), while the tanh GELU in
# place of the exact one moves it by 6.8e-4. 3e-5 is ~10x from either.
_FORWARD_ATOL = 3e-5


def _key(seed):
  """An "rbg" PRNG key: dropout masks from threefry take far longer to
  compile on CPU (about 18 s vs 4 s for one layer here)."""
  return jax.random.key(seed, impl="rbg")


def _random_model(config=TINY, seed=0) -> te.TransformerEncoder:
  """An encoder whose every parameter (biases, LayerNorms too) is random."""
  abstract = nnx.eval_shape(
      lambda: te.TransformerEncoder(config, rngs=nnx.Rngs(0))
  )
  rng = np.random.default_rng(seed)
  params = {}
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    if path[-1] == "scale_d":  # LayerNorm gains near 1
      params[path] = 1.0 + 0.2 * rng.standard_normal(variable.shape)
    else:
      params[path] = 0.3 * rng.standard_normal(variable.shape)
  return te.build_with_params(config, params, seed=_key(seed))


@functools.partial(jax.jit, static_argnames=("graphdef", "deterministic"))
def _jit_apply(graphdef, state, ids, mask, types, deterministic, rng):
  return nnx.merge(graphdef, state)(
      ids, mask, types, deterministic=deterministic, dropout_rng=rng
  )


def _forward(model, ids, mask, types=None, *, deterministic=True, rng=None):
  """Jitted forward (one compile per shape, not one per op) -> NumPy."""
  graphdef, state = nnx.split(model)
  return np.asarray(
      _jit_apply(graphdef, state, ids, mask, types, deterministic, rng)
  )


def _batch(rng, b, l, vocab, lengths):
  """Random ids/types with right padding to the given lengths."""
  ids = rng.integers(1, vocab, size=(b, l)).astype(np.int32)
  types = rng.integers(0, 2, size=(b, l)).astype(np.int32)
  mask = (np.arange(l)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0)
  types = np.where(mask == 1, types, 0)
  return ids, mask, types


# ---------------------------------------------------------------------------
# Independent NumPy reference, written from the BERT equations with
# Hugging Face's [out, in] weight layout rebuilt from the parameters.

_erf = np.vectorize(math.erf)


def _np_gelu(x, approximate):
  if approximate:
    return (
        0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    )
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _np_layer_norm(x, norm, eps):
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * norm["scale_d"] + norm["bias_d"]


def _np_linear(x, weight_out_in, bias):
  """torch.nn.Linear: x @ W.T + b."""
  return x @ weight_out_in.T + bias


def numpy_bert(p, config, ids, mask, types):
  """BERT forward in float64; `p` is the encoder's params as a pure dict."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  d, n = config.hidden_size, config.num_heads
  h = d // n
  b, l = ids.shape
  emb = p["embeddings"]
  x = (
      emb["word_vd"][ids]
      + emb["position_pd"][np.arange(l)][None]
      + emb["type_td"][types]
  )
  x = _np_layer_norm(x, emb["norm"], config.layer_norm_eps)
  approximate = config.hidden_act != "gelu"
  for i in range(config.num_layers):
    lp = p["layers"][i]
    att = lp["attention"]
    # Back to torch Linear layout: [out = N*H, in = D].
    wq = att["query_dnh"].reshape(d, d).T
    wk = att["key_dnh"].reshape(d, d).T
    wv = att["value_dnh"].reshape(d, d).T
    wo = att["out_nhd"].reshape(d, d).T
    q = _np_linear(x, wq, att["query_bias_nh"].reshape(d))
    k = _np_linear(x, wk, att["key_bias_nh"].reshape(d))
    v = _np_linear(x, wv, att["value_bias_nh"].reshape(d))
    context = np.zeros((b, l, d))
    for bi in range(b):
      for head in range(n):
        cols = slice(head * h, (head + 1) * h)
        scores = q[bi, :, cols] @ k[bi, :, cols].T / math.sqrt(h)
        scores = np.where(mask[bi][None, :] > 0, scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        context[bi, :, cols] = probs @ v[bi, :, cols]
    attn_out = _np_linear(context, wo, att["out_bias_d"])
    x = _np_layer_norm(
        x + attn_out, lp["attention_norm"], config.layer_norm_eps
    )
    mlp = lp["mlp"]
    inter = _np_gelu(_np_linear(x, mlp["wi_df"].T, mlp["bi_f"]), approximate)
    out = _np_linear(inter, mlp["wo_fd"].T, mlp["bo_d"])
    x = _np_layer_norm(x + out, lp["mlp_norm"], config.layer_norm_eps)
  return x


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


class TransformerEncoderTest(parameterized.TestCase):

  def test_bert_initialisation(self):
    model = te.TransformerEncoder(TINY, rngs=nnx.Rngs(_key(0)))
    # BERT's init: N(0, initializer_range) weights, zero biases, unit gains.
    self.assertAlmostEqual(
        float(jnp.std(model.embeddings.word_vd[...])),
        TINY.initializer_range,
        delta=0.002,
    )
    np.testing.assert_array_equal(model.layers[1].mlp_norm.scale_d[...], 1.0)
    np.testing.assert_array_equal(model.layers[1].mlp.bo_d[...], 0.0)
    ids, mask, _ = _batch(
        np.random.default_rng(0), 3, 7, TINY.vocab_size, [7, 3, 1]
    )
    out = _forward(model, ids, mask)
    self.assertEqual(out.shape, (3, 7, TINY.hidden_size))
    self.assertEqual(out.dtype, np.float32)

  def test_bfloat16_compute(self):
    model32 = _random_model(TINY, seed=3)
    params = {
        path: v[...]
        for path, v in nnx.to_flat_state(nnx.state(model32, nnx.Param))
    }
    model16 = te.build_with_params(
        dataclasses.replace(TINY, dtype=jnp.bfloat16), params
    )
    # Params stay float32; only activations drop to bf16.
    self.assertEqual(model16.layers[0].mlp.wi_df[...].dtype, jnp.float32)
    ids, mask, types = _batch(
        np.random.default_rng(1), 4, 11, TINY.vocab_size, [11, 6, 2, 9]
    )
    out16 = _forward(model16, ids, mask, types)
    self.assertEqual(out16.dtype, jnp.bfloat16)
    out32 = _forward(model32, ids, mask, types)
    # LayerNormed states are O(1); bf16 keeps ~3 significant digits.
    np.testing.assert_allclose(out16.astype(np.float32), out32, atol=0.15)
    self.assertGreater(np.abs(out16.astype(np.float32) - out32).max(), 0)

  @parameterized.named_parameters(
      ("gelu_erf", "gelu", True),
      ("gelu_tanh", "gelu_new", True),
      ("no_token_types", "gelu", False),
  )
  def test_matches_numpy_reference(self, hidden_act, with_types):
    config = dataclasses.replace(TINY, hidden_act=hidden_act)
    model = _random_model(config, seed=1)
    ids, mask, types = _batch(
        np.random.default_rng(2), 4, 11, config.vocab_size, [11, 6, 2, 9]
    )
    if not with_types:
      types = np.zeros_like(ids)
    ours = _forward(model, ids, mask, types if with_types else None)
    ref = numpy_bert(_params(model), config, ids, mask, types)
    np.testing.assert_allclose(ours, ref, atol=_FORWARD_ATOL, rtol=0)

  def test_gelu_variants_differ(self):
    # Guards the reference test: the two GELUs must be distinguishable.
    exact = _random_model(TINY, seed=1)
    tanh = _random_model(
        dataclasses.replace(TINY, hidden_act="gelu_new"), seed=1
    )
    ids, mask, types = _batch(
        np.random.default_rng(2), 4, 11, TINY.vocab_size, [11, 6, 2, 9]
    )
    diff = np.abs(
        _forward(exact, ids, mask, types) - _forward(tanh, ids, mask, types)
    ).max()
    self.assertGreater(diff, 1e-4)

  def test_mean_pooled_embedding_is_padding_invariant(self):
    model = _random_model(seed=4)
    ids, mask, types = _batch(
        np.random.default_rng(5), 4, 11, TINY.vocab_size, [11, 6, 2, 9]
    )
    hidden = _forward(model, ids, mask, types)
    pad = ((0, 0), (0, 9))
    ids_p, mask_p, types_p = (np.pad(a, pad) for a in (ids, mask, types))
    hidden_p = _forward(model, ids_p, mask_p, types_p)
    # Equal up to float32 rounding (the matmul shapes differ).
    np.testing.assert_allclose(
        pooling.pool(hidden_p, mask_p, "mean"),
        pooling.pool(hidden, mask, "mean"),
        atol=_FORWARD_ATOL,
        rtol=0,
    )
    # The real tokens' states themselves are unchanged.
    real = mask.astype(bool)
    np.testing.assert_allclose(
        hidden_p[:, :11][real], hidden[real], atol=_FORWARD_ATOL, rtol=0
    )

  def test_padded_token_ids_do_not_change_real_tokens(self):
    model = _random_model(seed=6)
    ids, mask, types = _batch(
        np.random.default_rng(7), 4, 11, TINY.vocab_size, [11, 4, 7, 1]
    )
    out = _forward(model, ids, mask, types)
    other_ids = np.where(mask == 1, ids, 17)  # any token, not [PAD]
    other_types = np.where(mask == 1, types, 1)
    other = _forward(model, other_ids, mask, other_types)
    real = mask.astype(bool)
    np.testing.assert_allclose(other[real], out[real], atol=1e-6, rtol=0)
    # ...while the padded positions' own states did change, so the test
    # does see a difference where one is expected.
    self.assertGreater(np.abs(other[~real] - out[~real]).max(), 1e-3)
    # Counterpart: changing a real token does change its neighbours.
    changed = ids.copy()
    changed[0, 10] = ids[0, 10] % (TINY.vocab_size - 1) + 1
    diff = np.abs(_forward(model, changed, mask, types)[0, 0] - out[0, 0]).max()
    self.assertGreater(diff, 1e-4)

  def test_fully_padded_row_is_finite(self):
    model = _random_model(seed=8)
    ids = np.zeros((4, 11), np.int32)
    mask = np.zeros((4, 11), np.int32)
    mask[0, :2] = 1  # rows 1-3 are all padding
    out = _forward(model, ids, mask, np.zeros_like(ids))
    self.assertTrue(np.isfinite(out).all())
    self.assertTrue(
        np.isfinite(np.asarray(pooling.pool(out, mask, "mean"))).all()
    )

  def test_too_long_input_raises(self):
    model = _random_model(seed=0)
    ids = np.ones((1, TINY.max_position_embeddings + 1), np.int32)
    with self.assertRaisesRegex(ValueError, "max_position_embeddings"):
      _forward(model, ids, np.ones_like(ids))

  def test_dropout_with_explicit_keys(self):
    model = _random_model(seed=9)
    ids, mask, types = _batch(
        np.random.default_rng(0), 4, 11, TINY.vocab_size, [11, 6, 2, 9]
    )
    base = _forward(model, ids, mask, types)
    run = functools.partial(
        _forward, model, ids, mask, types, deterministic=False
    )
    a = run(rng=_key(3))
    np.testing.assert_array_equal(a, run(rng=_key(3)))
    self.assertGreater(np.abs(a - base).max(), 1e-3)
    self.assertGreater(np.abs(a - run(rng=_key(4))).max(), 1e-3)
    # deterministic=True ignores the key.
    np.testing.assert_array_equal(
        _forward(model, ids, mask, types, rng=_key(3)), base
    )

  def test_dropout_with_module_streams(self):
    model = _random_model(seed=9)
    ids, mask, types = _batch(
        np.random.default_rng(0), 4, 11, TINY.vocab_size, [11, 6, 2, 9]
    )

    @nnx.jit
    def train_forward(model, ids, mask, types):
      return model(ids, mask, types, deterministic=False)

    # Without a key each dropout layer draws from, and advances, its own
    # NNX stream; nnx.jit carries the advanced state back out.
    s1 = np.asarray(train_forward(model, ids, mask, types))
    s2 = np.asarray(train_forward(model, ids, mask, types))
    self.assertGreater(np.abs(s1 - s2).max(), 1e-3)
    self.assertEqual(int(model.layers[0].mlp_dropout.rngs.count[...]), 2)

  def test_jit_on_tree_mode_split(self):
    model = _random_model(seed=10)
    graphdef, state = nnx.split(model, graph=False)

    @jax.jit
    def forward(state, ids, mask, types):
      return nnx.merge(graphdef, state)(ids, mask, types)

    ids, mask, types = _batch(
        np.random.default_rng(1), 4, 11, TINY.vocab_size, [11, 6, 2, 9]
    )
    np.testing.assert_allclose(
        forward(state, ids, mask, types),
        _forward(model, ids, mask, types),
        atol=1e-5,
        rtol=0,
    )

  def test_parameters_carry_logical_axes(self):
    model = _random_model(seed=0)
    known = {
        sharding.VOCAB,
        sharding.EMBED,
        sharding.HEADS,
        sharding.HEAD_DIM,
        sharding.MLP,
        None,
    }
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    self.assertLen(flat, 5 + TINY.num_layers * 16)
    for path, variable in flat.items():
      axes = variable.get_metadata()["out_sharding"]
      self.assertLen(axes, variable.ndim, msg=str(path))
      self.assertContainsSubset(set(axes), known, msg=str(path))
    self.assertEqual(
        model.embeddings.word_vd.get_metadata()["out_sharding"],
        (sharding.VOCAB, sharding.EMBED),
    )

  def test_sharded_forward_matches_single_device(self):
    model = _random_model(seed=11)
    ids, mask, types = _batch(
        np.random.default_rng(2), 4, 11, TINY.vocab_size, [11, 5, 9, 1]
    )
    expected = _forward(model, ids, mask, types)
    mesh = sharding.make_mesh((1, 4, 2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_shardings = jax.tree.map(
        lambda v: sharding.named_sharding(
            mesh, v.get_metadata()["out_sharding"]
        ),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    params = jax.device_put(params, param_shardings)
    # The vocabulary and FFN matrices really are split across devices.
    wi = params["layers"][0]["mlp"]["wi_df"][...]
    self.assertEqual(
        wi.addressable_shards[0].data.shape,
        (TINY.hidden_size // 4, TINY.intermediate_size // 2),
    )
    batch_sharding = sharding.named_sharding(
        mesh, (sharding.BATCH, sharding.LENGTH)
    )
    ids, mask, types = jax.device_put((ids, mask, types), batch_sharding)

    @jax.jit
    def forward(params, rest, ids, mask, types):
      return nnx.merge(graphdef, params, rest)(ids, mask, types)

    out = forward(params, rest, ids, mask, types)
    np.testing.assert_allclose(
        np.asarray(out), expected, atol=_FORWARD_ATOL, rtol=0
    )

  def test_config_from_hf_config(self):
    hf = {
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.2,
        "position_embedding_type": "absolute",
        "model_type": "bert",
    }
    config = te.EncoderConfig.from_hf_config(hf, dtype=jnp.bfloat16)
    self.assertEqual(
        (config.num_layers, config.num_heads, config.head_dim), (6, 12, 32)
    )
    self.assertEqual(config.attention_dropout, 0.2)
    self.assertEqual(config.dtype, jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "relative_key"):
      te.EncoderConfig.from_hf_config(
          {**hf, "position_embedding_type": "relative_key"}
      )
    with self.assertRaisesRegex(ValueError, "divisible"):
      te.EncoderConfig.from_hf_config({**hf, "num_attention_heads": 7})
    with self.assertRaisesRegex(ValueError, "hidden_act"):
      te.EncoderConfig.from_hf_config({**hf, "hidden_act": "mish"})


class PoolingTest(parameterized.TestCase):

  def test_cls_takes_first_position(self):
    hidden = (
        np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    )
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(
        pooling.pool(hidden, mask, "cls"), hidden[:, 0]
    )

  def test_mean_matches_masked_average(self):
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    expected = np.stack([hidden[i, : mask[i].sum()].mean(0) for i in range(3)])
    np.testing.assert_allclose(
        pooling.pool(hidden, mask, "mean"), expected, atol=1e-6, rtol=0
    )
    # bf16 inputs are accumulated in float32: the result is the exact mean
    # of the rounded inputs, not a bf16-rounded one.
    hidden16 = jnp.asarray(hidden, jnp.bfloat16)
    rounded = np.asarray(hidden16, np.float64)
    expected16 = np.stack(
        [rounded[i, : mask[i].sum()].mean(0) for i in range(3)]
    )
    out = pooling.pool(hidden16, mask, "mean")
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(out, expected16, atol=1e-6, rtol=0)

  def test_mean_of_empty_row_is_zero(self):
    hidden = np.ones((1, 3, 2), np.float32)
    out = pooling.pool(hidden, np.zeros((1, 3)), "mean")
    np.testing.assert_array_equal(out, np.zeros((1, 2)))

  def test_unknown_kind(self):
    with self.assertRaisesRegex(ValueError, "max"):
      pooling.pool(np.ones((1, 2, 2)), np.ones((1, 2)), "max")

  def test_l2_normalize_matches_torch(self):
    try:
      import torch
    except ImportError:
      self.skipTest("torch not installed")
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    x[1] = 0.0  # zero row: torch gives zeros, not NaN
    x[2] *= 1e-14  # below eps: divided by eps, not by its norm
    expected = torch.nn.functional.normalize(
        torch.from_numpy(x), p=2, dim=-1
    ).numpy()
    np.testing.assert_allclose(
        pooling.l2_normalize(x), expected, rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(pooling.l2_normalize(x))[[0, 3]], axis=1),
        1.0,
        rtol=1e-6,
    )


if __name__ == "__main__":
  absltest.main()
