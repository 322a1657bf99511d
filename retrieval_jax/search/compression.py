"""Compressed and approximate dense indexes behind one small interface.

`build(kind, docs_nd, metric=..., **params)` -> an `Index`; `index.search(
queries_qd, k)` -> ([Q, k] float32 scores, [Q, k] int64 rows, -1 = none);
`nbytes` (what search holds in memory), `bytes_per_doc`; `save(dir)` /
`load(dir)` write and read npy arrays plus `index.json`. Kinds (`INDEXES`):
flat (float32, `exact_topk`), pca (to d' dims), pq (faiss `IndexPQ`), sign
(packed sign bits: Hamming top-k, optionally BPR's re-ranking of the top
`rerank_depth` with the float query), hnsw and ivf_pq (faiss). "cosine"
normalises documents at build and queries at search; all else is dot.
faiss does PQ, HNSW and IVF-PQ (optional: the `index` extra, imported only
by those kinds; they save `faiss.serialize_index` bytes as one npy). PCA is
a NumPy SVD (float64, centred on the corpus), so no faiss is needed for it;
sign codes use `hamming.py` (JAX, shared with BPR's search).
`build_or_load` reuses a saved index while its content key matches.
"""

import json
import pathlib
import time
from typing import Any, ClassVar

from absl import logging
import jax.numpy as jnp
import numpy as np

from retrieval_jax import io
from retrieval_jax.search import chunked
from retrieval_jax.search import exact_topk
from retrieval_jax.search import hamming
from retrieval_jax.search import product_quantization

METRICS = ("dot", "cosine")


def _l2_normalize(x_nd: np.ndarray) -> np.ndarray:
  x_nd = np.asarray(x_nd, np.float32)
  norm_n1 = np.linalg.norm(x_nd, axis=1, keepdims=True)
  return x_nd / np.maximum(norm_n1, 1e-12)


