"""Strict readers for retrieval collections in the BEIR layout.

A collection is a directory holding

  corpus.jsonl       one {"_id", "title", "text"} object per line
  queries.jsonl      one {"_id", "text"} object per line
  qrels/<split>.tsv  "query-id<TAB>corpus-id<TAB>score" header, then one
                     judgment per line with an integer score

This is the one way the library reads a collection (training data,
evaluation, experiments): pure Python, no TensorFlow, so the run path needs
none; `tfds_beir` only prepares TFDS tables from these same parsers. Every
format problem raises `BeirFormatError`, starting "path:line: " (or "path: "
for the file as a whole); the rules for what BEIR leaves open are given
where they are applied (`json_id`, `read_corpus`, `read_qrels_rows`, ...).
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

# How many example ids and line numbers an unknown-id message lists.
_NUM_EXAMPLES = 3
# Optional sign, then digits; `int()` alone would also take "1_000" and
# full-width digits, which no qrels writer produces on purpose.
_INT_RE = re.compile(r"[+-]?[0-9]+")


class BeirFormatError(errors.DataError):
  """A BEIR file is missing or malformed (see `errors.DataError`)."""


class UnknownIdsWarning(UserWarning):
  """Qrels rows named queries or documents absent from the collection."""


@dataclasses.dataclass(frozen=True)
class QrelsRow:
  """One judgment as read from a qrels file.

  Attributes:
    query_id: str.
    doc_id: str.
    score: int, graded relevance; <= 0 means not relevant.
    line: int, 1-based line number in the qrels file.
  """

  query_id: str
  doc_id: str
  score: int
  line: int


def doc_text(title: str, text: str) -> str:
  """Joins a title and a body the way BEIR and MTEB do for dense encoders.

  Args:
    title: str, possibly empty.
    text: str, possibly empty.

  Returns:
    str, `(title + " " + text).strip()`; "" for a document with neither.
  """
  return (title + " " + text).strip()


@dataclasses.dataclass(frozen=True)
class BeirCollection:
  """A parsed BEIR collection, every list in file order.

  Attributes:
    doc_ids: list[str] [N], unique.
    titles: list[str] [N], "" where the corpus has no title.
    texts: list[str] [N], may contain "".
    query_ids: list[str] [Q], unique; all queries of queries.jsonl, judged
      in the split or not.
    queries: list[str] [Q].
    qrels: dict[str, dict[str, int]], query id -> doc id -> score, keys in
      qrels file order; only ids present in the collection. Empty when no
      split was read.
  """

  doc_ids: list[str]
  titles: list[str]
  texts: list[str]
  query_ids: list[str]
  queries: list[str]
  qrels: dict[str, dict[str, int]]

  def doc_texts(self) -> list[str]:
    """Returns list[str] [N], `doc_text(title, text)` per document."""
    return [doc_text(t, x) for t, x in zip(self.titles, self.texts)]

  def judged_query_ids(self) -> list[str]:
    """Returns list[str], the query ids with judgments, in queries order.

    Evaluation encodes only these: SciFact has 1,109 queries, of which the
    test qrels judge 300.
    """
    return [q for q in self.query_ids if q in self.qrels]

  def judged_queries(self) -> tuple[list[str], list[str]]:
    """Returns (ids, texts), both list[str], of the judged queries."""
    ids, texts = [], []
    for qid, query in zip(self.query_ids, self.queries):
      if qid in self.qrels:
        ids.append(qid)
        texts.append(query)
    return ids, texts


def _json_type(value) -> str:
  """Names a parsed JSON value's type as JSON spells it, with an article."""
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


# What each file should hold, for "missing file" messages.
_CORPUS_WHAT = 'a BEIR corpus, one {"_id", "title", "text"} object per line'
_QUERIES_WHAT = 'BEIR queries, one {"_id", "text"} object per line'
_QRELS_WHAT = "BEIR qrels, query-id<TAB>corpus-id<TAB>score rows"


