"""Tests for retrieval_jax.models.cross_encoder.

Oracles: the heads against explicit computations on the encoder's token
states; scores that do not depend on padding; the marker layout against the
plain pair encoding (removing the markers gives the [CLS] head's row at two
fewer ids).
"""

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np

from retrieval_jax import encoding
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import features
from retrieval_jax.data import tokenizers
from retrieval_jax.models import cross_encoder as ce
from retrieval_jax.models import transformer_encoder as te

_QUERIES = ["who likes apples?", "Which person enjoys chess and tennis?", "q"]
_ITEMS = [
    "Ann Lee likes apples, pears and opera.",
    "a much longer description of somebody " * 30,
    "x",
]


_SHARED = {}


def _tokenizer_and_encoder():
  """all-MiniLM-L6-v2's tokenizer and a small random encoder, built once."""
  if not _SHARED:
    _SHARED["tokenizer"] = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    )
    config = te.EncoderConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    # The "rbg" generator compiles the 30,522-row table's init far faster.
    _SHARED["encoder"] = te.TransformerEncoder(
        config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))
    )
  return _SHARED["tokenizer"], _SHARED["encoder"]


class CrossEncoderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tokenizer, cls.encoder = _tokenizer_and_encoder()

  def test_emb_layout_is_the_pair_encoding_plus_markers(self):
    emb = features.encode_pairs(self.tokenizer, _QUERIES, _ITEMS, 40, "emb")
    plain = features.encode_pairs(self.tokenizer, _QUERIES, _ITEMS, 38, "cls")
    q_id = self.tokenizer.token_to_id(features.PAIR_QUERY_MARKER)
    i_id = self.tokenizer.token_to_id(features.PAIR_ITEM_MARKER)
    for b in range(len(_QUERIES)):
      n = emb["attention_mask"][b].sum()
      self.assertLessEqual(n, 40)
      row = emb["input_ids"][b, :n].tolist()
      q_pos, i_pos = emb["markers"][b]
      self.assertEqual((row[q_pos], row[i_pos]), (q_id, i_id))
      self.assertEqual(row[i_pos - 1], self.tokenizer.sep_id)
      without = [t for j, t in enumerate(row) if j not in (q_pos, i_pos)]
      self.assertEqual(without, plain["input_ids"][b, : n - 2].tolist())
      types = emb["token_type_ids"][b, :n]
      np.testing.assert_array_equal(types, np.arange(n) >= i_pos)

  def test_heads_equal_explicit_computation(self):
    for head in ce.HEADS:
      model = ce.CrossEncoder(self.encoder, head, rngs=nnx.Rngs(1))
      batch = features.encode_pairs(self.tokenizer, _QUERIES, _ITEMS, 48, head)
      scores = np.asarray(
          model(
              batch["input_ids"],
              batch["attention_mask"],
              batch["token_type_ids"],
              batch.get("markers"),
          )
      )
      h = np.asarray(
          self.encoder(
              batch["input_ids"],
              batch["attention_mask"],
              batch["token_type_ids"],
          ),
          np.float64,
      )
      if head == "cls":
        expected = h[:, 0] @ np.asarray(model.score_d[...]) + float(
            model.bias[...]
        )
      else:
        m = batch["markers"]
        expected = np.einsum(
            "bd,bd->b", h[np.arange(3), m[:, 0]], h[np.arange(3), m[:, 1]]
        )
      np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)

  def test_scores_do_not_depend_on_padding(self):
    model = ce.CrossEncoder(self.encoder, "emb", rngs=nnx.Rngs(1))
    narrow = features.encode_pairs(
        self.tokenizer,
        _QUERIES[:1],
        _ITEMS[:1],
        48,
        "emb",
        pad_to_multiple_of=None,
    )
    wide = features.encode_pairs(
        self.tokenizer,
        _QUERIES[:1],
        _ITEMS[:1],
        48,
        "emb",
        pad_to_multiple_of=64,
    )
    self.assertNotEqual(narrow["input_ids"].shape, wide["input_ids"].shape)
    score = jax.jit(lambda *a: model(*a))
    np.testing.assert_allclose(
        score(
            narrow["input_ids"],
            narrow["attention_mask"],
            narrow["token_type_ids"],
            narrow["markers"],
        ),
        score(
            wide["input_ids"],
            wide["attention_mask"],
            wide["token_type_ids"],
            wide["markers"],
        ),
        rtol=1e-5,
        atol=1e-5,
    )

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "head='dot'"):
      ce.CrossEncoder(self.encoder, "dot", rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "head='dot'"):
      features.encode_pairs(self.tokenizer, ["a"], ["b"], 16, "dot")
    model = ce.CrossEncoder(self.encoder, "emb", rngs=nnx.Rngs(0))
    batch = features.encode_pairs(self.tokenizer, ["a"], ["b"], 16, "cls")
    with self.assertRaisesRegex(ValueError, "marker positions"):
      model(
          batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
      )


if __name__ == "__main__":
  absltest.main()


class PairScorerTest(absltest.TestCase):

  def test_scorer_matches_the_model_on_one_and_eight_devices(self):
    tokenizer, encoder = _tokenizer_and_encoder()
    model = ce.CrossEncoder(encoder, "emb", rngs=nnx.Rngs(1))
    query_ids = np.array([2, 0, 1])
    item_ids = np.array([[0, 1], [2, 2], [1, 0]])
    batch = features.encode_pairs(
        tokenizer,
        [_QUERIES[q] for q in np.repeat(query_ids, 2)],
        [_ITEMS[i] for i in item_ids.ravel()],
        32,
        "emb",
    )
    expected = np.asarray(
        model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            batch["markers"],
        )
    )
    for mesh in (
        sharding.make_mesh(devices=jax.devices()[:1]),
        sharding.make_mesh(),
    ):
      scorer = encoding.PairScorer(
          model,
          tokenizer,
          _QUERIES,
          _ITEMS,
          max_length=32,
          batch_size=4,
          mesh=mesh,
      )
      np.testing.assert_allclose(
          scorer(query_ids, item_ids),
          expected.reshape(3, 2),
          rtol=1e-5,
          atol=1e-5,
      )
