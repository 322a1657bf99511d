"""LoCoV1 long-document retrieval tasks from local files, via TFDS or BEIR.

LoCoV1 (Saad-Falcon et al. 2024, LoCo and M2-BERT) is hazyresearch/
LoCoV1-Queries {qid, query, answer_pids, dataset} and -Documents {pid,
passage, dataset}; each `dataset` value (`LOCO_TASKS`) is a title-less
collection with binary qrels. Null QASPER passages are dropped. Sources are
JSONL / Parquet files or directories; errors are `beir.BeirFormatError`s
naming file and row. `loco_to_beir` writes a BEIR directory;
`load_loco_tfds` (TFDS builder `LocoLocal`) returns the same collection.
"""

from collections.abc import Iterator
import dataclasses
import functools
import os
import re

from absl import logging

# TF must be imported with accelerators hidden before tfds imports it.
from retrieval_jax.data import tf_setup  # noqa: F401  # pylint: disable=unused-import
import tensorflow_datasets as tfds

from retrieval_jax import io
from retrieval_jax.data import beir
from retrieval_jax.data import long_documents
from retrieval_jax.data import tfds_beir

LOCO_TASKS = (  # LoCoV1's `dataset` values, in the benchmark's order
    "summ_screen_fd",
    "gov_report",
    "qmsum",
    "qasper_title",
    "qasper_abstract",
    "multifieldqa",
    "2wikimqa",
    "passage_retrieval",
    "legal_case_reports",
    "courtlistener_HTML",
    "courtlistener_Plain_Text",
    "stackoverflow",
)
QRELS_SPLIT = "test"  # LoCoV1's only split
TASK_FIELD = "dataset"
QUERY_FIELDS = ("qid", "query", "answer_pids", TASK_FIELD)
DOCUMENT_FIELDS = ("pid", "passage", TASK_FIELD)
SOURCE_SUFFIXES = (".jsonl", ".json", ".parquet")
RELEVANCE = 1  # binary qrels

_HASH_CHARS = 16
# Rows per Parquet batch: bounds memory for files of long documents.
_PARQUET_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class LocoTask:
  """One LoCoV1 task, parsed and validated; lists in source order.

  Null passages are left out of doc_ids / texts (counted in null_passages,
  their judgments in dropped_judgments); a qrels row's `line` is its query's
  line (or Parquet row).
  """

  task: str
  doc_ids: list[str]
  texts: list[str]
  query_ids: list[str]
  queries: list[str]
  qrels_rows: list[beir.QrelsRow]
  qrels_source: str
  null_passages: int
  dropped_judgments: int


def source_files(source: str | os.PathLike) -> list[str]:
  """Absolute paths of a source file, or of a directory's files by name."""
  source = os.path.abspath(os.fspath(source))
  if os.path.isfile(source):
    return [source]
  if not os.path.isdir(source):
    raise beir.BeirFormatError(
        source,
        None,
        "does not exist; expected a LoCoV1 JSONL or Parquet"
        " file, or a directory of them",
    )
  files = sorted(
      os.path.join(source, name)
      for name in os.listdir(source)
      if name.endswith(SOURCE_SUFFIXES)
      and os.path.isfile(os.path.join(source, name))
  )
  if not files:
    raise beir.BeirFormatError(
        source, None, f"holds no {'/'.join(SOURCE_SUFFIXES)} files"
    )
  return files


def _parquet_rows(
    path: str, fields: tuple[str, ...]
) -> Iterator[tuple[int, dict]]:
  """Yields (1-based row, {field: value}) of a Parquet file."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise beir.BeirFormatError(
        path,
        None,
        "reading Parquet needs pyarrow (`pip install pyarrow`);"
        " or convert the file to JSONL",
    ) from None
  parquet = pq.ParquetFile(path)
  names = set(parquet.schema_arrow.names)
  # Missing columns surface per row, like a JSONL line without the key.
  columns = [f for f in fields if f in names]
  row = 0
  for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
    for obj in batch.to_pylist():
      row += 1
      yield row, obj


def iter_rows(
    source: str | os.PathLike, fields: tuple[str, ...]
) -> Iterator[tuple[str, int, dict]]:
  """Yields (path, 1-based line or row, dict); `fields` are Parquet's."""
  for path in source_files(source):
    if path.endswith(".parquet"):
      rows = _parquet_rows(path, fields)
    else:
      rows = beir.read_json_objects(path)
    for lineno, obj in rows:
      yield path, lineno, obj