def require_file(path: str, what: str) -> None:
  """Raises BeirFormatError unless `path` is a regular file.

  Args:
    path: str, the file.
    what: str, what it should hold, for the message.
  """
  if not os.path.isfile(path):
    state = "is not a file" if os.path.exists(path) else "does not exist"
    raise BeirFormatError(path, None, f"{state}; expected {what}")


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line without its line end).

  A UTF-8 byte-order mark on the first line is dropped; CRLF line ends are
  accepted.
  """
  # Binary mode splits on b"\n" only; text mode would also split on U+2028
  # and friends, which JSON strings may hold unescaped, and shift the line
  # numbers away from what an editor shows.
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
  """Reads a JSONL file whose every non-blank line must be a JSON object.

  Blank lines are skipped.

  Args:
    path: str, an existing file.

  Yields:
    (int, dict), the 1-based line number and the parsed object.

  Raises:
    BeirFormatError: invalid UTF-8, malformed JSON, or a non-object line.
  """
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
  """Returns obj[key] as an id string.

  Ids are strings. JSON integers are accepted and converted with `str()`
  (some exports write numeric ids unquoted); null, booleans, floats, empty
  ids and ids holding a tab or a line break (which the qrels TSV could not
  hold) are rejected.

  Args:
    path: str and lineno: int, where `obj` came from, for messages.
    obj: dict, a parsed JSONL line.
    key: str, the id's key.

  Raises:
    BeirFormatError: the id is missing, empty, or not a string or integer.
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
  # JSON integers are the only non-string ids with one obvious spelling;
  # floats (1.0 vs 1) and booleans do not have one.
  value = str(value)
  if not value.strip():
    # A blank id cannot be written to a TREC run file or matched reliably.
    raise BeirFormatError(path, lineno, f'"{key}" is empty')
  if any(c in value for c in "\t\r\n"):
    # Such an id could never be matched by a qrels TSV row.
    raise BeirFormatError(
        path, lineno, f'"{key}" {value!r} contains a tab or line break'
    )
  return value


def json_text(
    path: str, lineno: int, obj: dict, key: str, required: bool
) -> str:
  """Returns obj[key] as a string.

  Args:
    path: str and lineno: int, where `obj` came from, for messages.
    obj: dict, a parsed JSONL line.
    key: str, the text's key.
    required: bool; when False, an absent or null value reads as "".

  Raises:
    BeirFormatError: a required key is missing, or the value is not a string.
  """
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
  """Records `value` at `lineno`; raises if an earlier line had it."""
  first = seen.setdefault(value, lineno)
  if first != lineno:
    raise BeirFormatError(
        path, lineno, f"duplicate {key} {value!r} (first at line {first})"
    )


def read_corpus(path: str) -> tuple[list[str], list[str], list[str]]:
  """Reads a BEIR corpus.jsonl.

  `title` is optional and defaults to ""; `text` is required but may be
  empty (Cranfield documents 471 and 995 have neither). Other keys, such as
  BEIR's `metadata`, are ignored.

  Args:
    path: str, the corpus file.

  Returns:
    (doc_ids, titles, texts), each list[str] [N] in file order.

  Raises:
    BeirFormatError: missing file, a malformed line, a duplicate id, or no
      documents at all.
  """
  require_file(path, _CORPUS_WHAT)
  ids, titles, texts = [], [], []
  # id -> first line; a repeated id would make qrels ambiguous and leave one
  # of the two documents unreachable by id, skewing every metric.
  seen = {}
  for lineno, obj in read_json_objects(path):
    doc_id = json_id(path, lineno, obj, "_id")
    _check_unique(path, lineno, "_id", doc_id, seen)
    ids.append(doc_id)
    # Title-less corpora (LIMIT, many exports) omit the key or write null.
    titles.append(json_text(path, lineno, obj, "title", required=False))
    texts.append(json_text(path, lineno, obj, "text", required=True))
  if not ids:
    # Checked here, not by callers: an empty corpus makes every later step
    # (encoding, top-k) fail far from the cause.
    raise BeirFormatError(path, None, "the corpus holds no documents")
  return ids, titles, texts


def read_queries(path: str) -> tuple[list[str], list[str]]:
  """Reads a BEIR queries.jsonl.

  Args:
    path: str, the queries file.

  Returns:
    (query_ids, texts), each list[str] [Q] in file order.

  Raises:
    BeirFormatError: missing file, a malformed line, a duplicate id, or no
      queries at all.
  """
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
  """Returns the integer in `field`, or None when it is not one."""
  field = field.strip()
  return int(field) if _INT_RE.fullmatch(field) else None


