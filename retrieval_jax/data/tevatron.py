"""Tevatron-style training data: one query and its passages per JSONL line.

  {"query_id"?: str, "query": str,
   "positive_passages": [{"docid", "title"?, "text", "score"?}, ...],
   "negative_passages": [...]}

The passages carry their texts, so the file is its own corpus (a docid keeps
one text across lines). "negative_passages" may be absent or empty; a
passage's optional "score" (a finite number) is a teacher's score of the
(query, passage) pair. Strict like `beir.py`: every problem raises
`beir.BeirFormatError` "path:line: ".
"""

import dataclasses
import math
import os

from retrieval_jax.data import beir

_WHAT = (
    'Tevatron training data, one {"query", "positive_passages",'
    ' "negative_passages"} object per line'
)
FIELDS = ("positive_passages", "negative_passages")


@dataclasses.dataclass(frozen=True)
class Passage:
  """One passage of a line: id, `beir.doc_text(title, text)`, score or None."""

  doc_id: str
  text: str
  score: float | None


@dataclasses.dataclass(frozen=True)
class TevatronRow:
  """One line: its number, the query and its passages in file order."""

  line: int
  query_id: str
  query: str
  positives: tuple[Passage, ...]
  negatives: tuple[Passage, ...]


def _reraise(path: str, lineno: int, where: str, error: beir.BeirFormatError):
  # The beir helpers name the key; the list position says which passage.
  detail = str(error).removeprefix(f"{path}:{lineno}: ")
  raise beir.BeirFormatError(path, lineno, f"{where}: {detail}") from None


def _passage(path, lineno, where, obj, require_score: bool) -> Passage:
  if not isinstance(obj, dict):
    raise beir.BeirFormatError(
        path,
        lineno,
        f"{where} must be a JSON object, got "
        f"{beir._json_type(obj)}",  # pylint: disable=protected-access
    )
  try:
    doc_id = beir.json_id(path, lineno, obj, "docid")
    title = beir.json_text(path, lineno, obj, "title", required=False)
    text = beir.json_text(path, lineno, obj, "text", required=True)
  except beir.BeirFormatError as e:
    _reraise(path, lineno, where, e)
  score = obj.get("score")
  if score is None:
    if require_score:
      raise beir.BeirFormatError(
          path,
          lineno,
          f'{where} has no "score"; with the file\'s scores as the teacher'
          " every passage needs one",
      )
  elif (
      isinstance(score, bool)
      or not isinstance(score, (int, float))
      or not math.isfinite(score)
  ):
    raise beir.BeirFormatError(
        path, lineno, f'{where}: "score" must be a finite number, got {score!r}'
    )
  return Passage(
      doc_id,
      beir.doc_text(title, text),
      None if score is None else float(score),
  )


def read_tevatron(
    path: str, *, require_scores: bool = False
) -> list[TevatronRow]:
  """Validated rows of a Tevatron JSONL file, in file order.

  A missing "query_id" becomes "L<line>". Refused, naming the line: a
  repeated query id, no positive, a docid twice in one line (as two
  positives, or positive and negative), a docid whose text differs from its
  first line's, and (require_scores) a passage without "score".
  """
  path = os.fspath(path)
  beir.require_file(path, _WHAT)
  rows = []
  seen_queries: dict[str, int] = {}
  texts: dict[str, tuple[str, int]] = {}
  for lineno, obj in beir.read_json_objects(path):
    query_id = (
        beir.json_id(path, lineno, obj, "query_id")
        if obj.get("query_id") is not None
        else f"L{lineno}"
    )
    first = seen_queries.setdefault(query_id, lineno)
    if first != lineno:
      # Two lines for one query would split its known relevant set.
      raise beir.BeirFormatError(
          path,
          lineno,
          f"duplicate query_id {query_id!r} (first at line {first})",
      )
    query = beir.json_text(path, lineno, obj, "query", required=True)
    lists = {}
    for field in FIELDS:
      value = obj.get(field)
      if value is None and field == "negative_passages":
        value = []
      if not isinstance(value, list):
        raise beir.BeirFormatError(
            path,
            lineno,
            f'"{field}" must be an array of passages, got '
            f"{beir._json_type(value)}",  # pylint: disable=protected-access
        )
      lists[field] = [
          _passage(path, lineno, f"{field}[{i}]", p, require_scores)
          for i, p in enumerate(value)
      ]
    if not lists["positive_passages"]:
      # Every loss needs a positive; such a query cannot be trained on.
      raise beir.BeirFormatError(path, lineno, '"positive_passages" is empty')
    in_line: dict[str, str] = {}
    for field in FIELDS:
      for i, p in enumerate(lists[field]):
        where = f"{field}[{i}]"
        if p.doc_id in in_line:
          raise beir.BeirFormatError(
              path,
              lineno,
              f"{where}: docid {p.doc_id!r} already in {in_line[p.doc_id]}",
          )
        in_line[p.doc_id] = where
        text, first = texts.setdefault(p.doc_id, (p.text, lineno))
        if text != p.text:
          # One docid is one passage: two texts would make it ambiguous.
          raise beir.BeirFormatError(
              path,
              lineno,
              f"{where}: docid {p.doc_id!r} has another text than at line"
              f" {first}",
          )
    rows.append(
        TevatronRow(
            lineno,
            query_id,
            query,
            tuple(lists["positive_passages"]),
            tuple(lists["negative_passages"]),
        )
    )
  if not rows:
    raise beir.BeirFormatError(path, None, "the file holds no queries")
  return rows
