"""Oracle tests for retrieval_jax.search.hamming (packed codes, BPR search)."""

from absl.testing import absltest
from absl.testing import parameterized
import faiss
import numpy as np

from retrieval_jax.search import chunked
from retrieval_jax.search import hamming


def _random_signs(rng, shape):
  """Normal floats with exact zeros mixed in (zero must pack as bit 1)."""
  x = rng.standard_normal(shape).astype(np.float32)
  x[rng.random(shape) < 0.05] = 0.0
  return x


def _brute_force(queries_qd, docs_nd, k):
  """Distances counted on unpacked bits; stable sort = smaller index first."""
  dist_qn = ((queries_qd[:, None, :] >= 0) != (docs_nd[None, :, :] >= 0)).sum(
      axis=-1
  )
  order_qk = np.argsort(dist_qn, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(dist_qn, order_qk, axis=1), order_qk, dist_qn


class HammingTest(parameterized.TestCase):

  @parameterized.product(dim=(384, 100, 33, 8), word=("uint8", "uint32"))
  def test_packed_distance_equals_unpacked_count(self, dim, word):
    rng = np.random.default_rng(dim)
    a_qd, b_nd = _random_signs(rng, (7, dim)), _random_signs(rng, (50, dim))
    want_qn = _brute_force(a_qd, b_nd, 1)[2]
    a_qw, b_nw = hamming.pack_signs(a_qd, word), hamming.pack_signs(b_nd, word)
    bits = 8 if word == "uint8" else 32
    self.assertEqual(a_qw.dtype, np.dtype(word))
    self.assertEqual(a_qw.shape, (7, -(-dim // bits)))
    np.testing.assert_array_equal(
        hamming.hamming_distance_np(a_qw, b_nw), want_qn
    )
    np.testing.assert_array_equal(hamming.hamming_distance(a_qw, b_nw), want_qn)
    # ±1 codes: <a, b> = D - 2 Hamming(a, b), and unpacking inverts packing.
    sa_qd, sb_nd = hamming.unpack_signs(a_qw, dim), hamming.unpack_signs(
        b_nw, dim
    )
    np.testing.assert_array_equal(sa_qd, np.where(a_qd >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(sa_qd @ sb_nd.T, dim - 2 * want_qn)

  def test_uint8_and_uint32_words_hold_the_same_bits(self):
    x_nd = _random_signs(np.random.default_rng(1), (5, 70))
    bytes_nb = hamming.pack_signs(x_nd, "uint8")
    words_nw = hamming.pack_signs(x_nd, "uint32")
    # Read back as little-endian bytes, the words are the zero-padded bytes.
    as_bytes = words_nw.astype("<u4").view(np.uint8)
    np.testing.assert_array_equal(as_bytes[:, : bytes_nb.shape[1]], bytes_nb)
    np.testing.assert_array_equal(as_bytes[:, bytes_nb.shape[1] :], 0)

  @parameterized.named_parameters(
      # dim 12: only 13 distinct distances over 600 docs, ties everywhere.
      ("many_ties", 600, 12, 25, 128),
      ("ragged_chunks", 1003, 64, 10, 100),
      ("k1", 300, 40, 1, 64),
      ("k_equals_n", 97, 24, 97, 32),
      ("one_chunk", 500, 256, 50, 4096),
  )
  def test_topk_equals_brute_force(self, n, dim, k, chunk):
    rng = np.random.default_rng(n + dim)
    queries_qd, docs_nd = _random_signs(rng, (9, dim)), _random_signs(
        rng, (n, dim)
    )
    want_dist, want_ids, _ = _brute_force(queries_qd, docs_nd, k)
    for word in ("uint8", "uint32"):
      q_qw = hamming.pack_signs(queries_qd, word)
      d_nw = hamming.pack_signs(docs_nd, word)
      for name, fn in (
          ("jax", hamming.hamming_topk),
          ("numpy", hamming.hamming_topk_np),
      ):
        dist_qk, ids_qk = fn(q_qw, d_nw, k, chunk_size=chunk)
        # Integer distances and the index tie-break: exactly equal.
        np.testing.assert_array_equal(dist_qk, want_dist, f"{name} {word}")
        np.testing.assert_array_equal(ids_qk, want_ids, f"{name} {word}")
      # Rows laid out on device once (what an index keeps): same answer.
      chunks = chunked.chunk_rows(d_nw, chunk)
      np.testing.assert_array_equal(
          hamming.hamming_topk(q_qw, chunks, k)[1], want_ids
      )

  def test_distances_match_faiss_binary_flat(self):
    rng = np.random.default_rng(3)
    queries_qd, docs_nd = _random_signs(rng, (6, 128)), _random_signs(
        rng, (800, 128)
    )
    q_qb, d_nb = hamming.pack_signs(queries_qd), hamming.pack_signs(docs_nd)
    index = faiss.IndexBinaryFlat(128)
    index.add(d_nb)
    want_dist, _ = index.search(q_qb, 20)
    dist_qk, _ = hamming.hamming_topk(q_qb, d_nb, 20)
    # faiss breaks ties its own way: compare the distances only.
    np.testing.assert_array_equal(dist_qk, want_dist)

  def test_recall_of_hamming_stage_equals_brute_force(self):
    rng = np.random.default_rng(4)
    n, dim, k = 2000, 48, 100
    queries_qd, docs_nd = _random_signs(rng, (20, dim)), _random_signs(
        rng, (n, dim)
    )
    relevant = [
        set(rng.choice(n, 30, replace=False).tolist()) for _ in range(20)
    ]

    def recall(ids_qk):
      return np.mean([
          len(rel & set(ids.tolist())) / len(rel)
          for rel, ids in zip(relevant, ids_qk)
      ])

    _, want_ids, _ = _brute_force(queries_qd, docs_nd, k)
    _, ids_qk = hamming.hamming_topk(
        hamming.pack_signs(queries_qd),
        hamming.pack_signs(docs_nd),
        k,
        chunk_size=300,
    )
    self.assertEqual(recall(ids_qk), recall(want_ids))
    self.assertGreater(recall(want_ids), 0.0)

  @parameterized.parameters("uint8", "uint32")
  def test_rerank_scores_candidates_with_the_float_query(self, word):
    rng = np.random.default_rng(5)
    dim, n, c, k = 40, 300, 50, 10
    # Queries on a 1/8 grid: every <q, ±1> sum is exact in float32.
    queries_qd = (
        np.round(rng.standard_normal((8, dim)) * 8).astype(np.float32) / 8
    )
    docs_nd = _random_signs(rng, (n, dim))
    codes_nw = hamming.pack_signs(docs_nd, word)
    _, cand_qc = hamming.hamming_topk(
        hamming.pack_signs(queries_qd, word), codes_nw, c
    )
    scores_qk, ids_qk = hamming.rerank(
        queries_qd, codes_nw, cand_qc, k, dim=dim
    )
    signs_nd = np.where(docs_nd >= 0, 1.0, -1.0)
    cand_scores_qc = np.einsum("qd,qcd->qc", queries_qd, signs_nd[cand_qc])
    # Ties keep the Hamming order: a stable sort of the candidates.
    order_qk = np.argsort(-cand_scores_qc, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(
        ids_qk, np.take_along_axis(cand_qc, order_qk, 1)
    )
    np.testing.assert_array_equal(
        scores_qk, np.take_along_axis(cand_scores_qc, order_qk, 1)
    )

  def test_rejects_bad_arguments(self):
    codes = hamming.pack_signs(np.ones((4, 8)))
    with self.assertRaisesRegex(ValueError, "k=5"):
      hamming.hamming_topk(codes, codes, 5)
    with self.assertRaisesRegex(ValueError, "k=0"):
      hamming.hamming_topk_np(codes, codes, 0)
    with self.assertRaisesRegex(ValueError, "word"):
      hamming.pack_signs(np.ones((1, 8)), "uint16")


if __name__ == "__main__":
  absltest.main()
