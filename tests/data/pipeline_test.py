"""Tests for the training data and its step-indexed loader.

Covers the LIMIT-small train/dev split files, the builders (BEIR qrels and
pairs files: row order, grouping, validation and error lines), and the loader's
contract: determinism and resume, shapes and dtypes, positives first,
epoch coverage, Rand1LH cycling, pair units, negatives never relevant, and
argument validation.
"""

import collections
import itertools
import json
import os
import shutil
import tempfile
import threading
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from retrieval_jax import pretrained
from retrieval_jax.data import beir
from retrieval_jax.data import negatives
from retrieval_jax.data import pipeline
from retrieval_jax.data import tokenizers
from test_util import LIMIT_SMALL, SCIFACT, SHARED_DATA

PAIRS = SHARED_DATA / "train-scifact" / "pairs.jsonl"
# Small token budgets keep tokenization and the tests fast.
LQ, LP = 12, 24
INT32_KEYS = (
    "query_ids",
    "query_mask",
    "passage_ids",
    "passage_mask",
    "positive_counts",
    "passage_doc",
    "relevant_doc",
)


def make_tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (works under pytest too)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def qrels_lines(split: str) -> list[str]:
  path = LIMIT_SMALL / "qrels" / f"{split}.tsv"
  return path.read_text(encoding="utf-8").splitlines()


_TOKENIZER = None


def get_tokenizer() -> tokenizers.WordPieceTokenizer:
  global _TOKENIZER
  if _TOKENIZER is None:
    try:
      model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))
    _TOKENIZER = tokenizers.WordPieceTokenizer.from_pretrained_dir(model_dir)
  return _TOKENIZER


_LIMIT_TRAIN = None


def limit_train() -> pipeline.TrainingData:
  """LIMIT-small's train split with BM25 negatives (read and mined once)."""
  global _LIMIT_TRAIN
  if _LIMIT_TRAIN is None:
    _LIMIT_TRAIN = negatives.mine(
        pipeline.TrainingData.from_beir(LIMIT_SMALL, "train"),
        method="bm25",
        depth=20,
    )
  return _LIMIT_TRAIN


def toy_data(negatives_per_query=None) -> pipeline.TrainingData:
  """Five queries with 1-3 positives over a 12-doc corpus."""
  doc_ids = [f"d{i}" for i in range(12)]
  doc_texts = [f"document number {i} about topic {i % 3}" for i in range(12)]
  positives = [("d0",), ("d1", "d2"), ("d3", "d4", "d5"), ("d6",), ("d7", "d8")]
  negative_ids = negatives_per_query or [
      ("d9", "d10", "d11", "d1"),
      ("d0", "d9"),
      (),
      ("d11",),
      ("d0", "d1", "d2", "d3", "d4", "d5"),
  ]
  examples = [
      pipeline.TrainingExample(
          f"q{i}", f"query {i} topic {i % 3}", pos, tuple(neg)
      )
      for i, (pos, neg) in enumerate(zip(positives, negative_ids))
  ]
  return pipeline.TrainingData(examples, doc_ids, doc_texts, source="toy")


def make_loader(data, **overrides) -> pipeline.TrainLoader:
  kwargs = dict(
      batch_size=4,
      group_size=4,
      unit="query",
      positives="one",
      query_max_length=LQ,
      passage_max_length=LP,
      seed=3,
      prefetch=0,
  )
  kwargs.update(overrides)
  return pipeline.TrainLoader(data, get_tokenizer(), **kwargs)


