"""Tests for the long-document collections packed from BEIR passages.

The properties checked are the ones evaluation relies on: every passage lands
in exactly one document, lengths respect the bounds, a judged passage makes
its document relevant with the passage's grade, the recorded token offsets
are where the passage's tokens really are, and builds are reproducible and
reused only when nothing changed.
"""

import collections
import filecmp
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from unittest import mock
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.data import long_documents as ld
from test_util import LIMIT_SMALL, SCIFACT


def read_manifest(path) -> dict:
  with open(os.path.join(path, ld.MANIFEST_FILE), encoding="utf-8") as f:
    return json.load(f)


def check_collection(
    tc,
    source_dir,
    out_dir,
    splits,
    min_tokens,
    max_tokens,
    count_tokens=ld.default_count_tokens,
    recount_every=1,
):
  """Checks (with TestCase `tc`) a built collection; returns the manifest.

  Token counts are recomputed for every `recount_every`-th document (the
  build itself has counted them all once).
  """
  manifest = read_manifest(out_dir)
  docs = manifest["documents"]
  passage_ids, titles, texts = beir.read_corpus(
      os.path.join(source_dir, beir.CORPUS_FILE)
  )
  passages = dict(
      zip(passage_ids, (beir.doc_text(t, x) for t, x in zip(titles, texts)))
  )

  # Partition: every source passage in exactly one document.
  placed = collections.Counter(p for d in docs for p in d["passages"])
  tc.assertEqual(sorted(placed), sorted(passage_ids))
  tc.assertEqual(set(placed.values()), {1})

  # The reader accepts the output, with no unknown-id warnings.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    collections_by_split = {s: beir.load_beir(out_dir, split=s) for s in splits}
  out = collections_by_split[splits[0]]
  tc.assertEqual(out.doc_ids, [d["_id"] for d in docs])
  tc.assertEqual(set(out.titles), {""})

  # Texts are the passages joined by blank lines; lengths and offsets are
  # the counter's, and lengths are additive over passages.
  for i, (d, text) in enumerate(zip(docs, out.texts)):
    members = [passages[p] for p in d["passages"]]
    tc.assertEqual(text, ld.SEPARATOR.join(m for m in members if m))
    if i % recount_every:
      continue
    lengths = [count_tokens(m) for m in members]
    tc.assertEqual(d["tokens"], sum(lengths))
    tc.assertEqual(d["tokens"], count_tokens(text))
    tc.assertEqual(
        d["offsets"], [int(x) for x in np.cumsum([0] + lengths[:-1])]
    )

  # Bounds: above max only for a lone passage; below min only for the last
  # document (the leftover passages).
  for i, d in enumerate(docs):
    if len(d["passages"]) > 1:
      tc.assertLessEqual(d["tokens"], max_tokens, d)
    if i < len(docs) - 1:
      tc.assertGreaterEqual(d["tokens"], min_tokens, (i, d["tokens"]))

  # Qrels: a query's long documents are exactly those holding one of its
  # judged passages, graded by the best such passage.
  doc_of = {p: d["_id"] for d in docs for p in d["passages"]}
  judged_queries = set()
  for split in splits:
    source = beir.read_qrels(beir.qrels_path(source_dir, split))
    expected = collections.defaultdict(dict)
    for query_id, judged in source.items():
      for passage_id, score in judged.items():
        row = expected[query_id]
        doc_id = doc_of[passage_id]
        row[doc_id] = max(row.get(doc_id, score), score)
    tc.assertEqual(collections_by_split[split].qrels, dict(expected))
    judged_queries |= set(source)
  tc.assertEqual(set(out.query_ids), judged_queries)

  # Summary statistics, recomputed from the per-document records.
  summary = manifest["summary"]
  tc.assertEqual(summary["documents"], len(docs))
  tc.assertEqual(summary["tokens"]["max"], max(d["tokens"] for d in docs))
  tc.assertEqual(
      summary["tokens"]["median"], float(np.median([d["tokens"] for d in docs]))
  )
  offset_of = {p: o for d in docs for p, o in zip(d["passages"], d["offsets"])}
  for split in splits:
    source = beir.read_qrels(beir.qrels_path(source_dir, split))
    offsets = [
        offset_of[p]
        for judged in source.values()
        for p, s in judged.items()
        if s > 0
    ]
    stats = summary["splits"][split]
    tc.assertEqual(stats["judged_passages"], len(offsets))
    tc.assertEqual(stats["offset_median"], float(np.median(offsets)))
    tc.assertAlmostEqual(
        stats["beyond_512"], np.mean(np.asarray(offsets) >= 512), delta=1e-6
    )
  return manifest