class Index:
  """Base class: `arrays` (saved as npy) and `config` (saved as JSON).

  config holds kind, metric, dim, num_docs and the kind's parameters.
  Subclasses implement `_fit` (docs -> arrays) and `_search`.
  """

  kind: ClassVar[str] = ""
  defaults: ClassVar[dict[str, Any]] = {}
  # Parameters read only by search: changing them needs no rebuild.
  search_params: ClassVar[tuple[str, ...]] = ()

  def __init__(self, arrays: dict[str, np.ndarray], config: dict[str, Any]):
    self.arrays, self.config = arrays, config
    self._state = None  # built on first search (a device copy, a faiss index)

  @classmethod
  def build(cls, docs_nd, *, metric: str = "dot", **params) -> "Index":
    """Fits the index on [N, D] documents (float32 after normalising)."""
    if metric not in METRICS:
      raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
    unknown = set(params) - set(cls.defaults)
    if unknown:
      raise ValueError(f"{cls.kind}: unknown parameters {sorted(unknown)}")
    docs_nd = np.asarray(docs_nd, np.float32)
    if metric == "cosine":
      docs_nd = _l2_normalize(docs_nd)
    config = dict(cls.defaults, **params)
    config.update(kind=cls.kind, metric=metric)
    config.update(dim=int(docs_nd.shape[1]), num_docs=int(docs_nd.shape[0]))
    return cls(cls._fit(docs_nd, config), config)

  @classmethod
  def _fit(cls, docs_nd, config) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _search(self, queries_qd, k):
    raise NotImplementedError

  def search(self, queries_qd, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows for [Q, D] queries: float32 scores, int64 rows (-1 pad)."""
    queries_qd = np.asarray(queries_qd, np.float32)
    if queries_qd.ndim != 2 or queries_qd.shape[1] != self.config["dim"]:
      raise ValueError(
          f"queries must be [Q, {self.config['dim']}], got {queries_qd.shape}"
      )
    if not 1 <= k <= self.config["num_docs"]:
      raise ValueError(f"k={k} must be in [1, N={self.config['num_docs']}]")
    if self.config["metric"] == "cosine":
      queries_qd = _l2_normalize(queries_qd)
    scores_qk, ids_qk = self._search(queries_qd, k)
    ids_qk = np.asarray(ids_qk, np.int64)
    scores_qk = np.where(ids_qk >= 0, scores_qk, -np.inf).astype(np.float32)
    return scores_qk, ids_qk

  @property
  def nbytes(self) -> int:
    """Bytes of the arrays search reads (faiss: its serialised size)."""
    return int(sum(a.nbytes for a in self.arrays.values()))

  @property
  def bytes_per_doc(self) -> float:
    """Bytes per document: the code size where codes have one (flat, pca,
    pq, sign, ivf_pq; codebooks excluded), else nbytes / N (hnsw)."""
    return self.nbytes / self.config["num_docs"]

  def save(self, directory) -> None:
    """Writes `<name>.npy` per array and index.json into `directory`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in self.arrays.items():
      io.save_npy_atomic(directory / f"{name}.npy", array)
    io.write_json_atomic(
        directory / "index.json", dict(self.config, arrays=sorted(self.arrays))
    )


class FlatIndex(Index):
  """float32 vectors, exact top-k (`exact_topk`, sharded over devices)."""

  kind = "flat"

  @classmethod
  def _fit(cls, docs_nd, config):
    return {"docs_nd": docs_nd}

  def _search(self, queries_qd, k):
    if self._state is None:
      self._state = exact_topk.encode_corpus(self.arrays["docs_nd"])
    return exact_topk.search(self._state, queries_qd, k)

  @property
  def bytes_per_doc(self):
    return 4.0 * self.config["dim"]


class PcaIndex(Index):
  """Projection on the corpus' top `dims` principal axes, exact search.

  score = ⟨q, μ⟩ + ⟨Pq, P(d − μ)⟩ = ⟨q, d̂⟩ for the reconstruction d̂.
  """

  kind = "pca"
  defaults = {"dims": 128}

  @classmethod
  def _fit(cls, docs_nd, config):
    mean_d = docs_nd.mean(axis=0, dtype=np.float64)
    # Right singular vectors of the centred corpus = its principal axes.
    _, _, vt_dd = np.linalg.svd(docs_nd - mean_d, full_matrices=False)
    axes_pd = vt_dd[: config["dims"]]
    docs_np = (docs_nd - mean_d) @ axes_pd.T
    return {
        "mean_d": mean_d.astype(np.float32),
        "axes_pd": axes_pd.astype(np.float32),
        "docs_np": docs_np.astype(np.float32),
    }

  def _search(self, queries_qd, k):
    a = self.arrays
    if self._state is None:
      self._state = exact_topk.encode_corpus(a["docs_np"])
    scores_qk, ids_qk = exact_topk.search(
        self._state, queries_qd @ a["axes_pd"].T, k
    )
    return scores_qk + (queries_qd @ a["mean_d"])[:, None], ids_qk

  @property
  def bytes_per_doc(self):
    return 4.0 * self.config["dims"]


class SignIndex(Index):
  """Packed sign bits; Hamming top-k (`hamming.py`), then BPR's re-ranking.

  rerank_depth 0: score = ⟨sign q, sign d⟩ = D − 2·Hamming (many ties);
  else the Hamming top max(k, rerank_depth) re-scored by ⟨q, sign d⟩.
  """

  kind = "sign"
  defaults = {"rerank_depth": 0, "word": "uint8"}
  search_params = ("rerank_depth",)

  @classmethod
  def _fit(cls, docs_nd, config):
    return {"codes_nw": hamming.pack_signs(docs_nd, config["word"])}

  def _search(self, queries_qd, k):
    if self._state is None:  # device copies, once
      codes_nw = jnp.asarray(self.arrays["codes_nw"])
      self._state = (codes_nw, chunked.chunk_rows(codes_nw))
    codes_nw, chunks = self._state
    dim = self.config["dim"]
    depth = min(max(k, self.config["rerank_depth"]), self.config["num_docs"])
    query_codes_qw = hamming.pack_signs(queries_qd, self.config["word"])
    dist_qc, cand_qc = hamming.hamming_topk(query_codes_qw, chunks, depth)
    if not self.config["rerank_depth"]:
      return (dim - 2 * dist_qc).astype(np.float32), cand_qc
    return hamming.rerank(queries_qd, codes_nw, cand_qc, k, dim=dim)

  @property
  def bytes_per_doc(self):
    return float(self.arrays["codes_nw"][0].nbytes)


class _FaissIndex(Index):
  """A faiss index saved as its serialised bytes (`faiss_bytes`)."""

  @classmethod
  def _make(cls, dim, config):
    raise NotImplementedError

  @classmethod
  def _fit(cls, docs_nd, config):
    import faiss  # pylint: disable=g-import-not-at-top

    docs_nd = np.ascontiguousarray(docs_nd)
    index = cls._make(docs_nd.shape[1], config)
    if not index.is_trained:
      index.train(docs_nd)
    index.add(docs_nd)
    return {"faiss_bytes": faiss.serialize_index(index)}

  def _set_search_params(self, index):
    del index

  def faiss_index(self):
    """The deserialised faiss index (search parameters set from config)."""
    if self._state is None:
      import faiss  # pylint: disable=g-import-not-at-top

      self._state = faiss.deserialize_index(self.arrays["faiss_bytes"])
      self._set_search_params(self._state)
    return self._state

  def _search(self, queries_qd, k):
    return self.faiss_index().search(np.ascontiguousarray(queries_qd), k)


class PqIndex(_FaissIndex):
  """faiss `IndexPQ`: m sub-quantisers of `nbits`, ADC inner products.

  engine "faiss": faiss' ADC search; "jax": `product_quantization.adc_topk`
  over the same codebooks and codes.
  """

  kind = "pq"
  defaults = {"m": 48, "nbits": 8, "engine": "faiss"}
  search_params = ("engine",)
  _adc_arrays = None  # (centroids_mks, codes_nm) on device, engine "jax"

  def _search(self, queries_qd, k):
    if self.config["engine"] == "faiss":
      return super()._search(queries_qd, k)
    if self.config["engine"] != "jax":
      raise ValueError(f"engine={self.config['engine']!r}: 'faiss' or 'jax'")
    if self._adc_arrays is None:
      centroids_mks, codes_nm = product_quantization.faiss_pq_arrays(
          self.faiss_index()
      )
      self._adc_arrays = (
          jnp.asarray(centroids_mks),
          chunked.chunk_rows(
              codes_nm.astype(
                  np.uint8 if self.config["nbits"] <= 8 else np.int32
              )
          ),
      )
    return product_quantization.adc_topk(queries_qd, *self._adc_arrays, k)

  @classmethod
  def _make(cls, dim, config):
    import faiss  # pylint: disable=g-import-not-at-top

    return faiss.IndexPQ(
        dim, config["m"], config["nbits"], faiss.METRIC_INNER_PRODUCT
    )

  @property
  def bytes_per_doc(self):
    return self.config["m"] * self.config["nbits"] / 8


class HnswIndex(_FaissIndex):
  """faiss `IndexHNSWFlat`: float32 vectors + graph (bytes/doc: all of it).

  Searches with efSearch = max(ef_search, k).
  """

  kind = "hnsw"
  defaults = {"m": 32, "ef_construction": 200, "ef_search": 128}
  search_params = ("ef_search",)

  @classmethod
  def _make(cls, dim, config):
    import faiss  # pylint: disable=g-import-not-at-top

    index = faiss.IndexHNSWFlat(dim, config["m"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config["ef_construction"]
    return index

  def _search(self, queries_qd, k):
    # faiss returns fewer than k hits (-1) when efSearch < k: widen it.
    self.faiss_index().hnsw.efSearch = max(self.config["ef_search"], k)
    return super()._search(queries_qd, k)


class IvfPqIndex(_FaissIndex):
  """faiss `IndexIVFPQ` over an inner-product coarse quantiser.

  nlist 0 = round(sqrt(N)); bytes/doc: PQ code + the 8-byte id faiss stores.
  """

  kind = "ivf_pq"
  defaults = {"nlist": 0, "m": 48, "nbits": 8, "nprobe": 8}
  search_params = ("nprobe",)

  @classmethod
  def _make(cls, dim, config):
    import faiss  # pylint: disable=g-import-not-at-top

    if not config["nlist"]:
      config["nlist"] = max(1, round(config["num_docs"] ** 0.5))
    # faiss' Python wrapper keeps the quantiser alive with the index; the
    # serialised index holds its own copy.
    return faiss.IndexIVFPQ(
        faiss.IndexFlatIP(dim),
        dim,
        config["nlist"],
        config["m"],
        config["nbits"],
        faiss.METRIC_INNER_PRODUCT,
    )

  def _set_search_params(self, index):
    index.nprobe = self.config["nprobe"]

  @property
  def bytes_per_doc(self):
    return self.config["m"] * self.config["nbits"] / 8 + 8


INDEXES: dict[str, type[Index]] = {
    "flat": FlatIndex,
    "pca": PcaIndex,
    "pq": PqIndex,
    "sign": SignIndex,
    "hnsw": HnswIndex,
    "ivf_pq": IvfPqIndex,
}


def build(kind: str, docs_nd, *, metric: str = "dot", **params) -> Index:
  """`INDEXES[kind].build(docs_nd, metric=metric, **params)`."""
  if kind not in INDEXES:
    raise ValueError(f"unknown index kind {kind!r}; known: {list(INDEXES)}")
  return INDEXES[kind].build(docs_nd, metric=metric, **params)


def load(directory) -> Index:
  """The index `Index.save` wrote to `directory`."""
  directory = pathlib.Path(directory)
  config = json.loads((directory / "index.json").read_text())
  names = config.pop("arrays")
  arrays = {n: np.load(directory / f"{n}.npy") for n in names}
  return INDEXES[config["kind"]](arrays, config)


# Kinds that need faiss (the `index` extra) to build or search.
FAISS_KINDS = tuple(k for k, c in INDEXES.items() if issubclass(c, _FaissIndex))
# Written last by `build_or_load`: present and equal = the index is complete.
KEY_FILE = "content_key.json"


def content_key(kind: str, docs_nd, *, metric: str = "dot", **params) -> str:
  """SHA-256 of what a built index is a function of: kind, metric, the
  build parameters (defaults filled in; not `search_params`) and the
  float32 document vectors."""
  if kind not in INDEXES:
    raise ValueError(f"unknown index kind {kind!r}; known: {list(INDEXES)}")
  cls = INDEXES[kind]
  params = dict(cls.defaults, **params)
  params = {k: v for k, v in params.items() if k not in cls.search_params}
  return io.fingerprint(
      [kind, metric, json.dumps(params, sort_keys=True)],
      np.asarray(docs_nd, np.float32),
  )


def build_or_load(
    directory, kind: str, docs_nd, *, metric: str = "dot", **params
) -> tuple[Index, dict[str, Any]]:
  """The index saved in `directory` if its content key matches, else built.

  A hit takes this call's `search_params` (ef_search, nprobe, ...: no
  rebuild). A miss builds `build(kind, docs_nd, ...)` and saves it into
  `directory` (the old index's other arrays removed), then writes KEY_FILE
  last, so an interrupted save is rebuilt. An unreadable saved index is
  rebuilt too. Returns (index, info): info = {"key", "build_s" (the
  build's, also when reused), "reused"}.
  """
  directory = pathlib.Path(directory)
  key = content_key(kind, docs_nd, metric=metric, **params)
  key_path = directory / KEY_FILE
  try:
    saved = json.loads(key_path.read_text())
    if saved["key"] == key:
      index = load(directory)
      wanted = dict(index.defaults, **params)
      searched = {k: wanted[k] for k in index.search_params}
      if any(index.config[k] != v for k, v in searched.items()):
        index.config.update(searched)  # index.json says what was searched
        io.write_json_atomic(
            directory / "index.json",
            dict(index.config, arrays=sorted(index.arrays)),
        )
      if isinstance(index, _FaissIndex):
        index.faiss_index()  # deserialised here: a bad copy is rebuilt
      return index, dict(saved, reused=True)
  except FileNotFoundError:
    pass
  except Exception as e:  # pylint: disable=broad-exception-caught
    # json, npy or faiss errors alike: rebuilding is always correct.
    logging.warning("%s: unreadable index (%s), rebuilding", directory, e)
  try:
    old_arrays = json.loads((directory / "index.json").read_text())["arrays"]
  except Exception:  # pylint: disable=broad-exception-caught
    old_arrays = []
  key_path.unlink(missing_ok=True)
  start = time.perf_counter()
  index = build(kind, docs_nd, metric=metric, **params)
  info = {"key": key, "build_s": time.perf_counter() - start}
  index.save(directory)
  for name in set(old_arrays) - set(index.arrays):
    (directory / f"{name}.npy").unlink(missing_ok=True)
  io.write_json_atomic(key_path, info)
  return index, dict(info, reused=False)