def assert_batches_equal(test, a, b):
  test.assertEqual(set(a), set(b))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class LimitSplitTest(absltest.TestCase):

  def test_split_is_a_partition_of_test(self):
    test_lines, train, dev = (qrels_lines(s) for s in ("test", "train", "dev"))
    self.assertEqual(train[0], test_lines[0])
    self.assertEqual(dev[0], test_lines[0])

    def query_of(line):
      return line.split("\t")[0]

    train_q = {query_of(r) for r in train[1:]}
    dev_q = {query_of(r) for r in dev[1:]}
    self.assertLen(train_q, 800)
    self.assertLen(dev_q, 200)
    self.assertEmpty(train_q & dev_q)
    self.assertLen(train[1:], 1600)
    self.assertLen(dev[1:], 400)
    # Each file is test.tsv restricted to its queries, in test.tsv's order.
    for rows, queries in ((train, train_q), (dev, dev_q)):
      self.assertEqual(
          rows[1:], [r for r in test_lines[1:] if query_of(r) in queries]
      )
    self.assertEqual(train_q | dev_q, {query_of(r) for r in test_lines[1:]})

  def test_readme_recipe_reproduces_the_split(self):
    rows = qrels_lines("test")[1:]
    ids = list(dict.fromkeys(row.split("\t")[0] for row in rows))
    perm = np.random.default_rng(0).permutation(len(ids))
    train = {ids[i] for i in perm[:800]}
    self.assertEqual(
        {r.split("\t")[0] for r in qrels_lines("train")[1:]}, train
    )
    readme = (LIMIT_SMALL / "README.md").read_text()
    self.assertIn("np.random.default_rng(0).permutation(len(ids))", readme)
    self.assertIn("disjoint", readme)

  def test_splits_load_as_beir(self):
    for split, n in (("train", 800), ("dev", 200)):
      collection = beir.load_beir(str(LIMIT_SMALL), split, on_unknown="error")
      self.assertLen(collection.qrels, n)
      self.assertTrue(all(len(d) == 2 for d in collection.qrels.values()))


