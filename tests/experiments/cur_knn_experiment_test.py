"""Tests for experiments/cur_knn/run.py (the pieces, not the cross-encoder).

Oracles: the subset's invariants (sizes, disjoint query sets, every relevant
document kept, determinism per seed); score caching that resumes after an
interruption with exactly the rows a full run computes; on an exactly
low-rank matrix every CUR method recovers the exact top-k and re-ranking an
exact first stage does too; call counts equal the budget; nDCG@10 known
answers.
"""

import pathlib

from absl.testing import absltest
import numpy as np

from experiments.cur_knn import run as ce
from retrieval_jax import errors
from retrieval_jax.data import beir


def _collection(qrels):
  n = 100
  return beir.BeirCollection(
      doc_ids=[f"d{i}" for i in range(n)],
      titles=[""] * n,
      texts=[f"text {i}" for i in range(n)],
      query_ids=[f"q{i}" for i in range(20)],
      queries=[f"query {i}" for i in range(20)],
      qrels=qrels,
  )


_TEST = _collection({
    f"q{i}": {f"d{3 * i}": 1, f"d{3 * i + 1}": 2, f"d{3 * i + 2}": 0}
    for i in range(10)
})
_TRAIN = _collection({f"q{i}": {f"d{i}": 1} for i in range(8, 20)})


class SubsetTest(absltest.TestCase):

  def test_invariants_and_determinism(self):
    kwargs = dict(num_test_queries=4, num_anchor_queries=6, num_items=30)
    test_ids, anchor_ids, rows = ce.select_subset(
        _TEST, _TRAIN, seed=1, **kwargs
    )
    self.assertLen(test_ids, 4)
    self.assertLen(anchor_ids, 6)
    self.assertEmpty(set(test_ids) & set(anchor_ids))
    self.assertLen(set(rows.tolist()), 30)
    self.assertEqual(rows.tolist(), sorted(rows.tolist()))
    for q in test_ids:
      i = int(q[1:])
      # Label > 0 documents are kept; the label-0 one only by chance.
      self.assertContainsSubset({3 * i, 3 * i + 1}, set(rows.tolist()))
    again = ce.select_subset(_TEST, _TRAIN, seed=1, **kwargs)
    self.assertEqual(
        (again[0], again[1], again[2].tolist()),
        (test_ids, anchor_ids, rows.tolist()),
    )
    other = ce.select_subset(_TEST, _TRAIN, seed=2, **kwargs)
    self.assertNotEqual(other[2].tolist(), rows.tolist())

  def test_sizes_out_of_range_name_the_key(self):
    with self.assertRaisesRegex(errors.ConfigError, "subset.num_items=3"):
      ce.select_subset(
          _TEST,
          _TRAIN,
          num_test_queries=4,
          num_anchor_queries=2,
          num_items=3,
          seed=0,
      )
    with self.assertRaisesRegex(errors.ConfigError, "subset.num_test_queries"):
      ce.select_subset(
          _TEST,
          _TRAIN,
          num_test_queries=11,
          num_anchor_queries=2,
          num_items=50,
          seed=0,
      )
    with self.assertRaisesRegex(errors.ConfigError, "num_anchor_queries"):
      ce.select_subset(
          _TEST,
          _TRAIN,
          num_test_queries=2,
          num_anchor_queries=13,
          num_items=50,
          seed=0,
      )


class _Interrupt(Exception):
  pass


class CachedScoresTest(absltest.TestCase):

  def test_resumes_after_the_last_finished_chunk(self):
    full = np.random.default_rng(0).normal(size=(10, 7)).astype(np.float32)
    calls = []

    def scorer(query_ids, item_ids, fail_at=None):
      calls.append(np.asarray(query_ids).tolist())
      if fail_at is not None and len(calls) == fail_at:
        raise _Interrupt()
      return full[np.asarray(query_ids)[:, None], item_ids]

    path = pathlib.Path(self.create_tempdir().full_path) / "scores.npz"
    with self.assertRaises(_Interrupt):
      ce.cached_scores(
          path, {"k": 1}, lambda q, i: scorer(q, i, fail_at=3), 10, 7, 4
      )
    # Chunks [0-3] and [4-7] were saved; the third (8-9) failed.
    calls.clear()
    got = ce.cached_scores(path, {"k": 1}, scorer, 10, 7, 4)
    np.testing.assert_array_equal(got, full)
    self.assertEqual(calls, [[8, 9]])
    calls.clear()
    ce.cached_scores(path, {"k": 1}, scorer, 10, 7, 4)
    self.assertEqual(calls, [])
    # Another key (another checkpoint, other items): everything again.
    ce.cached_scores(path, {"k": 2}, scorer, 10, 7, 4)
    self.assertEqual(calls, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])


class CompareTest(absltest.TestCase):

  def test_exact_low_rank_and_exact_first_stage(self):
    rng = np.random.default_rng(0)
    n, rank = 120, 5
    items = rng.normal(size=(n, rank))
    r_anc = rng.normal(size=(12, rank)) @ items.T
    s_test = rng.normal(size=(6, rank)) @ items.T
    exact = np.argsort(-s_test, axis=1, kind="stable")
    item_ids = [f"d{i}" for i in range(n)]
    test_ids = [f"q{i}" for i in range(6)]
    # Each query's best item is its one relevant document.
    qrels = {q: {item_ids[exact[i, 0]]: 1} for i, q in enumerate(test_ids)}
    short = exact.copy()
    short[:, 15:] = -1  # A first stage that ranks only 15 items.
    rows = ce.compare(
        s_test,
        r_anc,
        {"exact": exact, "short": short},
        budgets=[20, 40],
        ks=[1, 10],
        anchor_fractions=[0.5],
        rounds=2,
        seed=0,
        test_ids=test_ids,
        item_ids=item_ids,
        qrels=qrels,
    )
    self.assertLen(rows, 2 * 4)
    for row in rows:
      if row["method"] == "short + re-rank":
        self.assertEqual(row["calls"], 15)
      else:
        self.assertEqual(row["calls"], row["budget"])
      # k_i = 10 and 20 anchors span the rank-5 matrix: CUR is exact.
      self.assertEqual(row["recall@1"], 1.0, row)
      self.assertEqual(row["recall@10"], 1.0, row)
      self.assertAlmostEqual(row["ndcg@10"], 1.0, msg=row)
    table = ce.format_tables(rows, [1, 10], {"exact": 1.0})
    self.assertIn("| annCUR, k_i = 0.5·B | 1.000 | 1.000 |", table)
    self.assertIn("1.000 (15 calls)", table)

  def test_ndcg_known_answer(self):
    qrels = {"q": {"a": 1, "b": 1}}
    # Relevant at ranks 2 and 3 of three: DCG 1/log2(3) + 1/log2(4).
    got = ce.ndcg_at_10(
        np.array([[2, 0, 1, -1]]), ["q"], ["a", "b", "c"], qrels
    )
    want = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    self.assertAlmostEqual(got, want, places=6)


if __name__ == "__main__":
  absltest.main()
