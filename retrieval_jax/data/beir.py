"""Strict readers for retrieval collections in the BEIR layout.

corpus.jsonl ({"_id", "title", "text"} per line), queries.jsonl ({"_id",
"text"}), qrels/<split>.tsv (optional header, then query-id, corpus-id,
integer score). The library's one reader (`load_beir`): pure Python, so the
run path needs no TF. Every problem raises `BeirFormatError` "path:line: ".
"""

import collections
from collections.abc import Iterator, Sequence
import dataclasses
import json
import os
import re
import warnings

from retrieval_jax import errors

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
QRELS_SUFFIX = ".tsv"
ON_UNKNOWN_POLICIES = ("warn", "error", "ignore")

_NUM_EXAMPLES = 3
# Sign and ASCII digits: int() would also take "1_000" and full-width digits.
_INT_RE = re.compile(r"[+-]?[0-9]+")


class BeirFormatError(errors.DataError):
  """A BEIR file is missing or malformed (see `errors.DataError`)."""


class UnknownIdsWarning(UserWarning):
  """Qrels rows named queries or documents absent from the collection."""


@dataclasses.dataclass(frozen=True)
class QrelsRow:
  """One qrels judgment; score <= 0 is not relevant; line is 1-based."""

  query_id: str
  doc_id: str
  score: int
  line: int


def doc_text(title: str, text: str) -> str:
  """`(title + " " + text).strip()`, as BEIR and MTEB join for dense models."""
  return (title + " " + text).strip()


@dataclasses.dataclass(frozen=True)
class BeirCollection:
  """A parsed BEIR collection, lists in file order, ids unique.

  query_ids: all queries, judged or not; qrels: query -> doc -> score ({}
  without a split).
  """

  doc_ids: list[str]
  titles: list[str]
  texts: list[str]
  query_ids: list[str]
  queries: list[str]
  qrels: dict[str, dict[str, int]]

  def doc_texts(self) -> list[str]:
    """`doc_text(title, text)` per document: list[str] [N]."""
    return [doc_text(t, x) for t, x in zip(self.titles, self.texts)]

  def judged_query_ids(self) -> list[str]:
    """Judged query ids in queries order (SciFact test: 300 of 1,109)."""
    return [q for q in self.query_ids if q in self.qrels]

  def judged_queries(self) -> tuple[list[str], list[str]]:
    """(ids, texts) of the judged queries."""
    ids, texts = [], []
    for qid, query in zip(self.query_ids, self.queries):
      if qid in self.qrels:
        ids.append(qid)
        texts.append(query)
    return ids, texts


def _json_type(value) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):  # Before int: bool is a subclass of int.
    return "a boolean"
  if isinstance(value, (int, float)):
    return "a number"
  if isinstance(value, str):
    return "a string"
  if isinstance(value, list):
    return "an array"
  return "an object"


_CORPUS_WHAT = 'a BEIR corpus, one {"_id", "title", "text"} object per line'
_QUERIES_WHAT = 'BEIR queries, one {"_id", "text"} object per line'
_QRELS_WHAT = "BEIR qrels, query-id<TAB>corpus-id<TAB>score rows"


