"""Tests for retrieval_jax.analysis.order_rank.

Oracles: hand-made certificates and single flipped scores for the checkers;
the chain transforms applied to searched certificates (each output passes
its checker, and its rank stays within the proven bound by an independent
SVD rank); the trigonometric moment curve, which realises every pair as a
top-2 in dimension 4 (an exact LP feasibility statement); brute force over
all document orders for the rank-1 criterion; known answers (Forster's
bound of a Hadamard matrix is sqrt(n); the sign rank of 2 I_n - 1 is 2 for
n = 3 and 3 for n >= 4, since an open half-plane holds exactly one of n >= 4
directions only if its two neighbouring gaps sum to more than pi, and the
n gap sums total 4 pi); and soundness: a search never finds a certificate
below a proven lower bound.
"""

import itertools
import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import linalg

from retrieval_jax.analysis import order_rank as orank
from retrieval_jax.analysis import qrel_patterns as qp

DISJOINT = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
# Query i holds documents i and i + 1 (mod 4): no order makes all four
# pairs prefixes or suffixes.
CYCLE4 = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]])


def _random_qrels(seed: int, shape=(6, 6)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  density = 0.3 + 0.2 * rng.random()
  return (rng.random(shape) < density).astype(np.int64)


def _all_pairs(n: int) -> np.ndarray:
  return qp.to_matrix(qp.dense(n, 2), n).astype(np.int64)


def _brute_rank_one(a_mn) -> bool:
  """Some document order makes every relevant set a prefix or a suffix."""
  m, n = a_mn.shape
  for order in itertools.permutations(range(n)):
    row_mn = a_mn[:, list(order)]
    ok = True
    for row in row_mn:
      k = int(row.sum())
      prefix = row[:k].all()
      suffix = row[n - k:].all()
      if not (prefix or suffix):
        ok = False
        break
    if ok:
      return True
  return False


def _svd_rank(b_mn) -> int:
  return int(np.linalg.matrix_rank(b_mn))


class CheckerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.a_mn = np.array([[1, 0, 1], [0, 0, 1]])
    self.b_mn = np.array([[2.0, -1.0, 1.5], [0.2, 0.1, 3.0]])
    self.tau_m = np.array([0.5, 1.0])

  def test_row_thresholds_accept_and_reject_one_flip(self):
    self.assertTrue(
        orank.is_row_thresholdable(self.a_mn, self.b_mn, self.tau_m))
    for i, j in itertools.product(range(2), range(3)):
      flipped = self.b_mn.copy()
      # Mirror the score through its threshold: the other side, same gap.
      flipped[i, j] = 2 * self.tau_m[i] - flipped[i, j]
      self.assertFalse(
          orank.is_row_thresholdable(self.a_mn, flipped, self.tau_m), (i, j))

  def test_row_thresholds_follow_the_definition_at_ties(self):
    # An irrelevant score may equal its threshold (B_ij > tau_i iff A = 1),
    # a relevant one may not; a margin forbids both.
    tied = self.b_mn.copy()
    tied[0, 1] = self.tau_m[0]
    self.assertTrue(orank.is_row_thresholdable(self.a_mn, tied, self.tau_m))
    self.assertFalse(
        orank.is_row_thresholdable(self.a_mn, tied, self.tau_m, margin=1e-3))
    tied = self.b_mn.copy()
    tied[0, 0] = self.tau_m[0]
    self.assertFalse(orank.is_row_thresholdable(self.a_mn, tied, self.tau_m))

  def test_margin(self):
    # The smallest gap is 0.2 - 1.0 = -0.8 (row 1, an irrelevant doc); an
    # irrelevant score may sit exactly `margin` below its threshold.
    for margin, expected in ((0.75, True), (0.8, True), (0.85, False)):
      self.assertEqual(
          orank.is_row_thresholdable(self.a_mn, self.b_mn, self.tau_m,
                                     margin=margin), expected, margin)

  def test_global_threshold_needs_one_tau(self):
    # Any tau in [0.2, 1.5) separates both rows; 0.15 lets row 1's
    # irrelevant 0.2 through.
    self.assertTrue(orank.is_globally_thresholdable(self.a_mn, self.b_mn,
                                                    1.0))
    self.assertTrue(orank.is_globally_thresholdable(self.a_mn, self.b_mn,
                                                    0.5))
    self.assertFalse(orank.is_globally_thresholdable(self.a_mn, self.b_mn,
                                                     0.15))
    # Row-wise certificate that needs two different thresholds.
    b_mn = np.array([[1.0, 0.0], [3.0, 2.0]])
    a_mn = np.array([[1, 0], [1, 0]])
    self.assertTrue(orank.is_row_thresholdable(a_mn, b_mn, [0.5, 2.5]))
    for tau in np.linspace(-1, 4, 51):
      self.assertFalse(orank.is_globally_thresholdable(a_mn, b_mn, tau))

  def test_sign_pattern(self):
    sign_mn = np.array([[1, -1], [-1, -1]])
    b_mn = np.array([[0.3, -2.0], [-1e-300, -5.0]])
    self.assertTrue(orank.realizes_sign_pattern(sign_mn, b_mn))
    self.assertFalse(orank.realizes_sign_pattern(sign_mn, b_mn, margin=0.1))
    zero = b_mn.copy()
    zero[0, 0] = 0.0  # sign(0) matches neither +1 nor -1.
    self.assertFalse(orank.realizes_sign_pattern(sign_mn, zero))
    for i, j in itertools.product(range(2), range(2)):
      flipped = b_mn.copy()
      flipped[i, j] *= -1
      self.assertFalse(orank.realizes_sign_pattern(sign_mn, flipped))

  def test_order_preserving(self):
    self.assertTrue(orank.is_row_order_preserving(self.a_mn, self.b_mn))
    tied = self.b_mn.copy()
    tied[1, 0] = tied[1, 2]  # An irrelevant score ties a relevant one.
    self.assertFalse(orank.is_row_order_preserving(self.a_mn, tied))
    # Ties inside one relevance level are allowed.
    self.assertTrue(orank.is_row_order_preserving([[1, 1, 0]],
                                                  [[2.0, 2.0, 0.0]]))
    # Graded relevance: 2 > 1 > 0 must map to strictly decreasing scores.
    self.assertTrue(orank.is_row_order_preserving([[2, 0, 1]],
                                                  [[5.0, -1.0, 0.0]]))
    self.assertFalse(orank.is_row_order_preserving([[2, 0, 1]],
                                                   [[5.0, 0.0, -1.0]]))

  @parameterized.parameters(0, 1, 2)
  def test_found_certificates_reject_every_single_flip(self, seed):
    a_mn = _random_qrels(seed)
    cert = orank.search_realization(a_mn, 3, "rt", seed=seed)
    self.assertTrue(cert.found)
    b_mn = cert.scores_mn
    self.assertTrue(orank.is_row_thresholdable(a_mn, b_mn, cert.tau_m))
    self.assertTrue(orank.is_row_order_preserving(a_mn, b_mn))
    for i, j in itertools.product(*map(range, a_mn.shape)):
      flipped = b_mn.copy()
      flipped[i, j] = 2 * cert.tau_m[i] - flipped[i, j]
      self.assertFalse(orank.is_row_thresholdable(a_mn, flipped, cert.tau_m))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "a_mn must hold only 0 and 1"):
      orank.is_row_thresholdable([[2, 0]], [[1.0, 0.0]], [0.5])
    with self.assertRaisesRegex(ValueError, "b_mn must have shape"):
      orank.is_row_thresholdable(self.a_mn, self.b_mn[:, :2], self.tau_m)
    with self.assertRaisesRegex(ValueError, "tau_m must be 2"):
      orank.is_row_thresholdable(self.a_mn, self.b_mn, [0.5])
    with self.assertRaisesRegex(ValueError, "margin must be >= 0"):
      orank.is_row_thresholdable(self.a_mn, self.b_mn, self.tau_m, -1.0)
    with self.assertRaisesRegex(ValueError, "sign_mn must hold only"):
      orank.realizes_sign_pattern([[0, 1]], [[1.0, 1.0]])
    with self.assertRaisesRegex(ValueError, "b_mn must be finite"):
      orank.realizes_sign_pattern([[1, 1]], [[1.0, np.nan]])


class ChainTransformTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2, 3)
  def test_chain_on_searched_certificates(self, seed):
    a_mn = _random_qrels(seed + 10)
    sign_mn = 2 * a_mn - 1
    for dim in (2, 3):
      cert = orank.search_realization(a_mn, dim, "rt", seed=seed)
      self.assertTrue(cert.found, dim)
      b_mn = cert.scores_mn
      self.assertLessEqual(_svd_rank(b_mn), dim)
      # rt -> rop: the same B; rop -> rt: midpoint thresholds.
      self.assertTrue(orank.is_row_order_preserving(a_mn, b_mn))
      tau_m = orank.rop_to_rt(a_mn, b_mn)
      self.assertTrue(orank.is_row_thresholdable(a_mn, b_mn, tau_m))
      self.assertFalse((b_mn == tau_m[:, None]).any())
      # rt -> sign: one more dimension at most.
      signed_mn = orank.rt_to_sign(a_mn, b_mn, cert.tau_m)
      self.assertTrue(orank.realizes_sign_pattern(sign_mn, signed_mn))
      self.assertLessEqual(_svd_rank(signed_mn), dim + 1)
      self.assertLessEqual(_svd_rank(signed_mn), _svd_rank(b_mn) + 1)
      # sign -> gt -> rt.
      tau = orank.sign_to_gt(a_mn, signed_mn)
      self.assertEqual(tau, 0.0)
      self.assertTrue(orank.is_globally_thresholdable(a_mn, signed_mn, tau))
      tau_m = orank.gt_to_rt(a_mn, signed_mn, tau)
      np.testing.assert_array_equal(tau_m, np.zeros(a_mn.shape[0]))
      self.assertTrue(orank.is_row_thresholdable(a_mn, signed_mn, tau_m))

  def test_rop_to_rt_constant_rows_and_large_scores(self):
    a_mn = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0]])
    b_mn = np.array([[1e300, -1e300, 0.0], [5.0, -3.0, 1e17],
                     [1.0, 0.999, -1.0]])
    tau_m = orank.rop_to_rt(a_mn, b_mn)
    self.assertTrue(orank.is_row_thresholdable(a_mn, b_mn, tau_m))
    self.assertFalse((b_mn == tau_m[:, None]).any())
    self.assertEqual(tau_m[2], 0.5 * 1.0 + 0.5 * 0.999)

  def test_rop_to_rt_rejects(self):
    with self.assertRaisesRegex(ValueError, "does not preserve"):
      orank.rop_to_rt([[1, 0]], [[0.0, 0.0]])
    # Adjacent floats: no float64 lies strictly between them.
    with self.assertRaisesRegex(ValueError, "less than one float64 step"):
      orank.rop_to_rt([[1, 0]], [[np.nextafter(1.0, 2.0), 1.0]])

  def test_rt_to_sign_breaks_a_tie_at_the_threshold(self):
    a_mn = np.array([[1, 0, 0], [0, 1, 1]])
    b_mn = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    tau_m = np.array([1.0, 0.0])  # Both rows tie an irrelevant score.
    self.assertTrue(orank.is_row_thresholdable(a_mn, b_mn, tau_m))
    signed_mn = orank.rt_to_sign(a_mn, b_mn, tau_m)
    self.assertTrue(orank.realizes_sign_pattern(2 * a_mn - 1, signed_mn))
    np.testing.assert_array_equal(signed_mn, b_mn - [[1.5], [0.5]])

  def test_transforms_reject_non_certificates(self):
    a_mn = np.array([[1, 0]])
    with self.assertRaisesRegex(ValueError, "does not threshold a_mn row"):
      orank.rt_to_sign(a_mn, [[0.0, 1.0]], [0.5])
    with self.assertRaisesRegex(ValueError, "sign pattern"):
      orank.sign_to_gt(a_mn, [[1.0, 0.0]])
    with self.assertRaisesRegex(ValueError, "globally"):
      orank.gt_to_rt(a_mn, [[1.0, 0.0]], 2.0)


