"""Tests for retrieval_jax.search.cur_knn.

Oracles: exact recovery of low-rank score matrices once the anchor columns
span them (and failure below that rank); the anchor-row identity; CE-call
counts equal to k_i + k_r (budget for the adaptive search); recall
non-decreasing in k_r and 1.0 at k_r = N; on a noisy low-rank matrix an
intermediate k_i beats spending the whole budget on anchors; the sharded
index equals the one-device index.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.search import cur_knn as ck

_N, _RANK, _KQ, _TEST = 2000, 20, 100, 200


def _low_rank(seed=0, noise=0.0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(_KQ + _TEST, _RANK))
  items = rng.normal(size=(_N, _RANK))
  # Signal std sqrt(20) = 4.47; noise std sqrt(5) = 2.24 when noise = 1.
  return q @ items.T + noise * np.sqrt(5.0) * rng.normal(size=(_KQ + _TEST, _N))


def _rel_error(approx, exact):
  return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


class CurIndexTest(parameterized.TestCase):

  @parameterized.parameters((20, 1e-12), (50, 1e-12))
  def test_exact_recovery_float64(self, k_i, tol):
    s = _low_rank()
    with jax.enable_x64(True):
      index = ck.build_index(s[:_KQ], ck.random_anchor_items(_N, k_i, 0))
      c = s[_KQ:][:, index.anchor_items_k]
      err = _rel_error(c @ np.asarray(index.items_kn), s[_KQ:])
    self.assertLess(err, tol)

  def test_exact_recovery_float32_and_rank_deficit(self):
    s = _low_rank()
    r32 = s[:_KQ].astype(np.float32)
    for k_i, low, high in ((20, 0.0, 1e-6), (50, 0.0, 1e-6), (10, 0.5, 1.0)):
      index = ck.build_index(r32, ck.random_anchor_items(_N, k_i, 0))
      c = s[_KQ:][:, index.anchor_items_k].astype(np.float32)
      err = _rel_error(c @ np.asarray(index.items_kn), s[_KQ:])
      self.assertBetween(err, low, high)

  def test_refinement_only_removes_rounding(self):
    # Noisy (full-rank) scores: the refined E equals the plain one up to
    # float32 rounding, so the step is safe beyond the low-rank case.
    s = _low_rank(noise=1.0)[:_KQ].astype(np.float32)
    anchors = ck.random_anchor_items(_N, 50, 0)
    plain = np.asarray(ck.build_index(s, anchors, refine=0).items_kn)
    refined = np.asarray(ck.build_index(s, anchors, refine=1).items_kn)
    self.assertLess(_rel_error(refined, plain), 1e-4)

  def test_anchor_rows_are_reproduced(self):
    # k_i >= k_q: R[:, A] has full row rank, so pinv(R_A) R_A = I on rows.
    s = np.random.default_rng(1).normal(size=(30, 500))
    with jax.enable_x64(True):
      index = ck.build_index(s, ck.random_anchor_items(500, 40, 3))
      approx = s[:, index.anchor_items_k] @ np.asarray(index.items_kn)
    np.testing.assert_allclose(approx, s, atol=1e-10)

  def test_sharded_index_equals_one_device(self):
    s = _low_rank(noise=1.0)[:_KQ].astype(np.float32)
    anchors = ck.random_anchor_items(_N, 50, 0)
    one = ck.build_index(
        s, anchors, mesh=sharding.make_mesh(devices=jax.devices()[:1])
    )
    eight = ck.build_index(s, anchors, mesh=sharding.make_mesh())
    self.assertLen(eight.items_kn.sharding.device_set, 8)
    np.testing.assert_allclose(
        np.asarray(eight.items_kn),
        np.asarray(one.items_kn),
        rtol=1e-5,
        atol=1e-4,
    )

  def test_bad_anchors(self):
    with self.assertRaisesRegex(ValueError, "distinct"):
      ck.build_index(np.ones((3, 10)), np.array([1, 1]))
    with self.assertRaisesRegex(ValueError, "num_anchors"):
      ck.random_anchor_items(10, 11)


class SearchTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.s = _low_rank(noise=1.0)
    cls.queries = np.arange(_KQ, _KQ + _TEST)
    cls.exact_top10 = np.argsort(-cls.s[_KQ:], axis=1)[:, :10]

  def _recall(self, k_i, k_r):
    scorer = ck.CountingScorer(ck.matrix_scorer(self.s))
    index = ck.build_index(self.s[:_KQ], ck.random_anchor_items(_N, k_i, 0))
    result = ck.cur_search(index, self.queries, scorer, 10, k_r)
    # Budget accounting: k_i anchor calls + k_r re-ranking calls per query.
    self.assertEqual(scorer.total, _TEST * (k_i + k_r))
    self.assertEqual(set(scorer.per_query.values()), {k_i + k_r})
    np.testing.assert_array_equal(result.calls_b, k_i + k_r)
    return ck.top_k_recall(result.items_bk, self.exact_top10)

  def test_exact_low_rank_gives_recall_one(self):
    s = _low_rank()
    index = ck.build_index(s[:_KQ], ck.random_anchor_items(_N, 30, 0))
    result = ck.cur_search(index, self.queries, ck.matrix_scorer(s), 10, 10)
    self.assertEqual(
        ck.top_k_recall(result.items_bk, np.argsort(-s[_KQ:], axis=1)[:, :10]),
        1.0,
    )
    self.assertTrue(result.exact_bk.all())

  def test_recall_non_decreasing_in_k_r_and_one_at_n(self):
    recalls = [self._recall(50, k_r) for k_r in (0, 10, 50, 150, 450)]
    self.assertEqual(recalls, sorted(recalls))
    self.assertEqual(self._recall(50, _N - 50), 1.0)

  def test_intermediate_anchor_count_beats_all_anchors(self):
    # Noisy rank-20 matrix: at each budget, 50 anchors + re-ranking beats
    # 100 anchors (square R_A amplifies the noise) by a wide margin, and
    # beats re-ranking random candidates (expected recall budget / N).
    for budget in (100, 200, 500):
      middle, all_anchors = self._recall(50, budget - 50), self._recall(
          100, budget - 100
      )
      self.assertGreater(middle, all_anchors + 0.3)
      self.assertGreater(middle, 2 * budget / _N)

  def test_adaptive_uses_the_budget_exactly_and_beats_one_round(self):
    index = ck.build_index(self.s[:_KQ], ck.random_anchor_items(_N, 50, 0))
    recalls = {}
    for rounds in (1, 5):
      scorer = ck.CountingScorer(ck.matrix_scorer(self.s))
      result = ck.adaptive_cur_search(
          index, self.queries, scorer, 10, 200, rounds
      )
      self.assertEqual(scorer.total, _TEST * 200)
      np.testing.assert_array_equal(result.calls_b, 200)
      # Every returned score is exact.
      np.testing.assert_allclose(
          result.scores_bk, np.take_along_axis(self.s[_KQ:], result.items_bk, 1)
      )
      recalls[rounds] = ck.top_k_recall(result.items_bk, self.exact_top10)
    # One round is 200 random items; five rounds steer the later anchors.
    self.assertLess(recalls[1], 0.2)
    self.assertGreater(recalls[5], 0.7)


class RetrieveAndRerankTest(absltest.TestCase):

  def test_known_answer_budget_and_padding(self):
    s = np.array([[0.1, 0.9, 0.5, 0.3, 0.7], [0.2, 0.4, 0.8, 0.6, 0.0]])
    # Query 0's first stage ranks items 0, 3, 1, 4, 2; query 1's ranks only
    # items 4 and 0 (-1: nothing else shares a term).
    ranking = np.array([[0, 3, 1, 4, 2], [4, 0, -1, -1, -1]])
    scorer = ck.CountingScorer(ck.matrix_scorer(s))
    result = ck.retrieve_and_rerank(
        np.arange(2), ranking, scorer, k=4, budget=3
    )
    # Query 0: the first 3 (0, 3, 1) re-ranked by exact score (1, 3, 0),
    # then the first stage's next item (4) with score -inf.
    np.testing.assert_array_equal(result.items_bk[0], [1, 3, 0, 4])
    np.testing.assert_allclose(result.scores_bk[0, :3], [0.9, 0.3, 0.1])
    self.assertEqual(result.scores_bk[0, 3], -np.inf)
    np.testing.assert_array_equal(result.exact_bk[0], [1, 1, 1, 0])
    # Query 1: its 2 ranked items, re-ranked; the rest is empty.
    np.testing.assert_array_equal(result.items_bk[1], [0, 4, -1, -1])
    np.testing.assert_array_equal(result.calls_b, [3, 2])
    self.assertEqual(scorer.per_query, {0: 3, 1: 2})

  def test_full_budget_is_exact_search(self):
    s = _low_rank(noise=1.0)[:50, :300]
    rng = np.random.default_rng(0)
    ranking = np.stack([rng.permutation(300) for _ in range(50)])
    result = ck.retrieve_and_rerank(
        np.arange(50), ranking, ck.matrix_scorer(s), 10, 300
    )
    self.assertEqual(
        ck.top_k_recall(result.items_bk, np.argsort(-s, axis=1)[:, :10]), 1.0
    )


if __name__ == "__main__":
  absltest.main()
