"""Tests for retrieval_jax.analysis.qrel_patterns.

Oracles: known small outputs of the four generators (the examples their
definitions give); LIMIT-small's shipped qrels, which are exactly the dense
pattern's first 1000 pairs in corpus order, and its data integrity; the
moment-curve embedding's exact top-k (all pairs for n <= 100 in float32 and
float64, n = 300 in float64 only), its closed form for k = 2, the identity
q . v = const - |p(e^{i theta})|^2 against a direct product, and its
measured minimum margins.
"""

import collections
import itertools
import json
import math
import re

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from retrieval_jax.analysis import qrel_patterns as qp
import test_util


class DenseTest(absltest.TestCase):

  def test_all_pairs_of_four(self):
    np.testing.assert_array_equal(
        qp.dense(4, 2), [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    )
    self.assertEqual(qp.dense(4, 2).dtype, np.int32)

  def test_all_subsets_in_combinations_order(self):
    for n, k in ((5, 3), (6, 1), (7, 7), (9, 4)):
      np.testing.assert_array_equal(
          qp.dense(n, k),
          np.array(list(itertools.combinations(range(n), k))).reshape(-1, k),
      )

  def test_limit_query_count_uses_46_docs(self):
    relevant_mk = qp.dense(num_queries=1000, k=2)
    self.assertEqual(relevant_mk.shape, (1000, 2))
    self.assertEqual(relevant_mk.max(), 45)  # C(45, 2) = 990 < 1000.
    np.testing.assert_array_equal(relevant_mk, qp.dense(46, 2)[:1000])
    # The 35 unused pairs are the last ones: all inside docs 37..45.
    self.assertTrue((qp.dense(46, 2)[1000:] >= 37).all())

  def test_smallest_n_boundaries(self):
    # C(46, 2) = 1035 exactly fills 46 docs; one more query needs 47.
    np.testing.assert_array_equal(qp.dense(num_queries=1035), qp.dense(46))
    self.assertEqual(qp.dense(num_queries=1036).max(), 46)
    # k = 3: C(5, 3) = 10 < 11 <= C(6, 3) = 20.
    np.testing.assert_array_equal(
        qp.dense(num_queries=11, k=3), qp.dense(6, 3)[:11]
    )

  def test_extra_docs_are_unjudged_distractors(self):
    # LIMIT (full) has 50,000 docs but the same 46-doc dense queries.
    np.testing.assert_array_equal(
        qp.dense(50_000, 2, 1000), qp.dense(num_queries=1000)
    )

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "num_docs or num_queries"):
      qp.dense()
    with self.assertRaisesRegex(ValueError, "num_docs=45.*n >= 46"):
      qp.dense(45, 2, 1000)
    with self.assertRaisesRegex(ValueError, "num_docs must be >= k=3"):
      qp.dense(2, 3)
    with self.assertRaisesRegex(ValueError, "k must be >= 1, got 0"):
      qp.dense(4, 0)
    with self.assertRaisesRegex(ValueError, "num_queries must be >= 1"):
      qp.dense(10, 2, 0)