def _task_of(path: str, lineno: int, obj: dict) -> str:
  """The row's `dataset` value, validated."""
  return beir.json_text(path, lineno, obj, TASK_FIELD, required=True)


def _answer_pids(path: str, lineno: int, obj: dict) -> list[str]:
  """The row's `answer_pids` as id strings (the rules of `beir.json_id`)."""
  if "answer_pids" not in obj:
    raise beir.BeirFormatError(path, lineno, 'missing "answer_pids"')
  values = obj["answer_pids"]
  if not isinstance(values, (list, tuple)):
    raise beir.BeirFormatError(
        path,
        lineno,
        f'"answer_pids" must be a list of pids, got {type(values).__name__}',
    )
  # beir.json_id validates one key of one object; wrap each element.
  return [
      beir.json_id(path, lineno, {f"answer_pids[{i}]": v}, f"answer_pids[{i}]")
      for i, v in enumerate(values)
  ]


def _unknown_task(source: str, kind: str, task: str, found: set) -> Exception:
  """The error for a task that no row of `source` has."""
  found_list = ", ".join(sorted(found)) if found else "none (no rows)"
  extra = ""
  if task not in LOCO_TASKS:
    extra = f"; the LoCoV1 tasks are {', '.join(LOCO_TASKS)}"
  return beir.BeirFormatError(
      source,
      None,
      f"no {kind} of task {task!r}; the {TASK_FIELD!r} values found are:"
      f" {found_list}{extra}",
  )


def read_loco(
    queries: str | os.PathLike, documents: str | os.PathLike, task: str
) -> LocoTask:
  """Reads and validates one LoCoV1 task (see the module docstring).

  queries / documents: JSONL or Parquet files, or directories. Raises
  BeirFormatError for bad rows, duplicate ids, unknown answer pids or a task
  missing from either source.
  """
  queries, documents = os.fspath(queries), os.fspath(documents)
  if not isinstance(task, str) or not task:
    raise ValueError(f"task must be a non-empty string, got {task!r}")

  found = set()
  doc_ids, texts = [], []
  pid_where, null_pids = {}, set()  # pid -> "path:line", for messages
  for path, lineno, obj in iter_rows(documents, DOCUMENT_FIELDS):
    row_task = _task_of(path, lineno, obj)
    found.add(row_task)
    if row_task != task:
      continue
    pid = beir.json_id(path, lineno, obj, "pid")
    if pid in pid_where:
      raise beir.BeirFormatError(
          path,
          lineno,
          f"duplicate pid {pid!r} in task {task!r} (first at {pid_where[pid]})",
      )
    pid_where[pid] = f"{path}:{lineno}"
    if "passage" in obj and obj["passage"] is None:  # QASPER: no text
      null_pids.add(pid)
      continue
    doc_ids.append(pid)
    texts.append(beir.json_text(path, lineno, obj, "passage", required=True))
  if not pid_where:
    raise _unknown_task(documents, "documents", task, found)
  if not doc_ids:
    raise beir.BeirFormatError(
        documents, None, f"every passage of task {task!r} is null"
    )

  found = set()
  query_ids, query_texts, rows = [], [], []
  qid_where = {}
  dropped = 0
  for path, lineno, obj in iter_rows(queries, QUERY_FIELDS):
    row_task = _task_of(path, lineno, obj)
    found.add(row_task)
    if row_task != task:
      continue
    qid = beir.json_id(path, lineno, obj, "qid")
    if qid in qid_where:
      raise beir.BeirFormatError(
          path,
          lineno,
          f"duplicate qid {qid!r} in task {task!r} (first at {qid_where[qid]})",
      )
    qid_where[qid] = f"{path}:{lineno}"
    query_ids.append(qid)
    query_texts.append(beir.json_text(path, lineno, obj, "query", True))
    seen = set()
    for pid in _answer_pids(path, lineno, obj):
      if pid not in pid_where:
        raise beir.BeirFormatError(
            path,
            lineno,
            f"answer pid {pid!r} is not a document of task"
            f" {task!r} in {documents}",
        )
      if pid in seen:  # trec_eval and beir.py reject duplicates
        raise beir.BeirFormatError(
            path, lineno, f"answer pid {pid!r} is listed twice"
        )
      seen.add(pid)
      if pid in null_pids:
        dropped += 1
        continue
      rows.append(beir.QrelsRow(qid, pid, RELEVANCE, lineno))
  if not query_ids:
    raise _unknown_task(queries, "queries", task, found)
  if not rows:
    raise beir.BeirFormatError(
        queries,
        None,
        f"no query of task {task!r} has an answer pid with a non-null passage",
    )
  if task not in LOCO_TASKS:
    logging.warning("%r is not one of the 12 LoCoV1 tasks %s", task, LOCO_TASKS)
  if null_pids:
    logging.info(
        "LoCoV1 %s: dropped %d null passages and %d judgments naming them",
        task,
        len(null_pids),
        dropped,
    )
  return LocoTask(
      task=task,
      doc_ids=doc_ids,
      texts=texts,
      query_ids=query_ids,
      queries=query_texts,
      qrels_rows=rows,
      qrels_source=os.path.abspath(queries),
      null_passages=len(null_pids),
      dropped_judgments=dropped,
  )


