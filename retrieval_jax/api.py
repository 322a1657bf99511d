"""Notebook API: load a model or a trained run, encode, index, search.

  enc = retrieval_jax.load("all-MiniLM-L6-v2")       # or load(run=WORKDIR)
  emb = enc.encode(["a query", ...])                  # float32 [N, D]
  index = retrieval_jax.index(corpus, enc)            # or kind="bm25"
  ids, scores = index.search(["a query"], k=10)       # [Q][k] ids, [Q, k]

A trained run of any kind loads the same way (`load(run=...)`); `index`
builds what that kind searches with: exact dense search, a SPLADE inverted
index, or a first stage (BM25) re-ranked by ColBERT's MaxSim or a
cross-encoder. The evaluate and encode modes build on the same pieces.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import jax
import numpy as np

from retrieval_jax import encoding
from retrieval_jax import kinds
from retrieval_jax import sharding


@dataclasses.dataclass
class Model:
  """A pretrained encoder or a trained run, with its tokenizer.

  Attributes:
    kind: the `kinds.KINDS` entry ("bi_encoder" for a pretrained model).
    module, tokenizer: the NNX model and its tokenizer.
    run_config: the run's saved config ({} for a pretrained model).
    mesh: devices encoding runs on.
    max_length: tokens per text.
  """

  kind: Any
  module: Any
  tokenizer: Any
  run_config: dict
  mesh: Any
  max_length: int
  _encoder: Any = None

  @property
  def text_encoder(self) -> encoding.TextEncoder:
    """The dense encoder (kinds with `retriever == "dense"`)."""
    if self._encoder is None:
      self._encoder = self.kind.text_encoder(
          self.module,
          self.tokenizer,
          self.run_config,
          self.mesh,
          max_length=self.max_length,
      )
    return self._encoder

  def encode(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 64,
      progress: bool = False,
  ) -> np.ndarray:
    """float32 [N, D] embeddings (dense kinds) of `texts`, in order."""
    return self.text_encoder.encode(
        list(texts), batch_size=batch_size, progress=progress
    )

  def encode_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
    """`encode` with the checkpoint's query prompt prepended (e5: "query: ")."""
    return self.text_encoder.encode_queries(list(texts), **kwargs)

  def encode_documents(self, texts: Sequence[str], **kwargs) -> np.ndarray:
    """`encode` with the checkpoint's document prompt prepended."""
    return self.text_encoder.encode_documents(list(texts), **kwargs)


def load(
    name_or_path: str = "all-MiniLM-L6-v2",
    *,
    run: str | None = None,
    max_length: int | None = 256,
    mesh=None,
    pooling: str = "",
    normalize: bool | None = None,
    dtype: str = "float32",
) -> Model:
  """A packaged / local pretrained model, or a trained run (`run=WORKDIR`).

  Args:
    name_or_path: packaged model name or checkpoint directory (no `run`).
    run: a train-mode workdir; its latest checkpoint, any kind.
    max_length: tokens per text (None: the checkpoint's).
    mesh: default: every device on the data axis.
    pooling, normalize, dtype: pretrained models only; "" / None keep the
      checkpoint's own settings.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  if run is not None:
    module, tokenizer, run_cfg, _ = kinds.load_run(run, mesh)
    return Model(
        kinds.get(run_cfg["model"]),
        module,
        tokenizer,
        run_cfg,
        mesh,
        max_length or run_cfg["model"]["max_length"],
    )
  encoder = encoding.TextEncoder.from_pretrained(
      name_or_path,
      mesh,
      pooling=pooling,
      normalize=normalize,
      max_length=max_length,
      dtype=dtype,
  )
  return Model(
      kinds.KINDS["bi_encoder"],
      None,
      encoder.tokenizer,
      {"model": {"pooling": encoder.pooling, "normalize": encoder.normalize}},
      mesh,
      encoder.max_length,
      _encoder=encoder,
  )


@dataclasses.dataclass
class Index:
  """A searchable corpus; `search(queries, k) -> (ids, scores)`."""

  doc_ids: list[str]
  search_rows: Any  # (queries, k) -> (scores_qk, rows_qk), rows -1 = none

  def search(
      self, queries: Sequence[str] | str, k: int = 10
  ) -> tuple[list[list[str]], np.ndarray]:
    """Top-k documents per query.

    Returns:
      (ids, scores): `ids[q]` the doc ids best first (fewer than k when the
      retriever finds fewer), `scores` float32 [Q, k] (-inf past the end).
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    scores_qk, rows_qk = self.search_rows(queries, min(k, len(self.doc_ids)))
    rows_qk = np.asarray(rows_qk)
    scores_qk = np.where(
        rows_qk >= 0, np.asarray(scores_qk, np.float32), -np.inf
    )
    ids = [[self.doc_ids[r] for r in row if r >= 0] for row in rows_qk]
    return ids, scores_qk