class OtherPatternsTest(absltest.TestCase):

  def test_cycle(self):
    # Each query's window of k docs, wrapping: {2, 0} reads [0, 2].
    np.testing.assert_array_equal(qp.cycle(3, 3, 2), [[0, 1], [1, 2], [0, 2]])
    np.testing.assert_array_equal(
        qp.cycle(5, 7, 3),
        [
            [0, 1, 2],
            [1, 2, 3],
            [2, 3, 4],
            [0, 3, 4],
            [0, 1, 4],
            [0, 1, 2],
            [1, 2, 3],
        ],
    )
    with self.assertRaisesRegex(ValueError, "k must be <= num_docs=2"):
      qp.cycle(2, 3, 3)

  def test_disjoint(self):
    np.testing.assert_array_equal(
        qp.disjoint(6, 3, 2), [[0, 1], [2, 3], [4, 5]]
    )
    np.testing.assert_array_equal(qp.disjoint(10, 2, 3), [[0, 1, 2], [3, 4, 5]])
    with self.assertRaisesRegex(ValueError, r"3 \* k=2 = 6 > num_docs=5"):
      qp.disjoint(5, 3, 2)

  def test_random_rows_are_sorted_distinct_and_seeded(self):
    relevant_mk = qp.random(20, 500, 4, seed=7)
    self.assertEqual(relevant_mk.shape, (500, 4))
    self.assertEqual(relevant_mk.dtype, np.int32)
    self.assertTrue((np.diff(relevant_mk, axis=1) > 0).all())
    self.assertTrue(((relevant_mk >= 0) & (relevant_mk < 20)).all())
    np.testing.assert_array_equal(relevant_mk, qp.random(20, 500, 4, seed=7))
    self.assertFalse(np.array_equal(relevant_mk, qp.random(20, 500, 4, seed=8)))

  def test_random_covers_all_sets_evenly(self):
    # 2000 uniform pairs of 5 docs: every one of the 10 pairs shows up and
    # each doc is in ~ 2000 * 2 / 5 = 800 rows (binomial sd ~ 22).
    relevant_mk = qp.random(5, 2000, 2, seed=0)
    self.assertLen({tuple(r) for r in relevant_mk.tolist()}, 10)
    counts = np.bincount(relevant_mk.ravel(), minlength=5)
    self.assertTrue((np.abs(counts - 800) < 100).all(), counts)

  def test_k_equal_to_num_docs(self):
    np.testing.assert_array_equal(
        qp.random(3, 2, 3, seed=1), [[0, 1, 2], [0, 1, 2]]
    )

  def test_registry_has_one_signature(self):
    self.assertEqual(set(qp.PATTERNS), {"dense", "random", "cycle", "disjoint"})
    np.testing.assert_array_equal(
        qp.PATTERNS["dense"](None, 1000, 2, 0), qp.dense(num_queries=1000)
    )
    np.testing.assert_array_equal(
        qp.PATTERNS["dense"](6, None, 3, 0), qp.dense(6, 3)
    )
    np.testing.assert_array_equal(
        qp.PATTERNS["random"](9, 30, 3, 5), qp.random(9, 30, 3, 5)
    )
    np.testing.assert_array_equal(
        qp.PATTERNS["cycle"](9, 30, 3, 5), qp.cycle(9, 30, 3)
    )
    np.testing.assert_array_equal(
        qp.PATTERNS["disjoint"](9, 3, 3, 5), qp.disjoint(9, 3, 3)
    )


class MatrixTest(absltest.TestCase):

  def test_round_trip_every_pattern(self):
    for name, fn in qp.PATTERNS.items():
      relevant_mk = fn(12, 4, 3, 0)
      a_mn = qp.to_matrix(relevant_mk, 12)
      self.assertEqual(a_mn.dtype, bool, name)
      self.assertEqual(a_mn.shape, (4, 12), name)
      np.testing.assert_array_equal(a_mn.sum(axis=1), 3, err_msg=name)
      np.testing.assert_array_equal(
          qp.from_matrix(a_mn), relevant_mk, err_msg=name
      )

  def test_known_matrix(self):
    a_mn = qp.to_matrix(np.array([[0, 2], [1, 3]]), 4)
    np.testing.assert_array_equal(a_mn, [[1, 0, 1, 0], [0, 1, 0, 1]])
    # Integer 0/1 matrices work too; unsorted input comes back sorted.
    np.testing.assert_array_equal(
        qp.from_matrix(qp.to_matrix(np.array([[3, 1]]), 5).astype(int)),
        [[1, 3]],
    )

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "row 0 has 2, row 1 has 1"):
      qp.from_matrix(np.array([[1, 1, 0], [0, 0, 1]]))
    with self.assertRaisesRegex(ValueError, "2-D"):
      qp.from_matrix(np.ones(3))
    with self.assertRaisesRegex(ValueError, r"in \[0, 4\)"):
      qp.to_matrix(np.array([[0, 4]]), 4)
    with self.assertRaisesRegex(ValueError, "distinct"):
      qp.to_matrix(np.array([[1, 1]]), 4)
    with self.assertRaisesRegex(ValueError, "int array"):
      qp.to_matrix(np.array([[0.0, 1.0]]), 4)