def require_file(path: str, what: str) -> None:
  """Raises BeirFormatError unless `path` is a file; `what` it should hold."""
  if not os.path.isfile(path):
    state = "is not a file" if os.path.exists(path) else "does not exist"
    raise BeirFormatError(path, None, f"{state}; expected {what}")


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based lineno, line sans line end); drops a BOM, accepts CRLF."""
  # Binary: text mode would also split at U+2028, legal inside JSON strings.
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise BeirFormatError(
            path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None
      if lineno == 1:
        line = line.removeprefix("\ufeff")
      yield lineno, line.rstrip("\r\n")


def read_json_objects(path: str) -> Iterator[tuple[int, dict]]:
  """Yields (lineno, dict) per non-blank line of a JSONL file of objects."""
  for lineno, line in _read_lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise BeirFormatError(
          path, lineno, f"malformed JSON: {e.msg} (column {e.colno})"
      ) from None
    if not isinstance(obj, dict):
      raise BeirFormatError(
          path, lineno, f"expected a JSON object, got {_json_type(obj)}"
      )
    yield lineno, obj


def json_id(path: str, lineno: int, obj: dict, key: str) -> str:
  """obj[key] as an id string; JSON integers are converted with str().

  Null, booleans, floats (no one spelling), empty ids and ids with a tab or
  line break (no qrels TSV could hold them) raise BeirFormatError.
  """
  if key not in obj:
    raise BeirFormatError(path, lineno, f'missing "{key}"')
  value = obj[key]
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise BeirFormatError(
        path,
        lineno,
        f'"{key}" must be a string (or an integer), got {_json_type(value)}',
    )
  value = str(value)
  if not value.strip():
    # A blank id cannot be written to a TREC run file or matched reliably.
    raise BeirFormatError(path, lineno, f'"{key}" is empty')
  if any(c in value for c in "\t\r\n"):
    raise BeirFormatError(
        path, lineno, f'"{key}" {value!r} contains a tab or line break'
    )
  return value


def json_text(
    path: str, lineno: int, obj: dict, key: str, required: bool
) -> str:
  """obj[key] as a string; if not required, absent or null reads as ""."""
  if key not in obj or (not required and obj[key] is None):
    if required:
      raise BeirFormatError(path, lineno, f'missing "{key}"')
    return ""
  value = obj[key]
  if not isinstance(value, str):
    raise BeirFormatError(
        path, lineno, f'"{key}" must be a string, got {_json_type(value)}'
    )
  return value


def _check_unique(
    path: str, lineno: int, key: str, value: str, seen: dict[str, int]
) -> None:
  first = seen.setdefault(value, lineno)
  if first != lineno:
    raise BeirFormatError(
        path, lineno, f"duplicate {key} {value!r} (first at line {first})"
    )


def read_corpus(path: str) -> tuple[list[str], list[str], list[str]]:
  """(doc_ids, titles, texts) of a corpus.jsonl: list[str] [N], file order.

  title is optional (""); text is required but may be empty (Cranfield docs
  471 and 995); other keys are ignored.
  """
  require_file(path, _CORPUS_WHAT)
  ids, titles, texts = [], [], []
  # A repeated id would make qrels ambiguous and a document unreachable.
  seen = {}
  for lineno, obj in read_json_objects(path):
    doc_id = json_id(path, lineno, obj, "_id")
    _check_unique(path, lineno, "_id", doc_id, seen)
    ids.append(doc_id)
    # Title-less corpora (LIMIT, many exports) omit the key or write null.
    titles.append(json_text(path, lineno, obj, "title", required=False))
    texts.append(json_text(path, lineno, obj, "text", required=True))
  if not ids:
    # Here, not in callers: an empty corpus would fail far from the cause.
    raise BeirFormatError(path, None, "the corpus holds no documents")
  return ids, titles, texts


def read_queries(path: str) -> tuple[list[str], list[str]]:
  """(query_ids, texts) of a queries.jsonl: list[str] [Q], file order."""
  require_file(path, _QUERIES_WHAT)
  ids, texts = [], []
  seen = {}
  for lineno, obj in read_json_objects(path):
    query_id = json_id(path, lineno, obj, "_id")
    _check_unique(path, lineno, "_id", query_id, seen)
    ids.append(query_id)
    texts.append(json_text(path, lineno, obj, "text", required=True))
  if not ids:
    # Usually a truncated copy; evaluating zero queries would report zeros.
    raise BeirFormatError(path, None, "the file holds no queries")
  return ids, texts


def _parse_score(field: str) -> int | None:
  field = field.strip()
  return int(field) if _INT_RE.fullmatch(field) else None


def read_qrels_rows(path: str) -> list[QrelsRow]:
  """Validated QrelsRows of a qrels TSV in file order, ids unfiltered.

  The first line is a header iff its score is not an integer, so headerless
  files work; duplicate (query, doc) pairs raise, as in trec_eval.
  """
  require_file(path, _QRELS_WHAT)
  rows = []
  seen = {}  # (query_id, doc_id) -> first line.
  first_line = True
  for lineno, line in _read_lines(path):
    if not line.strip():
      continue
    # Split on tabs only: ids may contain spaces (LIMIT's are names).
    fields = line.split("\t")
    if len(fields) != 3:
      raise BeirFormatError(
          path,
          lineno,
          "expected 3 tab-separated columns (query-id, corpus-id, score),"
          f" got {len(fields)}: {line[:80]!r}",
      )
    query_id, doc_id, score_field = fields
    score = _parse_score(score_field)
    if first_line:
      first_line = False
      if score is None:
        continue  # A header such as "query-id corpus-id score".
    if score is None:
      raise BeirFormatError(
          path, lineno, f"score {score_field!r} is not an integer"
      )
    if not query_id.strip() or not doc_id.strip():
      raise BeirFormatError(path, lineno, "empty query-id or corpus-id")
    first = seen.setdefault((query_id, doc_id), lineno)
    if first != lineno:
      raise BeirFormatError(
          path,
          lineno,
          f"duplicate judgment for query {query_id!r} and doc {doc_id!r}"
          f" (first at line {first})",
      )
    # Scores <= 0 stay: trec_eval tells judged non-relevant from unjudged.
    rows.append(QrelsRow(query_id, doc_id, score, lineno))
  if not rows:
    raise BeirFormatError(path, None, "the file holds no judgments")
  return rows


def _describe_unknown(rows: list[QrelsRow], attr: str, noun: str) -> str:
  # Distinct ids in first-seen order, so the examples match the lines.
  ids = list(dict.fromkeys(getattr(r, attr) for r in rows))
  examples = ", ".join(repr(i) for i in ids[:_NUM_EXAMPLES])
  lines = ", ".join(str(r.line) for r in rows[:_NUM_EXAMPLES])
  return (
      f"{len(rows)} rows name {len(ids)} unknown {noun} ids (e.g. {examples};"
      f" first at lines {lines})"
  )


def qrels_from_rows(
    path: str,
    rows: Sequence[QrelsRow],
    query_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] | None = None,
    on_unknown: str = "warn",
) -> dict[str, dict[str, int]]:
  """query -> doc -> score of `rows`, under the unknown-id policy.

  "warn" (trec_eval's behaviour) drops rows with unknown ids with one
  UnknownIdsWarning; "error" raises at the first; "ignore" drops silently.
  None id lists accept any id; no row left raises BeirFormatError.
  """
  # Checked before any row is looked at, so a typo fails even on clean data.
  if on_unknown not in ON_UNKNOWN_POLICIES:
    raise ValueError(
        f"on_unknown must be one of {ON_UNKNOWN_POLICIES}, got {on_unknown!r}"
    )
  known_q = None if query_ids is None else set(query_ids)
  known_d = None if doc_ids is None else set(doc_ids)
  bad_q = [r for r in rows if known_q is not None and r.query_id not in known_q]
  bad_d = [r for r in rows if known_d is not None and r.doc_id not in known_d]
  # A row can be unknown on both sides; count it once in the totals.
  bad_lines = {r.line for r in bad_q} | {r.line for r in bad_d}
  if bad_lines and on_unknown != "ignore":
    parts = []
    if bad_q:
      parts.append(
          _describe_unknown(bad_q, "query_id", f"query ({QUERIES_FILE})")
      )
    if bad_d:
      parts.append(_describe_unknown(bad_d, "doc_id", f"doc ({CORPUS_FILE})"))
    summary = (
        f"{len(bad_lines)} of {len(rows)} judgments name ids the collection"
        f" lacks: {'; '.join(parts)}"
    )
    if on_unknown == "error":
      raise BeirFormatError(path, min(bad_lines), summary)
    # One warning per file: a mismatched id scheme can make every row unknown.
    warnings.warn(
        f"{path}: {summary}; dropped those rows",
        UnknownIdsWarning,
        stacklevel=2,
    )
  qrels = collections.defaultdict(dict)
  for r in rows:
    if r.line not in bad_lines:
      qrels[r.query_id][r.doc_id] = r.score
  if not qrels:
    # Usually another id numbering (Cranfield: positional vs ".I" query ids).
    raise BeirFormatError(
        path, None, "no judgment names a query and a doc of the collection"
    )
  return dict(qrels)


def read_qrels(
    path: str,
    query_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] | None = None,
    on_unknown: str = "warn",
) -> dict[str, dict[str, int]]:
  """`qrels_from_rows` of `read_qrels_rows(path)`: query -> doc -> score."""
  rows = read_qrels_rows(path)
  return qrels_from_rows(path, rows, query_ids, doc_ids, on_unknown)


def available_splits(directory: str) -> list[str]:
  """Sorted names of the qrels/<split>.tsv files."""
  qrels_dir = os.path.join(directory, QRELS_DIR)
  if not os.path.isdir(qrels_dir):
    return []
  return sorted(
      name.removesuffix(QRELS_SUFFIX)
      for name in os.listdir(qrels_dir)
      if name.endswith(QRELS_SUFFIX)
      and os.path.isfile(os.path.join(qrels_dir, name))
  )


def qrels_path(directory: str, split: str) -> str:
  """qrels/<split>.tsv; if missing, the error lists the splits present."""
  path = os.path.join(directory, QRELS_DIR, split + QRELS_SUFFIX)
  if not os.path.isfile(path):
    found = available_splits(directory)
    have = ", ".join(found) if found else "none"
    raise BeirFormatError(
        path, None, f"no qrels for split {split!r}; splits found: {have}"
    )
  return path


def corpus_path(directory: str) -> str:
  """directory/corpus.jsonl; BeirFormatError if missing."""
  path = os.path.join(directory, CORPUS_FILE)
  require_file(path, _CORPUS_WHAT)
  return path


def queries_path(directory: str) -> str:
  """directory/queries.jsonl; BeirFormatError if missing."""
  path = os.path.join(directory, QUERIES_FILE)
  require_file(path, _QUERIES_WHAT)
  return path


def check_directory(directory: str) -> None:
  """Raises BeirFormatError unless `directory` is an existing directory."""
  if not os.path.isdir(directory):
    state = (
        "is not a directory"
        if os.path.exists(directory)
        else ("does not exist")
    )
    raise BeirFormatError(
        directory,
        None,
        f"{state}; expected a BEIR collection directory ({CORPUS_FILE},"
        f" {QUERIES_FILE}, {QRELS_DIR}/<split>{QRELS_SUFFIX})",
    )


def load_beir(
    directory: str,
    split: str | None = "test",
    on_unknown: str = "warn",
    corpus_only: bool = False,
) -> BeirCollection:
  """Reads a BEIR collection directory into a BeirCollection.

  split None reads no qrels; corpus_only reads only corpus.jsonl (queries and
  qrels empty). All queries are kept: see `judged_query_ids`.
  """
  check_directory(directory)
  if corpus_only:
    doc_ids, titles, texts = read_corpus(corpus_path(directory))
    return BeirCollection(doc_ids, titles, texts, [], [], {})
  # Resolve paths first: fail before parsing a possibly huge corpus.
  qrels_file = None if split is None else qrels_path(directory, split)
  queries_file = queries_path(directory)
  doc_ids, titles, texts = read_corpus(corpus_path(directory))
  query_ids, queries = read_queries(queries_file)
  qrels = {}
  if qrels_file is not None:
    qrels = read_qrels(qrels_file, query_ids, doc_ids, on_unknown)
  return BeirCollection(doc_ids, titles, texts, query_ids, queries, qrels)