class TrainingDataTest(absltest.TestCase):

  def test_from_beir_groups_in_file_order(self):
    data = pipeline.TrainingData.from_beir(LIMIT_SMALL, "train")
    rows = [line.split("\t") for line in qrels_lines("train")[1:]]
    want = collections.defaultdict(list)
    for query_id, doc_id, _ in rows:
      want[query_id].append(doc_id)
    self.assertEqual([ex.query_id for ex in data.examples], list(want))
    self.assertEqual(
        [list(ex.positive_ids) for ex in data.examples], list(want.values())
    )
    _, texts = beir.read_queries(str(LIMIT_SMALL / "queries.jsonl"))
    self.assertEqual(
        [ex.query for ex in data.examples[:2]],
        [texts[int(q.split("_")[1])] for q in list(want)[:2]],
    )
    self.assertLen(data.doc_ids, 46)
    self.assertEqual(data.num_pairs, 1600)

  def test_from_pairs_groups_by_first_appearance(self):
    corpus = make_tempdir(self)
    with open(os.path.join(corpus, "corpus.jsonl"), "w") as f:
      for i in range(4):
        f.write(
            json.dumps({"_id": f"d{i}", "title": "", "text": f"t{i}"}) + "\n"
        )
    pairs = os.path.join(corpus, "pairs.jsonl")
    lines = [("b", "d2"), ("a", "d0"), ("b", "d1"), ("a", "d3")]
    with open(pairs, "w") as f:
      for query_id, doc_id in lines:
        f.write(
            json.dumps({
                "query_id": query_id,
                "query": "Q" + query_id,
                "doc_id": doc_id,
                "text": "new " + doc_id,
            })
            + "\n"
        )
    data = pipeline.TrainingData.from_pairs(pairs, corpus)
    self.assertEqual(
        [(ex.query_id, ex.query, ex.positive_ids) for ex in data.examples],
        [("b", "Qb", ("d2", "d1")), ("a", "Qa", ("d0", "d3"))],
    )
    # Positives take the pairs file's text; the corpus supplies the rest.
    self.assertEqual(data.doc_texts, ("new d0", "new d1", "new d2", "new d3"))

  def test_pair_doc_missing_from_corpus_names_the_line(self):
    pairs = os.path.join(make_tempdir(self), "pairs.jsonl")
    with open(pairs, "w") as f:
      f.write(
          json.dumps({
              "query_id": "q",
              "query": "Who?",
              "doc_id": "Geneva Durben",
              "text": "x",
          })
          + "\n\n"
      )
      f.write(
          json.dumps({
              "query_id": "q",
              "query": "Who?",
              "doc_id": "Nobody Atall",
              "text": "y",
          })
          + "\n"
      )
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        f"^{pairs}:3: doc 'Nobody Atall' is not in .*corpus.jsonl",
    ):
      pipeline.TrainingData.from_pairs(pairs, LIMIT_SMALL)

  def test_from_beir_skips_non_positive_and_groups_by_first_positive(self):
    root = make_tempdir(self)
    shutil.copy(LIMIT_SMALL / beir.CORPUS_FILE, root)
    shutil.copy(LIMIT_SMALL / beir.QUERIES_FILE, root)
    os.makedirs(os.path.join(root, "qrels"))
    # query_1's only positive comes before query_0's second one, and
    # query_2 is judged non-relevant only.
    qrels = os.path.join(root, "qrels", "train.tsv")
    with open(qrels, "w") as f:
      f.write(
          "query-id\tcorpus-id\tscore\n"
          "query_2\tGeneva Durben\t0\n"
          "query_0\tGeneva Durben\t1\n"
          "query_1\tArmand Schweda\t2\n"
          "query_0\tDorathea Bastress\t0\n"
          "query_0\tArmand Schweda\t1\n"
      )
    data = pipeline.TrainingData.from_beir(root, "train")
    self.assertEqual(data.source, qrels)
    self.assertEqual(
        [(ex.query_id, ex.positive_ids) for ex in data.examples],
        [
            ("query_0", ("Geneva Durben", "Armand Schweda")),
            ("query_1", ("Armand Schweda",)),
        ],
    )
    self.assertEqual(data.examples[0].query, "Who likes Joshua Trees?")
    # LIMIT titles are empty: the text, without a leading space.
    self.assertTrue(data.doc_texts[0].startswith("Geneva Durben likes"))

  def test_from_beir_missing_split_lists_available(self):
    with self.assertRaisesRegex(
        beir.BeirFormatError,
        "no qrels for split 'validation'; splits found: dev, test, train",
    ):
      pipeline.TrainingData.from_beir(LIMIT_SMALL, "validation")

  def write_pairs(self, lines: list[str]) -> str:
    path = os.path.join(make_tempdir(self), "pairs.jsonl")
    with open(path, "w") as f:
      f.write("".join(line + "\n" for line in lines))
    return path

  def test_read_pairs_title_and_score_optional(self):
    pair = {"query_id": 7, "query": "first", "doc_id": "d1", "text": "body"}
    self.assertEqual(
        pipeline.read_pairs(self.write_pairs([json.dumps(pair)])),
        [pipeline.PairRow(1, "7", "first", "d1", "body")],
    )

  def test_read_pairs_validation_names_file_and_line(self):
    pair = {
        "query_id": "q1",
        "query": "first",
        "doc_id": "d1",
        "title": "T",
        "text": "body",
        "score": 1,
    }
    good = json.dumps(pair)
    cases = [
        ('{"query_id": "q2",', "malformed JSON"),
        ('["q2"]', "expected a JSON object, got an array"),
        (
            json.dumps({k: v for k, v in pair.items() if k != "query"}),
            'missing "query"',
        ),
        (
            json.dumps({k: v for k, v in pair.items() if k != "doc_id"}),
            'missing "doc_id"',
        ),
        (
            json.dumps(dict(pair, query_id="q2", text=None)),
            '"text" must be a string, got null',
        ),
        (
            json.dumps(dict(pair, query_id="q2", score=0)),
            '"score" must be a positive integer, got 0',
        ),
        (good, "duplicate pair for query 'q1' and doc 'd1' (first at line 1)"),
    ]
    for bad, says in cases:
      with self.subTest(says=says):
        path = self.write_pairs([good, bad])
        with self.assertRaises(beir.BeirFormatError) as cm:
          pipeline.read_pairs(path)
        self.assertTrue(str(cm.exception).startswith(f"{path}:2: "))
        self.assertIn(says, str(cm.exception))

  def test_missing_or_empty_pairs_file(self):
    path = os.path.join(make_tempdir(self), "nope.jsonl")
    with self.assertRaisesRegex(beir.BeirFormatError, "does not exist"):
      pipeline.TrainingData.from_pairs(path, LIMIT_SMALL)
    with self.assertRaisesRegex(beir.BeirFormatError, "holds no pairs"):
      pipeline.read_pairs(self.write_pairs([]))

  def test_scifact_builders_agree(self):
    if not PAIRS.is_file() or not (SCIFACT / "qrels" / "train.tsv").is_file():
      self.skipTest("SciFact is not available")
    from_pairs = pipeline.TrainingData.from_pairs(PAIRS, SCIFACT)
    from_beir = pipeline.TrainingData.from_beir(SCIFACT, "train")
    self.assertLen(from_pairs.examples, 809)
    self.assertEqual(from_pairs.num_pairs, 919)
    self.assertEqual(from_pairs.examples, from_beir.examples)
    self.assertEqual(from_pairs.doc_texts, from_beir.doc_texts)

  def test_validation(self):
    ok = pipeline.TrainingExample("q", "text", ("d0",))
    ids, texts = ["d0", "d1"], ["a", "b"]
    with self.assertRaisesRegex(ValueError, "toy: no training queries"):
      pipeline.TrainingData([], ids, texts, source="toy")
    with self.assertRaisesRegex(ValueError, "query 'e' has no positives"):
      pipeline.TrainingData(
          [ok, pipeline.TrainingExample("e", "t", ())], ids, texts
      )
    with self.assertRaisesRegex(ValueError, "positive doc 'zz' is not in"):
      pipeline.TrainingData(
          [pipeline.TrainingExample("q", "t", ("zz",))], ids, texts
      )
    with self.assertRaisesRegex(ValueError, "'d0' is both a positive and"):
      pipeline.TrainingData(
          [pipeline.TrainingExample("q", "t", ("d0",), ("d1", "d0"))],
          ids,
          texts,
      )
    with self.assertRaisesRegex(ValueError, "appears twice"):
      pipeline.TrainingData([ok, ok], ids, texts)
    with self.assertRaisesRegex(ValueError, "negatives for 2 queries"):
      pipeline.TrainingData([ok], ids, texts).with_negatives([[], []])