class SearchTest(parameterized.TestCase):

  @parameterized.parameters(3, 4, 5, 6)
  def test_identity(self, n):
    a_mn = np.eye(n, dtype=np.int64)
    # rank_rt(I_n) = 2 for n >= 3: the middle document of any order is
    # neither a prefix nor a suffix, and the circle does it in 2-D.
    self.assertFalse(orank.rank_one_row_threshold(a_mn).found)
    for kind, dim in (("rt", 2), ("gt", 2), ("sign", 3)):
      cert = orank.search_realization(a_mn, dim, kind, seed=n)
      self.assertTrue(cert.found, kind)
      self.assertEqual(cert.dim, dim)
      self.assertGreater(cert.margin, 1e-9)
      self.assertTrue(orank.certifies(a_mn, cert))
      self.assertLessEqual(_svd_rank(cert.scores_mn), dim)
      self.assertLessEqual(np.abs(cert.u_md).max(), 1.0 + 1e-9)

  @parameterized.parameters(4, 5, 6)
  def test_all_pairs_rank_at_most_four(self, n):
    a_mn = _all_pairs(n)
    cert = orank.search_realization(a_mn, 4, "rt", seed=0)
    self.assertTrue(cert.found)
    self.assertTrue(orank.certifies(a_mn, cert))
    self.assertLessEqual(_svd_rank(cert.scores_mn), 4)

  @parameterized.parameters(4, 5, 6, 8, 12)
  def test_moment_curve_lp_is_feasible(self, n):
    # With the documents on (cos t, sin t, cos 2t, sin 2t), t = 2 pi j / n,
    # the LP over the queries and thresholds has a positive optimum.
    a_mn = _all_pairs(n)
    v_nd = qp.moment_curve_docs(n, 2)
    cert = orank.realize_with_docs(a_mn, v_nd, "rt")
    self.assertTrue(cert.found)
    self.assertGreater(cert.margin, 0.0)
    self.assertTrue(orank.is_row_thresholdable(a_mn, cert.scores_mn,
                                               cert.tau_m))
    np.testing.assert_array_equal(cert.v_nd, v_nd)
    # The closed-form queries certify the same thing independently, and
    # the LP optimum is at least their margin after scaling into the box.
    q_md = qp.moment_curve_queries(qp.dense(n, 2), n)
    closed_mn = q_md @ v_nd.T
    self.assertTrue(orank.is_row_order_preserving(a_mn, closed_mn))
    tau_m = orank.rop_to_rt(a_mn, closed_mn)
    scale_m = np.abs(q_md).max(axis=1)
    closed_margin = np.min((2 * a_mn - 1) * (closed_mn - tau_m[:, None])
                           / scale_m[:, None])
    self.assertGreaterEqual(cert.margin, min(closed_margin, 1.0) - 1e-9)

  def test_fixed_docs_lp_detects_infeasibility(self):
    # Documents on a line: the middle one can never be a query's only
    # relevant document, whatever the queries, so the optimum is 0.
    cert = orank.realize_with_docs(np.eye(3), [[0.0], [1.0], [2.0]], "rt")
    self.assertFalse(cert.found)
    self.assertLessEqual(cert.margin, 1e-9)
    # The ends can each be singled out: rows {0} and {2} are feasible.
    cert = orank.realize_with_docs([[1, 0, 0], [0, 0, 1]],
                                   [[0.0], [1.0], [2.0]], "rt")
    self.assertTrue(cert.found)

  def test_cycle_needs_two_dims(self):
    self.assertFalse(orank.rank_one_row_threshold(CYCLE4).found)
    self.assertFalse(_brute_rank_one(CYCLE4))
    miss = orank.search_realization(CYCLE4, 1, "rt", seed=0, restarts=2)
    self.assertFalse(miss.found)
    self.assertLessEqual(miss.margin, 1e-9)
    cert = orank.search_realization(CYCLE4, 2, "rt", seed=0)
    self.assertTrue(cert.found)
    self.assertTrue(orank.certifies(CYCLE4, cert))

  def test_disjoint_rank_one(self):
    cert = orank.search_realization(DISJOINT, 1, "rt", seed=0)
    self.assertTrue(cert.found)
    self.assertTrue(orank.certifies(DISJOINT, cert))

  def test_deterministic(self):
    a_mn = _random_qrels(5)
    one = orank.search_realization(a_mn, 2, "gt", seed=3)
    two = orank.search_realization(a_mn, 2, "gt", seed=3)
    np.testing.assert_array_equal(one.u_md, two.u_md)
    np.testing.assert_array_equal(one.v_nd, two.v_nd)
    self.assertEqual(one.margin, two.margin)

  def test_pure_lp_alternation_still_certifies(self):
    cert = orank.search_realization(DISJOINT, 2, "sign", seed=0,
                                    smooth_iters=0)
    self.assertTrue(cert.found)
    self.assertTrue(orank.certifies(DISJOINT, cert))

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "dim must be an int >= 1"):
      orank.search_realization(DISJOINT, 0)
    with self.assertRaisesRegex(ValueError, "kind must be one of"):
      orank.search_realization(DISJOINT, 1, "rop")
    with self.assertRaisesRegex(ValueError, "v_nd must have shape"):
      orank.realize_with_docs(DISJOINT, np.ones((3, 2)))


