"""Tests for retrieval_jax.search.sparse_index.

Oracles: a dense float64 NumPy ranking (Q @ D.T, stable argsort, zero scores
dropped) on problems whose weights lie on a 1/8 grid, so float32 sums are
exact and any disagreement is a bug; hand-built ties; an independent
per-row top-t reference for pruning; build paths that must agree (batched,
one-shot, from_rows, JAX input); save/load round trips.
"""

import os

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from retrieval_jax.evaluation import trec_run
from retrieval_jax.search import sparse_index as si


def _grid_sparse(rng, rows, vocab, nnz, pool):
  """[rows, vocab] float32, ~nnz weights per row in {1/8, ..., 2}.

  Term ids come from the first `pool` ids so rows overlap often and equal
  scores occur.
  """
  w = np.zeros((rows, vocab), np.float32)
  for r in range(rows):
    cols = rng.choice(pool, size=nnz, replace=False)
    w[r, cols] = rng.integers(1, 17, size=nnz) / 8
  return w


def _reference(q_qv, d_nv, k):
  """Dense float64 top-k: stable sort (smaller index first), zeros dropped."""
  s_qn = q_qv.astype(np.float64) @ d_nv.astype(np.float64).T
  scores = np.full((s_qn.shape[0], k), -np.inf)
  indices = np.full((s_qn.shape[0], k), -1)
  for q, row in enumerate(s_qn):
    order = np.argsort(-row, kind="stable")
    order = order[row[order] > 0][:k]
    scores[q, : order.size] = row[order]
    indices[q, : order.size] = order
  return scores, indices


def _same_index(a, b):
  for x, y in (
      (a.docs_nv.data, b.docs_nv.data),
      (a.docs_nv.indices, b.docs_nv.indices),
      (a.docs_nv.indptr, b.docs_nv.indptr),
  ):
    np.testing.assert_array_equal(x, y)
  assert (a.num_docs, a.vocab_size) == (b.num_docs, b.vocab_size)


