"""Tests for the strict BEIR readers: one per kind of bad input, plus counts
and properties of the real collections (LIMIT-small ships with the
repository; SciFact and Cranfield are read from the shared data directory
when it is present)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings

from absl.testing import absltest

from retrieval_jax.data import beir
import test_util
from test_util import CRANFIELD, LIMIT_SMALL, SCIFACT, SHARED_DATA

_QRELS_HEADER = "query-id\tcorpus-id\tscore\n"
_DOCS = [
    {"_id": "d1", "title": "T1", "text": "one"},
    {"_id": "d2", "title": "", "text": "two"},
    {"_id": "d3", "text": "three"},
]
_QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}]


def _jsonl(records) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


def make_tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test.

  `absltest.TestCase.create_tempdir` reads absl flags, which are unparsed
  when pytest runs the test; tempfile works under both runners.
  """
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class BeirTestCase(absltest.TestCase):
  """Writes small BEIR directories into a temporary directory."""

  def write_collection(
      self,
      corpus: str | None = None,
      queries: str | None = None,
      qrels: dict[str, str] | None = None,
  ) -> str:
    """Writes a collection; None means the small valid default."""
    root = make_tempdir(self)
    if corpus is None:
      corpus = _jsonl(_DOCS)
    if queries is None:
      queries = _jsonl(_QUERIES)
    if qrels is None:
      qrels = {"test": _QRELS_HEADER + "q1\td1\t1\nq2\td3\t2\n"}
    pathlib.Path(root, beir.CORPUS_FILE).write_text(corpus)
    pathlib.Path(root, beir.QUERIES_FILE).write_text(queries)
    os.makedirs(os.path.join(root, beir.QRELS_DIR))
    for split, text in qrels.items():
      pathlib.Path(root, beir.QRELS_DIR, f"{split}.tsv").write_text(text)
    return root

  def write_file(self, name: str, content: str | bytes) -> str:
    path = os.path.join(make_tempdir(self), name)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
      f.write(content)
    return path

  def assert_format_error(self, fn, *args, where: str, says: str, **kwargs):
    """Asserts fn raises BeirFormatError starting with `where`: ..."""
    with self.assertRaises(beir.BeirFormatError) as cm:
      fn(*args, **kwargs)
    message = str(cm.exception)
    self.assertTrue(
        message.startswith(where + ": ") or (where + ": ") in message,
        msg=f"{where!r} not in {message!r}",
    )
    self.assertIn(says, message)
    return cm.exception