def _qrels_dict(loco: LocoTask) -> dict[str, dict[str, int]]:
  """query id -> doc id -> score, validated like a BEIR qrels file."""
  return beir.qrels_from_rows(
      loco.qrels_source,
      loco.qrels_rows,
      loco.query_ids,
      loco.doc_ids,
      on_unknown="error",
  )


def loco_to_beir(
    queries_file: str | os.PathLike,
    documents_file: str | os.PathLike,
    task: str,
    out_dir: str | os.PathLike,
) -> dict:
  """Writes one LoCoV1 task as a BEIR directory (atomically replaced).

  Empty titles; qrels/test.tsv scores each answer pid 1. Returns a summary
  of counts (documents, queries, judgments, null_passages, ...).
  """
  loco = read_loco(queries_file, documents_file, task)
  qrels = _qrels_dict(loco)
  with long_documents.atomic_output(out_dir) as tmp_dir:
    long_documents.write_beir(
        tmp_dir,
        loco.doc_ids,
        [""] * len(loco.doc_ids),
        loco.texts,
        loco.query_ids,
        loco.queries,
        {QRELS_SPLIT: qrels},
    )
  summary = {
      "task": task,
      "documents": len(loco.doc_ids),
      "queries": len(loco.query_ids),
      "judged_queries": len(qrels),
      "judgments": len(loco.qrels_rows),
      "null_passages": loco.null_passages,
      "dropped_judgments": loco.dropped_judgments,
  }
  logging.info("LoCoV1 %s written to %s: %s", task, out_dir, summary)
  return summary


@dataclasses.dataclass(eq=False)
class LocoLocalConfig(tfds_beir.BeirLocalConfig):
  """A `LocoLocal` table of one task (`make_config`); source_dir is unused."""

  task: str = ""
  queries_source: str = ""
  documents_source: str = ""


def fingerprint(queries: str, documents: str, task: str) -> str:
  """_HASH_CHARS hex of a SHA-256 of the task and both sources' files."""
  files = [
      (f"{role}/{os.path.basename(path)}", io.file_sha256(path))
      for role, source in (("queries", queries), ("documents", documents))
      for path in source_files(source)
  ]
  return io.fingerprint(task, files)[:_HASH_CHARS]