class SearchTest(parameterized.TestCase):

  @parameterized.parameters(
      (1, 1 << 22), (10, 1 << 22), (10, 50), (400, 1), (1000, 1 << 22)
  )
  def test_matches_dense_reference(self, k, max_block_entries):
    rng = np.random.default_rng(k)
    d_nv = _grid_sparse(rng, 400, 1000, 12, pool=200)
    q_qv = _grid_sparse(rng, 30, 1000, 4, pool=250)
    index = si.from_dense_batches([d_nv], vocab_size=1000)
    scores_qk, indices_qk = si.search(
        index, si.to_sparse_rows(q_qv), k, max_block_entries=max_block_entries
    )
    ref_scores, ref_indices = _reference(q_qv, d_nv, k)
    self.assertEqual(scores_qk.dtype, np.float32)
    self.assertEqual(indices_qk.dtype, np.int64)
    np.testing.assert_array_equal(indices_qk, ref_indices)
    np.testing.assert_array_equal(scores_qk, ref_scores)
    # The problem really has unmatched docs and tied positive scores.
    s_qn = q_qv.astype(np.float64) @ d_nv.T
    self.assertTrue((s_qn == 0).any())
    self.assertTrue(any(np.unique(r[r > 0]).size < (r > 0).sum() for r in s_qn))

  def test_ties_by_smaller_index(self):
    # Docs 1, 3 and 4 tie at 2.0 below doc 2 (3.0); doc 0 shares nothing.
    index = si.from_rows(
        [[7], [1], [1, 2], [2], [1]],
        [[5.0], [2.0], [1.0, 1.0], [1.0], [2.0]],
        vocab_size=8,
    )
    q = sp.csr_matrix(np.array([[0, 1, 2, 0, 0, 0, 0, 0]], np.float32))
    scores, indices = si.search(index, q, 3)
    np.testing.assert_array_equal(indices, [[2, 1, 3]])
    np.testing.assert_array_equal(scores, [[3.0, 2.0, 2.0]])
    scores, indices = si.search(index, q, 6)
    np.testing.assert_array_equal(indices, [[2, 1, 3, 4, -1, -1]])
    np.testing.assert_array_equal(
        scores, [[3.0, 2.0, 2.0, 2.0, -np.inf, -np.inf]]
    )

  def test_zero_score_docs_excluded_and_padding(self):
    # Doc 3's only shared term with the 4th query scores 1e-30 * 1e-30,
    # which underflows to 0 in float32: no evidence, so not returned.
    index = si.from_rows(
        [[0], [1], [0, 2], [3, 4]],
        [[1.0], [1.0], [0.5, 1.0], [1.0, 1e-30]],
        vocab_size=6,
    )
    q = si.to_sparse_rows(
        np.array(
            [
                [1, 0, 0, 0, 0, 0],  # docs 0 and 2 only
                [0, 0, 0, 0, 0, 3],  # term 5: no document has it
                [0, 0, 0, 0, 0, 0],  # empty query
                [0, 0, 0, 0, 1e-30, 0],
            ],
            np.float32,
        )
    )
    scores, indices = si.search(index, q, 3)
    np.testing.assert_array_equal(indices, [[0, 2, -1]] + [[-1] * 3] * 3)
    np.testing.assert_array_equal(scores[0], [1.0, 0.5, -np.inf])
    self.assertTrue(np.all(np.isneginf(scores[1:])))
    # The padding is what the TREC run builder skips.
    run = trec_run.run_from_topk(
        ["a", "b", "c", "d"], ["d0", "d1", "d2", "d3"], scores, indices
    )
    self.assertEqual(
        run, {"a": {"d0": 1.0, "d2": 0.5}, "b": {}, "c": {}, "d": {}}
    )

  def test_bad_queries_and_k(self):
    index = si.from_rows([[0, 1]], [[1.0, 2.0]], vocab_size=4)
    good = sp.csr_matrix(np.ones((2, 4), np.float32))
    for queries, k in (
        (sp.csr_matrix(np.ones((2, 5), np.float32)), 1),
        (np.ones((2, 4), np.float32), 1),
        (sp.csr_matrix(-np.ones((2, 4), np.float32)), 1),
        (good, 0),
    ):
      with self.subTest(k=k, queries=type(queries).__name__):
        with self.assertRaises(ValueError):
          si.search(index, queries, k)


