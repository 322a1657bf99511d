"""Tests for retrieval_jax.search.fusion.

Oracles: known answers for normalisation ([1, 2, 3] -> [-1/2, 0, 1/2]),
missing-document filling and RRF on hand examples; alpha = 0 reproduces the
dense ranking on the union; with normalisation the fused run is invariant to
positive affine rescaling of either system; parity with a literal
raw-min-fill-then-normalise reference of the hybrid formula.
"""

import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from retrieval_jax.search import fusion


def _random_runs(seed, num_queries=4):
  """Dense and sparse runs whose doc sets overlap partly."""
  rng = np.random.default_rng(seed)
  dense, sparse = {}, {}
  for q in range(num_queries):
    docs = [f"d{i}" for i in rng.permutation(30)]
    dense[f"q{q}"] = {d: float(rng.normal()) for d in docs[:15]}
    sparse[f"q{q}"] = {d: float(rng.gamma(2.0) * 5) for d in docs[8:25]}
  return dense, sparse


def _reference_hybrid(dense, sparse, alpha, normalization, weight_on_dense):
  """Fill with the raw minimum first, then normalise with raw min/max."""

  def norm(x, xs):
    xs = np.asarray(list(xs))
    if normalization == "minmax_center":
      return (x - (xs.min() + xs.max()) / 2) / (xs.max() - xs.min())
    if normalization == "zscore":
      return (x - xs.mean()) / xs.std()
    return x

  out = {}
  for doc in set(dense) | set(sparse):
    s = norm(sparse.get(doc, min(sparse.values())), sparse.values())
    d = norm(dense.get(doc, min(dense.values())), dense.values())
    out[doc] = s + alpha * d if weight_on_dense else alpha * s + d
  return out


class NormalizeTest(parameterized.TestCase):

  def test_minmax_center_known_answer(self):
    out = fusion.normalize_scores(
        {"a": 1.0, "b": 2.0, "c": 3.0}, "minmax_center"
    )
    self.assertEqual(out, {"a": -0.5, "b": 0.0, "c": 0.5})

  def test_zscore_known_answer(self):
    out = fusion.normalize_scores({"a": 1.0, "b": 2.0, "c": 3.0}, "zscore")
    z = math.sqrt(1.5)  # (x - 2) / sqrt(2/3)
    np.testing.assert_allclose(
        [out["a"], out["b"], out["c"]], [-z, 0, z], rtol=1e-12
    )

  @parameterized.parameters("minmax_center", "zscore")
  def test_constant_list_maps_to_zero(self, method):
    self.assertEqual(
        fusion.normalize_scores({"a": 4.0, "b": 4.0}, method),
        {"a": 0.0, "b": 0.0},
    )
    self.assertEqual(fusion.normalize_scores({"a": -2.0}, method), {"a": 0.0})
    self.assertEqual(fusion.normalize_scores({}, method), {})

  def test_none_is_identity(self):
    scores = {"x": 3.5, "y": -1.0}
    self.assertEqual(fusion.normalize_scores(scores, "none"), scores)

  def test_bad_method_raises_naming_it(self):
    with self.assertRaisesRegex(ValueError, "'l2'"):
      fusion.normalize_scores({"a": 1.0}, "l2")
    with self.assertRaisesRegex(ValueError, "'bogus'"):
      fusion.interpolate({}, {}, normalization="bogus")


