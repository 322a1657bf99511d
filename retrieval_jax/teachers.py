"""Distillation teachers: a fixed scorer's score of each training candidate.

`config.loss.teacher` (`kinds.base.TEACHERS`): "bm25" (`search/bm25.py`);
"dense", a bi-encoder run or model (`config.loss.teacher_workdir`);
"hybrid", the evaluate mode's fusion (`search/fusion.py`: alpha 1, per-query
"minmax_center", BM25 zeros missing) of BM25 and a dense teacher
(teacher_workdir, default `config.model.pretrained`); "cross_encoder", a
cross-encoder run or checkpoint; "ensemble", the mean of per-query
normalised dense and sparse teachers (BM25, or a SPLADE run:
teacher_sparse_workdir), the inference-free LSR paper's; "file", a Tevatron
file's own scores (`data/tevatron.py`, nothing to run here).

`score_data` scores each query's candidates (positives, then negatives) and
keeps them in <workdir>/teacher/, keyed by content (the teacher's weights and
settings, queries, candidates, corpus), so a resume reads them back.
"""

from collections.abc import Sequence
import json
import os
import pathlib
import time
from typing import Any

from absl import logging
from flax import nnx
import numpy as np

from retrieval_jax import encoding
from retrieval_jax import io
from retrieval_jax import kinds
from retrieval_jax.data import negatives as negatives_lib
from retrieval_jax.data import pipeline
from retrieval_jax.errors import ConfigError
from retrieval_jax.search import bm25
from retrieval_jax.search import fusion

# The evaluate mode's hybrid (configs/evaluate.py): 0.7311 SciFact nDCG@10.
HYBRID_ALPHA = 1.0
NORMALIZATION = "minmax_center"
# Bumped when the cache layout changes, so old files are recomputed.
CACHE_FORMAT = 1
# Queries whose [N] BM25 score rows are alive at once.
_BM25_QUERY_CHUNK = 256


def _candidate_rows(data: pipeline.TrainingData) -> list[np.ndarray]:
  """int64 corpus indices of each query's candidates, `candidate_ids` order."""
  index = data.doc_index
  return [
      np.array([index[d] for d in ex.candidate_ids], np.int64)
      for ex in data.examples
  ]


class Bm25Teacher:
  """BM25 (`bm25.SETTINGS`) over the training corpus; no shared term: 0."""

  name = "bm25"

  def __init__(self, doc_texts: Sequence[str]):
    self.index = bm25.Bm25Index.build(doc_texts, progress=False)
    logging.info(
        "teacher: BM25 over %d docs (%.1f s)",
        self.index.num_docs,
        self.index.build_s,
    )

  def key(self) -> dict[str, Any]:
    return {"teacher": self.name, "settings": self.index.settings}

  def scores(self, data: pipeline.TrainingData) -> list[np.ndarray]:
    """float32 [candidates] per query."""
    rows = _candidate_rows(data)
    queries = [ex.query for ex in data.examples]
    out = []
    for start in range(0, len(queries), _BM25_QUERY_CHUNK):
      chunk = self.index.scores(queries[start : start + _BM25_QUERY_CHUNK])
      for scores_n, rows_c in zip(chunk, rows[start:]):
        out.append(
            np.zeros(len(rows_c), np.float32)
            if scores_n is None
            else scores_n[rows_c].astype(np.float32)
        )
    return out


class DenseTeacher:
  """A bi-encoder's q . d over each query's candidates (its own metric).

  Embeddings are kept by doc and query, so refreshed candidates only embed
  the docs not seen before. identity: what names the weights in cache keys.
  """

  name = "dense"

  def __init__(
      self,
      encoder: encoding.TextEncoder,
      doc_texts: Sequence[str],
      identity: dict[str, Any],
  ):
    self.encoder, self.doc_texts, self.identity = encoder, doc_texts, identity
    self._docs: dict[int, np.ndarray] = {}
    self._queries: dict[str, np.ndarray] = {}

  def key(self) -> dict[str, Any]:
    return {"teacher": self.name, **self.identity}

  def scores(self, data: pipeline.TrainingData) -> list[np.ndarray]:
    """float32 [candidates] per query."""
    rows = _candidate_rows(data)
    new_docs = sorted(set(np.concatenate(rows).tolist()).difference(self._docs))
    if new_docs:
      emb_nd = self.encoder.encode_documents(
          [self.doc_texts[i] for i in new_docs],
          desc="teacher: docs",
          progress=True,
      )
      self._docs.update(zip(new_docs, emb_nd))
    new_queries = sorted(
        {ex.query for ex in data.examples}.difference(self._queries)
    )
    if new_queries:
      emb_qd = self.encoder.encode_queries(
          new_queries, desc="teacher: queries", progress=True
      )
      self._queries.update(zip(new_queries, emb_qd))
    return [
        np.stack([self._docs[int(i)] for i in rows_c]) @ self._queries[ex.query]
        for ex, rows_c in zip(data.examples, rows)
    ]


