"""ADC oracle tests for retrieval_jax.search.product_quantization vs faiss."""

from absl.testing import absltest
from absl.testing import parameterized
import faiss
import numpy as np

from retrieval_jax.search import product_quantization as pq
import test_util


def _faiss_pq(docs_nd, m):
  index = faiss.IndexPQ(docs_nd.shape[1], m, 8, faiss.METRIC_INNER_PRODUCT)
  index.train(docs_nd)
  index.add(docs_nd)
  return index


class ProductQuantizationTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(0)
    cls.docs_nd = rng.standard_normal((1500, 32)).astype(np.float32)
    cls.queries_qd = rng.standard_normal((12, 32)).astype(np.float32)
    cls.index = _faiss_pq(cls.docs_nd, m=8)
    cls.centroids_mks, cls.codes_nm = pq.faiss_pq_arrays(cls.index)
    # faiss' own decode of every stored code.
    cls.recon_nd = cls.index.reconstruct_n(0, cls.index.ntotal)

  def test_arrays_and_decode_match_faiss(self):
    self.assertEqual(self.centroids_mks.shape, (8, 256, 4))
    self.assertEqual(self.codes_nm.shape, (1500, 8))
    self.assertEqual(self.codes_nm.dtype, np.int32)
    np.testing.assert_array_equal(
        self.index.sa_decode(self.codes_nm.astype(np.uint8)), self.recon_nd
    )
    # Decoding copies centroid entries: bitwise equal.
    np.testing.assert_array_equal(
        pq.decode(self.centroids_mks, self.codes_nm), self.recon_nd
    )

  def test_adc_scores_equal_dot_with_reconstruction(self):
    tables_qmk = pq.adc_tables(self.queries_qd, self.centroids_mks)
    scores_qn = np.asarray(pq.adc_scores(tables_qmk, self.codes_nm))
    want_qn = self.queries_qd.astype(np.float64) @ self.recon_nd.T.astype(
        np.float64
    )
    # Two float32 orders of a 32-term sum (8 tables of 4 products).
    np.testing.assert_allclose(
        scores_qn,
        want_qn,
        rtol=test_util.FP32_RTOL,
        atol=test_util.FP32_LONG_ATOL,
    )

  @parameterized.parameters((10, 4096), (10, 333), (1, 100), (1500, 512))
  def test_adc_topk_equals_faiss_and_brute_force(self, k, chunk):
    scores_qk, ids_qk = pq.adc_topk(
        self.queries_qd, self.centroids_mks, self.codes_nm, k, chunk_size=chunk
    )
    true_qn = self.queries_qd.astype(np.float64) @ self.recon_nd.T.astype(
        np.float64
    )
    want_ids = np.argsort(-true_qn, axis=1, kind="stable")[:, :k]
    test_util.assert_same_topk(ids_qk, want_ids, true_qn, atol=1e-4)
    np.testing.assert_allclose(
        scores_qk,
        np.take_along_axis(true_qn, ids_qk, 1),
        rtol=test_util.FP32_RTOL,
        atol=test_util.FP32_LONG_ATOL,
    )
    # faiss' IndexPQ search does the same ADC.
    faiss_scores, faiss_ids = self.index.search(self.queries_qd, k)
    test_util.assert_same_topk(ids_qk, faiss_ids, true_qn, atol=1e-4)
    np.testing.assert_allclose(
        scores_qk, faiss_scores, rtol=test_util.FP32_RTOL, atol=1e-4
    )

  @parameterized.parameters(4, 6, 10)
  def test_other_code_widths_decode_like_faiss(self, nbits):
    index = faiss.IndexPQ(32, 4, nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(self.docs_nd)
    index.add(self.docs_nd[:300])
    centroids_mks, codes_nm = pq.faiss_pq_arrays(index)
    self.assertEqual(centroids_mks.shape, (4, 2**nbits, 8))
    self.assertLess(int(codes_nm.max()), 2**nbits)
    np.testing.assert_array_equal(
        pq.decode(centroids_mks, codes_nm), index.reconstruct_n(0, 300)
    )


if __name__ == "__main__":
  absltest.main()