def _tmp(tc) -> pathlib.Path:
  return pathlib.Path(tc.create_tempdir().full_path)


class LimitSmallBuildTest(absltest.TestCase):
  """One LIMIT-small build (100-300 tokens, seed 3) shared by its tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = tempfile.mkdtemp(prefix="rj_long_docs_")
    cls.addClassCleanup(shutil.rmtree, root, ignore_errors=True)
    cls.out = pathlib.Path(root) / "long"
    cls.summary = ld.build_long_documents(
        LIMIT_SMALL,
        cls.out,
        splits=("test", "train", "dev"),
        min_tokens=100,
        max_tokens=300,
        seed=3,
    )

  def test_limit_small_collection_is_consistent(self):
    summary = self.summary
    manifest = check_collection(
        self,
        str(LIMIT_SMALL),
        str(self.out),
        ["dev", "test", "train"],
        100,
        300,
    )
    self.assertEqual(manifest["summary"], summary)
    self.assertEqual(summary["passages"], 46)
    # 46 passages of 141-171 tokens, documents of at most 300 tokens: one or
    # two passages each.
    self.assertContainsSubset(
        {len(d["passages"]) for d in manifest["documents"]}, {1, 2}
    )
    self.assertEqual(summary["splits"]["test"]["queries"], 1000)
    # Every query has two relevant passages; they may share a document.
    self.assertBetween(summary["splits"]["test"]["judgments"], 1000, 2000)
    self.assertEqual(summary["splits"]["test"]["judged_passages"], 2000)
    self.assertEqual(manifest["settings"]["splits"], ["dev", "test", "train"])
    self.assertLen(manifest["sources"], 5)
    with open(LIMIT_SMALL / beir.CORPUS_FILE, "rb") as f:
      self.assertEqual(
          manifest["sources"]["corpus.jsonl"],
          hashlib.sha256(f.read()).hexdigest(),
      )

  def test_offsets_locate_the_passage_tokens(self):
    tokenizer = ld._default_tokenizer()  # pylint: disable=protected-access
    manifest = read_manifest(self.out)
    collection = beir.load_beir(str(self.out), split=None)
    source = beir.load_beir(str(LIMIT_SMALL), split=None)
    passages = dict(zip(source.doc_ids, source.doc_texts()))
    for d, text in zip(manifest["documents"], collection.texts):
      ids = tokenizer.tokenize_to_ids(text)
      for passage_id, offset in zip(d["passages"], d["offsets"]):
        own = tokenizer.tokenize_to_ids(passages[passage_id])
        self.assertEqual(ids[offset : offset + len(own)], own)


class PackPassagesTest(absltest.TestCase):

  def test_defers_passages_that_do_not_fit(self):
    # Short passages of 10 tokens and long ones of 95, window [50, 100]: a
    # document holding 10-40 tokens cannot take a long passage (it would pass
    # 100) and must not close yet (below 50), so it skips ahead to short ones.
    lengths = [10] * 2000 + [95] * 300
    for seed in range(3):
      docs = ld.pack_passages(lengths, min_tokens=50, max_tokens=100, seed=seed)
      self.assertEqual(
          sorted(i for d in docs for i in d), list(range(len(lengths)))
      )
      totals = [sum(lengths[i] for i in d) for d in docs]
      self.assertLessEqual(max(totals), 100)
      # A document stays short only when the short passages ran out: every
      # later document holds nothing but long ones.
      short = [k for k, total in enumerate(totals) if total < 50]
      self.assertLessEqual(len(short), 1)
      for k in short:
        self.assertTrue(all(lengths[i] == 95 for d in docs[k + 1 :] for i in d))

  def test_partition_and_bounds(self):
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 60, size=3000)] + [500]
    for seed in range(3):
      docs = ld.pack_passages(lengths, min_tokens=50, max_tokens=100, seed=seed)
      self.assertEqual(
          sorted(i for d in docs for i in d), list(range(len(lengths)))
      )
      totals = [sum(lengths[i] for i in d) for d in docs]
      for d, total in zip(docs, totals):
        self.assertTrue(
            total <= 100 or (len(d) == 1 and lengths[d[0]] > 100), (d, total)
        )
      self.assertTrue(all(t >= 50 for t in totals[:-1]))
      # The 500-token passage is a document of its own.
      self.assertIn([len(lengths) - 1], docs)

  def test_targets_are_log_uniform(self):
    # Unit-length passages make every document exactly its target length.
    docs = ld.pack_passages(
        [1] * 200_000, min_tokens=10, max_tokens=1000, seed=1
    )
    sizes = np.array([len(d) for d in docs[:-1]])
    self.assertGreaterEqual(sizes.min(), 10)
    self.assertLessEqual(sizes.max(), 1000)
    # Log-uniform on [10, 1000]: half below the geometric mean 100, and the
    # mean of log10 at 2.
    self.assertAlmostEqual(np.mean(sizes < 100), 0.5, delta=0.05)
    self.assertAlmostEqual(np.mean(np.log10(sizes)), 2.0, delta=0.05)
    # A uniform (not log-uniform) draw would give a mean near 505.
    want = 990 / math.log(100)
    self.assertAlmostEqual(np.mean(sizes), want, delta=0.1 * want)


class BuildTest(parameterized.TestCase):

  def test_infeasible_window_is_reported(self):
    # Passages of 141-171 tokens and a [250, 300] window: one passage is too
    # short and most pairs are too long. Documents still never exceed the
    # maximum; the ones left short are counted in the summary.
    tmp_path = _tmp(self)
    summary = ld.build_long_documents(
        LIMIT_SMALL,
        tmp_path / "long",
        splits="test",
        min_tokens=250,
        max_tokens=300,
        seed=0,
    )
    tokens = [
        d["tokens"] for d in read_manifest(tmp_path / "long")["documents"]
    ]
    self.assertLessEqual(max(tokens), 300)
    self.assertEqual(summary["below_min_tokens"], sum(n < 250 for n in tokens))
    self.assertGreater(summary["below_min_tokens"], 0)
    self.assertEqual(summary["above_max_tokens"], 0)

  def test_same_seed_same_files_other_seed_other_packing(self):
    tmp_path = _tmp(self)
    kwargs = dict(splits=("test",), min_tokens=100, max_tokens=300)
    ld.build_long_documents(LIMIT_SMALL, tmp_path / "a", seed=7, **kwargs)
    ld.build_long_documents(LIMIT_SMALL, tmp_path / "b", seed=7, **kwargs)
    ld.build_long_documents(LIMIT_SMALL, tmp_path / "c", seed=8, **kwargs)
    files = ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "manifest.json"]
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "a", tmp_path / "b", files, shallow=False
    )
    self.assertEqual((match, mismatch, errors), (files, [], []))
    packing = lambda p: [d["passages"] for d in read_manifest(p)["documents"]]
    self.assertNotEqual(packing(tmp_path / "a"), packing(tmp_path / "c"))

  def test_ensure_reuses_and_rebuilds(self):
    tmp_path = _tmp(self)
    source = tmp_path / "source"
    shutil.copytree(LIMIT_SMALL, source)
    out = tmp_path / "long"
    settings = dict(splits=("test",), min_tokens=100, max_tokens=300, seed=0)
    path, summary = ld.ensure_long_documents(source, out, **settings)
    self.assertEqual(path, str(out))
    self.assertEqual(summary, read_manifest(out)["summary"])

    builds = []
    real_build = ld.build_long_documents
    self.enter_context(
        mock.patch.object(
            ld,
            "build_long_documents",
            lambda *a, **k: builds.append(k) or real_build(*a, **k),
        )
    )
    # Unchanged: reused, same summary, no build.
    self.assertEqual(
        ld.ensure_long_documents(source, out, **settings), (path, summary)
    )
    self.assertEmpty(builds)
    # A setting changes: rebuilt.
    ld.ensure_long_documents(source, out, **{**settings, "seed": 1})
    self.assertLen(builds, 1)
    self.assertEqual(read_manifest(out)["settings"]["seed"], 1)
    # The source changes (same size, different bytes): rebuilt.
    queries = source / beir.QUERIES_FILE
    queries.write_text(queries.read_text().replace("Who likes", "Who loves"))
    ld.ensure_long_documents(source, out, **{**settings, "seed": 1})
    self.assertLen(builds, 2)
    self.assertIn("Who loves", (out / beir.QUERIES_FILE).read_text())
    # A damaged manifest: rebuilt.
    (out / ld.MANIFEST_FILE).write_text("{not json")
    ld.ensure_long_documents(source, out, **{**settings, "seed": 1})
    self.assertLen(builds, 3)
    ld.ensure_long_documents(source, out, **{**settings, "seed": 1})
    self.assertLen(builds, 3)

  def test_failed_build_leaves_the_old_collection(self):
    tmp_path = _tmp(self)
    out = tmp_path / "long"
    settings = dict(splits=("test",), min_tokens=100, max_tokens=300)
    ld.build_long_documents(LIMIT_SMALL, out, seed=0, **settings)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    calls = []

    def failing_count(text):
      calls.append(text)
      if len(calls) == 20:
        raise RuntimeError("crash in the middle")
      return len(text.split())

    with self.assertRaisesRegex(RuntimeError, "crash"):
      ld.build_long_documents(
          LIMIT_SMALL, out, seed=1, count_tokens=failing_count, **settings
      )
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    self.assertEqual(after, before)

    # A crash halfway through writing the files.
    real_write = ld.write_beir

    def write_then_crash(directory, *args):
      real_write(directory, *args)
      raise OSError("disk full")

    self.enter_context(mock.patch.object(ld, "write_beir", write_then_crash))
    with self.assertRaisesRegex(OSError, "disk full"):
      ld.build_long_documents(LIMIT_SMALL, out, seed=1, **settings)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    self.assertEqual(after, before)
    # No temporary directories are left beside the output.
    self.assertEqual(sorted(p.name for p in tmp_path.iterdir()), ["long"])

  def test_custom_counter(self):
    tmp_path = _tmp(self)
    words = lambda text: len(text.split())
    summary = ld.build_long_documents(
        LIMIT_SMALL,
        tmp_path / "long",
        splits=("test",),
        min_tokens=50,
        max_tokens=120,
        count_tokens=words,
    )
    manifest = check_collection(
        self,
        str(LIMIT_SMALL),
        str(tmp_path / "long"),
        ["test"],
        50,
        120,
        count_tokens=words,
    )
    self.assertStartsWith(manifest["settings"]["tokenizer"], "callable:")
    self.assertLessEqual(summary["tokens"]["max"], 120)

  @parameterized.parameters(
      (dict(min_tokens=0), "min_tokens"),
      (dict(min_tokens=2.5), "min_tokens"),
      (dict(min_tokens=300, max_tokens=200), "max_tokens"),
      (dict(seed="x"), "seed"),
      (dict(splits=()), "splits"),
  )
  def test_invalid_settings(self, kwargs, match):
    tmp_path = _tmp(self)
    with self.assertRaisesRegex(ValueError, match):
      ld.build_long_documents(
          LIMIT_SMALL, tmp_path / "long", **{"splits": ("test",), **kwargs}
      )
    self.assertFalse((tmp_path / "long").exists())

  def test_missing_split_lists_existing_ones(self):
    with self.assertRaisesRegex(
        beir.BeirFormatError, r"'validation'; splits found: dev, test, train"
    ):
      ld.ensure_long_documents(
          LIMIT_SMALL, _tmp(self) / "long", splits=("test", "validation")
      )

  def test_out_dir_must_not_be_the_source(self):
    source = _tmp(self) / "source"
    shutil.copytree(LIMIT_SMALL, source)
    with self.assertRaisesRegex(ValueError, "out_dir"):
      ld.build_long_documents(source, source, splits=("test",))

  @absltest.skipUnless(SCIFACT.is_dir(), f"{SCIFACT} not present")
  def test_scifact_long_documents(self):
    tmp_path = _tmp(self)
    summary = ld.build_long_documents(
        SCIFACT, tmp_path / "long", min_tokens=2048, max_tokens=8192
    )
    check_collection(
        self,
        str(SCIFACT),
        str(tmp_path / "long"),
        ["test", "train"],
        2048,
        8192,
        recount_every=10,
    )
    self.assertEqual(summary["passages"], 5183)
    # 1.74M tokens in documents averaging (8192 - 2048) / ln 4 = 4432 tokens.
    self.assertBetween(summary["documents"], 330, 430)
    self.assertTrue(
        summary["tokens"]["min"] >= 2048 or summary["below_min_tokens"] <= 1
    )
    test = summary["splits"]["test"]
    self.assertEqual((test["queries"], test["judged_passages"]), (300, 339))
    # Most answers start past what a 512-token encoder reads.
    self.assertGreater(test["beyond_512"], 0.75)


if __name__ == "__main__":
  absltest.main()