class SparseTeacher:
  """A SPLADE run's q . d (both sides encoded) over each query's candidates."""

  name = "splade"

  def __init__(
      self,
      encoder: encoding.SparseEncoder,
      doc_texts: Sequence[str],
      identity: dict[str, Any],
  ):
    self.encoder, self.doc_texts, self.identity = encoder, doc_texts, identity

  def key(self) -> dict[str, Any]:
    return {"teacher": self.name, **self.identity}

  def scores(self, data: pipeline.TrainingData) -> list[np.ndarray]:
    """float32 [candidates] per query."""
    rows = _candidate_rows(data)
    docs = sorted(set(np.concatenate(rows).tolist()))
    where = {d: i for i, d in enumerate(docs)}
    docs_nv = self.encoder.encode(
        [self.doc_texts[i] for i in docs], desc="teacher", progress=False
    )
    queries_qv = self.encoder.encode(
        [ex.query for ex in data.examples], desc="teacher", progress=False
    )
    return [
        np.asarray(
            (docs_nv[[where[int(i)] for i in rows_c]] @ queries_qv[q].T)
            .toarray()
            .reshape(-1),
            np.float32,
        )
        for q, rows_c in enumerate(rows)
    ]


class CrossEncoderTeacher:
  """A cross-encoder's score of each (query, candidate) pair."""

  name = "cross_encoder"

  def __init__(self, model, tokenizer, run_cfg: dict, mesh, doc_texts):
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.doc_texts = doc_texts
    self.max_length = int(run_cfg["data"]["pair_max_length"])
    self.identity = negatives_lib.encoder_key(
        nnx.state(model, nnx.Param),
        head=model.head,
        pair_max_length=self.max_length,
    )

  def key(self) -> dict[str, Any]:
    return {"teacher": self.name, **self.identity}

  def scores(self, data: pipeline.TrainingData) -> list[np.ndarray]:
    """float32 [candidates] per query."""
    rows = _candidate_rows(data)
    scorer = encoding.PairScorer(
        self.model,
        self.tokenizer,
        [ex.query for ex in data.examples],
        self.doc_texts,
        max_length=self.max_length,
        mesh=self.mesh,
        desc="teacher: pairs",
    )
    # One pair per row: query q against one candidate.
    query_p = np.concatenate(
        [np.full(len(r), q, np.int64) for q, r in enumerate(rows)]
    )
    flat = scorer(query_p, np.concatenate(rows)[:, None]).reshape(-1)
    bounds = np.cumsum([len(r) for r in rows])[:-1]
    return [s.astype(np.float32) for s in np.split(flat, bounds)]


def _as_runs(lists: Sequence[np.ndarray], keep=None) -> dict:
  """{query position: {candidate slot: score}} (`fusion` run dicts)."""
  return {
      str(q): {
          str(j): float(s)
          for j, s in enumerate(scores_c)
          if keep is None or keep(s)
      }
      for q, scores_c in enumerate(lists)
  }


class HybridTeacher:
  """`fusion.interpolate` of BM25 and dense over each query's candidates.

  As the evaluate mode's hybrid: alpha * norm(BM25) + norm(dense), norm =
  per-query "minmax_center"; docs BM25 scores 0 are absent from its run
  (search never returns them) and take the list's minimum.
  """

  name = "hybrid"

  def __init__(self, dense: DenseTeacher, sparse: Bm25Teacher):
    self.dense, self.sparse = dense, sparse

  def key(self) -> dict[str, Any]:
    return {
        "teacher": self.name,
        "dense": self.dense.key(),
        "bm25": self.sparse.key(),
        "alpha": HYBRID_ALPHA,
        "normalization": NORMALIZATION,
    }

  def scores(self, data: pipeline.TrainingData) -> list[np.ndarray]:
    """float32 [candidates] per query."""
    dense = self.dense.scores(data)
    fused = fusion.interpolate(
        _as_runs(dense),
        _as_runs(self.sparse.scores(data), keep=lambda s: s > 0),
        alpha=HYBRID_ALPHA,
        normalization=NORMALIZATION,
        k=max(len(d) for d in dense),
    )
    return [
        np.array([fused[str(q)][str(j)] for j in range(len(d))], np.float32)
        for q, d in enumerate(dense)
    ]


