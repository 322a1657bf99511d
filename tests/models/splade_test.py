"""Tests for retrieval_jax.models.splade.

Oracles: hand-computed pooled weights (log 3 for logits [-1, 0.5, 2]);
invariance to padding; the model's weights against an independent NumPy
forward pass of the MLM head on the encoder's states; weight tying checked
through the state (one [V, D] table), through logits after editing the
table, and through the gradient (tied = embedding path + decoder path of an
untied reference); known answers for the inference-free query side and the
corpus IDF; a torch-layout MLM head loaded back.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from retrieval_jax import pretrained
from retrieval_jax.data import features
from retrieval_jax.data import tokenizers
from retrieval_jax.kinds import splade as splade_kind
from retrieval_jax.models import splade
from retrieval_jax.models import transformer_encoder as te

_V, _D = 50, 16
_CONFIG = te.EncoderConfig(
    vocab_size=_V,
    hidden_size=_D,
    num_layers=1,
    num_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    layer_norm_eps=1e-12,
)


_SHARED = {}


def _rbg(seed):
  # The "rbg" generator compiles the eager initialisers much faster.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _model(transform_init="identity", **kwargs):
  """A Splade on a fresh copy of one small random encoder (built once)."""
  if not _SHARED:
    # Weights drawn in NumPy and set without running the initialisers
    # (their eager compilation dominates a small model's cost). Scale 0.5
    # rather than BERT's 0.02 so the nonlinearities are exercised.
    abstract = nnx.state(
        nnx.eval_shape(
            lambda: te.TransformerEncoder(_CONFIG, rngs=nnx.Rngs(0))
        ),
        nnx.Param,
    )
    rng = np.random.default_rng(0)
    params = {
        path: rng.normal(float(path[-1] == "scale_d"), 0.5, v.shape)
        for path, v in nnx.to_flat_state(abstract)
    }
    _SHARED["encoder"] = te.build_with_params(
        _CONFIG, params, seed=jax.random.key(0, impl="rbg")
    )
  return splade.Splade(
      nnx.clone(_SHARED["encoder"]),
      transform_init=transform_init,
      rngs=_rbg(1),
      **kwargs,
  )


def _batch():
  ids = np.array([[2, 7, 9, 11, 3, 0, 0], [2, 40, 41, 3, 0, 0, 0]], np.int32)
  mask = (np.arange(7)[None] < np.array([[5], [4]])).astype(np.int32)
  return ids, mask, np.zeros_like(ids)


def _np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_head_logits(h, w, b, scale, beta, bias_v, table, eps=1e-12):
  """BERT MLM head in float64 NumPy with the exact (erf) GELU."""
  t = h @ w + b
  t = 0.5 * t * (1.0 + scipy.special.erf(t / np.sqrt(2.0)))
  return _np_layer_norm(t, scale, beta, eps) @ table.T + bias_v


def _np_pool(logits, mask, aggregation):
  w = np.log1p(np.maximum(logits, 0.0)) * mask[:, :, None]
  return w.max(1) if aggregation == "max" else w.sum(1)


def _f64(x):
  return np.asarray(x, np.float64)


class SpladePoolTest(parameterized.TestCase):

  @parameterized.parameters(("max", np.log(3.0)), ("sum", np.log(4.5)))
  def test_known_answer(self, aggregation, expected):
    # Term 0 over tokens [-1, 0.5, 2]: max log(1+2) = log 3, sum
    # log 1 + log 1.5 + log 3 = log 4.5. Term 1 is negative everywhere.
    logits = np.zeros((1, 3, 3), np.float32)
    logits[0, :, 0] = [-1.0, 0.5, 2.0]
    logits[0, :, 1] = [-3.0, -0.1, -2.0]
    logits[0, :, 2] = [np.e - 1.0, 0.0, 0.0]
    w = np.asarray(splade.splade_pool(logits, np.ones((1, 3)), aggregation))
    np.testing.assert_allclose(w[0], [expected, 0.0, 1.0], rtol=1e-6)

  @parameterized.parameters("max", "sum")
  def test_masked_positions_never_change_w(self, aggregation):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 10)).astype(np.float32)
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [0] * 6])
    w = np.asarray(splade.splade_pool(logits, mask, aggregation))
    # Huge logits at padded positions would win the max / dominate the sum
    # if masking leaked.
    noisy = np.where(mask[:, :, None] == 1, logits, 1e6)
    np.testing.assert_array_equal(
        np.asarray(splade.splade_pool(noisy, mask, aggregation)), w
    )
    np.testing.assert_allclose(
        w, _np_pool(_f64(logits), mask, aggregation), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(w[2], 0.0)  # no real token at all

  def test_weights_are_non_negative_and_bf16_gives_float32(self):
    logits = np.random.default_rng(0).normal(-2.0, 3.0, (4, 5, 30))
    w = splade.splade_pool(jnp.asarray(logits, jnp.bfloat16), np.ones((4, 5)))
    self.assertEqual(w.dtype, jnp.float32)
    self.assertTrue(np.all(np.asarray(w) >= 0.0))
    self.assertTrue(np.any(np.asarray(w) == 0.0))  # some all-negative terms

  def test_unknown_aggregation_raises(self):
    with self.assertRaisesRegex(ValueError, "mean"):
      splade.splade_pool(jnp.zeros((1, 1, 2)), jnp.ones((1, 1)), "mean")


class SpladeModelTest(parameterized.TestCase):

  @parameterized.parameters("max", "sum")
  def test_identity_init_is_layer_norm_of_act_times_table(self, aggregation):
    model = _model(aggregation=aggregation)
    ids, mask, types = _batch()
    h = _f64(model.encoder(ids, mask, types))
    table = _f64(model.encoder.embeddings.word_vd[...])
    d = np.eye(_D)
    expected = _np_head_logits(
        h, d, np.zeros(_D), np.ones(_D), np.zeros(_D), np.zeros(_V), table
    )
    logits = _f64(model.mlm_logits(ids, mask, types))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        _f64(model(ids, mask, types)),
        _np_pool(expected, mask, aggregation),
        rtol=1e-4,
        atol=1e-4,
    )
    # A constant decoder bias shifts every logit by that constant.
    shifted = _model(aggregation=aggregation, bias_init=-0.75)
    np.testing.assert_allclose(
        _f64(shifted(ids, mask, types)),
        _np_pool(expected - 0.75, mask, aggregation),
        rtol=1e-4,
        atol=1e-4,
    )

  def test_normal_init_differs_from_identity(self):
    w = np.asarray(_model("normal").head.transform_dd[...])
    self.assertLess(np.abs(w).max(), 0.2)  # N(0, 0.02²) entries
    self.assertGreater(np.abs(w).max(), 0.0)
    with self.assertRaisesRegex(ValueError, "xavier"):
      _model("xavier")

  def test_padding_does_not_change_weights_and_all_non_negative(self):
    model = _model()
    ids, mask, types = _batch()
    w = np.asarray(model(ids, mask, types))
    self.assertTrue(np.all(w >= 0.0))
    self.assertGreater(np.count_nonzero(w), 0)
    other = np.where(mask == 1, ids, 17)  # different padding ids
    np.testing.assert_allclose(
        np.asarray(model(other, mask, types)), w, atol=1e-5
    )

  def test_special_ids_zero_only_their_columns(self):
    ids, mask, types = _batch()
    w = np.asarray(_model()(ids, mask, types))
    w_special = np.asarray(_model(special_ids=(0, 2, 3))(ids, mask, types))
    np.testing.assert_array_equal(w_special[:, [0, 2, 3]], 0.0)
    keep = np.setdiff1d(np.arange(_V), [0, 2, 3])
    np.testing.assert_array_equal(w_special[:, keep], w[:, keep])
    with self.assertRaisesRegex(ValueError, "special_ids"):
      _model(special_ids=(_V,))

  def test_decoder_is_the_encoder_table(self):
    model = _model("normal")
    shapes = [
        v.shape for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ]
    self.assertEqual(shapes.count((_V, _D)), 1)  # a single shared table
    ids, mask, types = _batch()
    new_table = (
        np.random.default_rng(5).normal(size=(_V, _D)).astype(np.float32)
    )
    model.encoder.embeddings.word_vd.set_value(jnp.asarray(new_table))
    head = model.head
    expected = _np_head_logits(
        _f64(model.encoder(ids, mask, types)),
        _f64(head.transform_dd[...]),
        _f64(head.transform_bias_d[...]),
        _f64(head.norm.scale_d[...]),
        _f64(head.norm.bias_d[...]),
        _f64(head.bias_v[...]),
        _f64(new_table),
    )
    np.testing.assert_allclose(
        _f64(model.mlm_logits(ids, mask, types)), expected, rtol=1e-4, atol=1e-4
    )

  def test_gradient_sums_embedding_and_decoder_paths(self):
    ids, mask, types = _batch()
    model = _model("normal")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    table_path = ("encoder", "embeddings", "word_vd")

    def with_table(table):
      flat = dict(nnx.to_flat_state(params))
      flat[table_path] = flat[table_path].replace(table)
      return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)

    def tied(table):  # the module as the project runs it: split, merge
      return jnp.sum(with_table(table)(ids, mask, types) ** 2)

    def untied(enc_table, dec_table):
      # Reference: the encoder reads `enc_table`, the decoder `dec_table`.
      model = with_table(enc_table)
      h = model.encoder(ids, mask, types)
      w = splade.splade_pool(model.head(h, dec_table), mask)
      return jnp.sum(w**2)

    # Gradients w.r.t. the table only, in one jit: XLA prunes the other
    # parameters' gradients, which keeps the compile short.
    @jax.jit
    def grads(table):
      loss, g_tied = jax.value_and_grad(tied)(table)
      return loss, g_tied, *jax.grad(untied, argnums=(0, 1))(table, table)

    table = model.encoder.embeddings.word_vd[...]
    loss, g_tied, g_enc, g_dec = map(np.asarray, grads(table))
    np.testing.assert_allclose(
        loss, np.sum(np.asarray(model(ids, mask, types)) ** 2), rtol=1e-5
    )
    # Both paths carry gradient, and the tied gradient is their sum. The
    # lookup only reaches the rows of tokens in the batch.
    present = np.unique(ids)
    absent = np.setdiff1d(np.arange(_V), present)
    np.testing.assert_array_equal(g_enc[absent], 0.0)
    self.assertGreater(np.abs(g_enc[present]).max(), 1e-3)
    self.assertGreater(np.abs(g_dec[absent]).max(), 1e-3)
    np.testing.assert_allclose(g_tied, g_enc + g_dec, rtol=1e-4, atol=1e-6)


class LoadMlmHeadTest(absltest.TestCase):

  def _state_dict(self, norm_names=("weight", "bias")):
    rng = np.random.default_rng(0)
    return {
        "bert.embeddings.word_embeddings.weight": rng.normal(size=(_V, _D)),
        "cls.predictions.transform.dense.weight": (  # torch [out, in]
            rng.normal(size=(_D, _D)).astype(np.float32)
        ),
        "cls.predictions.transform.dense.bias": rng.normal(size=_D),
        f"cls.predictions.transform.LayerNorm.{norm_names[0]}": rng.normal(
            size=_D
        ),
        f"cls.predictions.transform.LayerNorm.{norm_names[1]}": rng.normal(
            size=_D
        ),
        "cls.predictions.bias": rng.normal(size=_V),
    }

  def test_round_trip_with_torch_layout(self):
    for names in (("weight", "bias"), ("gamma", "beta")):
      sd = self._state_dict(names)
      head = splade.MlmHead(_CONFIG, rngs=_rbg(0))
      self.assertTrue(pretrained.load_mlm_head(head, sd))
      norm = "cls.predictions.transform.LayerNorm."
      w = sd["cls.predictions.transform.dense.weight"]
      np.testing.assert_allclose(
          np.asarray(head.transform_dd[...]), w.T, rtol=1e-6
      )
      np.testing.assert_allclose(
          np.asarray(head.norm.scale_d[...]), sd[norm + names[0]], rtol=1e-6
      )
      # The loaded head computes torch's Linear: y = x W^T + b.
      h = np.random.default_rng(1).normal(size=(1, 3, _D))
      table = sd["bert.embeddings.word_embeddings.weight"]
      expected = _np_head_logits(
          h,
          w.T,
          sd["cls.predictions.transform.dense.bias"],
          sd[norm + names[0]],
          sd[norm + names[1]],
          sd["cls.predictions.bias"],
          table,
      )
      got = head(jnp.asarray(h, jnp.float32), jnp.asarray(table, jnp.float32))
      np.testing.assert_allclose(_f64(got), expected, rtol=1e-4, atol=1e-4)

  def test_absent_partial_and_misshapen_heads(self):
    head = splade.MlmHead(_CONFIG, rngs=_rbg(0))
    sd = self._state_dict()
    self.assertFalse(
        pretrained.load_mlm_head(
            head, {k: v for k, v in sd.items() if not k.startswith("cls.")}
        )
    )
    np.testing.assert_array_equal(
        np.asarray(head.transform_dd[...]), np.eye(_D)
    )  # untouched
    partial = dict(sd)
    del partial["cls.predictions.bias"]
    with self.assertRaisesRegex(ValueError, "cls.predictions.bias"):
      pretrained.load_mlm_head(head, partial)
    bad = dict(sd, **{"cls.predictions.bias": np.zeros(_V + 1)})
    with self.assertRaisesRegex(ValueError, "bias_v"):
      pretrained.load_mlm_head(head, bad)
    np.testing.assert_array_equal(
        np.asarray(head.transform_dd[...]), np.eye(_D)
    )  # nothing half-written


class InferenceFreeTest(absltest.TestCase):

  def test_query_known_answer(self):
    idf = np.array([5.0, 1.0, -2.0, 0.5, 3.0, 4.0], np.float32)
    q = features.inference_free_query(
        [[0, 1, 1, 2, 3, 5], [], [4, 4]],
        vocab_size=6,
        idf_v=idf,
        special_ids=(0, 5),
    )
    self.assertEqual((q.dtype, q.shape), (np.float32, (3, 6)))
    # Duplicates count once, specials 0, negative idf clipped to 0.
    np.testing.assert_array_equal(
        q, [[0, 1, 0, 0.5, 0, 0], [0] * 6, [0, 0, 0, 0, 3, 0]]
    )
    binary = features.inference_free_query([[1, 1, 3]], vocab_size=6)
    np.testing.assert_array_equal(binary, [[0, 1, 0, 1, 0, 0]])

  def test_query_bad_input(self):
    with self.assertRaisesRegex(ValueError, "ids_list"):
      features.inference_free_query([[1, 6]], vocab_size=6)
    with self.assertRaisesRegex(ValueError, "idf_v"):
      features.inference_free_query([[1]], vocab_size=6, idf_v=np.ones(5))

  def test_idf_known_answer(self):
    idf = features.idf_from_corpus([[1, 2, 2], [2, 3], [], [2]], vocab_size=5)
    n, df = 4, np.array([0, 1, 3, 1, 0])
    np.testing.assert_allclose(
        idf, np.log(1.0 + (n - df + 0.5) / (df + 0.5)), rtol=1e-6
    )
    self.assertAlmostEqual(float(idf[2]), np.log(1 + 1.5 / 3.5), places=6)
    self.assertEqual(idf.dtype, np.float32)
    with self.assertRaisesRegex(ValueError, "token_id_lists"):
      features.idf_from_corpus([[5]], vocab_size=5)


class QueryMatrixTest(absltest.TestCase):
  """`Splade.query_matrix`, the one query path of evaluate and the API."""

  _VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "dog", "sat"]

  def test_inference_free_weights_by_searched_corpus_idf(self):
    tok = tokenizers.WordPieceTokenizer(self._VOCAB)
    corpus = ["cat sat", "dog sat", "cat"]
    q_qv = splade_kind.INFERENCE_FREE.query_matrix(
        None, tok, ["cat dog dog", "sat"], corpus, max_length=16
    ).toarray()
    # Lucene idf over N = 3: df(cat) = df(sat) = 2, df(dog) = 1.
    expected = np.zeros((2, len(self._VOCAB)), np.float32)
    expected[0, 5] = np.log1p(1.5 / 2.5)
    expected[0, 6] = np.log1p(2.5 / 1.5)
    expected[1, 7] = np.log1p(1.5 / 2.5)
    np.testing.assert_allclose(q_qv, expected, rtol=1e-6)

  def test_splade_encodes_queries(self):
    calls = []

    class Encoder:

      def encode(self, texts, **kw):
        calls.append((list(texts), kw))
        return "encoded"

    out = splade_kind.SPLADE.query_matrix(
        Encoder(), None, ["q"], ["d"], max_length=8, batch_size=4
    )
    self.assertEqual(out, "encoded")
    self.assertEqual(calls, [(["q"], {"batch_size": 4})])


if __name__ == "__main__":
  absltest.main()