class TrainLoaderTest(parameterized.TestCase):

  def test_shapes_dtypes_and_contents(self):
    data = limit_train()
    loader = make_loader(data, batch_size=8, group_size=3)
    batch = loader.batch_at(5)
    spec = loader.batch_spec
    self.assertEqual(set(batch), set(spec))
    for key, (shape, dtype) in spec.items():
      self.assertEqual(
          (batch[key].shape, batch[key].dtype), (shape, dtype), key
      )
    self.assertEqual(spec["passage_ids"][0], (24, LP))
    self.assertEqual(spec["relevant_doc"][0], (8, 2))
    np.testing.assert_array_equal(batch["example_index"], np.arange(40, 48))
    tok = get_tokenizer()
    _, examples_b = loader.examples_at(5)
    for i, example in enumerate(examples_b):
      ex = data.examples[loader.units[example][0]]
      ids = tok.encode(ex.query, LQ)
      np.testing.assert_array_equal(batch["query_ids"][i, : len(ids)], ids)
      np.testing.assert_array_equal(
          batch["query_ids"][i, len(ids) :], tok.pad_id
      )
      self.assertEqual(
          batch["query_mask"][i].tolist(),
          [1] * len(ids) + [0] * (LQ - len(ids)),
      )
      self.assertEqual(
          sorted(batch["relevant_doc"][i]),
          sorted(data.doc_index[d] for d in ex.positive_ids),
      )
    for row, doc in enumerate(batch["passage_doc"]):
      ids = tok.encode(data.doc_texts[doc], LP)
      np.testing.assert_array_equal(batch["passage_ids"][row, : len(ids)], ids)
      self.assertEqual(batch["passage_mask"][row].sum(), len(ids))
      self.assertEqual(batch["passage_mask"][row, : len(ids)].min(), 1)

  @parameterized.parameters(
      ("query", "one"), ("query", "all"), ("pair", "one"), ("pair", "all")
  )
  def test_groups_positives_first_negatives_never_relevant(
      self, unit, positives
  ):
    data = toy_data()
    loader = make_loader(
        data,
        unit=unit,
        positives=positives,
        group_size=4,
        max_positives=2,
        batch_size=3,
        negative_depth=3,
    )
    g = loader.group_size
    for step in range(12):
      batch = loader.batch_at(step)
      _, examples_b = loader.examples_at(step)
      for i, example in enumerate(examples_b):
        q, j = loader.units[example]
        ex = data.examples[q]
        pos = [data.doc_index[d] for d in ex.positive_ids]
        group = batch["passage_doc"][i * g : (i + 1) * g]
        count = batch["positive_counts"][i]
        want = 1 if positives == "one" else min(len(pos), 2)
        self.assertEqual(count, want)
        self.assertContainsSubset(group[:count], pos)
        if unit == "pair":
          # The pair's own positive leads its group.
          self.assertEqual(group[0], pos[j])
        elif positives == "all":
          self.assertEqual(list(group[:count]), pos[:count])
        # Relevant docs: every positive, whichever ones the group holds.
        relevant = batch["relevant_doc"][i]
        self.assertEqual(sorted(relevant[relevant >= 0]), sorted(pos))
        mined = [data.doc_index[d] for d in ex.negative_ids[:3]]
        for doc in group[count:]:
          self.assertNotIn(doc, relevant)
          if doc >= 0:
            self.assertIn(doc, mined)

  def test_padding_and_short_lists(self):
    data = toy_data()
    loader = make_loader(data, group_size=4, batch_size=5)
    batch = loader.batch_at(0)
    _, examples_b = loader.examples_at(0)
    tok = get_tokenizer()
    for i, q in enumerate(examples_b):
      group = batch["passage_doc"][i * 4 : (i + 1) * 4]
      rows = slice(i * 4 + 1, (i + 1) * 4)
      if q == 2:
        # No mined negatives: padding rows, masked out entirely.
        self.assertEqual(list(group[1:]), [-1, -1, -1])
        self.assertEqual(batch["passage_mask"][rows].sum(), 0)
        np.testing.assert_array_equal(batch["passage_ids"][rows], tok.pad_id)
      elif q == 3:
        # One mined negative fills all three slots (with replacement).
        self.assertEqual(list(group[1:]), [11, 11, 11])
      elif q == 1:
        # Two mined: both used once, then one repeated.
        self.assertCountEqual(set(group[1:]), {0, 9})
      else:
        self.assertLen(set(group[1:]), 3)

  def test_same_batches_across_fresh_loaders(self):
    data = limit_train()
    a = make_loader(data, batch_size=48)
    b = make_loader(data, batch_size=48)
    # Steps 16 and 17 straddle the first epoch boundary (800 / 48).
    for step in (0, 1, 16, 17, 40):
      assert_batches_equal(self, a.batch_at(step), b.batch_at(step))
    # Another seed gives another order.
    c = make_loader(data, batch_size=48, seed=4)
    self.assertFalse(
        np.array_equal(a.batch_at(0)["query_ids"], c.batch_at(0)["query_ids"])
    )

  @parameterized.parameters(0, 2)
  def test_resume_matches_uninterrupted_run(self, prefetch):
    loader = make_loader(limit_train(), batch_size=64, prefetch=prefetch)
    full = list(itertools.islice(iter(loader), 16))
    resumed = loader.iterate(start_step=11)
    for step in range(11, 16):
      batch = next(resumed)
      assert_batches_equal(self, batch, full[step])
      assert_batches_equal(self, batch, loader.batch_at(step))
    resumed.close()
    # Closing the generator stops its producer thread.
    self.assertNotIn(
        "TrainLoader", [t.name for t in threading.enumerate() if t.is_alive()]
    )

  def test_prefetch_surfaces_errors(self):
    loader = make_loader(limit_train(), prefetch=2)
    # Simulate a failure in the producer thread at step 2.
    original = loader.batch_at

    def batch_at(step):
      if step == 2:
        raise RuntimeError("tokenizer exploded")
      return original(step)

    loader.batch_at = batch_at
    batches = loader.iterate()
    next(batches)
    next(batches)
    with self.assertRaisesRegex(RuntimeError, "tokenizer exploded"):
      next(batches)

  @parameterized.parameters("query", "pair")
  def test_each_epoch_covers_every_example_once(self, unit):
    data = limit_train()
    loader = make_loader(data, unit=unit, batch_size=48)
    e = loader.num_examples
    self.assertEqual(e, 800 if unit == "query" else 1600)
    self.assertEqual(loader.steps_per_epoch, -(-e // 48))
    steps = -(-3 * e // 48)
    seen = [loader.examples_at(t) for t in range(steps)]
    epochs = np.concatenate([s[0] for s in seen])[: 3 * e]
    examples = np.concatenate([s[1] for s in seen])[: 3 * e]
    np.testing.assert_array_equal(epochs, np.repeat([0, 1, 2], e))
    for epoch in range(3):
      order = examples[epoch * e : (epoch + 1) * e]
      np.testing.assert_array_equal(np.sort(order), np.arange(e))
    # Epochs are shuffled differently, each by its documented permutation.
    self.assertFalse(np.array_equal(examples[:e], examples[e : 2 * e]))
    np.testing.assert_array_equal(
        examples[e : 2 * e], np.random.default_rng([3, 1]).permutation(e)
    )

  def test_negatives_resampled_each_epoch(self):
    data = limit_train()
    loader = make_loader(data, batch_size=800, group_size=4)
    # Batch size = E: step t is exactly epoch t.
    groups = []
    for epoch in range(2):
      batch = loader.batch_at(epoch)
      _, examples_b = loader.examples_at(epoch)
      docs_bg = batch["passage_doc"].reshape(800, 4)
      groups.append(
          {int(x): tuple(docs_bg[i, 1:]) for i, x in enumerate(examples_b)}
      )
    # Three draws from 20 mined negatives: the same draw twice is rare.
    same = np.mean([groups[0][x] == groups[1][x] for x in range(800)])
    self.assertLess(same, 0.05)

  def test_pair_unit_one_example_per_pair(self):
    data = limit_train()
    loader = make_loader(data, unit="pair", batch_size=50)
    self.assertEqual(loader.num_examples, data.num_pairs)
    got = collections.Counter()
    for step in range(loader.num_examples // 50):
      batch = loader.batch_at(step)
      _, examples_b = loader.examples_at(step)
      for i, example in enumerate(examples_b):
        q = loader.units[example][0]
        got[(data.examples[q].query_id, batch["passage_doc"][i * 4])] += 1
        # The query's other positive is still known relevant.
        self.assertEqual((batch["relevant_doc"][i] >= 0).sum(), 2)
    want = collections.Counter(
        (ex.query_id, data.doc_index[d])
        for ex in data.examples
        for d in ex.positive_ids
    )
    self.assertEqual(got, want)

  def test_rand1lh_cycles_through_positives(self):
    data = toy_data()
    loader = make_loader(data, batch_size=5, group_size=1)
    e = loader.num_examples
    chosen = collections.defaultdict(list)
    # Batch size = E: step t is exactly epoch t.
    for epoch in range(6):
      batch = loader.batch_at(epoch)
      _, examples_b = loader.examples_at(epoch)
      self.assertEqual(e, 5)
      for i, q in enumerate(examples_b):
        chosen[q].append(int(batch["passage_doc"][i]))
    for q, docs in chosen.items():
      ex = data.examples[q]
      m = len(ex.positive_ids)
      offset = zlib.crc32((ex.query_id + "3").encode())
      self.assertEqual(
          docs,
          [data.doc_index[ex.positive_ids[(offset + t) % m]] for t in range(6)],
      )
      # Any m consecutive epochs use every positive once.
      self.assertLen(set(docs[:m]), m)

  def test_describe(self):
    loader = make_loader(toy_data(), batch_size=2, unit="pair")
    text = loader.describe()
    for part in (
        "5 queries",
        "9 pairs",
        "9 examples/epoch",
        "5 steps/epoch",
        "1 queries without negatives",
    ):
      self.assertIn(part, text)

  def test_validation(self):
    data = toy_data()
    bad = [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(group_size=0), "group_size must be >= 1"),
        (
            dict(positives="all", group_size=2, max_positives=3),
            "group_size=2 < max_positives=3",
        ),
        (dict(unit="triplet"), "unit must be one of"),
        (dict(positives="some"), "positives must be one of"),
        (dict(max_relevant=2), "query 'q2' has 3 positives"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(query_max_length=1), "query_max_length must be >= 2"),
        (dict(batch_size=2.5), "batch_size must be an integer"),
    ]
    for kwargs, message in bad:
      with self.assertRaisesRegex(ValueError, message):
        make_loader(data, **kwargs)
    no_negatives = toy_data([()] * 5)
    with self.assertRaisesRegex(ValueError, "no query of the data has any"):
      make_loader(no_negatives, group_size=2)
    # Groups of positives only need no negatives.
    make_loader(no_negatives, group_size=1)
    with self.assertRaisesRegex(ValueError, "step must be >= 0"):
      make_loader(data).batch_at(-1)
    # Checked on the call, before the first batch is asked for.
    with self.assertRaisesRegex(ValueError, "start_step must be >= 0"):
      make_loader(data, prefetch=2).iterate(start_step=-3)


if __name__ == "__main__":
  absltest.main()
