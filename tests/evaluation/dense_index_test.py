"""`config.retriever.index`: the evaluate mode's dense search through an index.

Oracles: on LIMIT-small (smoke settings, one shared dense cache) index=flat
and HNSW with efSearch >= N give exactly the metrics of exact search;
sign bits re-ranking every document rank by <q, sign d> (NumPy on the
cached embeddings); stats.json holds the index's bytes; a rerun loads the
saved index (building is patched to fail) and a build parameter change
rebuilds it; bad names and values raise ConfigError naming the key.
`compression.build_or_load` on arrays: search-only parameters never
rebuild, a corrupt saved index is rebuilt, a replaced kind leaves no
stale arrays.
"""

import json
import pathlib
import shutil
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import evaluate as evaluate_config
from retrieval_jax import errors
from retrieval_jax import evaluate
from retrieval_jax.evaluation import trec_run
from retrieval_jax.search import compression


def _config(cache_dir, index="exact", kind="dense", **params):
  config = evaluate_config.get_config("smoke")
  with config.unlocked():
    config.data.max_queries = 16
    config.retriever.latency_queries = 2
    config.encode.cache_dir = str(cache_dir)
    config.retriever.kind = kind
    config.retriever.index = index
    for key, value in params.items():
      config.retriever.index_params[index][key] = value
  return config


def _read(workdir, name):
  return json.loads((pathlib.Path(workdir) / name).read_text())


class EvaluateIndexTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="rj_index_"))
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
    cls.cache = cls.tmp / "cache"
    # The one run that encodes; every other run reads its dense cache.
    cls.exact = evaluate.evaluate(_config(cls.cache), cls.tmp / "exact")
    (path,) = cls.cache.glob("dense_*.npz")
    with np.load(path) as f:
      cls.docs_nd, cls.queries_qd = f["docs_nd"], f["queries_qd"]

  def _evaluate(self, index, workdir=None, **params):
    workdir = workdir or self.create_tempdir().full_path
    metrics = evaluate.evaluate(_config(self.cache, index, **params), workdir)
    return metrics, _read(workdir, "stats.json"), pathlib.Path(workdir)

  def test_flat_equals_exact(self):
    metrics, stats, workdir = self._evaluate("flat")
    self.assertEqual(metrics, self.exact)
    self.assertEqual(
        _read(workdir, "metrics_per_query.json"),
        _read(self.tmp / "exact", "metrics_per_query.json"),
    )
    self.assertEqual(stats["index"], "flat")
    self.assertEqual(stats["bytes_per_doc"], 4 * 384)
    self.assertEqual(stats["index_bytes"], self.docs_nd.nbytes)
    self.assertEqual(
        _read(self.tmp / "exact", "stats.json")["index_bytes"],
        self.docs_nd.nbytes,
    )

  def test_hnsw_with_ef_search_above_n_equals_exact(self):
    # M = 4 keeps the graph sparse; efSearch 64 > 46 documents.
    metrics, stats, _ = self._evaluate("hnsw", m=4, ef_search=64)
    self.assertEqual(metrics, self.exact)
    self.assertEqual(stats["index_config"]["m"], 4)
    self.assertGreater(stats["index_bytes"], self.docs_nd.nbytes)

  def test_pq_writes_code_bytes_and_jax_adc_agrees(self):
    metrics, stats, workdir = self._evaluate("pq", m=8, nbits=4)
    self.assertEqual(stats["bytes_per_doc"], 8 * 4 / 8)
    self.assertGreater(stats["index_bytes"], 46 * 4)  # + codebooks
    self.assertTrue((workdir / "index" / "faiss_bytes.npy").is_file())
    # Another engine is a search parameter: the same codes, reloaded.
    again, stats, _ = self._evaluate("pq", workdir, m=8, nbits=4, engine="jax")
    self.assertTrue(stats["index_reused"])
    for name, value in metrics.items():
      self.assertAlmostEqual(again[name], value, places=6, msg=name)
    self.assertNotEqual(metrics, self.exact)

  def test_sign_rerank_of_every_document_ranks_by_q_dot_sign_d(self):
    _, stats, workdir = self._evaluate("sign", rerank_depth=46)
    self.assertEqual(stats["bytes_per_doc"], 384 / 8)
    self.assertEqual(stats["index_bytes"], 46 * 48)
    queries_qd = self.queries_qd / np.linalg.norm(
        self.queries_qd, axis=1, keepdims=True
    )
    signs_nd = np.where(self.docs_nd >= 0, 1.0, -1.0)
    want_qn = np.argsort(-(queries_qd @ signs_nd.T), axis=1, kind="stable")
    run = trec_run.read_run(workdir / "run.trec")
    collection = evaluate.load_collection(_config(self.cache))
    query_ids = collection.judged_query_ids()
    self.assertLen(run, len(self.queries_qd))
    for row, qid in enumerate(query_ids[: len(self.queries_qd)]):
      ranked = sorted(run[qid], key=lambda d: -run[qid][d])
      want = [collection.doc_ids[i] for i in want_qn[row, :10]]
      self.assertEqual(ranked[:10], want, qid)

  def test_rerun_reuses_the_saved_index_until_a_build_parameter_changes(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    first, stats, _ = self._evaluate("hnsw", workdir, m=8, ef_search=64)
    self.assertFalse(stats["index_reused"])
    key = _read(workdir / "index", compression.KEY_FILE)
    with mock.patch.object(
        compression, "build", side_effect=AssertionError("rebuilt")
    ):
      again, stats, _ = self._evaluate("hnsw", workdir, m=8, ef_search=64)
      self.assertTrue(stats["index_reused"])
      self.assertEqual(again, first)
      # efSearch is read at search time: still no rebuild.
      _, stats, _ = self._evaluate("hnsw", workdir, m=8, ef_search=46)
      self.assertEqual(stats["index_config"]["ef_search"], 46)
      self.assertEqual(_read(workdir / "index", "index.json")["ef_search"], 46)
    _, stats, _ = self._evaluate("hnsw", workdir, m=4, ef_search=64)
    self.assertFalse(stats["index_reused"])
    self.assertNotEqual(
        _read(workdir / "index", compression.KEY_FILE)["key"], key["key"]
    )

  def test_hybrid_and_prf_search_the_index(self):
    for kind in ("hybrid", "dense_prf"):
      config = _config(self.cache, "sign", kind=kind)
      workdir = pathlib.Path(self.create_tempdir().full_path)
      evaluate.evaluate(config, workdir)
      stats = _read(workdir, "stats.json")
      self.assertTrue((workdir / "index" / "codes_nw.npy").is_file(), kind)
      if kind == "hybrid":
        self.assertEqual(stats["dense_index"]["bytes_per_doc"], 48)
      else:
        self.assertEqual(stats["index_bytes"], 46 * 48)
        self.assertEqual(stats["feedback_bytes"], self.docs_nd.nbytes)

  @parameterized.parameters(
      ("pq", {"m": 7, "nbits": 4}, r"index_params\.pq\.m=7: must divide"),
      ("pq", {"m": 8}, r"index_params\.pq\.nbits=8: 256 centroids"),
      ("pca", {"dims": 400}, r"index_params\.pca\.dims=400: more than"),
  )
  def test_params_the_corpus_cannot_take_name_the_key(
      self, index, params, message
  ):
    with self.assertRaisesRegex(
        errors.ConfigError, "^config.retriever." + message
    ):
      self._evaluate(index, **params)


class IndexConfigValidationTest(parameterized.TestCase):
  """Refused before the encoder is built (`make_encoder` patched to fail)."""

  def _assert_refused(self, config, message):
    with mock.patch.object(
        evaluate, "make_encoder", side_effect=AssertionError("work started")
    ):
      with self.assertRaisesRegex(errors.ConfigError, message):
        evaluate.evaluate(config, self.create_tempdir().full_path)

  @parameterized.parameters(
      ("annoy", {}, r"^config\.retriever\.index='annoy': expected 'exact'"),
      ("hnsw", {"m": 1}, r"^config\.retriever\.index_params\.hnsw\.m=1: "),
      ("ivf_pq", {"nprobe": 0}, r"index_params\.ivf_pq\.nprobe=0: "),
      ("pca", {"dims": 0}, r"index_params\.pca\.dims=0: "),
      ("pq", {"engine": "gpu"}, r"index_params\.pq\.engine='gpu': "),
      ("sign", {"word": "uint16"}, r"index_params\.sign\.word='uint16': "),
  )
  def test_bad_index_names_the_key(self, index, params, message):
    config = _config(self.create_tempdir().full_path)
    with config.unlocked():
      config.retriever.index = index
      if index in config.retriever.index_params:
        config.retriever.index_params[index].update(params)
    self._assert_refused(config, message)

  def test_unknown_parameter_names_the_key(self):
    config = _config(self.create_tempdir().full_path)
    with config.unlocked():
      config.retriever.index = "hnsw"
      config.retriever.index_params.hnsw.nprobe = 4
    self._assert_refused(
        config, r"^config\.retriever\.index_params\.hnsw\.nprobe: unknown"
    )

  def test_index_without_a_dense_search_names_the_key(self):
    config = _config(self.create_tempdir().full_path, "hnsw", kind="bm25")
    self._assert_refused(
        config, r"^config\.retriever\.index='hnsw': config\.retriever\.kind="
    )

  def test_missing_faiss_says_how_to_install_it(self):
    config = _config(self.create_tempdir().full_path, "hnsw")
    with mock.patch.dict(sys.modules, {"faiss": None}):  # import fails
      self._assert_refused(config, r'needs faiss.*pip install -e "\.\[index\]"')
    # sign and pca need no faiss.
    config = _config(self.create_tempdir().full_path, "sign")
    with mock.patch.dict(sys.modules, {"faiss": None}):
      with mock.patch.object(
          evaluate, "make_encoder", side_effect=AssertionError("work started")
      ):
        with self.assertRaisesRegex(AssertionError, "work started"):
          evaluate.evaluate(config, self.create_tempdir().full_path)


class BuildOrLoadTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.docs_nd = rng.standard_normal((300, 16)).astype(np.float32)
    self.queries_qd = rng.standard_normal((5, 16)).astype(np.float32)
    self.dir = pathlib.Path(self.create_tempdir().full_path) / "index"

  def test_search_parameters_reuse_build_parameters_rebuild(self):
    index, info = compression.build_or_load(
        self.dir, "ivf_pq", self.docs_nd, m=4, nbits=4, nlist=8, nprobe=1
    )
    self.assertFalse(info["reused"])
    one = index.search(self.queries_qd, 20)[1]
    index, info = compression.build_or_load(
        self.dir, "ivf_pq", self.docs_nd, m=4, nbits=4, nlist=8, nprobe=8
    )
    self.assertTrue(info["reused"])
    # All 8 lists probed: every query gets 20 hits; 1 list may hold fewer.
    self.assertTrue((index.search(self.queries_qd, 20)[1] >= 0).all())
    self.assertEqual(index.faiss_index().nprobe, 8)
    self.assertNotEqual(
        one.tolist(), index.search(self.queries_qd, 20)[1].tolist()
    )
    _, info = compression.build_or_load(
        self.dir, "ivf_pq", self.docs_nd[::-1], m=4, nbits=4, nlist=8
    )
    self.assertFalse(info["reused"])  # other vectors, other key

  def test_corrupt_index_is_rebuilt_and_stale_arrays_removed(self):
    compression.build_or_load(self.dir, "hnsw", self.docs_nd, m=8)
    (self.dir / "faiss_bytes.npy").write_bytes(b"garbage")
    with self.assertLogs(level="WARNING") as logs:
      index, info = compression.build_or_load(
          self.dir, "hnsw", self.docs_nd, m=8
      )
    self.assertIn("unreadable index", "\n".join(logs.output))
    self.assertFalse(info["reused"])
    self.assertEqual(index.search(self.queries_qd, 3)[1].shape, (5, 3))
    compression.build_or_load(self.dir, "sign", self.docs_nd)
    self.assertEqual(
        sorted(p.name for p in self.dir.iterdir()),
        ["codes_nw.npy", compression.KEY_FILE, "index.json"],
    )


if __name__ == "__main__":
  absltest.main()
