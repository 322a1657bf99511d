"""TREC run files: write, read, and build runs from top-k search output.

Lines are `qid Q0 docid rank score tag`, each query in trec_eval's order (so
the rank column agrees with trec_eval's), scores as `repr` floats (float32
round-trips). trec_eval splits on whitespace, and LIMIT-small's doc ids are
names like "Geneva Durben", so ids are percent-encoded on write: whitespace
and '%' become '%XX' UTF-8 escapes, nothing else changes; `read_run` decodes.
Tools reading the file raw see encoded ids (encode qrels with `encode_id`).
"""

from collections.abc import Mapping, Sequence
import os
import re
import urllib.parse

import numpy as np

from retrieval_jax.evaluation import ir_metrics

# `\s` matches exactly what `str.isspace` accepts, i.e. what `split()` splits.
_NEEDS_ESCAPE = re.compile(r"[\s%]")
_WHITESPACE = re.compile(r"\s")
_NUM_FIELDS = 6


def _escape(match: re.Match[str]) -> str:
  """'%XX' escapes of the UTF-8 bytes of one matched character."""
  return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


def encode_id(identifier: str) -> str:
  """Percent-encodes whitespace and '%' in a query or doc id.

  Args:
    identifier: the id; must not be empty.

  Returns:
    The id with every whitespace character and '%' replaced by '%XX' escapes
    of its UTF-8 bytes; ids without them are returned unchanged.

  Raises:
    ValueError: the id is empty (it would leave an empty field).
  """
  if not identifier:
    raise ValueError("run ids must not be empty")
  return _NEEDS_ESCAPE.sub(_escape, identifier)


def decode_id(field: str) -> str:
  """Inverse of `encode_id` ('%' is always escaped, so this is exact)."""
  return urllib.parse.unquote(field) if "%" in field else field


def write_run(path: str | os.PathLike[str],
              run: Mapping[str, ir_metrics.DocScores],
              tag: str = "retrieval_jax") -> None:
  """Writes a run as a TREC run file.

  Args:
    path: output file (overwritten).
    run: {query id: {doc id: score}} or {query id: [(doc id, score), ...]};
      queries are written in the mapping's order, documents in trec_eval's
      order (score descending, doc id descending). A query without documents
      writes no line (a run file cannot hold it).
    tag: the run tag (last column); must not contain whitespace.

  Raises:
    ValueError: the tag is empty or has whitespace, an id is empty, or a
      query lists the same doc twice.
  """
  if not tag or _WHITESPACE.search(tag):
    raise ValueError(f"run tag must be non-empty without whitespace: {tag!r}")
  lines = []
  for qid, docs in run.items():
    ranked = ir_metrics.trec_eval_sorted(docs)
    if len({doc for doc, _ in ranked}) != len(ranked):  # trec_eval refuses
      raise ValueError(f"query {qid!r} lists a document more than once")
    encoded_qid = encode_id(qid)
    lines.extend(
        f"{encoded_qid} Q0 {encode_id(doc)} {rank} {float(score)!r} {tag}\n"
        for rank, (doc, score) in enumerate(ranked, start=1))
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(lines)


def read_run(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
  """Reads a TREC run file (ids percent-decoded, see the module docstring).

  Blank lines are skipped; the rank must parse but, as in trec_eval, the
  order comes from the scores.

  Args:
    path: the run file.

  Returns:
    {query id: {doc id: score}}, queries and docs in file order.

  Raises:
    ValueError: a line does not have 6 fields, its rank is not an integer,
      its score is not a number, or a (query, doc) pair repeats; the message
      names the file and the 1-based line number.
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
            f"score tag', got {len(fields)}: {line.rstrip()!r}")
      qid_field, _, doc_field, rank_field, score_field, _ = fields
      try:
        int(rank_field)  # else the columns are shifted
        score = float(score_field)
      except ValueError:
        raise ValueError(f"{where}: rank must be an integer and score a "
                         f"number: {line.rstrip()!r}") from None
      docs = run.setdefault(decode_id(qid_field), {})
      doc = decode_id(doc_field)
      if doc in docs:  # trec_eval rejects duplicates
        raise ValueError(f"{where}: document {doc!r} repeats for query "
                         f"{decode_id(qid_field)!r}")
      docs[doc] = score
  return run


def run_from_topk(query_ids: Sequence[str], doc_ids: Sequence[str],
                  scores_qk: np.ndarray,
                  indices_qk: np.ndarray) -> dict[str, dict[str, float]]:
  """Turns top-k search output into a run dict.

  Args:
    query_ids: Q query ids, one per row.
    doc_ids: the collection's doc ids; `indices_qk` indexes into them.
    scores_qk: float [Q, K] scores (any float dtype; converted exactly to
      float64 Python floats).
    indices_qk: int [Q, K] doc indices; negative entries are padding (fewer
      than K results) and are skipped.

  Returns:
    {query id: {doc id: score}}; every query is present, possibly with an
    empty dict.

  Raises:
    ValueError: shapes disagree, an index is out of range, or a row lists the
      same document twice.
  """
  scores_qk = np.asarray(scores_qk)
  indices_qk = np.asarray(indices_qk)
  if scores_qk.shape != indices_qk.shape or scores_qk.ndim != 2:
    raise ValueError(f"scores {scores_qk.shape} and indices "
                     f"{indices_qk.shape} must both be [Q, K]")
  if len(query_ids) != scores_qk.shape[0]:
    raise ValueError(f"{len(query_ids)} query ids for {scores_qk.shape[0]} "
                     "rows")
  if indices_qk.size and indices_qk.max() >= len(doc_ids):
    raise ValueError(f"doc index {indices_qk.max()} out of range for "
                     f"{len(doc_ids)} docs")
  # Lists and one bulk `tolist`: far faster than per-element NumPy indexing.
  doc_ids = doc_ids if isinstance(doc_ids, list) else list(doc_ids)
  scores = scores_qk.astype(np.float64).tolist()
  run = {}
  for qid, row_scores, row_indices in zip(query_ids, scores,
                                          indices_qk.tolist()):
    docs = {doc_ids[i]: s for i, s in zip(row_indices, row_scores) if i >= 0}
    if len(docs) != sum(i >= 0 for i in row_indices):  # a repeated index
      raise ValueError(f"query {qid!r} lists a document more than once")
    run[qid] = docs
  return run
