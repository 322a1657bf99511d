"""Tests for LoCoV1 tasks read from local files: the BEIR conversion and the
TFDS builder must give the same collection, holding exactly the requested
task's rows, and bad rows must be reported with their file and line."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest

from retrieval_jax.data import beir
from retrieval_jax.data import tfds_beir
from retrieval_jax.data import tfds_loco

# Two tasks interleaved, as in the published files (which hold all 12).
DOCUMENTS = [
    {
        "pid": "qmsum_Passage_0",
        "passage": "Meeting one: budget talk.",
        "dataset": "qmsum",
    },
    {
        "pid": "2wikimqa_Passage_0",
        "passage": "Paris is in France.",
        "dataset": "2wikimqa",
    },
    {
        "pid": "qmsum_Passage_1",
        "passage": "Meeting two:\nremote control\u2028 design, caf\u00e9.",
        "dataset": "qmsum",
    },
    {
        "pid": "2wikimqa_Passage_1",
        "passage": "Rome is in Italy.",
        "dataset": "2wikimqa",
    },
    {
        "pid": "qmsum_Passage_2",
        "passage": "Meeting three: marketing.",
        "dataset": "qmsum",
    },
    # QASPER-style null passage: dropped, with the judgment naming it.
    {"pid": "2wikimqa_Passage_2", "passage": None, "dataset": "2wikimqa"},
]
QUERIES = [
    {
        "qid": "qmsum_Query_0",
        "query": "What was said about the budget?",
        "answer_pids": ["qmsum_Passage_0"],
        "dataset": "qmsum",
    },
    {
        "qid": "2wikimqa_Query_0",
        "query": "Where is Paris?",
        "answer_pids": ["2wikimqa_Passage_0", "2wikimqa_Passage_2"],
        "dataset": "2wikimqa",
    },
    {
        "qid": "qmsum_Query_1",
        "query": "Design and marketing?",
        "answer_pids": ["qmsum_Passage_2", "qmsum_Passage_1"],
        "dataset": "qmsum",
    },
    {
        "qid": "2wikimqa_Query_1",
        "query": "Only a null answer.",
        "answer_pids": ["2wikimqa_Passage_2"],
        "dataset": "2wikimqa",
    },
    {
        "qid": "2wikimqa_Query_2",
        "query": "Where is Rome?",
        "answer_pids": ["2wikimqa_Passage_1"],
        "dataset": "2wikimqa",
    },
]


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


class TfdsLocoTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.data_dir = os.path.join(cls.root, "tfds")
    cls.queries = write_jsonl(os.path.join(cls.root, "queries.jsonl"), QUERIES)
    cls.documents = write_jsonl(
        os.path.join(cls.root, "documents.jsonl"), DOCUMENTS
    )

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def tempdir(self):
    path = tempfile.mkdtemp(dir=self.root)
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def to_beir(self, task, queries=None, documents=None):
    out = os.path.join(self.tempdir(), task)
    summary = tfds_loco.loco_to_beir(
        queries or self.queries, documents or self.documents, task, out
    )
    return out, summary

  def test_loco_to_beir_round_trip_and_task_filter(self):
    out, summary = self.to_beir("qmsum")
    collection = beir.load_beir(out, split="test")
    self.assertEqual(
        collection.doc_ids,
        ["qmsum_Passage_0", "qmsum_Passage_1", "qmsum_Passage_2"],
    )
    self.assertEqual(collection.titles, ["", "", ""])
    # Texts survive byte for byte, line breaks and U+2028 included.
    self.assertEqual(collection.texts[1], DOCUMENTS[2]["passage"])
    self.assertEqual(collection.query_ids, ["qmsum_Query_0", "qmsum_Query_1"])
    self.assertEqual(collection.queries[1], "Design and marketing?")
    self.assertEqual(
        collection.qrels,
        {
            "qmsum_Query_0": {"qmsum_Passage_0": 1},
            "qmsum_Query_1": {"qmsum_Passage_2": 1, "qmsum_Passage_1": 1},
        },
    )
    self.assertEqual(summary["judgments"], 3)
    self.assertEqual(summary["null_passages"], 0)

  def test_null_passages_are_dropped_with_their_judgments(self):
    out, summary = self.to_beir("2wikimqa")
    collection = beir.load_beir(out, split="test")
    self.assertEqual(
        collection.doc_ids, ["2wikimqa_Passage_0", "2wikimqa_Passage_1"]
    )
    # All three queries are kept; the one whose only answer is null has no
    # judgments, so evaluation skips it.
    self.assertLen(collection.query_ids, 3)
    self.assertEqual(
        collection.qrels,
        {
            "2wikimqa_Query_0": {"2wikimqa_Passage_0": 1},
            "2wikimqa_Query_2": {"2wikimqa_Passage_1": 1},
        },
    )
    self.assertEqual(
        collection.judged_query_ids(), ["2wikimqa_Query_0", "2wikimqa_Query_2"]
    )
    self.assertEqual(
        (summary["null_passages"], summary["dropped_judgments"]), (1, 2)
    )

  def test_tfds_equals_beir_conversion(self):
    for task in ("qmsum", "2wikimqa"):
      out, _ = self.to_beir(task)
      expected = beir.load_beir(out, split="test")
      actual = tfds_loco.load_loco_tfds(
          self.queries, self.documents, task, data_dir=self.data_dir
      )
      self.assertEqual(actual, expected)
      self.assertEqual(
          [(q, list(d.items())) for q, d in actual.qrels.items()],
          [(q, list(d.items())) for q, d in expected.qrels.items()],
      )

  def test_tfds_tables_splits_and_reuse(self):
    corpus = tfds_loco.prepare(
        self.queries, self.documents, "qmsum", "corpus", self.data_dir
    )
    self.assertEqual(corpus.info.file_format.value, "array_record")
    self.assertEqual(list(corpus.info.splits.keys()), [tfds_beir.FULL_SPLIT])
    source = corpus.as_data_source(tfds_beir.FULL_SPLIT)
    self.assertLen(source, 3)
    self.assertEqual(source[2]["_id"].decode(), "qmsum_Passage_2")
    self.assertEqual(source[1]["text"].decode(), DOCUMENTS[2]["passage"])
    qrels = tfds_loco.prepare(
        self.queries, self.documents, "qmsum", "qrels", self.data_dir
    )
    self.assertEqual(list(qrels.info.splits.keys()), [tfds_loco.QRELS_SPLIT])
    rows = qrels.as_data_source(tfds_loco.QRELS_SPLIT)
    # `line` is the query's line in the queries file.
    self.assertEqual(
        [int(rows[i]["line"]) for i in range(len(rows))], [1, 3, 3]
    )
    # Each task and table has its own config; a second prepare reuses it.
    names = {
        tfds_loco.make_config(self.queries, self.documents, t, table).name
        for t in ("qmsum", "2wikimqa")
        for table in tfds_beir.TABLES
    }
    self.assertLen(names, 6)
    again = tfds_loco.prepare(
        self.queries, self.documents, "qmsum", "corpus", self.data_dir
    )
    self.assertEqual(again.data_dir, corpus.data_dir)
    self.assertTrue(again.is_prepared())

  def test_changed_source_gets_a_new_config(self):
    documents = write_jsonl(
        os.path.join(self.tempdir(), "documents.jsonl"), DOCUMENTS
    )
    before = tfds_loco.make_config(self.queries, documents, "qmsum", "corpus")
    changed = [dict(d) for d in DOCUMENTS]
    changed[0]["passage"] = changed[0]["passage"].replace("one", "One")
    write_jsonl(documents, changed)
    after = tfds_loco.make_config(self.queries, documents, "qmsum", "corpus")
    self.assertNotEqual(before.name, after.name)
    self.assertEqual(
        tfds_loco.load_loco_tfds(
            self.queries, documents, "qmsum", data_dir=self.data_dir
        ).texts[0],
        "Meeting One: budget talk.",
    )

  def test_directory_and_parquet_sources(self):
    # A directory of per-task files, as in the Hub repositories.
    directory = self.tempdir()
    write_jsonl(
        os.path.join(directory, "2wikimqa_test.jsonl"),
        [d for d in DOCUMENTS if d["dataset"] == "2wikimqa"],
    )
    write_jsonl(
        os.path.join(directory, "qmsum_test.jsonl"),
        [d for d in DOCUMENTS if d["dataset"] == "qmsum"],
    )
    out, _ = self.to_beir("qmsum")
    expected = beir.load_beir(out)
    from_dir, _ = self.to_beir("qmsum", documents=directory)
    self.assertEqual(beir.load_beir(from_dir), expected)
    try:
      import pyarrow  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.skipTest("pyarrow is not installed")
    parquet_dir = self.tempdir()
    queries = os.path.join(parquet_dir, "queries.parquet")
    documents = os.path.join(parquet_dir, "documents.parquet")
    pq.write_table(pyarrow.Table.from_pylist(QUERIES), queries)
    pq.write_table(pyarrow.Table.from_pylist(DOCUMENTS), documents)
    from_parquet, _ = self.to_beir("qmsum", queries, documents)
    self.assertEqual(beir.load_beir(from_parquet), expected)
    # Parquet rows are reported by row number, like JSONL lines.
    bad = [dict(q) for q in QUERIES]
    bad[2]["answer_pids"] = ["qmsum_Passage_9"]
    pq.write_table(pyarrow.Table.from_pylist(bad), queries)
    with self.assertRaisesRegex(
        beir.BeirFormatError, r"queries\.parquet:3: answer pid"
    ):
      self.to_beir("qmsum", queries, documents)

  def test_unknown_task_lists_the_known_ones(self):
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        r"no documents of task 'gov_report'; the 'dataset' values found are:"
        r" 2wikimqa, qmsum$",
    ):
      self.to_beir("gov_report")
    with self.assertRaisesRegex(
        beir.BeirFormatError, r"qasper.*the LoCoV1 tasks are summ_screen_fd"
    ):
      tfds_loco.load_loco_tfds(
          self.queries, self.documents, "qasper", data_dir=self.data_dir
      )

  def test_malformed_json_names_file_and_line(self):
    path = os.path.join(self.tempdir(), "documents.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      f.write(json.dumps(DOCUMENTS[0]) + "\n")
      f.write(json.dumps(DOCUMENTS[1]) + "\n")
      f.write('{"pid": "qmsum_Passage_1", "passage": "cut off\n')
    with self.assertRaisesRegex(
        beir.BeirFormatError, rf"^{path}:3: malformed JSON"
    ):
      self.to_beir("qmsum", documents=path)
    # The TFDS path fails the same way, before writing anything.
    with self.assertRaisesRegex(beir.BeirFormatError, rf"{path}:3:"):
      tfds_loco.load_loco_tfds(
          self.queries, path, "qmsum", data_dir=self.data_dir
      )

  def test_unknown_answer_pid_names_the_query_line(self):
    queries = [dict(q) for q in QUERIES]
    # A pid of the other task is not a document of this one.
    queries[2]["answer_pids"] = ["qmsum_Passage_1", "2wikimqa_Passage_0"]
    path = write_jsonl(os.path.join(self.tempdir(), "q.jsonl"), queries)
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        rf"^{path}:3: answer pid '2wikimqa_Passage_0' is not a document of"
        r" task 'qmsum'",
    ):
      self.to_beir("qmsum", queries=path)

  def test_invalid_rows(self):
    cases = [
        ({"pid": "qmsum_Passage_5", "dataset": "qmsum"}, 'missing "passage"'),
        (
            {"pid": "qmsum_Passage_5", "passage": 3, "dataset": "qmsum"},
            '"passage" must be a string',
        ),
        (
            {"pid": "qmsum_Passage_0", "passage": "again", "dataset": "qmsum"},
            r"duplicate pid 'qmsum_Passage_0' in task 'qmsum' \(first at"
            r" .*documents.jsonl:1\)",
        ),
        ({"pid": "x", "passage": "no task"}, 'missing "dataset"'),
    ]
    for row, message in cases:
      with self.subTest(message):
        path = write_jsonl(
            os.path.join(self.tempdir(), "documents.jsonl"), DOCUMENTS + [row]
        )
        with self.assertRaisesRegex(
            beir.BeirFormatError, rf"^{path}:7: {message}"
        ):
          self.to_beir("qmsum", documents=path)
    bad_queries = [
        (
            {
                "qid": "q",
                "query": "x",
                "answer_pids": "qmsum_Passage_0",
                "dataset": "qmsum",
            },
            '"answer_pids" must be a list',
        ),
        (
            {
                "qid": "q",
                "query": "x",
                "answer_pids": [None],
                "dataset": "qmsum",
            },
            r'"answer_pids\[0\]" must be a string',
        ),
        (
            {
                "qid": "q",
                "query": "x",
                "answer_pids": ["qmsum_Passage_0", "qmsum_Passage_0"],
                "dataset": "qmsum",
            },
            "answer pid 'qmsum_Passage_0' is listed twice",
        ),
        (
            {
                "qid": "qmsum_Query_0",
                "query": "x",
                "answer_pids": [],
                "dataset": "qmsum",
            },
            "duplicate qid",
        ),
    ]
    for row, message in bad_queries:
      with self.subTest(message):
        path = write_jsonl(
            os.path.join(self.tempdir(), "queries.jsonl"), QUERIES + [row]
        )
        with self.assertRaisesRegex(
            beir.BeirFormatError, rf"^{path}:6: {message}"
        ):
          self.to_beir("qmsum", queries=path)

  def test_missing_source(self):
    with self.assertRaisesRegex(beir.BeirFormatError, "does not exist"):
      self.to_beir("qmsum", documents=os.path.join(self.root, "nope.jsonl"))


if __name__ == "__main__":
  absltest.main()
