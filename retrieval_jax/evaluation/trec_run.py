"""TREC run files: write, read, and build runs from top-k search output.

Lines are `qid Q0 docid rank score tag` in trec_eval's order, scores as `repr`
floats. trec_eval splits on whitespace and LIMIT-small's doc ids are names
("Geneva Durben"), so whitespace and '%' in ids are '%XX'-encoded on write.
"""

from collections.abc import Mapping, Sequence
import os
import re
import urllib.parse

import numpy as np

from retrieval_jax.evaluation import ir_metrics

_NEEDS_ESCAPE = re.compile(r"[\s%]")
_WHITESPACE = re.compile(r"\s")
_NUM_FIELDS = 6


def _escape(match: re.Match[str]) -> str:
  return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


def encode_id(identifier: str) -> str:
  """Non-empty id -> id with whitespace and '%' as '%XX' UTF-8 escapes."""
  if not identifier:
    raise ValueError("run ids must not be empty")
  return _NEEDS_ESCAPE.sub(_escape, identifier)


def decode_id(field: str) -> str:
  """Inverse of `encode_id` ('%' is always escaped, so this is exact)."""
  return urllib.parse.unquote(field) if "%" in field else field


def write_run(
    path: str | os.PathLike[str],
    run: Mapping[str, ir_metrics.DocScores],
    tag: str = "retrieval_jax",
) -> None:
  """Writes `run` {qid: {doc: score} or [(doc, score)]} as a TREC run file.

  Queries keep the mapping's order, docs trec_eval's (score, then doc id,
  descending); a query without docs writes no line.
  """
  if not tag or _WHITESPACE.search(tag):
    raise ValueError(f"run tag must be non-empty without whitespace: {tag!r}")
  lines = []
  for qid, docs in run.items():
    ranked = ir_metrics.trec_eval_sorted(docs)
    if len({doc for doc, _ in ranked}) != len(ranked):
      raise ValueError(f"query {qid!r} lists a document more than once")
    encoded_qid = encode_id(qid)
    lines.extend(
        f"{encoded_qid} Q0 {encode_id(doc)} {rank} {float(score)!r} {tag}\n"
        for rank, (doc, score) in enumerate(ranked, start=1)
    )
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(lines)


def read_run(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
  """Reads a TREC run file into {qid: {doc: score}} in file order, ids decoded.

  As in trec_eval, the rank must parse but the order comes from the scores.
  """
  run: dict[str, dict[str, float]] = {}
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      where = f"{os.fspath(path)}:{line_number}"
      if len(fields) != _NUM_FIELDS:
        raise ValueError(
            f"{where}: expected {_NUM_FIELDS} fields 'qid Q0 docid rank "
            f"score tag', got {len(fields)}: {line.rstrip()!r}"
        )
      qid_field, _, doc_field, rank_field, score_field, _ = fields
      try:
        int(rank_field)  # Else the columns are shifted.
        score = float(score_field)
      except ValueError:
        raise ValueError(
            f"{where}: rank must be an integer and score a "
            f"number: {line.rstrip()!r}"
        ) from None
      docs = run.setdefault(decode_id(qid_field), {})
      doc = decode_id(doc_field)
      if doc in docs:
        raise ValueError(
            f"{where}: document {doc!r} repeats for query "
            f"{decode_id(qid_field)!r}"
        )
      docs[doc] = score
  return run


def run_from_topk(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    scores_qk: np.ndarray,
    indices_qk: np.ndarray,
) -> dict[str, dict[str, float]]:
  """Top-k output -> {qid: {doc id: score}}, every query present.

  Args:
    query_ids: Q ids, one per row; doc_ids: what `indices_qk` indexes.
    scores_qk: float [Q, K], converted exactly to float64.
    indices_qk: int [Q, K]; negative entries are padding and skipped.
  """
  scores_qk = np.asarray(scores_qk)
  indices_qk = np.asarray(indices_qk)
  if scores_qk.shape != indices_qk.shape or scores_qk.ndim != 2:
    raise ValueError(
        f"scores {scores_qk.shape} and indices "
        f"{indices_qk.shape} must both be [Q, K]"
    )
  if len(query_ids) != scores_qk.shape[0]:
    raise ValueError(
        f"{len(query_ids)} query ids for {scores_qk.shape[0]} rows"
    )
  if indices_qk.size and indices_qk.max() >= len(doc_ids):
    raise ValueError(
        f"doc index {indices_qk.max()} out of range for {len(doc_ids)} docs"
    )
  # Lists and one bulk `tolist`: far faster than per-element NumPy indexing.
  doc_ids = doc_ids if isinstance(doc_ids, list) else list(doc_ids)
  scores = scores_qk.astype(np.float64).tolist()
  run = {}
  for qid, row_scores, row_indices in zip(
      query_ids, scores, indices_qk.tolist()
  ):
    docs = {doc_ids[i]: s for i, s in zip(row_indices, row_scores) if i >= 0}
    if len(docs) != sum(i >= 0 for i in row_indices):  # a repeated index
      raise ValueError(f"query {qid!r} lists a document more than once")
    run[qid] = docs
  return run