class RankOneTest(parameterized.TestCase):

  def test_disjoint(self):
    cert = orank.rank_one_row_threshold(DISJOINT)
    self.assertTrue(cert.found)
    self.assertEqual(cert.dim, 1)
    self.assertGreater(cert.margin, 0.0)
    self.assertTrue(orank.certifies(DISJOINT, cert))

  @parameterized.parameters((3, 4), (4, 5), (5, 5), (6, 6), (3, 6))
  def test_matches_brute_force_over_orders(self, m, n):
    rng = np.random.default_rng(100 * m + n)
    outcomes = set()
    for _ in range(25):
      a_mn = (rng.random((m, n)) < rng.uniform(0.2, 0.8)).astype(np.int64)
      cert = orank.rank_one_row_threshold(a_mn)
      self.assertEqual(cert.found, _brute_rank_one(a_mn), a_mn)
      if cert.found:
        self.assertTrue(orank.certifies(a_mn, cert))
        self.assertLessEqual(_svd_rank(cert.scores_mn), 1)
      outcomes.add(cert.found)
    if m <= 4:
      self.assertEqual(outcomes, {True, False})

  def test_sign_rank_one(self):
    x_m = np.array([1, -1, 1])
    y_n = np.array([1, 1, -1, -1, 1])
    sign_mn = np.outer(x_m, y_n)
    self.assertTrue(orank.is_sign_rank_one(sign_mn))
    self.assertEqual(orank.sign_rank_lower_bound(sign_mn), 1)
    self.assertAlmostEqual(orank.forster_bound(sign_mn), 1.0, places=12)
    cert = orank.search_realization((sign_mn + 1) // 2, 1, "sign", seed=0)
    self.assertTrue(cert.found)
    broken = sign_mn.copy()
    broken[1, 2] *= -1
    self.assertFalse(orank.is_sign_rank_one(broken))
    self.assertEqual(orank.sign_rank_lower_bound(broken), 2)

  def test_sign_rank_two_of_identity_pattern(self):
    cert = orank.rank_two_sign(2 * np.eye(3) - 1)
    self.assertTrue(cert.found)
    self.assertTrue(orank.realizes_sign_pattern(2 * np.eye(3) - 1,
                                                cert.scores_mn))
    for n in (4, 5, 6):
      self.assertFalse(orank.rank_two_sign(2 * np.eye(n) - 1).found)
      # Reordering the columns does not change the sign rank.
      self.assertFalse(orank.rank_two_sign(2 * np.eye(n)[:, ::-1] - 1).found)
    self.assertIsNone(orank.rank_two_sign(2 * np.eye(12) - 1))

  def test_sign_rank_two_with_constant_rows(self):
    # Every row changes sign at most once along the columns, so it is
    # rank 2 (half-planes through the origin), but not rank 1.
    sign_mn = np.array([[1, 1, 1], [-1, -1, -1], [1, -1, -1], [1, 1, -1]])
    self.assertFalse(orank.is_sign_rank_one(sign_mn))
    for pattern in (sign_mn, sign_mn.T):
      cert = orank.rank_two_sign(pattern)
      self.assertTrue(cert.found)
      self.assertGreater(cert.margin, 0.1)
      self.assertTrue(orank.realizes_sign_pattern(pattern, cert.scores_mn))

  def test_sign_rank_two_is_sound_against_search(self):
    rng = np.random.default_rng(7)
    outcomes = set()
    for trial in range(20):
      a_mn = (rng.random((4, 6)) < 0.5).astype(np.int64)
      sign_mn = 2 * a_mn - 1
      exact = orank.rank_two_sign(sign_mn)
      np.testing.assert_equal(orank.rank_two_sign(sign_mn.T).found,
                              exact.found)
      if exact.found:
        self.assertTrue(orank.realizes_sign_pattern(sign_mn,
                                                    exact.scores_mn))
        self.assertLessEqual(_svd_rank(exact.scores_mn), 2)
      else:
        # A found search certificate would contradict the exact test.
        self.assertFalse(orank.search_realization(
            a_mn, 2, "sign", seed=trial, restarts=1, rounds=2).found)
      outcomes.add(exact.found)
    self.assertEqual(outcomes, {True, False})


class LowerBoundTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 4, 8, 16, 32)
  def test_forster_of_hadamard(self, n):
    h_nn = linalg.hadamard(n)
    self.assertAlmostEqual(orank.forster_bound(h_nn), math.sqrt(n),
                           delta=1e-12 * math.sqrt(n))
    # The integer bound must not round sqrt(16) = 4 up to 5.
    expected = max(math.ceil(math.sqrt(n) - 1e-9), 1 if n == 1 else 2)
    self.assertEqual(orank.sign_rank_lower_bound(h_nn), expected)

  def test_integer_rank(self):
    rng = np.random.default_rng(0)
    for _ in range(20):
      a_mn = (rng.random((rng.integers(1, 9), rng.integers(1, 9)))
              < 0.5).astype(np.int64)
      self.assertEqual(orank.integer_rank(a_mn), _svd_rank(a_mn))
    self.assertEqual(orank.integer_rank(np.eye(7)), 7)
    self.assertEqual(orank.integer_rank(np.ones((5, 3))), 1)
    self.assertEqual(orank.integer_rank(linalg.hadamard(16)), 16)
    self.assertEqual(orank.integer_rank(np.zeros((2, 3))), 0)
    # Rank 2 although the rows look unrelated: r2 = 2 r1 - r0.
    self.assertEqual(orank.integer_rank([[1, 0, 3], [2, 1, 5],
                                         [3, 2, 7]]), 2)


class RankBoundsTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2, 3, 4, 5)
  def test_random_matrices_fit_the_chain(self, seed):
    a_mn = _random_qrels(seed + 20)
    bounds = orank.rank_bounds(a_mn, seed=seed, restarts=3, rounds=2)
    bounds.check_chain()
    rt, gt, sign = (bounds.interval(k) for k in orank.KINDS)
    self.assertLessEqual(rt[0], rt[1])
    self.assertLessEqual(gt[0], gt[1])
    self.assertLessEqual(sign[0], sign[1])
    # The chain on the ends of the intervals.
    self.assertLessEqual(sign[0] - 1, rt[1])
    self.assertLessEqual(rt[0], gt[1])
    self.assertLessEqual(gt[0], sign[1])
    self.assertLessEqual(sign[1], rt[1] + 1)
    self.assertLessEqual(gt[1], orank.integer_rank(a_mn))
    for kind, cert in bounds.certificates.items():
      self.assertTrue(orank.certifies(a_mn, cert), kind)
      self.assertLessEqual(_svd_rank(cert.scores_mn), cert.dim)
    # Soundness: no search beats a proven lower bound.
    for kind, (lower, _) in zip(orank.KINDS, (rt, gt, sign)):
      if lower >= 2:
        self.assertFalse(orank.search_realization(
            a_mn, lower - 1, kind, seed=seed, restarts=2, rounds=2).found)

  def test_identity_is_exact(self):
    bounds = orank.rank_bounds(np.eye(4), seed=0)
    self.assertEqual(bounds.interval("rt"), (2, 2))
    self.assertEqual(bounds.interval("gt"), (2, 2))
    self.assertEqual(bounds.interval("sign"), (3, 3))
    bounds = orank.rank_bounds(np.eye(3), seed=0)
    self.assertEqual(bounds.interval("sign"), (2, 2))

  def test_known_small_patterns(self):
    bounds = orank.rank_bounds(DISJOINT)
    self.assertEqual([bounds.interval(k) for k in orank.KINDS],
                     [(1, 1), (1, 1), (1, 1)])
    # Rows {1, 2}, {}, {1, 2}: B = A with tau = 1/2 has rank 1, but the
    # sign pattern's rows are not all equal up to sign.
    bounds = orank.rank_bounds(np.outer([1, 0, 1], [0, 1, 1, 0]))
    self.assertEqual([bounds.interval(k) for k in orank.KINDS],
                     [(1, 1), (1, 1), (2, 2)])
    bounds = orank.rank_bounds(CYCLE4)
    self.assertEqual(bounds.interval("rt"), (2, 2))
    self.assertEqual(bounds.interval("gt"), (2, 2))
    self.assertEqual(bounds.interval("sign"), (2, 2))

  def test_constant_rows(self):
    bounds = orank.rank_bounds(np.ones((3, 4)))
    self.assertEqual([bounds.interval(k) for k in orank.KINDS],
                     [(0, 0), (0, 0), (1, 1)])
    bounds = orank.rank_bounds([[1, 1], [0, 0]])
    self.assertEqual([bounds.interval(k) for k in orank.KINDS],
                     [(0, 0), (1, 1), (1, 1)])

  def test_max_dim_stops_the_search(self):
    bounds = orank.rank_bounds(_all_pairs(5), max_dim=1)
    # Without a search only the rank of A (4 here) and min(m, n) remain.
    self.assertEqual(bounds.interval("rt"), (2, orank.integer_rank(
        _all_pairs(5))))
    self.assertEqual(bounds.certificates, {})

  def test_check_chain_catches_contradictions(self):
    a_mn = np.eye(4)
    with self.assertRaisesRegex(AssertionError, "fit the chain"):
      orank.RankBounds(a_mn, 3, 3, 3, 3, 1, 1).check_chain()
    with self.assertRaisesRegex(AssertionError, "empty or invalid"):
      orank.RankBounds(a_mn, 2, 1, 2, 2, 3, 3).check_chain()
    bounds = orank.rank_bounds(a_mn, seed=0)
    cert = bounds.certificates["rt"]
    bad_v = cert.v_nd.copy()
    bad_v[0] *= -1
    bounds.certificates["rt"] = orank.Realization(
        "rt", True, cert.u_md, bad_v, cert.tau_m, cert.margin)
    with self.assertRaisesRegex(AssertionError, "does not verify"):
      bounds.check_chain()


if __name__ == "__main__":
  absltest.main()
