"""seqio Tasks of (query, positive passage) training pairs.

Two sources:

* a pairs file, one JSON object per line:
    {"query_id", "query", "doc_id", "title", "text", "score"}
  (`title` optional; `score` optional, and must be > 0 when present, since
  every line is meant to be a positive);
* a BEIR directory's qrels split (usually "train"): every judgment with a
  score > 0, joined with its query text and document text.

Both give the same examples, as scalar tf.string features:

  query_id   the query's id
  query      the query text
  doc_id     the positive document's id
  positive   `beir.doc_text(title, text)`, i.e. (title + " " + text).strip()

No tokenization happens here: the encoder's tokenizer runs later, on the JAX
side, so one Task serves every model. Examples come in file order and the
dataset functions ignore `shuffle_files`; shuffling (seeded, resumable)
belongs to the trainer's loader, so call `get_dataset(..., shuffle=False)`.

Files are read and validated when the Task is registered, so a bad file
fails at start-up with the same "path:line: " messages as `beir.py`.
"""

from collections.abc import Mapping, Sequence
import os

from absl import logging

# TF must be imported with accelerators hidden before seqio imports it.
from retrieval_jax.data.tf_setup import tf
import seqio

from retrieval_jax.data import beir

# The task features, all scalar strings (seqio rank 0).
FEATURE_KEYS = ("query_id", "query", "doc_id", "positive")
_PAIRS_TEXT_KEYS = ("query", "text")
# The split a pairs-file task offers.
PAIRS_SPLIT = "train"

# Task name -> what it was registered from; makes registration idempotent.
_SOURCES: dict[str, tuple] = {}


def _string_feature() -> seqio.Feature:
  """A scalar string feature that seqio passes through untouched."""
  # seqio needs a vocabulary on every feature, but only uses it to tokenize
  # and append EOS, neither of which applies to raw strings.
  return seqio.Feature(
      vocabulary=seqio.PassThroughVocabulary(size=0),
      add_eos=False,
      required=True,
      dtype=tf.string,
      rank=0,
  )


OUTPUT_FEATURES = {key: _string_feature() for key in FEATURE_KEYS}


def read_pairs(path: str) -> dict[str, list[str]]:
  """Reads and validates a pairs JSONL file.

  Args:
    path: str, one {"query_id", "query", "doc_id", "title", "text", "score"}
      object per line.

  Returns:
    dict from each of FEATURE_KEYS to list[str] [P], in file order.

  Raises:
    BeirFormatError: missing file, malformed JSON, a line that is not an
      object, a missing or mistyped key, a score that is not a positive
      integer, a repeated (query_id, doc_id) pair, or no pairs at all.
  """
  beir.require_file(
      path,
      'training pairs, one {"query_id", "query", "doc_id", "title", "text"}'
      " object per line",
  )
  columns = {key: [] for key in FEATURE_KEYS}
  seen = {}
  for lineno, obj in beir.read_json_objects(path):
    query_id = beir.json_id(path, lineno, obj, "query_id")
    doc_id = beir.json_id(path, lineno, obj, "doc_id")
    query, text = (
        beir.json_text(path, lineno, obj, key, required=True)
        for key in _PAIRS_TEXT_KEYS
    )
    title = beir.json_text(path, lineno, obj, "title", required=False)
    # A missing score means the line is a positive by construction.
    score = obj.get("score", 1)
    if isinstance(score, bool) or not isinstance(score, int) or score <= 0:
      # A non-positive score would silently train on a non-relevant pair.
      raise beir.BeirFormatError(
          path, lineno, f'"score" must be a positive integer, got {score!r}'
      )
    first = seen.setdefault((query_id, doc_id), lineno)
    if first != lineno:
      raise beir.BeirFormatError(
          path,
          lineno,
          f"duplicate pair for query {query_id!r} and doc {doc_id!r}"
          f" (first at line {first})",
      )
    columns["query_id"].append(query_id)
    columns["query"].append(query)
    columns["doc_id"].append(doc_id)
    columns["positive"].append(beir.doc_text(title, text))
  if not seen:
    raise beir.BeirFormatError(path, None, "the file holds no pairs")
  return columns


