"""Tests for the seqio training-pair Tasks: file order, text joined as BEIR
does, validation messages, and idempotent registration."""

import json
import os
import pathlib
import shutil
import tempfile

# Hides accelerators from TensorFlow before seqio imports it.
from retrieval_jax.data import tf_setup  # noqa: F401  # pylint: disable=unused-import

from absl.testing import absltest
import seqio

from retrieval_jax.data import beir
from retrieval_jax.data import tasks
from test_util import LIMIT_SMALL, SCIFACT, SHARED_DATA

PAIRS = SHARED_DATA / "train-scifact" / "pairs.jsonl"

_PAIR = {
    "query_id": "q1",
    "query": "first",
    "doc_id": "d1",
    "title": "T",
    "text": "body",
    "score": 1,
}


def make_tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (works under pytest too)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def examples(task: seqio.Task, split: str) -> list[dict[str, str]]:
  """All examples of a task split, in order, with text decoded."""
  ds = task.get_dataset(split=split, shuffle=False, sequence_length=None)
  return [
      {k: v.decode("utf-8") for k, v in ex.items()}
      for ex in ds.as_numpy_iterator()
  ]


class TasksTest(absltest.TestCase):

  def register(self, register_fn, name, *args, **kwargs):
    """Registers a task and removes it from the global registry afterwards."""
    self.addCleanup(seqio.TaskRegistry.remove, name)
    return register_fn(name, *args, **kwargs)

  def write_pairs(self, lines: list[str]) -> str:
    path = os.path.join(make_tempdir(self), "pairs.jsonl")
    pathlib.Path(path).write_text("".join(line + "\n" for line in lines))
    return path

  def test_scifact_pairs_task_in_file_order(self):
    if not PAIRS.is_file():
      self.skipTest(f"{PAIRS} not present")
    task = self.register(tasks.register_pairs_task, "t_pairs", str(PAIRS))
    self.assertEqual(
        set(task.output_features), {"query_id", "query", "doc_id", "positive"}
    )
    got = examples(task, "train")
    self.assertLen(got, 919)
    records = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    self.assertEqual(
        [(e["query_id"], e["doc_id"]) for e in got],
        [(r["query_id"], r["doc_id"]) for r in records],
    )
    first = got[0]
    self.assertEqual(first["query_id"], "0")
    self.assertEqual(
        first["query"], "0-dimensional biomaterials lack inductive properties."
    )
    self.assertEqual(first["doc_id"], "31715818")
    self.assertTrue(
        first["positive"].startswith(
            "New opportunities: the use of nanotechnologies to manipulate and"
            " track stem cells. Nanotechnologies are emerging platforms"
        )
    )
    self.assertEqual(
        first["positive"], f"{records[0]['title']} {records[0]['text']}"
    )

  def test_beir_train_task_matches_pairs_file(self):
    if not (SCIFACT.is_dir() and PAIRS.is_file()):
      self.skipTest(f"{SCIFACT} or {PAIRS} not present")
    task = self.register(
        tasks.register_beir_train_task, "t_beir_train", str(SCIFACT)
    )
    got = examples(task, "train")
    self.assertLen(got, 919)
    # The pairs file was derived from the same train qrels and corpus, so
    # the two sources must agree example by example.
    self.assertEqual(got, list(map(dict, _pairs_as_examples(PAIRS))))

  def test_beir_train_task_skips_non_positive_and_keeps_row_order(self):
    root = make_tempdir(self)
    shutil.copy(LIMIT_SMALL / beir.CORPUS_FILE, root)
    shutil.copy(LIMIT_SMALL / beir.QUERIES_FILE, root)
    os.makedirs(os.path.join(root, "qrels"))
    # query_1 comes before query_0's second row: file order, not grouped.
    pathlib.Path(root, "qrels", "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        "query_0\tGeneva Durben\t1\n"
        "query_1\tArmand Schweda\t2\n"
        "query_0\tDorathea Bastress\t0\n"
        "query_0\tArmand Schweda\t1\n"
    )
    task = self.register(tasks.register_beir_train_task, "t_small", root)
    got = examples(task, "train")
    self.assertEqual(
        [(e["query_id"], e["doc_id"]) for e in got],
        [
            ("query_0", "Geneva Durben"),
            ("query_1", "Armand Schweda"),
            ("query_0", "Armand Schweda"),
        ],
    )
    self.assertEqual(got[0]["query"], "Who likes Joshua Trees?")
    # LIMIT titles are empty: the positive is the text, without a leading
    # space.
    self.assertTrue(got[0]["positive"].startswith("Geneva Durben likes"))

  def test_registration_is_idempotent_per_source(self):
    path = self.write_pairs([json.dumps(_PAIR)])
    task = self.register(tasks.register_pairs_task, "t_idem", path)
    self.assertIs(tasks.register_pairs_task("t_idem", path), task)
    other = self.write_pairs([json.dumps(_PAIR)])
    with self.assertRaisesRegex(ValueError, "already registered from"):
      tasks.register_pairs_task("t_idem", other)
    with self.assertRaisesRegex(ValueError, "already registered from"):
      tasks.register_beir_train_task("t_idem", str(LIMIT_SMALL))

  def test_pairs_title_optional(self):
    pair = dict(_PAIR)
    del pair["title"]
    path = self.write_pairs([json.dumps(pair)])
    self.assertEqual(tasks.read_pairs(path)["positive"], ["body"])

  def test_pairs_validation_names_file_and_line(self):
    good = json.dumps(_PAIR)
    cases = [
        ('{"query_id": "q2",', "malformed JSON"),
        ('["q2"]', "expected a JSON object, got an array"),
        (
            json.dumps({k: v for k, v in _PAIR.items() if k != "query"}),
            'missing "query"',
        ),
        (
            json.dumps({k: v for k, v in _PAIR.items() if k != "doc_id"}),
            'missing "doc_id"',
        ),
        (
            json.dumps(dict(_PAIR, query_id="q2", text=None)),
            '"text" must be a string, got null',
        ),
        (
            json.dumps(dict(_PAIR, query_id="q2", score=0)),
            '"score" must be a positive integer, got 0',
        ),
        (good, "duplicate pair for query 'q1' and doc 'd1' (first at line 1)"),
    ]
    for bad, says in cases:
      with self.subTest(says=says):
        path = self.write_pairs([good, bad])
        with self.assertRaises(beir.BeirFormatError) as cm:
          tasks.read_pairs(path)
        self.assertTrue(str(cm.exception).startswith(f"{path}:2: "))
        self.assertIn(says, str(cm.exception))

  def test_missing_or_empty_pairs_file(self):
    path = os.path.join(make_tempdir(self), "nope.jsonl")
    with self.assertRaisesRegex(beir.BeirFormatError, "does not exist"):
      tasks.register_pairs_task("t_missing", path)
    self.assertNotIn("t_missing", seqio.TaskRegistry.names())
    empty = self.write_pairs([])
    with self.assertRaisesRegex(beir.BeirFormatError, "holds no pairs"):
      tasks.read_pairs(empty)

  def test_missing_train_split(self):
    with self.assertRaisesRegex(
        beir.BeirFormatError, "no qrels for split 'validation'; splits found: dev, test, train",
    ):
      tasks.register_beir_train_task(
          "t_nosplit", str(LIMIT_SMALL), split="validation"
      )


def _pairs_as_examples(path: pathlib.Path):
  """Expected task examples straight from a pairs file, by plain json."""
  for line in path.read_text().splitlines():
    r = json.loads(line)
    yield {
        "query_id": r["query_id"],
        "query": r["query"],
        "doc_id": r["doc_id"],
        "positive": (r["title"] + " " + r["text"]).strip(),
    }


if __name__ == "__main__":
  absltest.main()