def _exact_top_k(n, k, dtype, relevant_mk=None):
  """(recall, margin) of the moment-curve embedding for a pattern."""
  if relevant_mk is None:
    relevant_mk = qp.dense(n, k)
  scores_mn = (
      qp.moment_curve_queries(relevant_mk, n, dtype)
      @ qp.moment_curve_docs(n, k, dtype).T
  )
  assert scores_mn.dtype == dtype
  return (
      qp.top_k_recall(scores_mn, relevant_mk),
      qp.min_top_k_margin(scores_mn, relevant_mk),
  )


def _unit_query_margin(n):
  """Float64 min top-2 margin over all pairs, queries scaled to norm 1."""
  relevant_mk = qp.dense(n, 2)
  q_md = qp.moment_curve_queries(relevant_mk, n)
  q_md /= np.linalg.norm(q_md, axis=1, keepdims=True)
  return qp.min_top_k_margin(q_md @ qp.moment_curve_docs(n, 2).T, relevant_mk)


class MomentCurveTest(parameterized.TestCase):

  def test_docs(self):
    docs_nd = qp.moment_curve_docs(8, 3)
    self.assertEqual(docs_nd.shape, (8, 6))
    np.testing.assert_allclose(np.linalg.norm(docs_nd, axis=1), np.sqrt(3))
    np.testing.assert_array_equal(docs_nd[0], [1, 0, 1, 0, 1, 0])
    # Doc 2 of 8 sits at 90 degrees: (cos, sin) of 90, 180, 270.
    np.testing.assert_allclose(docs_nd[2], [0, 1, -1, 0, 0, -1], atol=1e-15)
    self.assertEqual(qp.moment_curve_docs(8, 3, np.float32).dtype, np.float32)

  def test_k2_matches_closed_form(self):
    n = 46
    relevant_mk = qp.dense(n, 2)
    w_a = np.exp(2j * np.pi * relevant_mk[:, 0] / n)
    w_b = np.exp(2j * np.pi * relevant_mk[:, 1] / n)
    s, p = w_a + w_b, w_a * w_b
    c1 = -(np.conj(s) + s * np.conj(p))
    c2 = np.conj(p)
    expected_md = -2 * np.stack([c1.real, -c1.imag, c2.real, -c2.imag], 1)
    np.testing.assert_allclose(
        qp.moment_curve_queries(relevant_mk, n), expected_md, rtol=0, atol=1e-13
    )

  @parameterized.parameters(1, 2, 3, 5)
  def test_score_is_const_minus_polynomial_modulus(self, k):
    # q . v(theta) + prod_a |e^{i theta} - w_a|^2 must not depend on theta,
    # at any angle, not just the docs' angles.
    n = 17
    relevant_mk = qp.random(n, 20, k, seed=k)
    q_md = qp.moment_curve_queries(relevant_mk, n)
    theta_t = np.random.default_rng(0).uniform(0, 2 * np.pi, 50)
    j_k = np.arange(1, k + 1)
    v_td = np.stack(
        [np.cos(theta_t[:, None] * j_k), np.sin(theta_t[:, None] * j_k)], -1
    ).reshape(50, 2 * k)
    roots_mk = np.exp(2j * np.pi * relevant_mk / n)
    modulus_mt = np.prod(
        np.abs(np.exp(1j * theta_t)[None, None, :] - roots_mk[:, :, None]) ** 2,
        axis=1,
    )
    total_mt = q_md @ v_td.T + modulus_mt
    # Both terms reach ~500 at k = 5 and cancel; float64 rounding (BLAS
    # kernels differ between CPUs) scales with them, not with the constant.
    np.testing.assert_allclose(
        total_mt - total_mt[:, :1], 0, atol=1e-13 * np.abs(modulus_mt).max()
    )
    # The constant is the sum of the squared coefficient moduli, at least
    # |p_0|^2 + |p_k|^2 = 2 for a monic polynomial with unit roots.
    self.assertTrue((total_mt[:, 0] >= 2 - 1e-12).all())

  @parameterized.product(n=(10, 46, 100), dtype=(np.float32, np.float64))
  def test_all_pairs_exact(self, n, dtype):
    recall, margin = _exact_top_k(n, 2, dtype)
    self.assertEqual(recall, 1.0)
    self.assertGreater(margin, 0.0)

  @parameterized.parameters(1, 2, 3, 4)
  def test_all_k_subsets_exact_in_2k_dims(self, k):
    # Dimension 2k realises every k-subset; k = 3 is d = 6.
    recall, margin = _exact_top_k(12, k, np.float64)
    self.assertEqual(recall, 1.0)
    self.assertGreater(margin, 0.0)

  def test_margin_shrinks_like_n_to_the_minus_4(self):
    margins = {n: _unit_query_margin(n) for n in (10, 46, 100)}
    for n, expected in ((10, 2.1e-2), (46, 4.2e-5), (100, 1.9e-6)):
      self.assertAlmostEqual(margins[n] / expected, 1.0, delta=0.1, msg=n)
    slope = math.log(margins[100] / margins[46]) / math.log(100 / 46)
    self.assertBetween(slope, -4.5, -3.5)
    # The worst set is {a, a + 2}: doc a + 1 scores |p|^2 = (2 sin(pi/n))^4
    # below the maximum, before the queries' scaling.
    relevant_mk = qp.dense(46, 2)
    scores_mn = (
        qp.moment_curve_queries(relevant_mk, 46) @ qp.moment_curve_docs(46, 2).T
    )
    self.assertAlmostEqual(
        qp.min_top_k_margin(scores_mn, relevant_mk),
        (2 * math.sin(math.pi / 46)) ** 4,
        delta=1e-12,
    )

  def test_n300_float64_exact(self):
    recall, margin = _exact_top_k(300, 2, np.float64)
    self.assertEqual(recall, 1.0)
    self.assertGreater(margin, 0.0)

  def test_n300_float32_not_exact(self):
    # The ~1e-7 margin is below float32 rounding of scores of size ~1-10.
    recall, margin = _exact_top_k(300, 2, np.float32)
    self.assertBetween(recall, 0.99, 1.0 - 1e-9)
    self.assertLessEqual(margin, 0.0)

  def test_query_errors(self):
    with self.assertRaisesRegex(ValueError, "distinct"):
      qp.moment_curve_queries(np.array([[3, 3]]), 10)
    with self.assertRaisesRegex(ValueError, r"in \[0, 10\)"):
      qp.moment_curve_queries(np.array([[3, 10]]), 10)