def beir_train_pairs(
    directory: str, split: str = "train", on_unknown: str = "warn"
) -> dict[str, list[str]]:
  """Collects the positive pairs of a BEIR directory's qrels split.

  Args:
    directory: str, a BEIR collection directory.
    split: str, the qrels split to read.
    on_unknown: "warn" | "error" | "ignore", for judgments naming ids the
      collection lacks (see `beir.qrels_from_rows`).

  Returns:
    dict from each of FEATURE_KEYS to list[str] [P]: one entry per judgment
    with score > 0, in qrels file order.

  Raises:
    BeirFormatError: a missing or malformed file, or a split without any
      positive judgment.
  """
  beir.check_directory(directory)
  qrels_file = beir.qrels_path(directory, split)
  doc_ids, titles, texts = beir.read_corpus(beir.corpus_path(directory))
  query_ids, queries = beir.read_queries(beir.queries_path(directory))
  rows = beir.read_qrels_rows(qrels_file)
  # Validation and the unknown-id policy; `qrels` holds the rows we keep.
  qrels = beir.qrels_from_rows(qrels_file, rows, query_ids, doc_ids, on_unknown)
  query_text = dict(zip(query_ids, queries))
  doc_index = {doc_id: i for i, doc_id in enumerate(doc_ids)}
  columns = {key: [] for key in FEATURE_KEYS}
  # Iterate the rows rather than the qrels dict: the dict groups by query,
  # which reorders files whose judgments for one query are not contiguous.
  for row in rows:
    if row.score <= 0 or row.doc_id not in qrels.get(row.query_id, {}):
      continue
    i = doc_index[row.doc_id]
    columns["query_id"].append(row.query_id)
    columns["query"].append(query_text[row.query_id])
    columns["doc_id"].append(row.doc_id)
    columns["positive"].append(beir.doc_text(titles[i], texts[i]))
  if not columns["query_id"]:
    raise beir.BeirFormatError(
        qrels_file, None, "no judgment has a positive score"
    )
  num_skipped = len(rows) - len(columns["query_id"])
  if num_skipped:
    logging.info(
        "%s: %d judgments skipped (score <= 0 or unknown id)",
        qrels_file,
        num_skipped,
    )
  return columns


def _function_source(
    columns: Mapping[str, Sequence[str]], split: str
) -> seqio.FunctionDataSource:
  """Wraps in-memory columns as a one-split seqio source."""
  num_examples = len(columns["query_id"])

  def dataset_fn(split: str, shuffle_files: bool) -> tf.data.Dataset:
    # One file, already in memory: there are no files to shuffle, and the
    # order must stay the file's for a deterministic loader.
    del split, shuffle_files
    # The strings become graph constants, which TF caps at 2 GB: ample for
    # MS MARCO's ~530k training pairs, too small for multi-GB pair files
    # (stream those through the TFDS builder instead).
    return tf.data.Dataset.from_tensor_slices({
        key: tf.constant(columns[key], dtype=tf.string) for key in FEATURE_KEYS
    })

  return seqio.FunctionDataSource(
      dataset_fn, splits=[split], num_input_examples={split: num_examples}
  )


def _register(name: str, source_key: tuple, make_columns, split: str):
  """Registers a Task once per name; re-registering needs the same source."""
  if name in seqio.TaskRegistry.names():
    if _SOURCES.get(name) == source_key:
      return seqio.TaskRegistry.get(name)
    previous = _SOURCES.get(name, "a source registered elsewhere")
    raise ValueError(
        f"seqio task {name!r} is already registered from {previous};"
        f" cannot register it again from {source_key}"
    )
  # Read now, not at the first batch: a bad file fails at start-up, and
  # nothing is registered under the name.
  columns = make_columns()
  task = seqio.TaskRegistry.add(
      name,
      source=_function_source(columns, split),
      output_features=OUTPUT_FEATURES,
  )
  _SOURCES[name] = source_key
  logging.info(
      "Registered seqio task %s: %d pairs from %s",
      name,
      len(columns["query_id"]),
      source_key,
  )
  return task


def register_pairs_task(name: str, pairs_path: str) -> seqio.Task:
  """Registers a Task over a pairs JSONL file (split "train").

  Idempotent: registering `name` again from the same file returns the
  registered Task; from a different file, raises.

  Args:
    name: str, the seqio task name.
    pairs_path: str, the pairs file (see `read_pairs`).

  Returns:
    seqio.Task with OUTPUT_FEATURES, examples in file order.

  Raises:
    BeirFormatError: a missing or malformed pairs file.
    ValueError: `name` is registered from another source.
  """
  # Absolute paths, so "./pairs.jsonl" and its full path are one source.
  source_key = ("pairs", os.path.abspath(pairs_path))
  return _register(
      name, source_key, lambda: read_pairs(pairs_path), PAIRS_SPLIT
  )


def register_beir_train_task(
    name: str, directory: str, split: str = "train", on_unknown: str = "warn"
) -> seqio.Task:
  """Registers a Task over a BEIR directory's positive judgments.

  Idempotent: registering `name` again with the same arguments returns the
  registered Task; with different ones, raises.

  Args:
    name: str, the seqio task name.
    directory: str, a BEIR collection directory.
    split: str, the qrels split; also the Task's only split.
    on_unknown: "warn" | "error" | "ignore" (see `beir.qrels_from_rows`).

  Returns:
    seqio.Task with OUTPUT_FEATURES, examples in qrels file order.

  Raises:
    BeirFormatError: a missing or malformed file.
    ValueError: `name` is registered from another source.
  """
  source_key = ("beir", os.path.abspath(directory), split, on_unknown)
  return _register(
      name,
      source_key,
      lambda: beir_train_pairs(directory, split, on_unknown),
      split,
  )