class EnsembleTeacher:
  """The mean over `members` of per-query "minmax_center" scores.

  The inference-free LSR paper normalises each teacher to [0, 1] per query
  before the mean; centring differs by a per-query constant, which the list
  losses and Margin-MSE ignore.
  """

  name = "ensemble"

  def __init__(self, members: Sequence[Any]):
    self.members = tuple(members)

  def key(self) -> dict[str, Any]:
    return {
        "teacher": self.name,
        "members": [m.key() for m in self.members],
        "normalization": NORMALIZATION,
    }

  def scores(self, data: pipeline.TrainingData) -> list[np.ndarray]:
    """float32 [candidates] per query."""
    total = None
    for member in self.members:
      normed = [
          np.fromiter(
              fusion.normalize_scores(
                  {str(j): float(s) for j, s in enumerate(scores_c)},
                  NORMALIZATION,
              ).values(),
              np.float64,
          )
          for scores_c in member.scores(data)
      ]
      total = (
          normed if total is None else [a + b for a, b in zip(total, normed)]
      )
    return [(t / len(self.members)).astype(np.float32) for t in total]


def _dense_teacher(path: str, mesh, doc_texts, *, max_length: int, key: str):
  """A `DenseTeacher` of a bi-encoder train workdir or a model directory."""
  try:
    if (pathlib.Path(path).expanduser() / "checkpoints").is_dir():
      model, tokenizer, run_cfg, _ = kinds.load_run(
          path, mesh, kinds=("bi_encoder",)
      )
      encoder = kinds.KINDS["bi_encoder"].text_encoder(
          model,
          tokenizer,
          run_cfg,
          mesh,
          max_length=run_cfg["model"]["max_length"],
      )
    else:
      encoder = encoding.TextEncoder.from_pretrained(
          path, mesh, max_length=max_length
      )
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"{key}={path!r}: {e}") from e
  identity = negatives_lib.encoder_key(
      encoder.state.filter(nnx.Param),
      pooling=encoder.pooling,
      normalize=bool(encoder.normalize),
      max_length=int(encoder.max_length),
      prompts=[encoder.query_prompt, encoder.doc_prompt],
  )
  logging.info("teacher: dense encoder %s", path)
  return DenseTeacher(encoder, doc_texts, identity)


def _splade_teacher(path: str, mesh, doc_texts, *, key: str) -> SparseTeacher:
  """A `SparseTeacher` of a SPLADE train workdir or checkpoint."""
  try:
    model, tokenizer, run_cfg, _ = kinds.load_run(path, mesh, kinds=("splade",))
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"{key}={path!r}: {e}") from e
  max_length = int(run_cfg["model"]["max_length"])
  encoder = encoding.SparseEncoder.from_model(
      model, tokenizer, mesh, max_length=max_length
  )
  identity = negatives_lib.encoder_key(
      nnx.state(model, nnx.Param), max_length=max_length
  )
  return SparseTeacher(encoder, doc_texts, identity)


def build(config, doc_texts: Sequence[str], mesh):
  """The teacher `config.loss.teacher` names over the training corpus
  `doc_texts`; None for "" and "file" (no scoring to do).

  Raises:
    ConfigError: a teacher workdir that holds no model of the right kind.
  """
  loss = config.loss
  name = loss.get("teacher", "")
  if name in ("", "file"):
    return None
  workdir = loss.get("teacher_workdir", "")

  def dense():
    return _dense_teacher(
        workdir or config.model.pretrained,
        mesh,
        doc_texts,
        max_length=config.model.max_length,
        key=(
            "config.loss.teacher_workdir"
            if workdir
            else "config.model.pretrained"
        ),
    )

  if name == "bm25":
    return Bm25Teacher(doc_texts)
  if name == "dense":
    return dense()
  if name == "hybrid":
    return HybridTeacher(dense(), Bm25Teacher(doc_texts))
  if name == "ensemble":
    sparse_dir = loss.get("teacher_sparse_workdir", "")
    sparse = (
        _splade_teacher(
            sparse_dir,
            mesh,
            doc_texts,
            key="config.loss.teacher_sparse_workdir",
        )
        if sparse_dir
        else Bm25Teacher(doc_texts)
    )
    return EnsembleTeacher([dense(), sparse])
  if name == "cross_encoder":
    try:
      model, tokenizer, run_cfg, _ = kinds.load_run(
          workdir, mesh, kinds=("cross_encoder",)
      )
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"config.loss.teacher_workdir={workdir!r}: {e}") from e
    return CrossEncoderTeacher(model, tokenizer, run_cfg, mesh, doc_texts)
  raise ConfigError(
      f"config.loss.teacher={name!r}: expected one of {kinds.base.TEACHERS}"
  )


