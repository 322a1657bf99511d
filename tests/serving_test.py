"""Tests for `retrieval_jax.serving`: text checks and the index directory.

A tiny random encoder with a hand-written vocabulary is exported once; its
towers show that a non-str item is named before the tokenizer sees it, and
`build_index` writes what the passage tower gives. The index files are also
checked without a model: `write_index` / `load_index` round trips, what
`--mode=encode` writes, and each inconsistency `load_index` refuses.
"""

import json
import pathlib
import shutil
import tempfile

from absl.testing import absltest
from flax import nnx
import numpy as np

from retrieval_jax import export
from retrieval_jax import serving
from retrieval_jax.models import transformer_encoder as te

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]
_CONFIG = te.EncoderConfig(
    vocab_size=len(_VOCAB),
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
)


class ServingModelTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # A private directory: concurrent runs must not share one.
    root = pathlib.Path(tempfile.mkdtemp(prefix="rj_serving_"))
    cls.addClassCleanup(shutil.rmtree, root, ignore_errors=True)
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(_VOCAB))
    graphdef, state = nnx.split(
        te.TransformerEncoder(_CONFIG, rngs=nnx.Rngs(0))
    )
    export.export_towers(
        root / "export",
        graphdef=graphdef,
        params=state,
        tokenizer_dir=tokenizer_dir,
        pooling="mean",
        normalize=True,
        query_max_length=8,
        passage_max_length=16,
    )
    cls.root = root
    cls.model = serving.ServingModel.load(root / "export")

  def test_a_pair_scorer_export_is_refused_by_name(self):
    # A cross-encoder export has one `pair` tower and no dense query tower.
    pair = self.root / "pair_export"
    shutil.copytree(self.root / "export", pair)
    manifest = json.loads((pair / serving.MANIFEST_FILE).read_text())
    manifest["kind"] = "cross_encoder"
    manifest["towers"] = {"pair": manifest["towers"]["query"]}
    (pair / serving.MANIFEST_FILE).write_text(json.dumps(manifest))
    with self.assertRaisesRegex(
        ValueError, "cross_encoder export has no dense query tower"
    ):
      serving.ServingModel.load(pair)

  def test_non_str_items_are_named(self):
    cases = [
        (self.model.encode_queries, [None], "queries[0] is NoneType"),
        (self.model.encode_queries, [5], "queries[0] is int"),
        (self.model.encode_queries, ["the cat", b"sat"], "queries[1] is bytes"),
        (self.model.encode_passages, ["a", "b", 1.5], "passages[2] is float"),
        (self.model.encode_queries, "the cat", "queries is one str"),
        (self.model.encode_queries, 7, "queries is int"),
    ]
    for encode, texts, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(TypeError, message.replace("[", r"\[")):
          encode(texts)
    with self.assertRaisesRegex(TypeError, r"texts\[1\] is dict, expected str"):
      serving.check_texts(["a", {}])
    # Any iterable of str (numpy's str_ is a str) is accepted.
    self.assertEqual(
        serving.check_texts(np.array(["the", "cat"])), ["the", "cat"]
    )
    self.assertEqual(
        self.model.encode_queries(iter(["the cat"])).shape, (1, 16)
    )

  def test_build_index_writes_the_passage_tower_rows(self):
    out = pathlib.Path(self.create_tempdir().full_path) / "index"
    passages = ["the cat sat", "the cat", "sat sat sat the"]
    index = serving.build_index(self.model, out, ["a", "b", "c"], passages)
    np.testing.assert_array_equal(
        index.embeddings_nd, self.model.encode_passages(passages)
    )
    self.assertEqual(index.doc_ids, ["a", "b", "c"])
    self.assertEqual((index.num_docs, index.embedding_dim), (3, 16))
    manifest = self.model.manifest
    self.assertEqual(
        index.info["metadata"],
        {
            "export_dir": str(self.model.export_dir),
            "passage_params_sha256": manifest["sha256"]["params.safetensors"],
            "passage_max_length": 16,
        },
    )
    with self.assertRaisesRegex(ValueError, "2 ids for 3 passages"):
      serving.build_index(self.model, out, ["a", "b"], passages)


class IndexFilesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(self.create_tempdir().full_path)
    self.emb_nd = np.random.default_rng(0).standard_normal((5, 4))

  def test_round_trip(self):
    info = serving.write_index(
        self.dir,
        ["d0", "d1", "d2", "d3", "d4"],
        self.emb_nd,
        metric="cosine",
        metadata={"source": "test"},
    )
    index = serving.load_index(self.dir)
    self.assertEqual(index.doc_ids, ["d0", "d1", "d2", "d3", "d4"])
    self.assertEqual(index.embeddings_nd.dtype, np.float32)
    np.testing.assert_array_equal(
        index.embeddings_nd, self.emb_nd.astype(np.float32)
    )
    self.assertEqual(index.metric, "cosine")
    self.assertEqual(index.info, info)
    self.assertEqual(info["metadata"], {"source": "test"})
    self.assertEqual((info["num_docs"], info["embedding_dim"]), (5, 4))

  def test_encode_mode_output_loads_as_a_dot_index(self):
    # What `--mode=encode` writes: the two files, no index.json.
    np.save(self.dir / "corpus_embeddings.npy", self.emb_nd.astype(np.float32))
    (self.dir / "corpus_ids.json").write_text(json.dumps(list("abcde")))
    index = serving.load_index(self.dir)
    self.assertEqual((index.metric, index.info), ("dot", {}))
    self.assertEqual(index.doc_ids, list("abcde"))

  def test_inconsistent_indexes_are_refused(self):
    ids = list("abcde")
    bad_writes = [
        (dict(doc_ids=ids[:4]), "4 ids for 5 rows"),
        (dict(doc_ids=["a", "a", "b", "c", "d"]), "duplicate document ids"),
        (dict(doc_ids=[*ids[:4], 5]), r"doc_ids\[4\] is int"),
        (dict(embeddings_nd=np.full((5, 4), np.nan)), "NaN or inf"),
        (dict(embeddings_nd=np.zeros((0, 4)), doc_ids=[]), "non-empty"),
        (dict(metric="l2"), "metric 'l2'"),
    ]
    for kwargs, message in bad_writes:
      with self.subTest(message):
        args = {"doc_ids": ids, "embeddings_nd": self.emb_nd, **kwargs}
        with self.assertRaisesRegex(ValueError, message):
          serving.write_index(self.dir / "bad", **args)
    with self.assertRaisesRegex(FileNotFoundError, "corpus_embeddings.npy"):
      serving.load_index(self.dir)
    serving.write_index(self.dir, ids, self.emb_nd)
    # A float64 copy, or files that disagree with index.json, do not load.
    np.save(self.dir / "corpus_embeddings.npy", self.emb_nd)
    with self.assertRaisesRegex(ValueError, "float64, expected float32"):
      serving.load_index(self.dir)
    np.save(self.dir / "corpus_embeddings.npy", self.emb_nd[:, :3].astype("f4"))
    with self.assertRaisesRegex(ValueError, r"describes \[5, 4\] rows"):
      serving.load_index(self.dir)


if __name__ == "__main__":
  absltest.main()
