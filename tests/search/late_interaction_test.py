"""Tests for retrieval_jax.search.late_interaction.

Oracles: the worked example q = {e1, e2}, d = {e1, (e1+e2)/√2} ⇒ 1 + 1/√2;
s = L_q when every query vector is in the document; monotonicity in added
document tokens; invariance to document-token permutation; masked tokens
that never change s (the −∞ convention: a 0-masking implementation fails
the all-negative case); a float64 NumPy loop reference; re-ranking against
a NumPy sort; two-stage limits (depth K = full re-rank, depth 0 = first
stage) and the MaxSim counter.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.search import late_interaction as li
import test_util


def _unit(rng, *shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(q_qd, q_mask_q, d_ld, d_mask_l):
  """float64 loops over the definition; NEG for a doc with no scored row."""
  if not d_mask_l.any():
    return li.NEG
  total = 0.0
  for i in np.flatnonzero(q_mask_q):
    total += max(
        float(np.dot(q_qd[i].astype(np.float64), d_ld[j].astype(np.float64)))
        for j in np.flatnonzero(d_mask_l)
    )
  return total


def _one(q_qd, d_ld, q_mask_q=None, d_mask_l=None):
  """maxsim of one query against one document, as a Python float."""
  q_mask_q = np.ones(len(q_qd), bool) if q_mask_q is None else q_mask_q
  d_mask_l = np.ones(len(d_ld), bool) if d_mask_l is None else d_mask_l
  return float(
      li.maxsim(
          q_qd[None], q_mask_q[None], d_ld[None, None], d_mask_l[None, None]
      )[0, 0]
  )


def _corpus(rng, n=12, length=7, dim=16, lq=5, q=4):
  """Random unit vectors with random (non-empty) masks."""
  docs = _unit(rng, n, length, dim)
  d_mask = rng.random((n, length)) < 0.7
  d_mask[:, 0] = True
  queries = _unit(rng, q, lq, dim)
  q_mask = rng.random((q, lq)) < 0.8
  q_mask[:, 0] = True
  return queries, q_mask, docs, d_mask


class MaxSimTest(parameterized.TestCase):

  def test_worked_example(self):
    e1, e2 = np.eye(2, dtype=np.float32)
    q = np.stack([e1, e2])
    d = np.stack([e1, (e1 + e2) / np.sqrt(2)])
    self.assertAlmostEqual(_one(q, d), 1 + 1 / np.sqrt(2), places=5)

  def test_query_contained_in_doc_scores_lq(self):
    rng = np.random.default_rng(0)
    q = _unit(rng, 6, 32)
    d = np.concatenate([_unit(rng, 9, 32), q[::-1]])
    # Six float32 self-dots of unit vectors, each 1 to a few ulps (4.8e-7
    # seen in total); a missed token costs 1.
    self.assertAlmostEqual(_one(q, d), 6.0, delta=6 * test_util.FP32_RTOL)

  def test_adding_doc_tokens_never_decreases(self):
    rng = np.random.default_rng(1)
    q, d = _unit(rng, 5, 4, 8), _unit(rng, 5, 10, 8)
    # Candidate m of query b holds the first m + 1 tokens of document b.
    prefix_ml = np.arange(10)[None, :] <= np.arange(10)[:, None]
    d_mask_bml = np.broadcast_to(prefix_ml, (5, 10, 10))
    d_bmld = np.broadcast_to(d[:, None], (5, 10, 10, 8))
    scores_bm = np.asarray(
        li.maxsim(q, np.ones((5, 4), bool), d_bmld, d_mask_bml)
    )
    self.assertTrue(np.all(np.diff(scores_bm, axis=1) >= -1e-6), scores_bm)
    self.assertTrue(np.all(scores_bm[:, 0] < scores_bm[:, -1]))

  def test_doc_permutation_invariance(self):
    rng = np.random.default_rng(2)
    q, d = _unit(rng, 5, 8), _unit(rng, 9, 8)
    mask = rng.random(9) < 0.6
    mask[0] = True
    perm = rng.permutation(9)
    # A float32 sum of 5 maxima of size ~1 whose dot products may round
    # differently with the rows' order: 1e-5, not 5e-7.
    self.assertAlmostEqual(
        _one(q, d, d_mask_l=mask),
        _one(q, d[perm], d_mask_l=mask[perm]),
        places=5,
    )

  def test_masked_token_never_changes_score_all_negative(self):
    # Every real similarity is negative; the masked token would win any
    # max that saw it as 0 (0-masking) or as its real value (+1).
    e1, e2 = np.eye(2, dtype=np.float32)
    q = np.stack([e1, e2])
    real = np.stack([-(e1 + e2) / np.sqrt(2), -(2 * e1 + e2) / np.sqrt(5)])
    for masked in (np.zeros(2, np.float32), e1, e2):
      d = np.concatenate([real, masked[None]])
      s = _one(q, d, d_mask_l=np.array([True, True, False]))
      self.assertAlmostEqual(s, _one(q, real), places=6)
      self.assertAlmostEqual(s, -1 / np.sqrt(2) - 1 / np.sqrt(5), places=5)

  def test_query_mask_drops_rows(self):
    rng = np.random.default_rng(3)
    q, d = _unit(rng, 6, 8), _unit(rng, 5, 8)
    mask = np.array([1, 0, 1, 1, 0, 0], bool)
    self.assertAlmostEqual(
        _one(q, d, q_mask_q=mask), _one(q[mask], d), places=5
    )
    self.assertEqual(_one(q, d, q_mask_q=np.zeros(6, bool)), 0.0)

  def test_doc_without_scored_tokens_scores_neg(self):
    rng = np.random.default_rng(4)
    q, d = _unit(rng, 32, 8), _unit(rng, 5, 8)
    s = _one(q, d, d_mask_l=np.zeros(5, bool))
    # Exactly NEG (finite, no overflow from summing 32 NEG rows).
    self.assertEqual(s, np.float32(li.NEG))
    self.assertTrue(np.isfinite(s))

  def test_matches_reference_batched(self):
    rng = np.random.default_rng(5)
    queries, q_mask, docs, d_mask = _corpus(rng)
    d_mask[3] = False  # One empty document.
    cand = rng.integers(0, len(docs), (4, 6))
    got = np.asarray(li.maxsim(queries, q_mask, docs[cand], d_mask[cand]))
    want = np.array([
        [_reference(queries[b], q_mask[b], docs[c], d_mask[c]) for c in row]
        for b, row in enumerate(cand)
    ])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(None, 1, 5)
  def test_maxsim_all_equals_pairwise(self, chunk_size):
    rng = np.random.default_rng(6)
    queries, q_mask, docs, d_mask = _corpus(rng)
    d_mask[7] = False
    got = np.asarray(
        li.maxsim_all(queries, q_mask, docs, d_mask, chunk_size=chunk_size)
    )
    self.assertEqual(got.shape, (4, 12))
    want = np.array([
        [
            _reference(queries[b], q_mask[b], docs[n], d_mask[n])
            for n in range(12)
        ]
        for b in range(4)
    ])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_maxsim_all_float16_inputs(self):
    rng = np.random.default_rng(7)
    queries, q_mask, docs, d_mask = _corpus(rng)
    got = np.asarray(
        li.maxsim_all(
            queries.astype(np.float16), q_mask, docs.astype(np.float16), d_mask
        )
    )
    self.assertEqual(got.dtype, np.float32)
    want = np.asarray(li.maxsim_all(queries, q_mask, docs, d_mask))
    # Bound from the storage rounding: at most L_q * 2^-10.
    np.testing.assert_allclose(got, want, atol=5 * 2.0**-10)

  def test_gradient_chunked_equals_dense_and_skips_masked(self):
    rng = np.random.default_rng(8)
    queries, q_mask, docs, d_mask = _corpus(rng)

    def loss(q, d, chunk):
      s = li.maxsim_all(q, q_mask, d, d_mask, chunk_size=chunk)
      return jnp.sum(jax.nn.log_softmax(s, axis=-1)[:, :4])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    gq, gd = grad(queries, docs, None)
    gq5, gd5 = grad(queries, docs, 5)
    np.testing.assert_allclose(gq5, gq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gd5, gd, rtol=1e-5, atol=1e-6)
    self.assertTrue(np.all(np.asarray(gd)[~d_mask] == 0))
    self.assertTrue(np.all(np.asarray(gq)[~q_mask] == 0))
    self.assertGreater(np.abs(np.asarray(gd)[d_mask]).max(), 0)

  def test_bad_chunk_size(self):
    rng = np.random.default_rng(9)
    queries, q_mask, docs, d_mask = _corpus(rng)
    with self.assertRaisesRegex(ValueError, "chunk_size=0"):
      li.maxsim_all(queries, q_mask, docs, d_mask, chunk_size=0)


class RerankTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(10)
    self.queries, self.q_mask, self.docs, self.d_mask = _corpus(rng, q=5)
    self.dense = np.asarray(
        li.maxsim_all(self.queries, self.q_mask, self.docs, self.d_mask)
    )
    cand = np.stack([rng.permutation(12)[:8] for _ in range(5)])
    cand[1, 5:] = -1
    cand[3, 0] = -1  # An empty slot first: must still end last.
    cand[4, :] = -1
    self.cand = cand

  @parameterized.parameters(False, True)
  def test_rerank_sorts_by_maxsim_and_keeps_empty_last(self, on_device):
    docs = jnp.asarray(self.docs) if on_device else self.docs
    d_mask = jnp.asarray(self.d_mask) if on_device else self.d_mask
    scores, indices = li.rerank(
        self.queries, self.q_mask, docs, d_mask, self.cand, batch=2
    )
    for q in range(5):
      valid = self.cand[q][self.cand[q] >= 0]
      want = valid[np.argsort(-self.dense[q, valid], kind="stable")]
      n = len(valid)
      np.testing.assert_array_equal(indices[q, :n], want)
      np.testing.assert_array_equal(indices[q, n:], -1)
      np.testing.assert_allclose(
          scores[q, :n], self.dense[q, want], rtol=1e-5, atol=1e-5
      )
      self.assertTrue(np.all(np.isneginf(scores[q, n:])))
      self.assertTrue(np.all(np.diff(scores[q, :n]) <= 0))

  def test_ties_keep_input_order(self):
    # Documents 2 and 5 are identical: equal scores, input order kept.
    docs, d_mask = self.docs.copy(), self.d_mask.copy()
    docs[5], d_mask[5] = docs[2], d_mask[2]
    for cand in ([[5, 2, 0]], [[2, 0, 5]]):
      _, indices = li.rerank(
          self.queries[:1], self.q_mask[:1], docs, d_mask, np.array(cand)
      )
      order = [i for i in indices[0] if i in (2, 5)]
      self.assertEqual(order, [i for i in cand[0] if i in (2, 5)])

  def test_empty_doc_ranks_below_real_above_empty_slot(self):
    d_mask = self.d_mask.copy()
    d_mask[4] = False
    scores, indices = li.rerank(
        self.queries[:1],
        self.q_mask[:1],
        self.docs,
        d_mask,
        np.array([[-1, 4, 1]]),
    )
    np.testing.assert_array_equal(indices, [[1, 4, -1]])
    self.assertEqual(scores[0, 1], np.float32(li.NEG))

  def test_bad_candidates(self):
    with self.assertRaisesRegex(ValueError, "outside"):
      li.rerank(
          self.queries, self.q_mask, self.docs, self.d_mask, np.full((5, 2), 12)
      )
    with self.assertRaisesRegex(ValueError, "candidate rows"):
      li.rerank(
          self.queries[:2], self.q_mask[:2], self.docs, self.d_mask, self.cand
      )


class TwoStageTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(11)
    self.queries, self.q_mask, self.docs, self.d_mask = _corpus(rng, q=3)
    self.cand = np.stack([rng.permutation(12)[:10] for _ in range(3)])
    self.cand[2, 7:] = -1
    # Positive first-stage scores, deliberately not sorted.
    self.first = rng.uniform(1.0, 10.0, self.cand.shape).astype(np.float32)
    self.args = (self.queries, self.q_mask, self.docs, self.d_mask)

  def _first_stage_order(self):
    scores = np.where(self.cand >= 0, self.first, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return (
        np.take_along_axis(self.cand, order, axis=1),
        np.take_along_axis(scores, order, axis=1),
    )

  def test_full_depth_equals_rerank(self):
    scores, indices = li.rerank(*self.args, self._first_stage_order()[0])
    for depth in (None, 10, 50):
      result = li.two_stage(self.first, self.cand, *self.args, depth=depth)
      np.testing.assert_array_equal(result.indices_qk, indices)
      # float32 MaxSim; another candidate count may block the matmul
      # differently, so a few ulps rather than numpy's default 1e-7.
      np.testing.assert_allclose(result.maxsim_qk, scores, rtol=1e-6)
      self.assertEqual(result.num_maxsim, int((self.cand >= 0).sum()))
      np.testing.assert_array_equal(result.reranked_qk, indices >= 0)

  def test_depth_zero_is_first_stage(self):
    indices, scores = self._first_stage_order()
    result = li.two_stage(self.first, self.cand, *self.args, depth=0)
    np.testing.assert_array_equal(result.indices_qk, indices)
    np.testing.assert_array_equal(result.first_stage_qk, scores)
    self.assertEqual(result.num_maxsim, 0)
    self.assertFalse(result.reranked_qk.any())
    self.assertTrue(np.all(np.isneginf(result.maxsim_qk)))

  def test_partial_depth_head_reranked_tail_in_first_stage_order(self):
    indices, scores = self._first_stage_order()
    result = li.two_stage(self.first, self.cand, *self.args, depth=4)
    head_scores, head = li.rerank(*self.args, indices[:, :4])
    np.testing.assert_array_equal(result.indices_qk[:, :4], head)
    np.testing.assert_array_equal(result.indices_qk[:, 4:], indices[:, 4:])
    # float32 MaxSim over other candidate counts: a few ulps (see above).
    np.testing.assert_allclose(result.maxsim_qk[:, :4], head_scores, rtol=1e-6)
    np.testing.assert_array_equal(result.first_stage_qk[:, 4:], scores[:, 4:])
    # first_stage_qk moved with its documents.
    for q in range(3):
      lookup = dict(zip(self.cand[q].tolist(), self.first[q].tolist()))
      for i, s in zip(result.indices_qk[q, :4], result.first_stage_qk[q, :4]):
        self.assertEqual(s, np.float32(lookup[int(i)]))
    self.assertEqual(result.num_maxsim, 12)
    # The rank scores a run file gets decrease along each row.
    run = result.run_scores()
    valid = result.indices_qk >= 0
    self.assertTrue(np.all(np.diff(np.where(valid, run, -1e9), axis=1) <= 0))

  def test_prune_ratio(self):
    indices, scores = self._first_stage_order()
    ratio = 0.5
    kept = scores >= ratio * scores[:, :1]
    for drop in (True, False):
      result = li.two_stage(
          self.first, self.cand, *self.args, prune_ratio=ratio, drop_pruned=drop
      )
      self.assertEqual(result.num_maxsim, int(kept.sum()))
      for q in range(3):
        survivors = indices[q][kept[q]]
        pruned = indices[q][~kept[q] & (indices[q] >= 0)]
        _, want = li.rerank(
            self.queries[q : q + 1],
            self.q_mask[q : q + 1],
            self.docs,
            self.d_mask,
            survivors[None],
        )
        n = len(survivors)
        np.testing.assert_array_equal(result.indices_qk[q, :n], want[0])
        tail = result.indices_qk[q, n:]
        if drop:
          np.testing.assert_array_equal(tail, -1)
        else:
          np.testing.assert_array_equal(tail[: len(pruned)], pruned)
    # Ratio 0 prunes nothing; ratio 1 keeps only the top (distinct scores).
    r0 = li.two_stage(self.first, self.cand, *self.args, prune_ratio=0.0)
    self.assertEqual(r0.num_maxsim, int((self.cand >= 0).sum()))
    r1 = li.two_stage(self.first, self.cand, *self.args, prune_ratio=1.0)
    self.assertEqual(r1.num_maxsim, 3)
    np.testing.assert_array_equal(r1.indices_qk[:, 0], indices[:, 0])

  def test_prune_with_depth_counts_both_limits(self):
    indices, scores = self._first_stage_order()
    kept = scores >= 0.3 * scores[:, :1]
    result = li.two_stage(
        self.first, self.cand, *self.args, depth=3, prune_ratio=0.3
    )
    self.assertEqual(
        result.num_maxsim, int(np.minimum(kept.sum(axis=1), 3).sum())
    )

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "depth=-1"):
      li.two_stage(self.first, self.cand, *self.args, depth=-1)
    with self.assertRaisesRegex(ValueError, "prune_ratio=1.5"):
      li.two_stage(self.first, self.cand, *self.args, prune_ratio=1.5)
    with self.assertRaisesRegex(ValueError, "must both be"):
      li.two_stage(self.first[:, :3], self.cand, *self.args)


if __name__ == "__main__":
  absltest.main()
