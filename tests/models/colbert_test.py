"""Tests for retrieval_jax.models.colbert.

Oracles: the token layouts against the tokenizer's own ids; query
augmentation ([MASK] rows scored but never attended: the real tokens'
vectors equal those of the unaugmented query); punctuation masking against
`string.punctuation`; unit-norm output rows equal to an explicit
normalize(H W); the corpus encoder against direct model calls, in input
order, with float16 storage within its rounding bound.
"""

import functools
import string

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np
import pytest

from retrieval_jax import encoding
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import features
from retrieval_jax.data import tokenizers
from retrieval_jax.models import colbert
from retrieval_jax.models import transformer_encoder as te
from retrieval_jax.search import late_interaction as li

_QUERIES = ["who likes apples?", "What is (really) the answer, then?", "q"]
_DOCS = [
    "Ann Lee likes apples, pears and opera.",
    "a much longer description of somebody! " * 12,
    "x",
    "Cells divide; tissues grow. Organs form.",
]

_SHARED = {}
# Every model call in this file has 8 rows and 40 positions (queries use
# query_maxlen=40): compiles dominate the run time on CPU.
_ROWS = 8
_WIDTH = 40


def _tokenizer_and_model():
  """all-MiniLM-L6-v2's tokenizer and a small random ColBERT, built once."""
  if not _SHARED:
    _SHARED["tokenizer"] = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    )
    config = te.EncoderConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    # Weights drawn in NumPy: running the initialisers of the 30,522-row
    # table eagerly costs seconds of compilation on CPU.
    abstract = nnx.state(
        nnx.eval_shape(lambda: te.TransformerEncoder(config, rngs=nnx.Rngs(0))),
        nnx.Param,
    )
    rng = np.random.default_rng(0)
    params = {
        path: (
            (
                1 + 0.1 * rng.standard_normal(v.shape)
                if path[-1] == "scale_d"
                else 0.05 * rng.standard_normal(v.shape)
            ).astype(np.float32)
        )
        for path, v in nnx.to_flat_state(abstract)
    }
    encoder = te.build_with_params(config, params)
    _SHARED["model"] = colbert.ColBERT(
        encoder, dim=16, rngs=nnx.Rngs(jax.random.key(1, impl="rbg"))
    )
    graphdef, state = nnx.split(_SHARED["model"])

    def forward(state, ids_bl, attention_bl):
      model = nnx.merge(graphdef, state)
      return (model.encoder(ids_bl, attention_bl), model(ids_bl, attention_bl))

    _SHARED["forward"] = functools.partial(jax.jit(forward), state)
  return _SHARED["tokenizer"], _SHARED["model"]


def _forward(ids_bl, attention_bl):
  """(encoder states, ColBERT vectors) as float64 NumPy, rows padded to 8."""
  b = len(ids_bl)
  assert b <= _ROWS
  pad = ((0, _ROWS - b), (0, 0))
  h, e = _SHARED["forward"](np.pad(ids_bl, pad), np.pad(attention_bl, pad))
  return np.asarray(h, np.float64)[:b], np.asarray(e, np.float64)[:b]


class TokenisationTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok, _ = _tokenizer_and_model()

  def test_query_layout_with_augmentation(self):
    ids, attention, score = features.encode_queries(
        self.tok, _QUERIES, query_maxlen=12
    )
    self.assertEqual(ids.shape, (3, 12))
    self.assertEqual(ids.dtype, np.int32)
    q_marker = self.tok.token_to_id("[unused0]")
    for b, text in enumerate(_QUERIES):
      content = self.tok.tokenize_to_ids(text)[:9]
      n = len(content) + 3
      np.testing.assert_array_equal(
          ids[b, :n], [self.tok.cls_id, q_marker, *content, self.tok.sep_id]
      )
      np.testing.assert_array_equal(ids[b, n:], self.tok.mask_id)
      # [MASK] fill: never attended to, always scored.
      np.testing.assert_array_equal(attention[b], np.arange(12) < n)
      np.testing.assert_array_equal(score[b], 1)
    # The long query was cut: its row ends with [SEP], no [MASK] left.
    self.assertEqual(ids[1, -1], self.tok.sep_id)

  def test_query_layout_without_augmentation(self):
    ids, attention, score = features.encode_queries(
        self.tok, _QUERIES, query_maxlen=12, augment=False
    )
    aug_ids, aug_attention, _ = features.encode_queries(
        self.tok, _QUERIES, query_maxlen=12
    )
    np.testing.assert_array_equal(attention, aug_attention)
    np.testing.assert_array_equal(score, attention)
    np.testing.assert_array_equal(ids[attention == 1], aug_ids[attention == 1])
    np.testing.assert_array_equal(ids[attention == 0], self.tok.pad_id)

  def test_doc_layout_and_punctuation_mask(self):
    ids, attention, score = features.encode_docs(self.tok, _DOCS, doc_maxlen=40)
    lengths = attention.sum(1)
    self.assertEqual(ids.shape, (4, lengths.max()))
    self.assertEqual(lengths[1], 40)
    d_marker = self.tok.token_to_id("[unused1]")
    np.testing.assert_array_equal(ids[:, :2], [[self.tok.cls_id, d_marker]] * 4)
    tokens = [self.tok.convert_ids_to_tokens(row) for row in ids]
    punct_seen = 0
    for b in range(4):
      self.assertEqual(ids[b, lengths[b] - 1], self.tok.sep_id)
      for j, token in enumerate(tokens[b]):
        is_punct = token in set(string.punctuation)
        punct_seen += is_punct and j < lengths[b]
        self.assertEqual(
            score[b, j], int(j < lengths[b] and not is_punct), (b, j, token)
        )
    self.assertGreaterEqual(punct_seen, 8)  # , . ; ! all occur.
    _, attention2, score2 = features.encode_docs(
        self.tok, _DOCS, doc_maxlen=40, mask_punctuation=False, pad_multiple=16
    )
    self.assertEqual(score2.shape, (4, 48))
    np.testing.assert_array_equal(score2, attention2)
    np.testing.assert_array_equal(
        attention2[:, : attention.shape[1]], attention
    )

  def test_bad_maxlen(self):
    with self.assertRaisesRegex(ValueError, "query_maxlen=2"):
      features.encode_queries(self.tok, _QUERIES, query_maxlen=2)
    with self.assertRaisesRegex(ValueError, "doc_maxlen=0"):
      features.encode_docs(self.tok, _DOCS, doc_maxlen=0)


class ColBERTTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok, cls.model = _tokenizer_and_model()

  def test_rows_are_unit_norm_projection(self):
    ids, attention, _ = features.encode_docs(
        self.tok, _DOCS, doc_maxlen=40, pad_multiple=40
    )
    h, e_bld = _forward(ids, attention)
    self.assertEqual(e_bld.shape, (4, 40, 16))
    out = jax.eval_shape(lambda i, a: self.model(i, a), ids, attention)
    self.assertEqual(out.dtype, np.float32)
    norms = np.linalg.norm(e_bld, axis=-1)
    np.testing.assert_allclose(norms[attention == 1], 1.0, atol=1e-5)
    want = h @ np.asarray(self.model.linear_hd[...], np.float64)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(e_bld, want, atol=1e-5)

  def test_mask_rows_scored_not_attended(self):
    aug = features.encode_queries(self.tok, _QUERIES, query_maxlen=_WIDTH)
    plain = features.encode_queries(
        self.tok, _QUERIES, query_maxlen=_WIDTH, augment=False
    )
    _, e_aug = _forward(aug[0], aug[1])
    _, e_plain = _forward(plain[0], plain[1])
    real = plain[1] == 1
    # Not attended: the real tokens cannot tell [MASK] fill from [PAD].
    np.testing.assert_allclose(e_aug[real], e_plain[real], atol=1e-5)
    # Scored: the [MASK] rows change MaxSim by exactly their own maxima.
    docs = features.encode_docs(self.tok, _DOCS, doc_maxlen=40, pad_multiple=40)
    _, e_doc = _forward(docs[0], docs[1])
    s_aug = np.asarray(li.maxsim_all(e_aug, aug[2], e_doc, docs[2]))
    s_plain = np.asarray(li.maxsim_all(e_plain, plain[2], e_doc, docs[2]))
    sims = np.einsum("bqd,nld->bnql", e_aug, e_doc)
    sims = np.where(docs[2][None, :, None, :] == 1, sims, -np.inf).max(-1)
    extra = np.where(~real[:, None, :], sims, 0).sum(-1)
    np.testing.assert_allclose(s_aug - s_plain, extra, atol=1e-4)
    self.assertGreater(np.abs(extra).min(), 1e-3)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "projection_init='xavier'"):
      colbert.ColBERT(
          self.model.encoder, rngs=nnx.Rngs(0), projection_init="xavier"
      )
    with self.assertRaisesRegex(ValueError, "dim=0"):
      colbert.ColBERT(self.model.encoder, 0, rngs=nnx.Rngs(0))

  def test_init_scales(self):
    rngs = lambda: nnx.Rngs(jax.random.key(3, impl="rbg"))
    torch_w = np.asarray(
        colbert.ColBERT(
            self.model.encoder, 64, rngs=rngs(), projection_init="torch"
        ).linear_hd[...]
    )
    bound = 1 / np.sqrt(32)  # U(±1/sqrt(hidden)).
    self.assertLessEqual(np.abs(torch_w).max(), bound)
    self.assertGreater(np.abs(torch_w).max(), 0.9 * bound)
    bert_w = np.asarray(
        colbert.ColBERT(self.model.encoder, 64, rngs=rngs()).linear_hd[...]
    )
    self.assertAlmostEqual(bert_w.std(), 0.02, delta=0.002)


class MultiVectorEncoderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok, cls.model = _tokenizer_and_model()
    cls.encoder = encoding.MultiVectorEncoder.from_model(
        cls.model,
        cls.tok,
        sharding.make_mesh(),
        query_maxlen=_WIDTH,
        doc_maxlen=_WIDTH,
    )

  def test_docs_match_direct_model_in_input_order(self):
    # 16 texts in two batches of 8, every batch padded to width 40.
    texts = (_DOCS * 4)[:15] + ["one more, short"]
    texts = [f"{i} {t}" if i % 3 else t for i, t in enumerate(texts)]
    emb, mask = self.encoder.embed_docs(
        texts, batch_size=8, pad_multiple=40, progress=False
    )
    self.assertEqual(emb.dtype, np.float16)
    ids, attention, score = features.encode_docs(self.tok, texts, doc_maxlen=40)
    self.assertEqual(emb.shape, (16, 40, 16))
    np.testing.assert_array_equal(mask, score)
    want = (
        np.concatenate(
            [_forward(ids[i : i + 8], attention[i : i + 8])[1] for i in (0, 8)]
        )
        * score[..., None]
    )
    # float16 storage: relative rounding 2^-11 per component.
    np.testing.assert_allclose(emb.astype(np.float32), want, atol=2.0**-11)

  def test_queries_fixed_width(self):
    # float16 shares the corpus test's compiled step.
    emb, mask = self.encoder.embed_queries(
        _QUERIES, batch_size=8, dtype=np.float16
    )
    ids, attention, score = features.encode_queries(
        self.tok, _QUERIES, query_maxlen=_WIDTH
    )
    self.assertEqual(emb.shape, (3, _WIDTH, 16))
    np.testing.assert_array_equal(mask, score)
    np.testing.assert_array_equal(mask, 1)  # [MASK] rows are scored.
    np.testing.assert_allclose(
        emb.astype(np.float32), _forward(ids, attention)[1], atol=2.0**-11
    )
    self.assertEqual(self.encoder.dim, 16)

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "0 texts"):
      self.encoder.embed_docs([], progress=False)
    with self.assertRaisesRegex(ValueError, "dtype=int32"):
      self.encoder.embed_docs(["a"], dtype=np.int32, progress=False)


class FromPretrainedTest(absltest.TestCase):

  # Loads all-MiniLM-L6-v2 and compiles its forward pass: seconds on CPU.
  @pytest.mark.slow
  def test_minilm_with_new_projection(self):
    loaded = pretrained.load_pretrained(pretrained.DEFAULT_MODEL)
    encoder = encoding.MultiVectorEncoder.from_model(
        colbert.ColBERT(loaded.model, 24, rngs=nnx.Rngs(0)),
        tokenizers.WordPieceTokenizer.from_pretrained_dir(loaded.model_dir),
        query_maxlen=16,
        doc_maxlen=16,
    )
    self.assertEqual(encoder.dim, 24)
    emb, mask = encoder.embed_docs(
        _DOCS[:2], batch_size=8, progress=False, dtype=np.float32
    )
    self.assertEqual(emb.shape, (2, 16, 24))
    np.testing.assert_allclose(
        np.linalg.norm(emb, axis=-1)[mask == 1], 1.0, atol=1e-5
    )
    # The encoder is the checkpoint's: its states equal a plain load's.
    loaded = pretrained.load_pretrained(pretrained.DEFAULT_MODEL)
    ids, attention, _ = features.encode_docs(
        encoder.tokenizer, _DOCS[:1], doc_maxlen=16
    )
    model = nnx.merge(encoder.graphdef, encoder.state)
    np.testing.assert_allclose(
        model.encoder(ids, attention), loaded.model(ids, attention), atol=1e-5
    )


if __name__ == "__main__":
  absltest.main()
