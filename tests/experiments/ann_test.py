"""Tests for experiments/ann/run.py.

Fast: the pieces on small arrays: the mixture is seeded, unit-norm and
clustered, and its queries are held out; the blocked NumPy ground truth
equals a float64 full sort; recall@k on a hand-written case; the whole
benchmark on 3,000 vectors, where both exact searches agree with the
ground truth and HNSW with efSearch >= N is exact. Slow: the smoke config
as shipped (20,000 vectors).
"""

import json
import pathlib
from unittest import mock

from absl.testing import absltest
import numpy as np
import pytest

from experiments.ann import config as ann_config
from experiments.ann import run as ann_run


def _data(**overrides):
  config = ann_config.get_config("smoke")
  with config.unlocked():
    config.data.update(overrides)
  return config.data


class PiecesTest(absltest.TestCase):

  def test_mixture_is_seeded_unit_norm_clustered_and_held_out(self):
    data = _data(num_docs=2000, num_queries=50, num_centres=4, dim=32)
    docs_nd, queries_qd = ann_run.make_data(data)
    again_nd, again_qd = ann_run.make_data(data)
    np.testing.assert_array_equal(docs_nd, again_nd)
    np.testing.assert_array_equal(queries_qd, again_qd)
    self.assertEqual(docs_nd.dtype, np.float32)
    self.assertEqual(docs_nd.shape, (2000, 32))
    np.testing.assert_allclose(np.linalg.norm(docs_nd, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(queries_qd, axis=1), 1, atol=1e-5)
    # Queries are fresh draws, and do not depend on the corpus size.
    self.assertFalse((queries_qd[:, None, :] == docs_nd[None]).all(-1).any())
    _, fewer_qd = ann_run.make_data(
        _data(num_docs=100, num_queries=50, num_centres=4, dim=32)
    )
    np.testing.assert_array_equal(fewer_qd, queries_qd)
    # Four clusters: cosines near 1/(1+spread²) = 0.5 within a cluster
    # (a point's nearest neighbour higher still), near 0 across them.
    cos_nn = docs_nd @ docs_nd.T
    top = np.sort(cos_nn, axis=1)[:, -2]  # nearest other point
    self.assertGreater(np.median(top), 0.6)
    self.assertGreater((np.abs(cos_nn) < 0.3).mean(), 0.5)

  def test_exact_neighbours_equals_a_full_sort(self):
    rng = np.random.default_rng(0)
    docs_nd = rng.standard_normal((70_000, 8)).astype(np.float32)
    queries_qd = rng.standard_normal((5, 8)).astype(np.float32)
    got_qk = ann_run.exact_neighbours(queries_qd, docs_nd, 7)
    scores_qn = queries_qd.astype(np.float64) @ docs_nd.T.astype(np.float64)
    want_qk = np.argsort(-scores_qn, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(got_qk, want_qk)

  def test_recall_at_k(self):
    truth_qk = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found_qk = np.array([[4, 3, 9, -1], [8, 7, 6, 5]])
    self.assertEqual(ann_run.recall_at_k(found_qk, truth_qk), (2 / 4 + 1) / 2)

  def test_benchmark_on_a_small_mixture(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    config = ann_config.get_config("smoke")
    with config.unlocked():
      config.data.update(num_docs=3000, num_queries=20, num_centres=10)
      config.hnsw.update(m=16, ef_construction=64, ef_search=(4, 256))
      config.ivf_pq.update(m=8, nbits=6, nprobe=(1, 55))
    results = ann_run.run(config, workdir)
    saved = json.loads((workdir / "results.json").read_text())
    self.assertEqual(saved["rows"], results["rows"])
    rows = {(r["method"], str(r["params"])): r for r in results["rows"]}
    self.assertLen(rows, 6)
    for row in results["rows"]:
      self.assertAlmostEqual(row["qps"], 20 / row["search_s"])
      self.assertAlmostEqual(row["qps_cpu"], 20 / row["search_cpu_s"])
      if row["method"] in ann_run.EXACT_METHODS:
        self.assertEqual(row["recall"], 1.0, row)
    hnsw = results["rows"][2:4]
    self.assertLess(hnsw[0]["recall"], hnsw[1]["recall"])
    self.assertGreaterEqual(hnsw[1]["recall"], 0.95)
    flat = results["rows"][0]
    self.assertEqual(flat["index_bytes"], 3000 * 384 * 4)
    ivf = results["rows"][-2:]
    self.assertEqual(ivf[0]["params"]["nlist"], 55)  # round(sqrt(3000))
    # All 55 lists probed: at least as many hits as one list holds.
    self.assertGreaterEqual(ivf[1]["recall"], ivf[0]["recall"])
    self.assertEqual(ivf[0]["bytes_per_doc"], ivf[0]["index_bytes"] / 3000)
    self.assertTrue(results["summary"]["reached"])
    table = (workdir / "table.md").read_text()
    self.assertIn(
        "| faiss HNSW | m=16, ef_construction=64, ef_search=4 |", table
    )
    self.assertIn("HNSW reaches recall@10 >= 0.95 at efSearch 256", table)

  def test_summary_takes_the_smallest_ef_search_reaching_the_target(self):
    def row(method, ef, qps, recall):
      return dict(
          method=method,
          params={"ef_search": ef} if ef else {},
          qps=qps,
          qps_cpu=qps / 2,
          recall=recall,
      )

    rows = [
        row("faiss IndexFlatIP", 0, 10, 1.0),
        row("faiss HNSW", 8, 900, 0.5),
        row("faiss HNSW", 64, 300, 0.97),
        row("faiss HNSW", 32, 500, 0.94),
    ]
    self.assertEqual(
        ann_run.summary(rows[:2], 10),
        {"target_recall": 0.95, "reached": False},
    )
    got = ann_run.summary(rows + [row("faiss HNSW", 128, 400, 0.99)], 10)
    self.assertEqual(got["ef_search"], 64)
    self.assertEqual(got["speedup"], {"faiss IndexFlatIP": 30.0})
    self.assertEqual(got["speedup_cpu"], {"faiss IndexFlatIP": 30.0})


class SmokeTest(absltest.TestCase):

  @pytest.mark.slow
  def test_smoke_config(self):
    workdir = self.create_tempdir().full_path
    with mock.patch("builtins.print"):
      results = ann_run.run(ann_config.get_config("smoke"), workdir)
    by_method = {r["method"]: r for r in results["rows"]}
    self.assertEqual(by_method["faiss IndexFlatIP"]["recall"], 1.0)
    self.assertEqual(by_method["JAX exact_topk"]["recall"], 1.0)
    self.assertTrue(results["summary"]["reached"])


if __name__ == "__main__":
  absltest.main()