class MetricsTest(absltest.TestCase):

  def test_top_k_recall_known_answer(self):
    relevant_mk = np.array([[0, 1], [1, 2], [0, 3]])
    scores_mn = np.array([
        [0.9, 0.8, 0.1, 0.0],  # Both found.
        [0.9, 0.8, 0.1, 0.0],  # Doc 1 found, doc 2 not.
        [0.1, 0.9, 0.8, 0.0],  # Neither.
    ])
    self.assertAlmostEqual(qp.top_k_recall(scores_mn, relevant_mk), 3 / 6)
    # Margins: 0.8 - 0.1, 0.1 - 0.9, 0.0 - 0.9.
    self.assertAlmostEqual(qp.min_top_k_margin(scores_mn, relevant_mk), -0.9)
    self.assertAlmostEqual(
        qp.min_top_k_margin(scores_mn[:1], relevant_mk[:1]), 0.7
    )

  def test_ties_go_to_the_lowest_index(self):
    scores_mn = np.array([[1.0, 1.0, 1.0, 0.0]])
    self.assertEqual(qp.top_k_recall(scores_mn, np.array([[0, 1]])), 1.0)
    self.assertEqual(qp.top_k_recall(scores_mn, np.array([[1, 2]])), 0.5)
    # A tie is not a margin.
    self.assertEqual(qp.min_top_k_margin(scores_mn, np.array([[0, 1]])), 0.0)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "3 rows but relevant_mk has 2"):
      qp.top_k_recall(np.zeros((3, 4)), np.array([[0, 1], [1, 2]]))
    with self.assertRaisesRegex(ValueError, "needs an irrelevant doc"):
      qp.min_top_k_margin(np.zeros((1, 2)), np.array([[0, 1]]))


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class LimitSmallTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.relevant_mk, cls.doc_ids, cls.query_ids = qp.limit_qrels(
        str(test_util.LIMIT_SMALL)
    )

  def test_qrels_are_the_dense_pairs_in_corpus_order(self):
    self.assertEqual(self.relevant_mk.shape, (1000, 2))
    self.assertLen(self.doc_ids, 46)
    self.assertEqual(self.query_ids, [f"query_{i}" for i in range(1000)])
    # The corpus lists the people in the generator's order, so query i is
    # exactly the i-th lexicographic pair, no relabelling needed.
    np.testing.assert_array_equal(
        self.relevant_mk, qp.dense(num_queries=1000, k=2)
    )
    # Hence the doc degrees: 45 for docs 0..36, 38 for 37, 38 and 37 for
    # 39..45 (the 35 dropped pairs lie inside docs 37..45).
    np.testing.assert_array_equal(
        np.bincount(self.relevant_mk.ravel()), [45] * 37 + [38] * 2 + [37] * 7
    )

  def test_split_subsets_keep_corpus_indices(self):
    dev_mk, dev_docs, dev_queries = qp.limit_qrels(
        str(test_util.LIMIT_SMALL), split="dev"
    )
    self.assertEqual(dev_docs, self.doc_ids)
    self.assertEqual(dev_mk.shape, (200, 2))
    rows = dict(zip(self.query_ids, self.relevant_mk.tolist()))
    self.assertEqual(dev_mk.tolist(), [rows[q] for q in dev_queries])

  def test_moment_curve_recall_at_2_is_one(self):
    recall, margin = _exact_top_k(46, 2, np.float64, self.relevant_mk)
    self.assertEqual(recall, 1.0)
    self.assertGreater(margin, 0.0)

  def test_data_integrity(self):
    root = test_util.LIMIT_SMALL
    corpus = _read_jsonl(root / "corpus.jsonl")
    queries = _read_jsonl(root / "queries.jsonl")
    with open(root / "qrels" / "test.tsv", encoding="utf-8") as f:
      header, *lines = f.read().splitlines()
    self.assertEqual(header.split("\t"), ["query-id", "corpus-id", "score"])
    rows = [line.split("\t") for line in lines]
    self.assertLen(queries, 1000)
    self.assertLen(rows, 2000)
    self.assertEqual({score for _, _, score in rows}, {"1"})
    relevant = collections.defaultdict(set)
    for query_id, doc_id, _ in rows:
      relevant[query_id].add(doc_id)
    self.assertLen(relevant, 1000)
    self.assertTrue(all(len(docs) == 2 for docs in relevant.values()))
    self.assertLen({frozenset(docs) for docs in relevant.values()}, 1000)
    doc_texts = {d["_id"]: d["text"] for d in corpus}
    self.assertLen(doc_texts, 46)
    self.assertEqual(set().union(*relevant.values()), set(doc_texts))
    for query in queries:
      match = re.fullmatch(r"Who likes (.+)\?", query["text"])
      self.assertIsNotNone(match, query)
      for doc_id in relevant[query["_id"]]:
        self.assertIn(match.group(1), doc_texts[doc_id], query)


if __name__ == "__main__":
  absltest.main()