class CorpusAndQueriesTest(BeirTestCase):

  def test_valid_corpus_keeps_order_and_defaults_title(self):
    path = self.write_file("corpus.jsonl", _jsonl(_DOCS))
    ids, titles, texts = beir.read_corpus(path)
    self.assertEqual(ids, ["d1", "d2", "d3"])
    self.assertEqual(titles, ["T1", "", ""])
    self.assertEqual(texts, ["one", "two", "three"])

  def test_malformed_json_names_file_and_line(self):
    path = self.write_file(
        "corpus.jsonl", _jsonl(_DOCS[:1]) + '{"_id": "d2", "text": \n'
    )
    self.assert_format_error(
        beir.read_corpus,
        path,
        where=f"{path}:2",
        says="malformed JSON",
    )

  def test_non_object_line(self):
    path = self.write_file("corpus.jsonl", _jsonl(_DOCS[:2] + [["d3", "x"]]))
    self.assert_format_error(
        beir.read_corpus,
        path,
        where=f"{path}:3",
        says="expected a JSON object, got an array",
    )

  def test_missing_id(self):
    path = self.write_file(
        "corpus.jsonl", _jsonl([_DOCS[0], {"title": "", "text": "x"}])
    )
    self.assert_format_error(
        beir.read_corpus, path, where=f"{path}:2", says='missing "_id"'
    )

  def test_null_and_empty_ids_are_rejected(self):
    for bad, says in ((None, "got null"), ("", "is empty"), (1.5, "number")):
      with self.subTest(bad=bad):
        path = self.write_file(
            "queries.jsonl", _jsonl([_QUERIES[0], {"_id": bad, "text": "x"}])
        )
        self.assert_format_error(
            beir.read_queries, path, where=f"{path}:2", says=says
        )

  def test_id_with_tab_is_rejected(self):
    path = self.write_file(
        "corpus.jsonl", _jsonl([{"_id": "a\tb", "text": ""}])
    )
    self.assert_format_error(
        beir.read_corpus, path, where=f"{path}:1", says="tab or line break"
    )

  def test_integer_ids_become_strings(self):
    path = self.write_file("corpus.jsonl", _jsonl([{"_id": 7, "text": "x"}]))
    self.assertEqual(beir.read_corpus(path)[0], ["7"])

  def test_missing_or_non_string_text(self):
    for doc, says in (
        ({"_id": "d9", "title": "t"}, 'missing "text"'),
        ({"_id": "d9", "text": 3}, '"text" must be a string, got a number'),
        ({"_id": "d9", "title": [], "text": ""}, '"title" must be a string'),
    ):
      with self.subTest(says=says):
        path = self.write_file("corpus.jsonl", _jsonl([_DOCS[0], doc]))
        self.assert_format_error(
            beir.read_corpus, path, where=f"{path}:2", says=says
        )

  def test_duplicate_doc_id_names_both_lines(self):
    path = self.write_file("corpus.jsonl", _jsonl(_DOCS + [_DOCS[0]]))
    self.assert_format_error(
        beir.read_corpus,
        path,
        where=f"{path}:4",
        says="duplicate _id 'd1' (first at line 1)",
    )

  def test_duplicate_query_id_names_both_lines(self):
    path = self.write_file("queries.jsonl", _jsonl(_QUERIES + [_QUERIES[1]]))
    self.assert_format_error(
        beir.read_queries,
        path,
        where=f"{path}:3",
        says="duplicate _id 'q2' (first at line 2)",
    )

  def test_blank_lines_are_skipped_but_counted(self):
    path = self.write_file(
        "corpus.jsonl", "\n" + _jsonl(_DOCS[:1]) + "  \n" + '{"_id": }\n'
    )
    self.assert_format_error(
        beir.read_corpus, path, where=f"{path}:4", says="malformed JSON"
    )

  def test_crlf_and_byte_order_mark(self):
    content = "\ufeff" + _jsonl(_DOCS).replace("\n", "\r\n")
    path = self.write_file("corpus.jsonl", content.encode("utf-8"))
    self.assertEqual(beir.read_corpus(path)[0], ["d1", "d2", "d3"])

  def test_invalid_utf8_names_line(self):
    path = self.write_file(
        "corpus.jsonl", _jsonl(_DOCS[:1]).encode() + b'{"_id": "\xff"}\n'
    )
    self.assert_format_error(
        beir.read_corpus, path, where=f"{path}:2", says="not valid UTF-8"
    )

  def test_empty_corpus(self):
    for content in ("", "\n \n"):
      with self.subTest(content=content):
        path = self.write_file("corpus.jsonl", content)
        self.assert_format_error(
            beir.read_corpus, path, where=path, says="holds no documents"
        )

  def test_empty_queries(self):
    path = self.write_file("queries.jsonl", "")
    self.assert_format_error(
        beir.read_queries, path, where=path, says="holds no queries"
    )

  def test_missing_corpus_file(self):
    root = self.write_collection()
    os.remove(os.path.join(root, beir.CORPUS_FILE))
    path = os.path.join(root, beir.CORPUS_FILE)
    self.assert_format_error(
        beir.load_beir,
        root,
        where=path,
        says="does not exist; expected a BEIR corpus",
    )

  def test_missing_queries_file(self):
    root = self.write_collection()
    os.remove(os.path.join(root, beir.QUERIES_FILE))
    self.assert_format_error(
        beir.load_beir,
        root,
        where=os.path.join(root, beir.QUERIES_FILE),
        says="does not exist; expected BEIR queries",
    )

  def test_missing_directory(self):
    path = os.path.join(make_tempdir(self), "nope")
    self.assert_format_error(
        beir.load_beir,
        path,
        where=path,
        says="does not exist; expected a BEIR collection directory",
    )


