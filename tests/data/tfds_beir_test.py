"""Tests for the TFDS builder over local BEIR directories: its tables must
hold exactly what the pure-Python parser reads, in file order, and it must
never reuse a preparation whose sources have changed."""

import os
import pathlib
import shutil
import tempfile

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

  def assert_tables_equal_parser(self, directory):
    """Every prepared table equals beir.py's parse; returns the tables."""
    corpus = tfds_beir.read_split(
        tfds_beir.prepare(directory, "corpus", self.data_dir),
        tfds_beir.FULL_SPLIT,
        ("_id", "title", "text"),
    )
    self.assertEqual(
        corpus, list(beir.read_corpus(beir.corpus_path(directory)))
    )
    queries = tfds_beir.read_split(
        tfds_beir.prepare(directory, "queries", self.data_dir),
        tfds_beir.FULL_SPLIT,
        ("_id", "text"),
    )
    self.assertEqual(
        queries, list(beir.read_queries(beir.queries_path(directory)))
    )
    qrels_builder = tfds_beir.prepare(directory, "qrels", self.data_dir)
    qrels = {}
    for split in beir.available_splits(directory):
      columns = tfds_beir.read_split(
          qrels_builder, split, ("query_id", "doc_id", "score", "line")
      )
      qrels[split] = [beir.QrelsRow(*row) for row in zip(*columns)]
      self.assertEqual(
          qrels[split], beir.read_qrels_rows(beir.qrels_path(directory, split))
      )
    return corpus, queries, qrels

  def test_limit_small_equals_parser(self):
    (doc_ids, _, _), _, qrels = self.assert_tables_equal_parser(
        str(LIMIT_SMALL)
    )
    self.assertLen(doc_ids, 46)
    self.assertEqual(doc_ids[0], "Geneva Durben")
    self.assertLen(qrels["test"], 2000)

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

  def test_scifact_equals_parser(self):
    scifact = SHARED_DATA / "scifact"
    if not scifact.is_dir():
      self.skipTest(f"{scifact} not present")
    self.assert_tables_equal_parser(str(scifact))

  def test_cranfield_with_empty_docs_equals_parser(self):
    cranfield = SHARED_DATA / "cranfield"
    if not cranfield.is_dir():
      self.skipTest(f"{cranfield} not present")
    (doc_ids, _, texts), _, _ = self.assert_tables_equal_parser(str(cranfield))
    self.assertEqual(texts[doc_ids.index("471")], "")

  def test_changed_source_is_prepared_again(self):
    directory = copy_collection(self, LIMIT_SMALL)
    (_, _, first), _, _ = self.assert_tables_equal_parser(directory)
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
    (_, _, second), _, _ = self.assert_tables_equal_parser(directory)
    self.assertNotEqual(second[0], first[0])
    self.assertTrue(second[0].startswith("Geneva Durben liked"))

  def test_format_errors_surface_unchanged(self):
    directory = copy_collection(self, LIMIT_SMALL)
    corpus = pathlib.Path(directory, beir.CORPUS_FILE)
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines + lines[:1]))
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        f"^{corpus}:47: duplicate _id 'Geneva Durben' \\(first at line 1\\)",
    ):
      tfds_beir.prepare(directory, "corpus", self.data_dir)

  def test_tensorflow_sees_no_accelerator(self):
    # On a host with GPUs this is the check that TF left them to JAX.
    self.assertEqual(tf.config.get_visible_devices("GPU"), [])
    self.assertEqual(tf.config.get_visible_devices("TPU"), [])
    self.assertEqual(
        {d.device_type for d in tf.config.list_logical_devices()}, {"CPU"}
    )


if __name__ == "__main__":
  absltest.main()
