"""Tests for retrieval_jax.search.compression (one interface, six kinds)."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from retrieval_jax.search import compression
from retrieval_jax.search import hamming
from retrieval_jax.search import product_quantization as pq
import test_util

_PARAMS = {
    "flat": {},
    "pca": {"dims": 16},
    "pq": {"m": 8},
    "sign": {"rerank_depth": 50},
    "hnsw": {"m": 16},
    "ivf_pq": {"m": 8, "nlist": 16, "nprobe": 4},
}


def _clustered(rng, n, dim, centers=20):
  """Seeded clustered vectors: what ANN indexes are built for."""
  means_cd = rng.standard_normal((centers, dim)) * 2
  return (
      means_cd[rng.integers(0, centers, n)] + rng.standard_normal((n, dim))
  ).astype(np.float32)


def _truth(queries_qd, docs_nd, k):
  scores_qn = queries_qd.astype(np.float64) @ docs_nd.T.astype(np.float64)
  return scores_qn, np.argsort(-scores_qn, axis=1, kind="stable")[:, :k]


class CompressionTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(0)
    cls.docs_nd = _clustered(rng, 2000, 32)
    cls.queries_qd = _clustered(rng, 16, 32)

  def test_flat_is_exact(self):
    index = compression.build("flat", self.docs_nd)
    scores_qk, ids_qk = index.search(self.queries_qd, 20)
    true_qn, want = _truth(self.queries_qd, self.docs_nd, 20)
    test_util.assert_same_topk(ids_qk, want, true_qn, atol=1e-4)
    self.assertEqual(ids_qk.dtype, np.int64)
    self.assertEqual(index.bytes_per_doc, 4 * 32)
    self.assertEqual(index.nbytes, 2000 * 32 * 4)

  def test_pca_scores_are_dot_products_with_the_reconstruction(self):
    index = compression.build("pca", self.docs_nd, dims=8)
    a = index.arrays
    recon_nd = a["mean_d"] + a["docs_np"] @ a["axes_pd"]
    scores_qk, ids_qk = index.search(self.queries_qd, 10)
    true_qn, want = _truth(self.queries_qd, recon_nd, 10)
    test_util.assert_same_topk(ids_qk, want, true_qn, atol=1e-3)
    np.testing.assert_allclose(
        scores_qk, np.take_along_axis(true_qn, ids_qk, 1), rtol=1e-4, atol=1e-3
    )
    # Orthonormal axes: the first principal directions of the corpus.
    np.testing.assert_allclose(
        a["axes_pd"] @ a["axes_pd"].T, np.eye(8), atol=test_util.FP32_LONG_ATOL
    )
    self.assertEqual(index.bytes_per_doc, 4 * 8)

  def test_full_rank_pca_ranks_like_flat(self):
    index = compression.build("pca", self.docs_nd, dims=32)
    _, ids_qk = index.search(self.queries_qd, 10)
    true_qn, want = _truth(self.queries_qd, self.docs_nd, 10)
    test_util.assert_same_topk(ids_qk, want, true_qn, atol=1e-3)

  def test_pq_is_adc_over_its_codes(self):
    index = compression.build("pq", self.docs_nd, m=8)
    centroids_mks, codes_nm = pq.faiss_pq_arrays(index.faiss_index())
    scores_qk, ids_qk = index.search(self.queries_qd, 10)
    want_scores, want_ids = pq.adc_topk(
        self.queries_qd, centroids_mks, codes_nm, 10
    )
    recon_nd = np.asarray(pq.decode(centroids_mks, codes_nm))
    true_qn, _ = _truth(self.queries_qd, recon_nd, 10)
    test_util.assert_same_topk(ids_qk, want_ids, true_qn, atol=1e-4)
    np.testing.assert_allclose(scores_qk, want_scores, rtol=1e-5, atol=1e-4)
    self.assertEqual(index.bytes_per_doc, 8)
    # engine "jax" searches the same codes by `adc_topk`.
    index.config["engine"] = "jax"
    np.testing.assert_array_equal(
        index.search(self.queries_qd, 10)[1], want_ids
    )

  @parameterized.parameters("uint8", "uint32")
  def test_sign_index(self, word):
    signs_nd = np.where(self.docs_nd >= 0, 1.0, -1.0)
    # Re-ranking every document: exact <q, sign d> search.
    index = compression.build(
        "sign", self.docs_nd, rerank_depth=2000, word=word
    )
    scores_qk, ids_qk = index.search(self.queries_qd, 10)
    true_qn, want = _truth(self.queries_qd, signs_nd, 10)
    test_util.assert_same_topk(ids_qk, want, true_qn, atol=1e-4)
    # No re-ranking: <sign q, sign d> = D - 2 Hamming, the Hamming order.
    index = compression.build("sign", self.docs_nd, word=word)
    scores_qk, ids_qk = index.search(self.queries_qd, 10)
    dist_qk, want_ids = hamming.hamming_topk_np(
        hamming.pack_signs(self.queries_qd, word), index.arrays["codes_nw"], 10
    )
    np.testing.assert_array_equal(ids_qk, want_ids)
    np.testing.assert_array_equal(scores_qk, 32 - 2 * dist_qk)
    self.assertEqual(index.bytes_per_doc, 4)

  def test_ann_indexes_recall_exact_neighbours(self):
    _, want = _truth(self.queries_qd, self.docs_nd, 10)
    for kind, floor in (("hnsw", 0.95), ("ivf_pq", 0.5)):
      index = compression.build(kind, self.docs_nd, **_PARAMS[kind])
      _, ids_qk = index.search(self.queries_qd, 10)
      recall = np.mean(
          [len(set(a) & set(b)) / 10 for a, b in zip(ids_qk, want)]
      )
      self.assertGreaterEqual(recall, floor, kind)
    self.assertEqual(index.bytes_per_doc, 8 + 8)
    # faiss alone would pad with -1 when efSearch < k.
    index = compression.build("hnsw", self.docs_nd, m=8, ef_search=4)
    _, ids_qk = index.search(self.queries_qd, 300)
    self.assertTrue(np.all(ids_qk >= 0))

  @parameterized.parameters(*_PARAMS)
  def test_save_load_round_trip(self, kind):
    index = compression.build(
        kind, self.docs_nd, metric="cosine", **_PARAMS[kind]
    )
    directory = self.create_tempdir().full_path
    index.save(directory)
    loaded = compression.load(directory)
    self.assertIsInstance(loaded, compression.INDEXES[kind])
    self.assertEqual(loaded.config, index.config)
    self.assertEqual(loaded.nbytes, index.nbytes)
    want = index.search(self.queries_qd, 7)
    got = loaded.search(self.queries_qd, 7)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])

  @parameterized.parameters("flat", "sign", "pq")
  def test_cosine_ignores_vector_lengths(self, kind):
    scale_n1 = np.random.default_rng(1).uniform(0.5, 3, (2000, 1))
    a = compression.build(kind, self.docs_nd, metric="cosine", **_PARAMS[kind])
    b = compression.build(
        kind, self.docs_nd * scale_n1, metric="cosine", **_PARAMS[kind]
    )
    _, ids_a = a.search(self.queries_qd, 5)
    _, ids_b = b.search(3 * self.queries_qd, 5)
    # Normalised inputs differ by rounding only: same neighbours.
    agree = np.mean(ids_a == ids_b)
    self.assertGreaterEqual(agree, 0.95)

  def test_rejects_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "unknown index kind"):
      compression.build("lsh", self.docs_nd)
    with self.assertRaisesRegex(ValueError, "unknown parameters"):
      compression.build("pca", self.docs_nd, dim=3)
    with self.assertRaisesRegex(ValueError, "metric"):
      compression.build("flat", self.docs_nd, metric="l2")
    index = compression.build("flat", self.docs_nd)
    with self.assertRaisesRegex(ValueError, "k=2001"):
      index.search(self.queries_qd, 2001)
    with self.assertRaisesRegex(ValueError, r"\[Q, 32\]"):
      index.search(self.queries_qd[:, :5], 3)


if __name__ == "__main__":
  absltest.main()