def read_qrels_rows(path: str) -> list[QrelsRow]:
  """Reads and validates a BEIR qrels TSV, without any id filtering.

  The header is recognised by content, not by its names: the first
  non-blank line is a header when its third column is not an integer, and a
  judgment otherwise, so headerless files are accepted too. Duplicate
  (query, doc) judgments are an error, as in trec_eval.

  Args:
    path: str, the qrels file.

  Returns:
    list[QrelsRow] in file order, no two with the same (query_id, doc_id).

  Raises:
    BeirFormatError: missing file, a row without exactly three tab-separated
      columns, an empty id, a non-integer score, a duplicate (query, doc)
      pair, or no judgments at all.
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
    # Scores <= 0 are kept: they mark judged non-relevant documents, which
    # trec_eval distinguishes from unjudged ones (e.g. for bpref).
    rows.append(QrelsRow(query_id, doc_id, score, lineno))
  if not rows:
    raise BeirFormatError(path, None, "the file holds no judgments")
  return rows


def _describe_unknown(rows: list[QrelsRow], attr: str, noun: str) -> str:
  """Summarises rows with unknown ids: counts, example ids, first lines."""
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
  """Builds the qrels dict, applying the unknown-id policy.

  The default "warn" matches trec_eval, which ignores judgments for queries
  absent from the run.

  Args:
    path: str, the qrels file the rows came from (for messages).
    rows: Sequence[QrelsRow], as `read_qrels_rows` returns them.
    query_ids: the collection's query ids, or None to accept any.
    doc_ids: the collection's doc ids, or None to accept any.
    on_unknown: "warn" drops rows with unknown ids and emits one
      UnknownIdsWarning; "error" raises BeirFormatError at the first such
      row; "ignore" drops them silently.

  Returns:
    dict[str, dict[str, int]], query id -> doc id -> score, in row order.

  Raises:
    BeirFormatError: per the policy, or when no row is left.
    ValueError: an unknown policy.
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
    # One warning per file, whatever the number of rows: a mismatched id
    # scheme can make every row unknown.
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
    # Usually the query or doc ids follow a different numbering than the
    # corpus (Cranfield's positional vs ".I" query ids are the classic case).
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
  """Reads a BEIR qrels TSV; see `read_qrels_rows` and `qrels_from_rows`.

  Args:
    path: str, the qrels file.
    query_ids: the collection's query ids, or None to accept any.
    doc_ids: the collection's doc ids, or None to accept any.
    on_unknown: "warn" | "error" | "ignore", for rows naming ids that are
      not in `query_ids` / `doc_ids`.

  Returns:
    dict[str, dict[str, int]], query id -> doc id -> integer score, in file
    order.
  """
  rows = read_qrels_rows(path)
  return qrels_from_rows(path, rows, query_ids, doc_ids, on_unknown)


def available_splits(directory: str) -> list[str]:
  """Returns list[str], sorted names of the qrels/<split>.tsv files."""
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
  """Returns the path of qrels/<split>.tsv, raising if there is none.

  Raises:
    BeirFormatError: the split file is missing; the message lists the splits
      the directory does have.
  """
  path = os.path.join(directory, QRELS_DIR, split + QRELS_SUFFIX)
  if not os.path.isfile(path):
    found = available_splits(directory)
    have = ", ".join(found) if found else "none"
    raise BeirFormatError(
        path, None, f"no qrels for split {split!r}; splits found: {have}"
    )
  return path


def corpus_path(directory: str) -> str:
  """Returns directory/corpus.jsonl, raising BeirFormatError if missing."""
  path = os.path.join(directory, CORPUS_FILE)
  require_file(path, _CORPUS_WHAT)
  return path


def queries_path(directory: str) -> str:
  """Returns directory/queries.jsonl, raising BeirFormatError if missing."""
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
  """Reads a BEIR collection directory.

  Args:
    directory: str, holding corpus.jsonl, queries.jsonl, qrels/<split>.tsv.
    split: str, which qrels file to read; None reads no qrels.
    on_unknown: "warn" | "error" | "ignore", for qrels rows naming ids the
      corpus or queries lack (see `qrels_from_rows`).
    corpus_only: read only corpus.jsonl (for directories that hold just a
      corpus, e.g. to encode it); queries and qrels are left empty.

  Returns:
    BeirCollection with all queries (see `judged_query_ids` for the ones
    with judgments in `split`).

  Raises:
    BeirFormatError: a missing or malformed file.
  """
  check_directory(directory)
  if corpus_only:
    # Encode-only directories may hold nothing but the corpus.
    doc_ids, titles, texts = read_corpus(corpus_path(directory))
    return BeirCollection(doc_ids, titles, texts, [], [], {})
  # Resolve every path first: a wrong split name or a missing file should
  # fail before the corpus, possibly gigabytes, is parsed.
  qrels_file = None if split is None else qrels_path(directory, split)
  queries_file = queries_path(directory)
  doc_ids, titles, texts = read_corpus(corpus_path(directory))
  query_ids, queries = read_queries(queries_file)
  qrels = {}
  if qrels_file is not None:
    qrels = read_qrels(qrels_file, query_ids, doc_ids, on_unknown)
  return BeirCollection(doc_ids, titles, texts, query_ids, queries, qrels)
