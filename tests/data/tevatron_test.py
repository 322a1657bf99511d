"""Tests for the Tevatron reader and the training data it gives.

The fixture tests/fixtures/tevatron/train.jsonl (4 queries, 1 positive and 2
scored negatives each, one line without a query_id) read back as written;
bad lines raise errors naming file:line; the given negatives, and their
scores as teacher targets, reach the loader's batches.
"""

import json
import pathlib
import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from retrieval_jax import pretrained
from retrieval_jax.data import beir
from retrieval_jax.data import pipeline
from retrieval_jax.data import tevatron
from retrieval_jax.data import tokenizers
from test_util import REPO

FIXTURE = REPO / "tests" / "fixtures" / "tevatron" / "train.jsonl"


def _tokenizer():
  try:
    model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
  except FileNotFoundError as e:
    raise absltest.SkipTest(str(e))
  return tokenizers.WordPieceTokenizer.from_pretrained_dir(model_dir)


def _passage(docid, text="some text", **extra):
  return {"docid": docid, "text": text, **extra}


def _line(**overrides):
  obj = {
      "query_id": "q",
      "query": "a query",
      "positive_passages": [_passage("p")],
      "negative_passages": [_passage("n", "other text")],
  }
  obj.update(overrides)
  return json.dumps(obj)


class ReadTevatronTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def _write(self, *lines) -> str:
    path = self.dir / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)

  def test_fixture_reads_as_written(self):
    rows = tevatron.read_tevatron(str(FIXTURE), require_scores=True)
    self.assertEqual([r.query_id for r in rows], ["t1", "t2", "L3", "t4"])
    self.assertEqual([r.line for r in rows], [1, 2, 3, 4])
    first = rows[0]
    self.assertEqual(first.query, "which animal uses stones to open shellfish")
    self.assertEqual(
        first.positives,
        (
            tevatron.Passage(
                "p1",
                "Sea otters Sea otters use rocks as tools to crack open"
                " shellfish while floating.",
                9.5,
            ),
        ),
    )
    self.assertEqual([p.doc_id for p in first.negatives], ["n1", "n2"])
    self.assertEqual([p.score for p in first.negatives], [3.0, 5.25])
    # A passage without a title is its text alone.
    self.assertEqual(
        rows[2].negatives[0].text,
        "The oboe is a double-reed instrument with a bright, high sound.",
    )

  def test_errors_name_file_and_line(self):
    cases = [
        ("not json", "malformed JSON"),
        (_line(query=None), 'missing "query"|"query" must be a string'),
        (_line(positive_passages=[]), '"positive_passages" is empty'),
        (_line(positive_passages="p"), '"positive_passages" must be an array'),
        (
            _line(positive_passages=[{"text": "x"}]),
            r'positive_passages\[0\]: missing "docid"',
        ),
        (
            _line(negative_passages=[_passage("n"), 3]),
            r"negative_passages\[1\] must be a JSON object",
        ),
        (
            _line(negative_passages=[_passage("n", score="high")]),
            r'negative_passages\[0\]: "score" must be a finite number',
        ),
        (
            _line(negative_passages=[_passage("n", score=True)]),
            r'negative_passages\[0\]: "score" must be a finite number',
        ),
        (
            _line(negative_passages=[_passage("p")]),
            r"negative_passages\[0\]: docid 'p' already in"
            r" positive_passages\[0\]",
        ),
    ]
    for bad, message in cases:
      with self.subTest(message):
        path = self._write(_line(query_id="ok"), bad)
        with self.assertRaisesRegex(
            beir.BeirFormatError, f"^{path}:2: ({message})"
        ):
          tevatron.read_tevatron(path)

  def test_cross_line_errors_name_both_lines(self):
    path = self._write(
        _line(query_id="a"),
        _line(query_id="b", positive_passages=[_passage("p", "changed")]),
    )
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        f"^{path}:2: positive_passages\\[0\\]: docid 'p' has another text"
        " than at line 1",
    ):
      tevatron.read_tevatron(path)
    path = self._write(_line(query_id="a"), "", _line(query_id="a"))
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        f"^{path}:3: duplicate query_id 'a' \\(first at line 1\\)",
    ):
      tevatron.read_tevatron(path)

  def test_scores_required_for_a_file_teacher(self):
    path = self._write(_line(query_id="a", negative_passages=[]))
    self.assertLen(tevatron.read_tevatron(path), 1)
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        f'^{path}:1: positive_passages\\[0\\] has no "score"',
    ):
      tevatron.read_tevatron(path, require_scores=True)

  def test_empty_and_missing_files(self):
    with self.assertRaisesRegex(beir.BeirFormatError, "holds no queries"):
      tevatron.read_tevatron(self._write(""))
    with self.assertRaisesRegex(beir.BeirFormatError, "does not exist"):
      tevatron.read_tevatron(str(self.dir / "absent.jsonl"))