def cache_key(teacher, data: pipeline.TrainingData) -> dict[str, Any]:
  """The JSON cache key of `teacher` scoring `data`: all scores depend on."""
  return {
      "teacher": teacher.key(),
      "num_queries": len(data.examples),
      "queries": io.fingerprint(
          [ex.query_id for ex in data.examples],
          [ex.query for ex in data.examples],
      ),
      "candidates": io.fingerprint(
          [list(ex.candidate_ids) for ex in data.examples]
      ),
      # The whole corpus: BM25's idf and length norm read every document.
      "corpus": io.fingerprint(list(data.doc_ids), list(data.doc_texts)),
  }


def _digest(key: dict[str, Any]) -> str:
  return io.fingerprint(
      json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  )


def _read_cache(path: pathlib.Path, digest: str, sizes: list[int]):
  """The cached score lists when `path` holds this key's; else None."""
  if not path.is_file():
    return None
  try:
    cached = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    logging.warning("%s: unreadable teacher cache (%s); rescoring", path, e)
    return None
  if not isinstance(cached, dict) or cached.get("key_digest") != digest:
    logging.info("%s: another key's teacher scores; rescoring", path)
    return None
  scores = cached.get("scores")
  try:
    # Never trust another layout: wrong targets would train silently.
    if (
        cached.get("format") != CACHE_FORMAT
        or [len(s) for s in scores] != sizes
    ):
      raise ValueError("wrong layout")
    out = [np.asarray(s, np.float32) for s in scores]
    if not all(np.all(np.isfinite(s)) and s.ndim == 1 for s in out):
      raise ValueError("not finite numbers")
  except (TypeError, ValueError) as e:
    logging.warning("%s: malformed teacher cache (%s); rescoring", path, e)
    return None
  return out


def score_data(
    data: pipeline.TrainingData,
    teacher,
    cache_dir: str | os.PathLike | None,
) -> pipeline.TrainingData:
  """`data` whose queries carry `teacher`'s scores of their candidates.

  None (no teacher, or the file's own scores) returns `data` unchanged. With
  `cache_dir`, the scores are read from / written to
  <cache_dir>/<teacher>-<key digest>.json (`cache_key`).
  """
  if teacher is None:
    return data
  sizes = [len(ex.candidate_ids) for ex in data.examples]
  path = None
  if cache_dir is not None:
    key = cache_key(teacher, data)
    digest = _digest(key)
    path = pathlib.Path(cache_dir) / f"{teacher.name}-{digest[:16]}.json"
    cached = _read_cache(path, digest, sizes)
    if cached is not None:
      logging.info("%s: reusing teacher scores (%d queries)", path, len(sizes))
      return data.with_teacher_scores(cached)
  start = time.perf_counter()
  scores = [np.asarray(s, np.float32) for s in teacher.scores(data)]
  if [len(s) for s in scores] != sizes or not all(
      np.all(np.isfinite(s)) for s in scores
  ):
    raise ValueError(f"teacher {teacher.name!r} gave malformed scores")
  logging.info(
      "teacher %s: %d candidates of %d queries in %.1f s",
      teacher.name,
      sum(sizes),
      len(sizes),
      time.perf_counter() - start,
  )
  if path is not None:
    # float32 -> float64 -> JSON text is exact both ways.
    io.write_json_atomic(
        path,
        {
            "format": CACHE_FORMAT,
            "key_digest": digest,
            "key": key,
            "scores": [s.tolist() for s in scores],
        },
        indent=None,
    )
  return data.with_teacher_scores(scores)
