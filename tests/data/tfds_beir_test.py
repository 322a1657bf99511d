"""Tests for the TFDS builder over local BEIR directories: it must return
exactly what the pure-Python reader returns, in file order, and never reuse
a preparation whose sources have changed."""

import os
import pathlib
import shutil
import tempfile
import warnings

from absl.testing import absltest

from retrieval_jax.data import beir
from retrieval_jax.data import tfds_beir
from retrieval_jax.data.tf_setup import tf
from test_util import LIMIT_SMALL, SHARED_DATA



def make_tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (works under pytest too)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def copy_collection(test: absltest.TestCase, source: pathlib.Path) -> str:
  """Copies a collection into a writable temporary directory."""
  target = os.path.join(make_tempdir(test), source.name)
  shutil.copytree(source, target)
  for root, dirs, files in os.walk(target):
    for name in dirs + files:
      os.chmod(os.path.join(root, name), 0o755)
  return target


class TfdsBeirTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One data_dir for the class, so each collection is prepared once.
    cls.data_dir = tempfile.mkdtemp()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir, ignore_errors=True)
    super().tearDownClass()

  def assert_same_as_beir(self, directory, **kwargs):
    expected = beir.load_beir(directory, **kwargs)
    actual = tfds_beir.load_beir_tfds(
        directory, data_dir=self.data_dir, **kwargs
    )
    self.assertEqual(actual, expected)
    # Dict equality ignores order; the qrels must keep file order too.
    self.assertEqual(
        [(q, list(d.items())) for q, d in actual.qrels.items()],
        [(q, list(d.items())) for q, d in expected.qrels.items()],
    )
    return actual

  def test_limit_small_equals_beir_reader(self):
    collection = self.assert_same_as_beir(str(LIMIT_SMALL))
    self.assertLen(collection.doc_ids, 46)
    self.assertEqual(collection.doc_ids[0], "Geneva Durben")
    # Prepared data is reused: a second load reads the same directories.
    self.assertEqual(
        tfds_beir.load_beir_tfds(str(LIMIT_SMALL), data_dir=self.data_dir),
        collection,
    )

  def test_array_record_random_access_in_file_order(self):
    builder = tfds_beir.prepare(str(LIMIT_SMALL), "corpus", self.data_dir)
    self.assertEqual(builder.info.file_format.value, "array_record")
    source = builder.as_data_source(tfds_beir.FULL_SPLIT)
    ids, _, texts = beir.read_corpus(str(LIMIT_SMALL / beir.CORPUS_FILE))
    self.assertLen(source, len(ids))
    for i in (45, 0, 17):  # Random access, out of order.
      self.assertEqual(source[i]["index"], i)
      self.assertEqual(source[i]["_id"].decode(), ids[i])
      self.assertEqual(source[i]["text"].decode(), texts[i])

  def test_qrels_table_has_one_split_per_file(self):
    scifact = SHARED_DATA / "scifact"
    if not scifact.is_dir():
      self.skipTest(f"{scifact} not present")
    builder = tfds_beir.prepare(str(scifact), "qrels", self.data_dir)
    splits = builder.info.splits
    self.assertEqual(sorted(splits.keys()), ["test", "train"])
    self.assertEqual(splits["test"].num_examples, 339)
    self.assertEqual(splits["train"].num_examples, 919)

  def test_scifact_equals_beir_reader(self):
    scifact = SHARED_DATA / "scifact"
    if not scifact.is_dir():
      self.skipTest(f"{scifact} not present")
    collection = self.assert_same_as_beir(str(scifact))
    self.assertLen(collection.judged_query_ids(), 300)
    self.assert_same_as_beir(str(scifact), split="train")

  def test_cranfield_with_empty_docs_equals_beir_reader(self):
    cranfield = SHARED_DATA / "cranfield"
    if not cranfield.is_dir():
      self.skipTest(f"{cranfield} not present")
    collection = self.assert_same_as_beir(str(cranfield))
    self.assertEqual(collection.texts[collection.doc_ids.index("471")], "")

  def test_changed_source_is_prepared_again(self):
    directory = copy_collection(self, LIMIT_SMALL)
    first = tfds_beir.load_beir_tfds(directory, data_dir=self.data_dir)
    name = tfds_beir.make_config(directory, "corpus").name
    # Same bytes in another directory: same config, the cache is shared.
    self.assertEqual(
        name, tfds_beir.make_config(str(LIMIT_SMALL), "corpus").name
    )
    self.assertTrue(name.startswith("limit_small_corpus_"))
    # Same size, different bytes (a stale-cache check on size or mtime
    # alone could miss this).
    corpus = pathlib.Path(directory, beir.CORPUS_FILE)
    text = corpus.read_text()
    corpus.write_text(
        text.replace("Geneva Durben likes", "Geneva Durben liked")
    )
    self.assertNotEqual(tfds_beir.make_config(directory, "corpus").name, name)
    second = tfds_beir.load_beir_tfds(directory, data_dir=self.data_dir)
    self.assertEqual(second, beir.load_beir(directory))
    self.assertNotEqual(second.texts[0], first.texts[0])
    self.assertTrue(second.texts[0].startswith("Geneva Durben liked"))

  def test_unknown_ids_follow_policy_with_original_line_numbers(self):
    directory = copy_collection(self, LIMIT_SMALL)
    qrels = pathlib.Path(directory, "qrels", "test.tsv")
    qrels.write_text(qrels.read_text() + "query_0\tNobody Known\t1\n")
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      collection = tfds_beir.load_beir_tfds(directory, data_dir=self.data_dir)
    unknown = [w for w in caught if w.category is beir.UnknownIdsWarning]
    self.assertLen(unknown, 1)
    self.assertIn(
        f"{qrels}: 1 of 2001 judgments name ids", str(unknown[0].message)
    )
    self.assertIn("first at lines 2002", str(unknown[0].message))
    self.assertEqual(sum(map(len, collection.qrels.values())), 2000)
    with self.assertRaisesRegex(beir.BeirFormatError, f"^{qrels}:2002: "):
      tfds_beir.load_beir_tfds(
          directory, data_dir=self.data_dir, on_unknown="error"
      )

  def test_format_errors_surface_unchanged(self):
    directory = copy_collection(self, LIMIT_SMALL)
    corpus = pathlib.Path(directory, beir.CORPUS_FILE)
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines + lines[:1]))
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        f"^{corpus}:47: duplicate _id 'Geneva Durben' \\(first at line 1\\)",
    ):
      tfds_beir.load_beir_tfds(directory, data_dir=self.data_dir)

  def test_missing_split_lists_available(self):
    with self.assertRaisesRegex(
        beir.BeirFormatError, "no qrels for split 'validation'; splits found: dev, test, train",
    ):
      tfds_beir.load_beir_tfds(
          str(LIMIT_SMALL), split="validation", data_dir=self.data_dir
      )

  def test_corpus_only_directory(self):
    directory = make_tempdir(self)
    shutil.copy(LIMIT_SMALL / beir.CORPUS_FILE, directory)
    collection = tfds_beir.load_beir_tfds(
        directory, data_dir=self.data_dir, corpus_only=True
    )
    self.assertEqual(collection, beir.load_beir(directory, corpus_only=True))
    self.assertLen(collection.doc_ids, 46)

  def test_tensorflow_sees_no_accelerator(self):
    # On a host with GPUs this is the check that TF left them to JAX.
    self.assertEqual(tf.config.get_visible_devices("GPU"), [])
    self.assertEqual(tf.config.get_visible_devices("TPU"), [])
    self.assertEqual(
        {d.device_type for d in tf.config.list_logical_devices()}, {"CPU"}
    )


if __name__ == "__main__":
  absltest.main()