class TrainingDataTest(absltest.TestCase):

  def test_the_file_is_the_corpus(self):
    data = pipeline.TrainingData.from_tevatron(FIXTURE, teacher_scores=True)
    # First-appearance order over positives then negatives of each line.
    self.assertEqual(
        data.doc_ids,
        ("p1", "n1", "n2", "p2", "n3", "n4", "p3", "n5", "p4", "n6"),
    )
    ex = data.examples[3]
    self.assertEqual(ex.positive_ids, ("p4",))
    self.assertEqual(ex.negative_ids, ("n6", "n2"))
    self.assertEqual(ex.teacher_scores, (9.0, 6.0, 0.25))
    self.assertTrue(data.has_teacher_scores)
    unscored = pipeline.TrainingData.from_tevatron(FIXTURE)
    self.assertFalse(unscored.has_teacher_scores)
    self.assertEqual(unscored.examples[3].negative_ids, ("n6", "n2"))
    # New negatives drop the scores that no longer line up.
    fresh = data.with_negatives([()] * 4)
    self.assertEqual(fresh.examples[0].teacher_scores, ())

  def test_a_corpus_directory_adds_documents(self):
    tmp = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    (tmp / "corpus.jsonl").write_text(
        json.dumps({"_id": "x1", "title": "", "text": "extra doc"})
        + "\n"
        + json.dumps({"_id": "p1", "title": "", "text": "old copy"})
        + "\n"
    )
    (tmp / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "q"}))
    data = pipeline.TrainingData.from_tevatron(FIXTURE, tmp)
    self.assertEqual(data.doc_ids[:3], ("x1", "p1", "n1"))
    self.assertEqual(data.doc_texts[0], "extra doc")
    # The file's text is the passage meant.
    self.assertTrue(data.doc_texts[1].startswith("Sea otters Sea otters"))
    self.assertLen(data.doc_ids, 11)


class LoaderTest(absltest.TestCase):

  def test_given_negatives_and_scores_fill_the_groups(self):
    data = pipeline.TrainingData.from_tevatron(FIXTURE, teacher_scores=True)
    loader = pipeline.TrainLoader(
        data,
        _tokenizer(),
        batch_size=4,
        group_size=3,
        unit="pair",
        positives="one",
        query_max_length=16,
        passage_max_length=32,
        seed=0,
        prefetch=0,
    )
    self.assertEqual(
        loader.batch_spec["teacher_scores"], ((12,), np.dtype(np.float32))
    )
    file_scores = {}
    with open(FIXTURE, encoding="utf-8") as f:
      for line in f:
        obj = json.loads(line)
        for p in obj["positive_passages"] + obj["negative_passages"]:
          file_scores[(obj["query"], p["docid"])] = p["score"]
    seen = set()
    for step in range(2):
      batch = loader.batch_at(step)
      _, examples_b = loader.examples_at(step)
      docs_bg = batch["passage_doc"].reshape(4, 3)
      teacher_bg = batch["teacher_scores"].reshape(4, 3)
      for row, example in enumerate(examples_b):
        ex = data.examples[int(loader.units[example, 0])]
        got = [data.doc_ids[d] for d in docs_bg[row]]
        # The positive first, then exactly the file's negatives.
        self.assertEqual(got[0], ex.positive_ids[0])
        self.assertCountEqual(got[1:], ex.negative_ids)
        np.testing.assert_array_equal(
            teacher_bg[row],
            np.array([file_scores[(ex.query, d)] for d in got], np.float32),
        )
        seen.add(ex.query_id)
    self.assertEqual(seen, {"t1", "t2", "L3", "t4"})

  def test_partly_scored_data_is_refused(self):
    data = pipeline.TrainingData.from_tevatron(FIXTURE, teacher_scores=True)
    examples = list(data.examples)
    examples[1] = pipeline.TrainingExample(
        examples[1].query_id,
        examples[1].query,
        examples[1].positive_ids,
        examples[1].negative_ids,
    )
    partial = pipeline.TrainingData(examples, data.doc_ids, data.doc_texts)
    with self.assertRaisesRegex(ValueError, "1 of 4 queries have no teacher"):
      pipeline.TrainLoader(
          partial,
          _tokenizer(),
          batch_size=2,
          group_size=3,
          unit="pair",
          positives="one",
          query_max_length=16,
          passage_max_length=32,
          seed=0,
      )
    with self.assertRaisesRegex(ValueError, "2 teacher scores for 3"):
      pipeline.TrainingData(
          [
              pipeline.TrainingExample(
                  "q", "x", ("p1",), ("n1", "n2"), (1.0, 2.0)
              )
          ],
          data.doc_ids,
          data.doc_texts,
      )


if __name__ == "__main__":
  absltest.main()