class QrelsTest(BeirTestCase):

  def test_rows_keep_file_order_graded_and_negative_scores(self):
    path = self.write_file(
        "test.tsv", _QRELS_HEADER + "q2\td3\t2\nq1\td1\t-1\nq2\td1\t0\n"
    )
    qrels = beir.read_qrels(path)
    self.assertEqual(qrels, {"q2": {"d3": 2, "d1": 0}, "q1": {"d1": -1}})
    self.assertEqual(list(qrels), ["q2", "q1"])
    rows = beir.read_qrels_rows(path)
    self.assertEqual([r.line for r in rows], [2, 3, 4])

  def test_headerless_file_is_accepted(self):
    with_header = self.write_file("a.tsv", _QRELS_HEADER + "q1\td1\t1\n")
    without = self.write_file("b.tsv", "q1\td1\t1\n")
    self.assertEqual(beir.read_qrels(without), beir.read_qrels(with_header))
    self.assertEqual(beir.read_qrels_rows(without)[0].line, 1)

  def test_ids_with_spaces_and_crlf(self):
    path = self.write_file(
        "test.tsv",
        (_QRELS_HEADER + "query 0\tGeneva Durben\t1\n").replace("\n", "\r\n"),
    )
    self.assertEqual(beir.read_qrels(path), {"query 0": {"Geneva Durben": 1}})

  def test_wrong_column_count(self):
    path = self.write_file("test.tsv", _QRELS_HEADER + "q1\td1\t1\nq2 0 d3 1\n")
    self.assert_format_error(
        beir.read_qrels,
        path,
        where=f"{path}:3",
        says="expected 3 tab-separated columns",
    )
    path = self.write_file("test.tsv", _QRELS_HEADER + "q1\t0\td1\t1\n")
    self.assert_format_error(
        beir.read_qrels, path, where=f"{path}:2", says="got 4"
    )

  def test_non_integer_score(self):
    for score in ("1.5", "yes", ""):
      with self.subTest(score=score):
        path = self.write_file(
            "test.tsv", _QRELS_HEADER + f"q1\td1\t1\nq1\td2\t{score}\n"
        )
        self.assert_format_error(
            beir.read_qrels,
            path,
            where=f"{path}:3",
            says=f"score {score!r} is not an integer",
        )

  def test_duplicate_row_names_both_lines(self):
    path = self.write_file(
        "test.tsv", _QRELS_HEADER + "q1\td1\t1\nq2\td3\t1\nq1\td1\t2\n"
    )
    self.assert_format_error(
        beir.read_qrels,
        path,
        where=f"{path}:4",
        says="duplicate judgment for query 'q1' and doc 'd1' (first at line 2)",
    )

  def test_header_only_file(self):
    path = self.write_file("test.tsv", _QRELS_HEADER)
    self.assert_format_error(
        beir.read_qrels, path, where=path, says="holds no judgments"
    )

  def test_unknown_ids_warn_once_with_counts_and_drop_rows(self):
    root = self.write_collection(
        qrels={
            "test": (
                _QRELS_HEADER
                + "q1\td1\t1\n"  # line 2, known
                + "qX\td1\t1\n"  # line 3, unknown query
                + "q2\td3\t1\n"  # line 4, known
                + "q2\tdY\t1\n"  # line 5, unknown doc
                + "qX\tdZ\t1\n"  # line 6, both unknown
                + "qW\td2\t1\n"
            )  # line 7, unknown query
        }
    )
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      collection = beir.load_beir(root)
    self.assertLen(caught, 1)
    self.assertIs(caught[0].category, beir.UnknownIdsWarning)
    message = str(caught[0].message)
    path = os.path.join(root, "qrels", "test.tsv")
    self.assertIn(f"{path}: 4 of 6 judgments name ids", message)
    self.assertIn(
        "3 rows name 2 unknown query (queries.jsonl) ids (e.g. 'qX', 'qW';"
        " first at lines 3, 6, 7)",
        message,
    )
    self.assertIn(
        "2 rows name 2 unknown doc (corpus.jsonl) ids (e.g. 'dY', 'dZ';"
        " first at lines 5, 6)",
        message,
    )
    self.assertIn("dropped", message)
    self.assertEqual(collection.qrels, {"q1": {"d1": 1}, "q2": {"d3": 1}})

  def test_unknown_ids_error_policy_names_first_line(self):
    root = self.write_collection(
        qrels={"test": _QRELS_HEADER + "q1\td1\t1\nq2\tdY\t1\nqX\td1\t1\n"}
    )
    self.assert_format_error(
        beir.load_beir,
        root,
        on_unknown="error",
        where=os.path.join(root, "qrels", "test.tsv") + ":3",
        says="2 of 3 judgments name ids the collection lacks",
    )

  def test_unknown_ids_ignore_policy_is_silent(self):
    root = self.write_collection(
        qrels={"test": _QRELS_HEADER + "q1\td1\t1\nq2\tdY\t1\n"}
    )
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # Any warning fails the test.
      collection = beir.load_beir(root, on_unknown="ignore")
    self.assertEqual(collection.qrels, {"q1": {"d1": 1}})

  def test_all_unknown_is_an_error(self):
    root = self.write_collection(qrels={"test": "q7\td1\t1\nq8\td2\t1\n"})
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", beir.UnknownIdsWarning)
      self.assert_format_error(
          beir.load_beir,
          root,
          where=os.path.join(root, "qrels", "test.tsv"),
          says="no judgment names a query and a doc of the collection",
      )

  def test_bad_policy_name(self):
    path = self.write_file("test.tsv", "q1\td1\t1\n")
    with self.assertRaisesRegex(ValueError, "on_unknown must be one of"):
      beir.read_qrels(path, on_unknown="drop")

  def test_missing_split_lists_available(self):
    root = self.write_collection(
        qrels={"train": "q1\td1\t1\n", "dev": "q2\td2\t1\n"}
    )
    self.assert_format_error(
        beir.load_beir,
        root,
        split="test",
        where=os.path.join(root, "qrels", "test.tsv"),
        says="no qrels for split 'test'; splits found: dev, train",
    )

  def test_missing_qrels_directory(self):
    root = self.write_collection(qrels={})
    os.rmdir(os.path.join(root, "qrels"))
    self.assert_format_error(
        beir.load_beir,
        root,
        where=os.path.join(root, "qrels", "test.tsv"),
        says="splits found: none",
    )


