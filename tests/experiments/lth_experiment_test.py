"""Tests for experiments/lth: the pseudo-query pairs of a target corpus.

Each pseudo-query is a piece of its own document (its title, one of its
sentences, or a run of its words within the crop bounds), the positive is
the document exactly as the corpus has it (the training data reads no
other text), the draws repeat under a seed, and the file loads as training
pairs over the corpus. A run's training-config overrides apply, and one
naming a key the training config lacks (or a value of the wrong type) is an
error naming the run.
"""

import json
import math
import pathlib

from absl.testing import absltest
import numpy as np

from experiments.lth import config as lth_config
from experiments.lth import pseudo_queries
from experiments.lth import run as lth_run
from retrieval_jax import errors
from retrieval_jax.data import beir
from retrieval_jax.data import pipeline
from retrieval_jax.data import spans
from test_util import LIMIT_SMALL
from test_util import REPO

TINY = REPO / "tests" / "fixtures" / "tiny_beir"


def _corpus(directory):
  return beir.read_corpus(beir.corpus_path(str(directory)))


class PseudoQueriesTest(absltest.TestCase):

  def test_each_query_is_a_piece_of_its_document(self):
    ids, titles, texts = _corpus(TINY)
    by_id = {i: (t, x) for i, t, x in zip(ids, titles, texts)}
    for method in pseudo_queries.METHODS:
      pairs = pseudo_queries.pseudo_query_pairs(
          ids, titles, texts, method=method, per_doc=2, seed=3
      )
      self.assertNotEmpty(pairs)
      for p in pairs:
        title, text = by_id[p["doc_id"]]
        self.assertEqual((p["title"], p["text"]), (title, text))
        self.assertTrue(p["query_id"].startswith(f"{method}:{p['doc_id']}:"))
        if method == "title":
          self.assertEqual(p["query"], title)
        elif method == "sentence":
          self.assertIn(p["query"], spans.split_sentences("", text))
        else:
          words, query = text.split(), p["query"].split()
          n = len(query)
          self.assertBetween(
              n, max(1, math.ceil(0.1 * len(words))), max(1, len(words) // 2)
          )
          self.assertTrue(
              any(words[i : i + n] == query for i in range(len(words)))
          )

  def test_seeded(self):
    ids, titles, texts = _corpus(LIMIT_SMALL)
    make = lambda seed: pseudo_queries.pseudo_query_pairs(
        ids, titles, texts, method="crop", per_doc=1, seed=seed
    )
    self.assertEqual(make(0), make(0))
    self.assertNotEqual(
        [p["query"] for p in make(0)], [p["query"] for p in make(1)]
    )
    # LIMIT has no titles: nothing to write.
    with self.assertRaisesRegex(ValueError, "no pseudo-query"):
      pseudo_queries.write_pairs(
          LIMIT_SMALL,
          pathlib.Path(self.create_tempdir()) / "x.jsonl",
          method="title",
      )

  def test_file_loads_as_training_pairs_over_the_corpus(self):
    out = pathlib.Path(self.create_tempdir()) / "pairs.jsonl"
    summary = pseudo_queries.write_pairs(
        LIMIT_SMALL, out, method="crop", per_doc=2
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    self.assertLen(rows, summary["num_pairs"])
    self.assertEqual(summary["num_docs"], 46)
    data = pipeline.TrainingData.from_pairs(out, LIMIT_SMALL)
    ids, titles, texts = _corpus(LIMIT_SMALL)
    # Every positive is the corpus' own text (none replaced by the file).
    self.assertEqual(data.doc_ids, tuple(ids))
    self.assertEqual(
        data.doc_texts,
        tuple(beir.doc_text(t, x) for t, x in zip(titles, texts)),
    )
    self.assertEqual(data.num_pairs, summary["num_pairs"])
    self.assertTrue(np.all([len(ex.positive_ids) == 1 for ex in data.examples]))


class OverridesTest(absltest.TestCase):

  def _config(self, *overrides):
    config = lth_config.get_config("smoke")
    with config.unlocked():
      config.runs.bpr.overrides = overrides
    return config

  def test_overrides_apply(self):
    workdir = pathlib.Path(self.create_tempdir())
    plain = lth_run.training_config(self._config(), "bpr", workdir)
    cfg = lth_run.training_config(
        self._config("train.num_steps=7", "model.bpr_hashnet_gamma=0.5"),
        "bpr",
        workdir,
    )
    self.assertEqual((plain.train.num_steps, cfg.train.num_steps), (2, 7))
    self.assertEqual(cfg.model.bpr_hashnet_gamma, 0.5)

  def test_a_bad_override_names_the_run(self):
    workdir = pathlib.Path(self.create_tempdir())
    for bad in ("train.nope=3", "train.num_steps='x'", "train.num_steps"):
      with self.subTest(bad), self.assertRaisesRegex(
          errors.ConfigError, r"config\.runs\.bpr\.overrides: .*train\."
      ):
        lth_run.training_config(self._config(bad), "bpr", workdir)


if __name__ == "__main__":
  absltest.main()