class InterpolateTest(parameterized.TestCase):

  def test_missing_docs_take_the_list_minimum(self):
    dense = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    sparse = {"q": {"b": 10.0, "d": 4.0}}
    out = fusion.interpolate(dense, sparse, alpha=0.5)
    # a: 0.5 * 4 + 3, b: 0.5 * 10 + 2, c: 0.5 * 4 + 1, d: 0.5 * 4 + 1; the
    # c/d tie is broken by doc id descending.
    self.assertEqual(
        list(out["q"].items()), [("b", 7.0), ("a", 5.0), ("d", 3.0), ("c", 3.0)]
    )

  def test_missing_docs_with_normalisation_and_weight_on_dense(self):
    dense = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    sparse = {"q": {"b": 10.0, "d": 4.0}}
    out = fusion.interpolate(
        dense,
        sparse,
        alpha=0.5,
        normalization="minmax_center",
        weight_on_dense=True,
    )
    # Normalised dense a .5, b 0, c -.5 (min -.5); sparse b .5, d -.5.
    self.assertEqual(
        list(out["q"].items()),
        [("b", 0.5), ("a", -0.25), ("d", -0.75), ("c", -0.75)],
    )

  @parameterized.product(
      normalization=["none", "minmax_center", "zscore"],
      weight_on_dense=[False, True],
  )
  def test_matches_fill_then_normalise_reference(
      self, normalization, weight_on_dense
  ):
    dense, sparse = _random_runs(0)
    out = fusion.interpolate(
        dense,
        sparse,
        alpha=0.3,
        normalization=normalization,
        weight_on_dense=weight_on_dense,
    )
    for qid in dense:
      ref = _reference_hybrid(
          dense[qid], sparse[qid], 0.3, normalization, weight_on_dense
      )
      self.assertEqual(set(out[qid]), set(ref))
      for doc, score in out[qid].items():
        self.assertAlmostEqual(score, ref[doc], places=12)
      scores = list(out[qid].values())
      self.assertEqual(scores, sorted(scores, reverse=True))

  def test_alpha_zero_reproduces_dense_ranking_on_union(self):
    dense, sparse = _random_runs(1)
    out = fusion.interpolate(dense, sparse, alpha=0.0)
    for qid, dense_q in dense.items():
      dense_order = sorted(dense_q, key=dense_q.get, reverse=True)
      fused = list(out[qid])
      self.assertEqual(set(fused), set(dense_q) | set(sparse[qid]))
      self.assertEqual([d for d in fused if d in dense_q], dense_order)
      # Sparse-only documents sit at the dense minimum, below every dense
      # document with a larger score.
      lowest = min(dense_q.values())
      for doc in set(sparse[qid]) - set(dense_q):
        self.assertEqual(out[qid][doc], lowest)
      self.assertEqual(fused[: len(dense_q) - 1], dense_order[:-1])

  @parameterized.product(
      normalization=["minmax_center", "zscore"], weight_on_dense=[False, True]
  )
  def test_invariant_to_positive_affine_rescaling(
      self, normalization, weight_on_dense
  ):
    dense, sparse = _random_runs(2)
    kwargs = dict(
        alpha=0.7,
        normalization=normalization,
        weight_on_dense=weight_on_dense,
        k=20,
    )
    base = fusion.interpolate(dense, sparse, **kwargs)
    dense2 = {
        q: {d: 3.0 * s + 7.0 for d, s in ds.items()} for q, ds in dense.items()
    }
    sparse2 = {
        q: {d: 0.25 * s - 2.0 for d, s in ds.items()}
        for q, ds in sparse.items()
    }
    for d_run, s_run in ((dense2, sparse), (dense, sparse2), (dense2, sparse2)):
      out = fusion.interpolate(d_run, s_run, **kwargs)
      for qid in base:
        self.assertEqual(list(out[qid]), list(base[qid]))
        np.testing.assert_allclose(
            list(out[qid].values()), list(base[qid].values()), atol=1e-12
        )
    # Without normalisation the same rescaling does change the run.
    raw = dict(kwargs, normalization="none")
    self.assertNotEqual(
        [list(v) for v in fusion.interpolate(dense, sparse, **raw).values()],
        [list(v) for v in fusion.interpolate(dense2, sparse, **raw).values()],
    )

  def test_top_k_and_single_run_queries(self):
    dense = {"q1": {"a": 1.0, "b": 3.0, "c": 2.0}, "q2": {"x": 5.0, "y": 9.0}}
    sparse = {"q1": {"a": 1.0}, "q3": {"u": 1.0, "v": 2.0}, "q2": {}}
    out = fusion.interpolate(dense, sparse, alpha=0.5, k=2)
    self.assertEqual(list(out), ["q1", "q2", "q3"])
    self.assertEqual(list(out["q1"]), ["b", "c"])
    # Only one system: its ranking, with its weight (1 dense, alpha sparse).
    self.assertEqual(out["q2"], {"y": 9.0, "x": 5.0})
    self.assertEqual(list(out["q3"].items()), [("v", 1.0), ("u", 0.5)])

  def test_inputs_untouched_and_k_checked(self):
    dense, sparse = _random_runs(3, num_queries=1)
    copies = (
        {q: dict(v) for q, v in dense.items()},
        {q: dict(v) for q, v in sparse.items()},
    )
    fusion.interpolate(dense, sparse, normalization="zscore")
    self.assertEqual((dense, sparse), copies)
    with self.assertRaisesRegex(ValueError, "k must"):
      fusion.interpolate(dense, sparse, k=0)


class ReciprocalRankFusionTest(absltest.TestCase):

  def test_known_answer(self):
    run1 = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    run2 = {"q": {"c": 5.0, "a": 4.0, "d": 1.0}}
    out = fusion.reciprocal_rank_fusion([run1, run2], k=60)
    self.assertEqual(
        list(out["q"].items()),
        [
            ("a", 1 / 61 + 1 / 62),
            ("c", 1 / 63 + 1 / 61),
            ("b", 1 / 62),
            ("d", 1 / 63),
        ],
    )

  def test_tied_scores_rank_by_doc_id_descending(self):
    run = {"q": {"x": 1.0, "y": 1.0, "z": 0.5}}
    out = fusion.reciprocal_rank_fusion([run], k=0)
    self.assertEqual(out["q"], {"y": 1.0, "x": 0.5, "z": 1 / 3})
    # Mirrored ranks give bit-identical sums; the tie then goes by doc id.
    out = fusion.reciprocal_rank_fusion(
        [{"q": {"a": 2.0, "b": 1.0}}, {"q": {"b": 2.0, "a": 1.0}}]
    )
    self.assertEqual(list(out["q"]), ["b", "a"])
    self.assertEqual(out["q"]["a"], out["q"]["b"])

  def test_depth_and_queries_of_any_run(self):
    run1 = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}}
    run2 = {"q1": {"c": 1.0}, "q2": {"e": 1.0, "f": 0.0}}
    out = fusion.reciprocal_rank_fusion([run1, run2], k=1, depth=1)
    self.assertEqual(out, {"q1": {"a": 0.5, "c": 0.5}, "q2": {"e": 0.5}})
    self.assertEqual(list(out["q1"]), ["c", "a"])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "runs"):
      fusion.reciprocal_rank_fusion([])
    with self.assertRaisesRegex(ValueError, "-1"):
      fusion.reciprocal_rank_fusion([{}], k=-1)
    with self.assertRaisesRegex(ValueError, "depth"):
      fusion.reciprocal_rank_fusion([{}], depth=0)


if __name__ == "__main__":
  absltest.main()