class BuildTest(parameterized.TestCase):

  def test_threshold_keeps_strictly_greater(self):
    rng = np.random.default_rng(0)
    w = (rng.integers(0, 5, size=(6, 20)) / 4).astype(np.float32)
    for threshold in (0.0, 0.5, 1.0):
      got = si.to_sparse_rows(w, threshold)
      np.testing.assert_array_equal(
          got.toarray(), np.where(w > threshold, w, 0)
      )
      self.assertEqual(got.nnz, int((w > threshold).sum()))
      index = si.from_dense_batches([w], vocab_size=20, threshold=threshold)
      np.testing.assert_array_equal(
          index.docs_nv.toarray(), np.where(w > threshold, w, 0)
      )

  @parameterized.parameters((1, 0.0), (3, 0.0), (3, 0.5), (25, 0.0))
  def test_top_terms_keeps_t_largest(self, t, threshold):
    rng = np.random.default_rng(t)
    # Coarse values: many ties, so the tie rule (smaller term id) matters.
    w = (rng.integers(0, 4, size=(20, 30)) / 2).astype(np.float32)
    index = si.from_dense_batches(
        [w[:7], w[7:]], vocab_size=30, threshold=threshold, top_terms=t
    )
    got = index.docs_nv.toarray()
    for r in range(20):
      order = np.lexsort((np.arange(30), -w[r]))  # weight desc, id asc
      order = order[w[r, order] > threshold][:t]
      expected = np.zeros(30, np.float32)
      expected[order] = w[r, order]
      np.testing.assert_array_equal(got[r], expected, err_msg=f"row {r}")

  def test_incremental_equals_one_shot(self):
    rng = np.random.default_rng(1)
    w = _grid_sparse(rng, 15, 40, 6, pool=40)
    one_shot = si.from_dense_batches([w], vocab_size=40)
    batches = [w[:3], w[3:3], jnp.asarray(w[3:10]), w[10:].astype(np.float64)]
    _same_index(si.from_dense_batches(iter(batches), vocab_size=40), one_shot)
    rows = [np.flatnonzero(r)[::-1] for r in w]  # unsorted ids are fine
    _same_index(
        si.from_rows(rows, [r[i] for r, i in zip(w, rows)], 40), one_shot
    )
    np.testing.assert_array_equal(one_shot.docs_nv.toarray(), w)
    self.assertEqual(one_shot.docs_nv.format, "csc")

  def test_stats(self):
    index = si.from_rows([[0, 3], [1], []], [[1.0, 2.0], [0.5], []], 10)
    m = index.docs_nv
    expected_bytes = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
    self.assertEqual(si.index_size_bytes(index), expected_bytes)
    self.assertEqual(
        si.stats(index),
        {
            "num_docs": 3,
            "vocab_size": 10,
            "nnz": 3,
            "avg_terms_per_doc": 1.0,
            "bytes": expected_bytes,
        },
    )

  def test_bad_inputs(self):
    cases = {
        "1-D batch": lambda: si.from_dense_batches([np.ones(4)], vocab_size=4),
        "wrong width": lambda: si.from_dense_batches(
            [np.ones((2, 5))], vocab_size=4
        ),
        "vocab 0": lambda: si.from_dense_batches([], vocab_size=0),
        "negative threshold": lambda: si.to_sparse_rows(np.ones((1, 3)), -0.1),
        "nan": lambda: si.to_sparse_rows(np.full((1, 3), np.nan)),
        "top_terms < 0": lambda: si.from_dense_batches(
            [np.ones((1, 3))], vocab_size=3, top_terms=-1
        ),
        "id out of range": lambda: si.from_rows([[4]], [[1.0]], 4),
        "repeated id": lambda: si.from_rows([[1, 2, 1]], [[1, 1, 1]], 4),
        "length mismatch": lambda: si.from_rows([[1, 2]], [[1.0]], 4),
        "list mismatch": lambda: si.from_rows([[1]], [], 4),
        "negative weight": lambda: si.from_rows([[1]], [[-1.0]], 4),
    }
    for name, build in cases.items():
      with self.subTest(name):
        with self.assertRaises(ValueError):
          build()


class SaveLoadTest(absltest.TestCase):

  def test_round_trip(self):
    rng = np.random.default_rng(2)
    w = _grid_sparse(rng, 50, 64, 5, pool=64)
    index = si.from_dense_batches([w], vocab_size=64)
    directory = self.create_tempdir().full_path
    path = os.path.join(directory, "docs.index")
    si.save(index, path)
    si.save(index, path)  # overwrite in place
    self.assertEqual(os.listdir(directory), ["docs.index"])  # no temp left
    loaded = si.load(path)
    _same_index(loaded, index)
    q = si.to_sparse_rows(w[:5])
    for a, b in zip(si.search(loaded, q, 7), si.search(index, q, 7)):
      np.testing.assert_array_equal(a, b)

  def test_wrong_files(self):
    directory = self.create_tempdir().full_path
    text = os.path.join(directory, "notes.txt")
    with open(text, "w") as f:
      f.write("not an index\n")
    other = os.path.join(directory, "other.npz")
    np.savez(other, x=np.arange(3))
    stale = os.path.join(directory, "stale.npz")
    index = si.from_rows([[0]], [[1.0]], 2)
    si.save(index, stale)
    with np.load(stale) as f:
      arrays = dict(f)
    arrays["format_version"] = np.array(si.FORMAT_VERSION + 1)
    with open(stale, "wb") as f:
      np.savez(f, **arrays)
    for path, message in (
        (text, "not a saved SparseIndex"),
        (other, "missing arrays"),
        (stale, "format version"),
    ):
      with self.subTest(path):
        with self.assertRaisesRegex(ValueError, message) as cm:
          si.load(path)
        self.assertIn(path, str(cm.exception))
    with self.assertRaises(FileNotFoundError):
      si.load(os.path.join(directory, "absent.npz"))


if __name__ == "__main__":
  absltest.main()