def make_config(
    queries: str | os.PathLike,
    documents: str | os.PathLike,
    task: str,
    table: str,
) -> LocoLocalConfig:
  """The LocoLocalConfig of one table (of tfds_beir.TABLES) of a task.

  All tables hash both sources: a qrels row is valid only with its documents.
  """
  if table not in tfds_beir.TABLES:
    raise ValueError(f"table must be one of {tfds_beir.TABLES}, got {table!r}")
  queries = os.path.abspath(os.fspath(queries))
  documents = os.path.abspath(os.fspath(documents))
  # Lower-case names; the hash keeps "..._HTML" and "..._html" apart.
  stem = re.sub(r"[^a-z0-9]+", "_", task.lower()).strip("_") or "task"
  return LocoLocalConfig(
      name=f"loco_{stem}_{table}_{fingerprint(queries, documents, task)}",
      description=(
          f"{table} of LoCoV1 task {task!r} from {queries} and {documents}"
      ),
      table=table,
      task=task,
      queries_source=queries,
      documents_source=documents,
  )


@functools.lru_cache(maxsize=1)
def _read_loco_cached(
    queries: str, documents: str, task: str, digest: str
) -> LocoTask:
  """`read_loco`, once for the three tables of one preparation."""
  del digest  # Part of the cache key only: changed files miss the cache.
  return read_loco(queries, documents, task)


class LocoLocal(tfds_beir.BeirLocal):
  """One table of one LoCoV1 task from local files (see module docstring).

  The features are `BeirLocal`'s, so both builders' tables read alike.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Corpus, queries and qrels of one LoCoV1 task."}

  def _loco(self) -> LocoTask:
    config = self.builder_config
    digest = config.name.rsplit("_", 1)[-1]
    return _read_loco_cached(
        config.queries_source, config.documents_source, config.task, digest
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    # Parse (and validate) before TFDS opens any output file.
    loco = self._loco()
    table = self.builder_config.table
    split = QRELS_SPLIT if table == "qrels" else tfds_beir.FULL_SPLIT
    return {split: self._generate_examples(loco=loco, table=table)}

  def _generate_examples(self, loco: LocoTask, table: str):
    if table == "corpus":
      for i, (doc_id, text) in enumerate(zip(loco.doc_ids, loco.texts)):
        yield i, {"index": i, "_id": doc_id, "title": "", "text": text}
    elif table == "queries":
      for i, (qid, text) in enumerate(zip(loco.query_ids, loco.queries)):
        yield i, {"index": i, "_id": qid, "text": text}
    else:
      for i, row in enumerate(loco.qrels_rows):
        yield i, tfds_beir.qrels_example(i, row)


def prepare(
    queries: str | os.PathLike,
    documents: str | os.PathLike,
    task: str,
    table: str,
    data_dir: str | os.PathLike | None = None,
) -> LocoLocal:
  """Prepares one table of a LoCoV1 task (if needed); returns its builder.

  Read it with `as_data_source(split)`: "full", or "test" for qrels.
  """
  return tfds_beir.prepare_builder(
      LocoLocal, make_config(queries, documents, task, table), data_dir
  )


def load_loco_tfds(
    queries: str | os.PathLike,
    documents: str | os.PathLike,
    task: str,
    data_dir: str | os.PathLike | None = None,
) -> beir.BeirCollection:
  """Reads one LoCoV1 task through its TFDS tables, preparing them if needed.

  Equals `beir.load_beir` on `loco_to_beir(queries, documents, task, ...)`.
  """
  try:
    corpus = prepare(queries, documents, task, "corpus", data_dir)
    doc_ids, titles, texts = tfds_beir.read_split(
        corpus, tfds_beir.FULL_SPLIT, ("_id", "title", "text")
    )
    query_table = prepare(queries, documents, task, "queries", data_dir)
    query_ids, query_texts = tfds_beir.read_split(
        query_table, tfds_beir.FULL_SPLIT, ("_id", "text")
    )
    qrels_table = prepare(queries, documents, task, "qrels", data_dir)
    columns = tfds_beir.read_split(
        qrels_table, QRELS_SPLIT, ("query_id", "doc_id", "score", "line")
    )
  finally:
    # The parsed task can be large; it is only needed while preparing.
    _read_loco_cached.cache_clear()
  rows = [beir.QrelsRow(*row) for row in zip(*columns)]
  qrels = beir.qrels_from_rows(
      os.path.abspath(os.fspath(queries)),
      rows,
      query_ids,
      doc_ids,
      on_unknown="error",
  )
  return beir.BeirCollection(
      doc_ids, titles, texts, query_ids, query_texts, qrels
  )