class CollectionTest(BeirTestCase):

  def test_judged_queries_and_doc_texts(self):
    root = self.write_collection(qrels={"test": "q2\td1\t0\n"})
    collection = beir.load_beir(root)
    self.assertEqual(collection.query_ids, ["q1", "q2"])
    self.assertEqual(collection.judged_query_ids(), ["q2"])
    self.assertEqual(collection.judged_queries(), (["q2"], ["second"]))
    self.assertEqual(collection.doc_texts(), ["T1 one", "two", "three"])

  def test_split_none_and_corpus_only(self):
    root = self.write_collection()
    no_qrels = beir.load_beir(root, split=None)
    self.assertEqual(no_qrels.qrels, {})
    self.assertLen(no_qrels.query_ids, 2)
    os.remove(os.path.join(root, beir.QUERIES_FILE))
    corpus = beir.load_beir(root, corpus_only=True)
    self.assertEqual(corpus.doc_ids, ["d1", "d2", "d3"])
    self.assertEqual((corpus.query_ids, corpus.qrels), ([], {}))

  def test_doc_text(self):
    self.assertEqual(beir.doc_text("", ""), "")
    self.assertEqual(beir.doc_text(" T ", "x "), "T  x")

  def test_beir_does_not_import_tensorflow(self):
    # Evaluation code imports beir.py and must not pay for (or initialise)
    # TensorFlow. A fresh interpreter, since this one may have TF already.
    code = (
        "import sys; import retrieval_jax.data.beir;"
        " sys.exit('tensorflow' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(test_util.REPO))
    result = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    self.assertEqual(result.returncode, 0)


class RealDataTest(absltest.TestCase):

  def test_limit_small(self):
    collection = beir.load_beir(str(LIMIT_SMALL))
    self.assertLen(collection.doc_ids, 46)
    self.assertLen(collection.query_ids, 1000)
    self.assertEqual(sum(map(len, collection.qrels.values())), 2000)
    self.assertEqual(collection.judged_query_ids(), collection.query_ids)
    # Every query has exactly two relevant documents.
    self.assertEqual({len(d) for d in collection.qrels.values()}, {2})
    # Names with spaces survive as ids in the corpus and in the qrels.
    self.assertEqual(collection.doc_ids[0], "Geneva Durben")
    self.assertEqual(
        collection.qrels["query_0"],
        {"Geneva Durben": 1, "Dorathea Bastress": 1},
    )
    self.assertTrue(all(" " in d for d in collection.doc_ids))

  def test_shipped_limit_small_equals_shared_copy(self):
    shared = SHARED_DATA / "limit-small"
    if not shared.is_dir():
      self.skipTest(f"{shared} not present")
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
      self.assertEqual(
          (LIMIT_SMALL / name).read_bytes(), (shared / name).read_bytes()
      )

  def test_scifact(self):
    if not SCIFACT.is_dir():
      self.skipTest(f"{SCIFACT} not present")
    collection = beir.load_beir(str(SCIFACT))
    self.assertLen(collection.doc_ids, 5183)
    self.assertLen(collection.query_ids, 1109)
    self.assertEqual(sum(map(len, collection.qrels.values())), 339)
    self.assertLen(collection.qrels, 300)
    judged = collection.judged_query_ids()
    self.assertLen(judged, 300)
    # Judged queries keep queries.jsonl order.
    position = {q: i for i, q in enumerate(collection.query_ids)}
    self.assertEqual(judged, sorted(judged, key=position.get))
    train = beir.load_beir(str(SCIFACT), split="train")
    self.assertEqual(sum(map(len, train.qrels.values())), 919)
    self.assertLen(train.qrels, 809)
    # Train and test queries are disjoint by id.
    self.assertFalse(set(train.qrels) & set(collection.qrels))

  def test_cranfield(self):
    if not CRANFIELD.is_dir():
      self.skipTest(f"{CRANFIELD} not present")
    collection = beir.load_beir(str(CRANFIELD))
    self.assertLen(collection.doc_ids, 1400)
    self.assertLen(collection.query_ids, 225)
    scores = [s for docs in collection.qrels.values() for s in docs.values()]
    self.assertLen(scores, 1612)
    self.assertEqual(sorted(set(scores)), [1, 2, 3, 4])
    # Gains per grade, as documented for the conversion.
    self.assertEqual(
        [scores.count(g) for g in (4, 3, 2, 1)], [128, 387, 734, 363]
    )
    # Docs 471 and 995 have neither title nor text, and are kept.
    texts = dict(zip(collection.doc_ids, collection.doc_texts()))
    self.assertEqual((texts["471"], texts["995"]), ("", ""))
    self.assertEqual(sum(t == "" for t in texts.values()), 2)


if __name__ == "__main__":
  absltest.main()