def index(
    corpus: Mapping[str, str] | Sequence[str],
    model: Model | None = None,
    *,
    kind: str | None = None,
    depth: int = 100,
    batch_size: int = 32,
) -> Index:
  """Indexes `corpus` ({id: text} or texts, ids "0", "1", ...) for search.

  Args:
    corpus: the documents.
    model: from `load`; its kind decides the index.
    kind: "bm25" for a BM25 index (no model); default: the model's.
    depth: first-stage (BM25) candidates re-ranked by ColBERT or a
      cross-encoder.
    batch_size: texts per encoder step.
  """
  from retrieval_jax.search import bm25  # pylint: disable=g-import-not-at-top

  if isinstance(corpus, Mapping):
    doc_ids, texts = list(corpus), list(corpus.values())
  else:
    texts = list(corpus)
    doc_ids = [str(i) for i in range(len(texts))]
  retriever = kind or (model.kind.retriever if model else "bm25")
  if retriever == "bm25":
    bm = bm25.Bm25Index.build(texts)
    return Index(doc_ids, bm.search)
  if model is None:
    raise ValueError(f"kind={retriever!r} needs a model (retrieval_jax.load)")
  with jax.default_matmul_precision("float32"):
    return Index(
        doc_ids, _SEARCHERS[retriever](model, texts, depth, batch_size)
    )


def _dense(model, texts, depth, batch_size):
  from retrieval_jax.search import exact_topk  # pylint: disable=g-import-not-at-top

  del depth
  corpus = exact_topk.encode_corpus(
      model.encode_documents(texts, batch_size=batch_size, progress=False),
      mesh=model.mesh,
      metric="cosine" if model.text_encoder.normalize else "dot",
  )
  return lambda queries, k: exact_topk.search(
      corpus,
      model.encode_queries(queries, batch_size=batch_size, progress=False),
      k,
  )


def _sparse(model, texts, depth, batch_size):
  from retrieval_jax.search import sparse_index  # pylint: disable=g-import-not-at-top

  del depth
  encoder = encoding.SparseEncoder(
      model.module, model.tokenizer, model.mesh, max_length=model.max_length
  )
  docs_nv = encoder.encode(texts, batch_size=batch_size, progress=False)
  built = sparse_index.SparseIndex(docs_nv.tocsc(), *docs_nv.shape)

  def search(queries, k):
    queries_qv = model.kind.query_matrix(
        encoder,
        model.tokenizer,
        queries,
        texts,
        max_length=model.max_length,
        batch_size=batch_size,
        progress=False,
    )
    return sparse_index.search(built, queries_qv, k)

  return search


def _colbert(model, texts, depth, batch_size):
  from retrieval_jax.search import bm25  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import late_interaction  # pylint: disable=g-import-not-at-top

  run = model.run_config
  encoder = encoding.MultiVectorEncoder(
      model.module,
      model.tokenizer,
      model.mesh,
      query_maxlen=run["data"]["query_max_length"],
      doc_maxlen=model.max_length,
      augment=run["model"]["colbert_augment"],
  )
  docs_nld, masks_nl = encoder.embed_docs(
      texts, batch_size=batch_size, progress=False
  )
  first = bm25.Bm25Index.build(texts)

  def search(queries, k):
    scores_qk, rows_qk = first.search(queries, max(depth, k))
    q_qld, q_mask_ql = encoder.embed_queries(queries)
    out = late_interaction.two_stage(
        scores_qk, rows_qk, q_qld, q_mask_ql, docs_nld, masks_nl
    )
    return out.maxsim_qk[:, :k], out.indices_qk[:, :k]

  return search


def _rerank(model, texts, depth, batch_size):
  from retrieval_jax.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import bm25  # pylint: disable=g-import-not-at-top

  first = bm25.Bm25Index.build(texts)

  def search(queries, k):
    _, rows_qk = first.search(queries, max(depth, k))
    scorer = encoding.PairScorer(
        model.module,
        model.tokenizer,
        queries,
        texts,
        max_length=model.run_config["data"]["pair_max_length"],
        batch_size=batch_size,
        mesh=model.mesh,
    )
    scores_qk, rows_qk = evaluators.rerank(scorer, np.asarray(rows_qk))
    return scores_qk[:, :k], rows_qk[:, :k]

  return search


_SEARCHERS = {
    "dense": _dense,
    "splade": _sparse,
    "inference_free": _sparse,
    "colbert": _colbert,
    "rerank": _rerank,
}
