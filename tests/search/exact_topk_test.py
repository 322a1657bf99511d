"""Tests for retrieval_jax.search.exact_topk on 8 fake CPU devices."""

from absl.testing import absltest
from absl.testing import parameterized
import faiss
import jax
from jax import monitoring
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.search import exact_topk as et
import test_util


def _reference(queries_qd, corpus_nd, k):
  """Brute force in float64; stable argsort = smaller index first on ties."""
  scores_qn = queries_qd.astype(np.float64) @ corpus_nd.astype(np.float64).T
  order_qk = np.argsort(-scores_qn, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores_qn, order_qk, axis=1), order_qk


def _grid(rng, shape):
  """Normal-ish values on a 1/8 grid: float32 products and sums are exact.

  Every score is then the exact float64 value, so the reference ranking is
  the true one and any disagreement is a bug, not rounding.
  """
  return (
      np.clip(np.round(rng.standard_normal(shape) * 8), -24, 24) / 8
  ).astype(np.float32)


def _normalize(x_nd):
  x_nd = x_nd.astype(np.float64)
  return x_nd / np.linalg.norm(x_nd, axis=1, keepdims=True)


def _mesh(num_devices):
  return sharding.make_mesh(devices=jax.devices()[:num_devices])


class ExactTopkTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertLen(jax.devices(), 8)

  @parameterized.named_parameters(
      # N divisible by neither the chunk nor the device count.
      ("ragged_8dev", 1003, 10, 128, 32, 8),
      ("ragged_1dev", 1003, 10, 128, 32, 1),
      ("k1", 777, 1, 128, 32, 8),
      ("k_equals_n", 300, 300, 128, 32, 8),
      ("k_equals_n_1dev", 300, 300, 128, 32, 1),
      ("plain_topk", 2049, 17, 256, 1, 8),
      ("large_k_falls_back", 2049, 50, 256, 8, 1),
      ("fewer_rows_than_devices", 5, 3, 128, 32, 8),
  )
  def test_matches_numpy_reference(
      self, n, k, chunk_size, group_size, num_devices
  ):
    rng = np.random.default_rng(n + k)
    corpus_nd = _grid(rng, (n, 24))
    queries_qd = _grid(rng, (9, 24))
    corpus = et.encode_corpus(
        corpus_nd, chunk_size=chunk_size, mesh=_mesh(num_devices)
    )
    scores_qk, indices_qk = et.search(
        corpus, queries_qd, k, group_size=group_size
    )
    ref_scores_qk, ref_indices_qk = _reference(queries_qd, corpus_nd, k)
    self.assertEqual(scores_qk.dtype, np.float32)
    self.assertEqual(scores_qk.shape, (9, k))
    np.testing.assert_array_equal(indices_qk, ref_indices_qk)
    np.testing.assert_array_equal(scores_qk, ref_scores_qk)
    # Descending per row.
    self.assertTrue((np.diff(scores_qk, axis=1) <= 0).all())

  @parameterized.product(num_devices=[1, 8], group_size=[1, 4, 16], k=[5, 40])
  def test_exact_ties_break_by_smaller_index(self, num_devices, group_size, k):
    # Small integers: every score is an exact integer and each value is
    # shared by many rows, so ties occur at every rank, across groups,
    # chunks and devices (a group holding a high score also holds rows that
    # tie with lower-ranked groups).
    rng = np.random.default_rng(0)
    corpus_nd = np.round(rng.standard_normal((6000, 2)) * 4).astype(np.float32)
    queries_qd = rng.integers(-2, 3, size=(9, 2)).astype(np.float32)
    # 512-row chunks: with k=5 every group size prunes; with k=40 groups of
    # 16 are too few (32) and the plain path runs.
    corpus = et.encode_corpus(
        corpus_nd, chunk_size=512, mesh=_mesh(num_devices)
    )
    scores_qk, indices_qk = et.search(
        corpus, queries_qd, k, group_size=group_size
    )
    ref_scores_qk, ref_indices_qk = _reference(queries_qd, corpus_nd, k)
    np.testing.assert_array_equal(indices_qk, ref_indices_qk)
    np.testing.assert_array_equal(scores_qk, ref_scores_qk)

  @parameterized.product(num_devices=[1, 8], group_size=[1, 8])
  def test_padding_never_returned(self, num_devices, group_size):
    # Padding rows are zero vectors (score 0) and every real score is
    # negative, so any padding row that leaked, or a group maximum taken
    # over padding, would change the answer. N = 4 mod 8: the last real
    # group of each size mixes real and padding rows.
    rng = np.random.default_rng(8)
    n = 3004
    corpus_nd = _grid(rng, (n, 16)) ** 2 + 0.125
    queries_qd = -(_grid(rng, (5, 16)) ** 2 + 0.125)
    corpus = et.encode_corpus(
        corpus_nd, chunk_size=512, mesh=_mesh(num_devices)
    )
    self.assertGreater(corpus.embeddings_nd.shape[0], n)
    for k in (1, 3, 20):
      scores_qk, indices_qk = et.search(
          corpus, queries_qd, k, group_size=group_size
      )
      ref_scores_qk, ref_indices_qk = _reference(queries_qd, corpus_nd, k)
      np.testing.assert_array_equal(indices_qk, ref_indices_qk)
      np.testing.assert_array_equal(scores_qk, ref_scores_qk)

  @parameterized.parameters(8, 9)
  def test_groups_above_running_kth(self, num_above):
    # k = 32, groups of 4: the cheap selection (top k/4 = 8 groups) is exact
    # only when at most 8 groups of a chunk beat the running 32nd score.
    # Chunk 0 fills the running list with 10s; chunk 1 has `num_above`
    # groups holding one better row each, so 9 must take the full path.
    scores_n = np.zeros(1024, np.float32)
    scores_n[:40] = 10.0
    scores_n[512 + 4 * np.arange(num_above)] = 20.0 + np.arange(num_above)
    corpus = et.encode_corpus(scores_n[:, None], chunk_size=512, mesh=_mesh(1))
    self.assertEqual(corpus.chunk_size, 512)
    queries_qd = np.ones((1, 1), np.float32)
    scores_qk, indices_qk = et.search(corpus, queries_qd, 32, group_size=4)
    ref_scores_qk, ref_indices_qk = _reference(
        queries_qd, scores_n[:, None], 32
    )
    np.testing.assert_array_equal(indices_qk, ref_indices_qk)
    np.testing.assert_array_equal(scores_qk, ref_scores_qk)

  def test_all_rows_equal_gives_first_k(self):
    corpus_nd = np.ones((1000, 4), np.float32)
    queries_qd = np.ones((3, 4), np.float32)
    _, indices_qk = et.exact_topk(queries_qd, corpus_nd, 25, chunk_size=128)
    np.testing.assert_array_equal(indices_qk, np.tile(np.arange(25), (3, 1)))

  def test_duplicate_rows(self):
    rng = np.random.default_rng(1)
    # On the 1/8 grid every score is exact, so the copies tie bit for bit
    # whichever matmul kernel (or row position in it) computes them.
    corpus_nd = _grid(rng, (2000, 16))
    # Copies of row 1700 spread over chunks and devices; the query is that
    # row, so the copies are the best matches and tie exactly.
    copies = [3, 250, 999, 1700, 1999]
    corpus_nd[copies] = corpus_nd[1700]
    queries_qd = corpus_nd[[1700]] * 3.0
    scores_qk, indices_qk = et.exact_topk(
        queries_qd, corpus_nd, 8, chunk_size=128
    )
    np.testing.assert_array_equal(indices_qk[0, :5], copies)
    self.assertTrue((scores_qk[0, :5] == scores_qk[0, 0]).all())
    _, ref_indices_qk = _reference(queries_qd, corpus_nd, 8)
    np.testing.assert_array_equal(indices_qk, ref_indices_qk)

  def test_cosine(self):
    rng = np.random.default_rng(2)
    # Rows of very different norms: dot and cosine rankings disagree.
    corpus_nd = (
        rng.standard_normal((900, 32)) * rng.uniform(0.1, 10.0, (900, 1))
    ).astype(np.float32)
    queries_qd = rng.standard_normal((6, 32)).astype(np.float32) * 5.0
    scores_qk, indices_qk = et.exact_topk(
        queries_qd, corpus_nd, 12, metric="cosine", chunk_size=128
    )
    ref_scores_qk, ref_indices_qk = _reference(
        _normalize(queries_qd), _normalize(corpus_nd), 12
    )
    # Neighbouring ranks are >= 3.4e-6 apart here, over 30x the float32
    # rounding of these cosines (~1e-7), so the ids are exact.
    np.testing.assert_array_equal(indices_qk, ref_indices_qk)
    np.testing.assert_allclose(
        scores_qk,
        ref_scores_qk,
        rtol=test_util.FP32_RTOL,
        atol=test_util.FP32_ATOL,
    )
    self.assertLessEqual(scores_qk.max(), 1.0 + test_util.FP32_ATOL)
    # Same as the dot metric on pre-normalised inputs.
    dot_scores_qk, dot_indices_qk = et.exact_topk(
        _normalize(queries_qd).astype(np.float32),
        _normalize(corpus_nd).astype(np.float32),
        12,
        chunk_size=128,
    )
    np.testing.assert_array_equal(indices_qk, dot_indices_qk)
    np.testing.assert_allclose(
        scores_qk,
        dot_scores_qk,
        rtol=test_util.FP32_RTOL,
        atol=test_util.FP32_ATOL,
    )
    # And not the dot ranking on the raw vectors.
    _, raw_indices_qk = et.exact_topk(queries_qd, corpus_nd, 12)
    self.assertFalse((raw_indices_qk == indices_qk).all())

  def test_bfloat16_inputs_accumulate_in_float32(self):
    rng = np.random.default_rng(3)
    corpus_nd = jnp.asarray(rng.standard_normal((700, 256)), jnp.bfloat16)
    queries_qd = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    scores_qk, indices_qk = et.exact_topk(
        queries_qd, corpus_nd, 10, chunk_size=128
    )
    self.assertEqual(scores_qk.dtype, np.float32)
    # The bf16 values are exact in float64; a bf16 accumulator would be off
    # by ~0.1 at these magnitudes, float32 by ~1e-5.
    ref_scores_qk, ref_indices_qk = _reference(
        np.asarray(queries_qd, np.float64),
        np.asarray(corpus_nd, np.float64),
        10,
    )
    np.testing.assert_array_equal(indices_qk, ref_indices_qk)
    np.testing.assert_allclose(scores_qk, ref_scores_qk, atol=1e-4)

  @parameterized.parameters("dot", "cosine")
  def test_sharded_equals_single_device(self, metric):
    rng = np.random.default_rng(4)
    corpus_nd = rng.standard_normal((5001, 128)).astype(np.float32)
    queries_qd = rng.standard_normal((33, 128)).astype(np.float32)
    results = {}
    meshes = {
        "1": sharding.make_mesh(devices=jax.devices()[:1]),
        "8": sharding.make_mesh(devices=jax.devices()),
        "4x2": sharding.make_mesh((4, 2, 1)),  # data × fsdp
        "4x1x2": sharding.make_mesh((4, 1, 2)),  # model axis replicates
    }
    for name, mesh in meshes.items():
      results[name] = et.exact_topk(
          queries_qd, corpus_nd, 20, metric=metric, chunk_size=256, mesh=mesh
      )
    single_scores_qk, single_indices_qk = results["1"]
    for name in ("8", "4x2", "4x1x2"):
      scores_qk, indices_qk = results[name]
      # Scores reach ~54 (an ulp is 4e-6): another shard shape may sum the
      # 128 products in another order. Neighbouring ranks are >= 5e-4
      # (dot) and >= 1.9e-6 (cosine, ~20x its rounding) apart.
      np.testing.assert_array_equal(indices_qk, single_indices_qk)
      np.testing.assert_allclose(
          scores_qk,
          single_scores_qk,
          rtol=test_util.FP32_RTOL,
          atol=test_util.FP32_ATOL,
      )
    self.assertEqual(
        et.encode_corpus(
            corpus_nd, mesh=meshes["8"]
        ).embeddings_nd.sharding.shard_shape((5120, 128)),
        (640, 128),
    )

  def test_query_batches_match_one_batch(self):
    rng = np.random.default_rng(5)
    corpus_nd = rng.standard_normal((1200, 16)).astype(np.float32)
    queries_qd = rng.standard_normal((23, 16)).astype(np.float32)
    whole = et.exact_topk(queries_qd, corpus_nd, 5, chunk_size=128)
    batched = et.exact_topk(
        queries_qd, corpus_nd, 5, chunk_size=128, query_batch_size=6
    )
    np.testing.assert_array_equal(batched[1], whole[1])
    np.testing.assert_array_equal(batched[0], whole[0])

  def test_no_recompilation_for_same_shapes(self):
    events = []

    def listener(event, duration_secs, **kwargs):
      del duration_secs
      events.append((event, kwargs.get("fun_name")))

    monitoring.register_event_duration_secs_listener(listener)
    try:
      rng = np.random.default_rng(6)
      # Shapes used by no other test, so the first call compiles here.
      corpus_nd = rng.standard_normal((1111, 40)).astype(np.float32)
      queries_qd = rng.standard_normal((17, 40)).astype(np.float32)
      # 17 queries in batches of 5: four batches, the last one padded.
      first = et.exact_topk(
          queries_qd, corpus_nd, 7, chunk_size=128, query_batch_size=5
      )
      traces = [
          e
          for e in events
          if e == ("/jax/core/compile/jaxpr_trace_duration", "_search_batch")
      ]
      self.assertLen(traces, 1)
      events.clear()
      second = et.exact_topk(
          queries_qd + 1.0, corpus_nd, 7, chunk_size=128, query_batch_size=5
      )
      compiles = [
          e
          for e in events
          if e[0] == "/jax/core/compile/backend_compile_duration"
      ]
      self.assertEqual(compiles, [])
      self.assertFalse((first[1] == second[1]).all())
    finally:
      monitoring.unregister_event_duration_listener(listener)

  @parameterized.parameters(10, 100)
  def test_matches_faiss_flat_ip(self, k):
    rng = np.random.default_rng(7)
    corpus_nd = _normalize(rng.standard_normal((20_000, 64))).astype(np.float32)
    queries_qd = _normalize(rng.standard_normal((50, 64))).astype(np.float32)
    index = faiss.IndexFlatIP(64)
    index.add(corpus_nd)
    faiss_scores_qk, faiss_indices_qk = index.search(queries_qd, k)
    scores_qk, indices_qk = et.exact_topk(
        queries_qd, corpus_nd, k, chunk_size=2048
    )
    # faiss and XLA sum the 64 products in different orders (a few ulps of
    # ~0.5), and these scores hold near-ties: the smallest gap between
    # neighbouring ranks of the top 100 is 1.8e-7. Those pairs may come in
    # either order; the mean gap there is ~5e-4.
    true_qn = queries_qd.astype(np.float64) @ corpus_nd.astype(np.float64).T
    test_util.assert_same_topk(indices_qk, faiss_indices_qk, true_qn, 1e-6)
    np.testing.assert_allclose(scores_qk, faiss_scores_qk, atol=1e-5)

  def test_invalid_arguments(self):
    corpus_nd = np.ones((10, 4), np.float32)
    with self.assertRaisesRegex(ValueError, "k=11"):
      et.exact_topk(np.ones((2, 4), np.float32), corpus_nd, 11)
    with self.assertRaisesRegex(ValueError, "k=0"):
      et.exact_topk(np.ones((2, 4), np.float32), corpus_nd, 0)
    with self.assertRaisesRegex(ValueError, "metric"):
      et.exact_topk(np.ones((2, 4), np.float32), corpus_nd, 1, metric="l2")
    with self.assertRaisesRegex(ValueError, "queries"):
      et.exact_topk(np.ones((2, 5), np.float32), corpus_nd, 1)


if __name__ == "__main__":
  absltest.main()
