"""Training data for the dual-encoder trainer, and its step-indexed loader.

Two layers:

* `TrainingData`: one `TrainingExample` per training query (its id and
  text, its positive doc ids in file order, its mined hard negatives in rank
  order) plus the corpus the doc ids index. Built from a BEIR qrels split or
  a pairs file through the seqio Tasks of `tasks.py`; negatives are added
  with `mine_negatives` (BM25 or an encoder, cached on disk).
* `TrainLoader`: turns the data into fixed-shape numpy batches. Batch t is
  a pure function of (data, settings, seed, t), so a run restored at step t
  sees exactly the batches an uninterrupted run would have seen; the only
  iterator state to checkpoint is the step.

The example stream. An example is one query (unit "query") or one
(query, positive) pair (unit "pair"). Epoch e visits every example once, in
the order `np.random.default_rng([seed, e]).permutation(E)`; the stream is
epoch 0's order, then epoch 1's, and so on, and batch t holds stream items
[t*B, (t+1)*B), so a batch may straddle two epochs.

The positives of an example ("one" or "all", from the loss):
* "one", unit "pair": the pair's own positive;
* "one", unit "query": Rand1LH, positive (crc32(query_id + str(seed)) + e)
  mod m of the query's m positives, so over m epochs each is used once;
* "all", unit "query": the first min(m, max_positives) in file order;
* "all", unit "pair": the pair's own positive, then the query's others in
  file order, min(m, max_positives) in all.

Hard negatives fill the rest of each group of `group_size` passages: draws
without replacement from the query's top-`negative_depth` mined list, with
an rng seeded by (seed, epoch, example index). A shorter list is used whole
and topped up with draws with replacement; an empty one leaves padding
(doc -1, all-zero mask).

Batch layout (B = batch_size, G = group_size, R = max_relevant):

  query_ids       int32 [B, Lq]    token ids, padded to query_max_length
  query_mask      int32 [B, Lq]    1 on tokens, 0 on padding
  passage_ids     int32 [B*G, Lp]  query-major: rows i*G .. i*G+G-1 are
                                   query i's group, its positives first
  passage_mask    int32 [B*G, Lp]
  positive_counts int32 [B]        positives in each group, 1..G
  passage_doc     int32 [B*G]      corpus index of each row, -1 = padding
  relevant_doc    int32 [B, R]     corpus indices of every known relevant
                                   doc of the query, -1 padded
  example_index   int64 [B]        position in the example stream

Shapes are fixed, so the train step compiles once. Token type ids are all
zero for single-segment inputs and are left out.
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import hashlib
import itertools
import math
import operator
import os
import queue
import threading
import time
import zlib

from absl import logging
import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.data import negatives as negatives_lib

UNITS = ("pair", "query")
POSITIVE_CHOICES = ("one", "all")
MINING_METHODS = ("bm25", "dense")
# Corpus index of a padding passage row.
PAD_DOC = -1
# The task features, in the order `_task_rows` returns them.
_ROW_KEYS = ("query_id", "query", "doc_id", "positive")


@dataclasses.dataclass(frozen=True)
class TrainingExample:
  """One training query.

  Attributes:
    query_id: str.
    query: str, the query text.
    positive_ids: tuple[str, ...], its relevant doc ids in file order; all
      of them count as known relevant, whichever the loader feeds.
    negative_ids: tuple[str, ...], mined hard negatives in rank order; never
      a positive.
  """

  query_id: str
  query: str
  positive_ids: tuple[str, ...]
  negative_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingData:
  """Training queries and the corpus their doc ids index.

  Attributes:
    examples: tuple[TrainingExample, ...], queries in first-appearance order.
    doc_ids: tuple[str, ...] [N], unique.
    doc_texts: tuple[str, ...] [N], passage texts (`beir.doc_text`; for a
      positive, the text its source file gives).
    source: str, where the queries came from (for messages and logs).
  """

  examples: tuple[TrainingExample, ...]
  doc_ids: tuple[str, ...]
  doc_texts: tuple[str, ...]
  source: str = "<memory>"

  def __post_init__(self):
    # Lists are accepted; tuples keep the frozen data immutable.
    for name in ("examples", "doc_ids", "doc_texts"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    # Checked once here, so the loader can index without checks: every
    # way to build or change the data goes through this constructor.
    if not self.examples:
      raise ValueError(f"{self.source}: no training queries")
    if len(self.doc_ids) != len(self.doc_texts):
      raise ValueError(f"{self.source}: {len(self.doc_ids)} doc ids but"
                       f" {len(self.doc_texts)} doc texts")
    if len(self.doc_index) != len(self.doc_ids):
      raise ValueError(f"{self.source}: the corpus has duplicate doc ids")
    seen = set()
    for ex in self.examples:
      self._check_example(ex, seen)

  def _check_example(self, ex: TrainingExample, seen: set[str]) -> None:
    """Raises ValueError naming the query when `ex` is inconsistent."""
    where = f"{self.source}: query {ex.query_id!r}"
    if ex.query_id in seen:
      # Two records for one query would split its known relevant set.
      raise ValueError(f"{where} appears twice")
    seen.add(ex.query_id)
    if not ex.positive_ids:
      # Every loss needs a positive; such a query cannot be trained on.
      raise ValueError(f"{where} has no positives")
    positives = set(ex.positive_ids)
    if len(positives) != len(ex.positive_ids):
      raise ValueError(f"{where} lists a positive twice")
    if len(set(ex.negative_ids)) != len(ex.negative_ids):
      # Sampling without replacement assumes distinct candidates.
      raise ValueError(f"{where} lists a negative twice")
    for kind, ids in (("positive", ex.positive_ids),
                      ("negative", ex.negative_ids)):
      missing = [d for d in ids if d not in self.doc_index]
      if missing:
        raise ValueError(f"{where}: {kind} doc {missing[0]!r} is not in the"
                         f" corpus ({len(missing)} missing)")
    relevant = positives.intersection(ex.negative_ids)
    if relevant:
      # A known relevant doc scored as a negative trains the model against
      # the labels.
      raise ValueError(f"{where}: doc {sorted(relevant)[0]!r} is both a"
                       " positive and a negative")

  @functools.cached_property
  def doc_index(self) -> dict[str, int]:
    """dict, doc id -> corpus index."""
    return {doc_id: i for i, doc_id in enumerate(self.doc_ids)}

  @property
  def num_pairs(self) -> int:
    """int, the number of (query, positive) pairs."""
    return sum(len(ex.positive_ids) for ex in self.examples)

  @classmethod
  def from_beir(cls, directory: str | os.PathLike, split: str = "train", *,
                corpus_dir: str | os.PathLike | None = None
               ) -> "TrainingData":
    """Reads a BEIR qrels split's positives through its seqio Task.

    Args:
      directory: a BEIR collection directory.
      split: the qrels split (qrels/<split>.tsv).
      corpus_dir: the collection whose corpus.jsonl supplies the negatives;
        None for `directory`'s. Every positive must be in it.

    Returns:
      TrainingData with one example per judged query (positives: judgments
      with score > 0, in qrels order) and no negatives yet.

    Raises:
      BeirFormatError: a missing or malformed file.
      ValueError: a positive doc id absent from `corpus_dir`'s corpus.
    """
    # Imported here: TensorFlow and seqio cost seconds to import, and the
    # loader itself does not need them.
    from retrieval_jax.data import tasks  # pylint: disable=g-import-not-at-top

    directory = os.fspath(directory)
    # Resolve the files first, so a wrong split fails before any reading.
    qrels_file = beir.qrels_path(directory, split)
    corpus_dir = directory if corpus_dir is None else os.fspath(corpus_dir)
    beir.check_directory(corpus_dir)
    corpus_file = beir.corpus_path(corpus_dir)
    name = _task_name("beir", os.path.abspath(directory), split)
    task = tasks.register_beir_train_task(name, directory, split)
    rows = _task_rows(task, split)

    def line_of(query_id: str, doc_id: str) -> int | None:
      # Only on the error path: the Task carries no line numbers.
      for row in beir.read_qrels_rows(qrels_file):
        if (row.query_id, row.doc_id) == (query_id, doc_id):
          return row.line
      return None

    return _from_rows(rows, corpus_file, qrels_file, line_of)

  @classmethod
  def from_pairs(cls, pairs_path: str | os.PathLike,
                 corpus_dir: str | os.PathLike) -> "TrainingData":
    """Reads a pairs file through its seqio Task.

    The pairs file gives each positive's text; `corpus_dir`'s corpus.jsonl
    supplies the negatives and must hold every positive's doc id, so that a
    positive mined or sampled for another query is known by its index.

    Args:
      pairs_path: one {"query_id", "query", "doc_id", "title", "text"}
        object per line (see `tasks.read_pairs`).
      corpus_dir: a BEIR collection directory (only corpus.jsonl is read).

    Returns:
      TrainingData with one example per query, in first-appearance order,
      its positives in file order, and no negatives yet.

    Raises:
      BeirFormatError: a missing or malformed file.
      ValueError: a pair's doc id absent from the corpus, or one query id
        (or doc id) with two different texts; the message names the line.
    """
    from retrieval_jax.data import tasks  # pylint: disable=g-import-not-at-top

    pairs_path = os.fspath(pairs_path)
    corpus_dir = os.fspath(corpus_dir)
    # The corpus path is checked before the (slower) Task registration.
    beir.check_directory(corpus_dir)
    corpus_file = beir.corpus_path(corpus_dir)
    name = _task_name("pairs", os.path.abspath(pairs_path))
    task = tasks.register_pairs_task(name, pairs_path)
    rows = _task_rows(task, tasks.PAIRS_SPLIT)

    def line_of(query_id: str, doc_id: str) -> int | None:
      # Only on the error path: re-read the file for the line number.
      for lineno, obj in beir.read_json_objects(pairs_path):
        # str(): ids written as JSON integers are strings in the Task.
        ids = (str(obj.get("query_id")), str(obj.get("doc_id")))
        if ids == (query_id, doc_id):
          return lineno
      return None

    return _from_rows(rows, corpus_file, pairs_path, line_of)

  def with_negatives(self,
                     negatives: Sequence[Sequence[str]]) -> "TrainingData":
    """Returns a copy whose queries carry the given negatives.

    Args:
      negatives: list[list[str]] [Q], per query (in `examples` order) its
        negatives in rank order.

    Raises:
      ValueError: wrong length, or a doc id that is unknown or a positive.
    """
    if len(negatives) != len(self.examples):
      # Usually a cache or a miner run over other queries.
      raise ValueError(
          f"{self.source}: got negatives for {len(negatives)} queries, the"
          f" data has {len(self.examples)}")
    examples = tuple(
        dataclasses.replace(ex, negative_ids=tuple(negs))
        for ex, negs in zip(self.examples, negatives))
    # `replace` re-runs the constructor's checks on the new negatives.
    return dataclasses.replace(self, examples=examples)

  def mine_negatives(self, method: str = "bm25", *, depth: int = 100,
                     encoder=None, batch_size: int = 64,
                     cache_path: str | os.PathLike | None = None
                    ) -> "TrainingData":
    """Mines hard negatives for every query, excluding its positives.

    Args:
      method: "bm25" (`negatives.bm25_negatives`) or "dense"
        (`negatives.dense_negatives` with `encoder`).
      depth: negatives kept per query.
      encoder: a `TextEncoder`, for method "dense".
      batch_size: texts per encoder step, for method "dense".
      cache_path: a JSON file that keeps the result across runs (see
        `negatives.cached_negatives`); None mines every time.

    Returns:
      TrainingData with `negative_ids` set.
    """
    if method not in MINING_METHODS:
      raise ValueError(
          f"method must be one of {MINING_METHODS}, got {method!r}")
    if method == "dense" and encoder is None:
      raise ValueError('method "dense" needs an encoder')
    query_ids = [ex.query_id for ex in self.examples]
    query_texts = [ex.query for ex in self.examples]
    # Every positive is excluded, not only the ones a batch will feed: a
    # positive is relevant whichever the loader picks.
    exclude = [set(ex.positive_ids) for ex in self.examples]
    if method == "bm25":
      settings = negatives_lib.BM25_SETTINGS

      def compute():
        return negatives_lib.bm25_negatives(
            query_texts, self.doc_ids, self.doc_texts, exclude, depth=depth)

    else:
      settings = negatives_lib.encoder_fingerprint(encoder)

      def compute():
        return negatives_lib.dense_negatives(
            encoder, query_texts, self.doc_ids, self.doc_texts, exclude,
            depth=depth, batch_size=batch_size)

    if cache_path is None:
      mined = compute()
    else:
      key = negatives_lib.mining_key(method, settings, query_ids, query_texts,
                                     self.doc_ids, self.doc_texts, exclude,
                                     depth)
      mined = negatives_lib.cached_negatives(cache_path, key, compute)
    return self.with_negatives(mined)


def _task_name(*source: str) -> str:
  """A seqio task name unique to a source (registration is idempotent)."""
  # Derived from the source, not chosen by the caller: the registry is
  # global, and one name registered from two sources is an error.
  digest = hashlib.sha1("\0".join(source).encode("utf-8")).hexdigest()
  return f"retrieval_jax_{source[0]}_{digest[:16]}"


def _task_rows(task, split: str) -> list[tuple[str, str, str, str]]:
  """A Task's examples as (query_id, query, doc_id, positive), file order."""
  # File order: the loader does its own seeded, resumable shuffling.
  dataset = task.get_dataset(sequence_length=None, split=split,
                             shuffle=False)
  return [tuple(example[key].decode("utf-8") for key in _ROW_KEYS)
          for example in dataset.as_numpy_iterator()]


def _from_rows(rows: Sequence[tuple[str, str, str, str]], corpus_file: str,
               source: str, line_of: Callable[[str, str], int | None]
              ) -> TrainingData:
  """Groups (query_id, query, doc_id, positive) rows by query.

  Args:
    rows: the task's examples in file order.
    corpus_file: the corpus.jsonl the doc ids must be in.
    source: the file the rows came from, for messages.
    line_of: (query_id, doc_id) -> the row's line in `source`.

  Returns:
    TrainingData over `corpus_file`'s corpus, positive texts from `rows`.
  """

  def fail(query_id, doc_id, message):
    raise beir.BeirFormatError(source, line_of(query_id, doc_id), message)

  doc_ids, titles, bodies = beir.read_corpus(corpus_file)
  doc_index = {doc_id: i for i, doc_id in enumerate(doc_ids)}
  doc_texts = [beir.doc_text(t, b) for t, b in zip(titles, bodies)]
  # doc id -> (text, query id) of the first row naming it.
  given = {}
  # query id -> (text, [positive doc ids]); dicts keep first appearance.
  groups = {}
  num_changed = 0
  for query_id, query, doc_id, positive in rows:
    i = doc_index.get(doc_id)
    if i is None:
      fail(query_id, doc_id, f"doc {doc_id!r} is not in {corpus_file}")
    if doc_id in given:
      # One doc id is one passage: two texts would make the corpus index
      # stand for two different passages.
      if given[doc_id][0] != positive:
        fail(query_id, doc_id, f"doc {doc_id!r} has a different text than"
             f" for query {given[doc_id][1]!r}")
    else:
      given[doc_id] = (positive, query_id)
      # The source's text is the positive the data set means; the corpus
      # copy may differ in whitespace or version.
      num_changed += doc_texts[i] != positive
      doc_texts[i] = positive
    group = groups.setdefault(query_id, (query, []))
    if group[0] != query:
      fail(query_id, doc_id, f"query {query_id!r} has two different texts")
    group[1].append(doc_id)
  if num_changed:
    logging.warning("%s: %d positive texts differ from %s; using the former",
                    source, num_changed, corpus_file)
  examples = [TrainingExample(query_id, query, tuple(positives))
              for query_id, (query, positives) in groups.items()]
  data = TrainingData(examples, doc_ids, doc_texts, source=source)
  logging.info("%s: %d training queries, %d pairs, corpus of %d docs from %s",
               source, len(examples), data.num_pairs, len(doc_ids),
               corpus_file)
  return data


def _check_int(name: str, value, minimum: int) -> int:
  """Returns `value` as an int, raising ValueError below `minimum`."""
  # bool is an int subclass, but batch_size=True is a bug, not a 1.
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  try:
    # Accepts numpy integers (config values often are), rejects floats.
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  return value


def _pad_tokens(id_lists: Sequence[Sequence[int]], width: int,
                pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token id lists into a matrix.

  Returns:
    ids_nl int32 [N, width], lengths_n int32 [N].
  """
  ids_nl = np.full((len(id_lists), width), pad_id, np.int32)
  lengths_n = np.zeros(len(id_lists), np.int32)
  for i, ids in enumerate(id_lists):
    ids_nl[i, : len(ids)] = ids
    lengths_n[i] = len(ids)
  return ids_nl, lengths_n


def _mask(lengths_n: np.ndarray, width: int) -> np.ndarray:
  """int32 [N, width], 1 on the first lengths_n[i] positions of row i."""
  return (np.arange(width)[None, :] < lengths_n[:, None]).astype(np.int32)


class TrainLoader:
  """Deterministic, step-indexed batches of query groups (module docstring).

  All texts the batches can hold (every query, every positive, the top
  `negative_depth` negatives) are tokenized once in the constructor, so
  `batch_at` only samples and gathers.
  """

  def __init__(self, data: TrainingData, tokenizer, *, batch_size: int,
               group_size: int, unit: str, positives: str,
               max_positives: int = 4, query_max_length: int,
               passage_max_length: int, seed: int, negative_depth: int = 100,
               max_relevant: int | None = None, prefetch: int = 2):
    """Validates the settings and tokenizes the data.

    Args:
      data: the training queries, with negatives mined (unless every group
        holds only positives).
      tokenizer: a `WordPieceTokenizer` (`encode(text, max_length)`,
        `pad_id`).
      batch_size: B, queries per batch.
      group_size: G, passages per query (positives, then hard negatives).
      unit: "pair" (one example per (query, positive)) or "query".
      positives: "one" or "all" (see the module docstring).
      max_positives: most positives per group for positives "all".
      query_max_length: Lq, tokens per query ([CLS] and [SEP] included).
      passage_max_length: Lp, tokens per passage.
      seed: int >= 0; with the step, decides every batch.
      negative_depth: negatives are drawn from the top this many mined.
      max_relevant: R, width of "relevant_doc"; None for the largest
        positive count of any query.
      prefetch: batches `iterate` prepares ahead on a background thread;
        0 computes them on the caller's thread.

    Raises:
      ValueError: a setting out of range or not an allowed string; group
        too small for max_positives with positives "all"; max_relevant below
        some query's positive count; groups that need hard negatives when
        no query has any.
    """
    if not isinstance(data, TrainingData):
      raise ValueError(f"data must be a TrainingData, got {type(data)}")
    self.data = data
    self.tokenizer = tokenizer
    self.batch_size = _check_int("batch_size", batch_size, 1)
    self.group_size = _check_int("group_size", group_size, 1)
    self.unit = _check_choice("unit", unit, UNITS)
    self.positives = _check_choice("positives", positives, POSITIVE_CHOICES)
    self.max_positives = _check_int("max_positives", max_positives, 1)
    # [CLS] and [SEP] need two positions.
    self.query_max_length = _check_int("query_max_length", query_max_length, 2)
    self.passage_max_length = _check_int("passage_max_length",
                                         passage_max_length, 2)
    # numpy's SeedSequence takes only non-negative entropy.
    self.seed = _check_int("seed", seed, 0)
    self.negative_depth = _check_int("negative_depth", negative_depth, 1)
    self.prefetch = _check_int("prefetch", prefetch, 0)
    if self.positives == "all" and self.group_size < self.max_positives:
      # Cutting positives to fit would change the loss without a word.
      raise ValueError(
          f"group_size={self.group_size} < max_positives="
          f"{self.max_positives}: with positives='all' a group must have"
          " room for max_positives positives")
    examples = data.examples
    most = max(examples, key=lambda ex: len(ex.positive_ids))
    num_most = len(most.positive_ids)
    if max_relevant is None:
      max_relevant = num_most
    self.max_relevant = _check_int("max_relevant", max_relevant, 1)
    if self.max_relevant < num_most:
      # Dropping a relevant doc from "relevant_doc" would let the loss score
      # it as a negative.
      raise ValueError(
          f"max_relevant={self.max_relevant} but query {most.query_id!r} has"
          f" {num_most} positives")
    # A few queries without negatives get padding; all of them without is
    # a forgotten mining step, and every batch would be mostly padding.
    needs_negatives = self.group_size > (
        1 if self.positives == "one" else min(num_most, self.max_positives))
    if needs_negatives and not any(ex.negative_ids for ex in examples):
      raise ValueError(
          f"group_size={self.group_size} asks for hard negatives but no query"
          " of the data has any; mine them first"
          " (TrainingData.mine_negatives) or lower group_size")

    doc_index = data.doc_index
    # Per query: corpus indices of its positives (file order) and of its
    # top negatives (rank order).
    self._positive_docs = [
        np.array([doc_index[d] for d in ex.positive_ids], np.int32)
        for ex in examples]
    self._negative_docs = [
        np.array([doc_index[d] for d in ex.negative_ids[:self.negative_depth]],
                 np.int32)
        for ex in examples]
    # Rand1LH offsets: a stable hash, unlike Python's hash(), which is
    # salted per process and would change the positives on every restart.
    self._offsets = np.array(
        [zlib.crc32((ex.query_id + str(self.seed)).encode("utf-8"))
         for ex in examples], np.int64)
    self._relevant_qr = np.full((len(examples), self.max_relevant), PAD_DOC,
                                np.int32)
    for q, docs in enumerate(self._positive_docs):
      self._relevant_qr[q, :len(docs)] = docs
    # Example -> (query index, positive slot); the slot is -1 for unit
    # "query", whose positive is chosen per epoch.
    if self.unit == "query":
      units = [(q, -1) for q in range(len(examples))]
    else:
      units = [(q, j) for q, ex in enumerate(examples)
               for j in range(len(ex.positive_ids))]
    self._units_e2 = np.array(units, np.int64)
    # A few epochs' orders are kept: consecutive steps reuse one, and a
    # batch straddling two epochs needs both. lru_cache is thread-safe, so
    # the prefetch thread and direct callers can share it.
    self._order = functools.lru_cache(maxsize=8)(self._epoch_order)
    self._tokenize()

  def _tokenize(self) -> None:
    """Tokenizes every query and every doc a batch can hold, once."""
    start = time.perf_counter()
    encode = self.tokenizer.encode
    pad_id = self.tokenizer.pad_id
    self._query_ids_ql, self._query_lengths_q = _pad_tokens(
        [encode(ex.query, self.query_max_length) for ex in self.data.examples],
        self.query_max_length, pad_id)
    # Only docs a batch can hold: on a large corpus most docs are neither a
    # positive nor in any query's top negatives.
    used_docs = np.unique(
        np.concatenate(self._positive_docs + self._negative_docs))
    # Corpus index -> row of the token table; the extra last row is the
    # all-padding passage that PAD_DOC maps to.
    self._doc_row_n = np.full(len(self.data.doc_ids) + 1, -1, np.int32)
    self._doc_row_n[used_docs] = np.arange(len(used_docs), dtype=np.int32)
    self._doc_row_n[PAD_DOC] = len(used_docs)
    texts = self.data.doc_texts
    self._doc_ids_rl, self._doc_lengths_r = _pad_tokens(
        [encode(texts[i], self.passage_max_length) for i in used_docs] + [[]],
        self.passage_max_length, pad_id)
    logging.info("TrainLoader: tokenized %d queries and %d docs in %.1f s",
                 len(self.data.examples), len(used_docs),
                 time.perf_counter() - start)

  @property
  def num_examples(self) -> int:
    """E, examples per epoch (queries or pairs, per `unit`)."""
    return len(self._units_e2)

  @property
  def steps_per_epoch(self) -> int:
    """ceil(E / B): steps for every example to be seen at least once."""
    return math.ceil(self.num_examples / self.batch_size)

  @property
  def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Key -> (shape, dtype) of every batch, for compiling ahead of data."""
    b, g = self.batch_size, self.group_size
    lq, lp = self.query_max_length, self.passage_max_length
    int32 = np.dtype(np.int32)
    return {
        "query_ids": ((b, lq), int32),
        "query_mask": ((b, lq), int32),
        "passage_ids": ((b * g, lp), int32),
        "passage_mask": ((b * g, lp), int32),
        "positive_counts": ((b,), int32),
        "passage_doc": ((b * g,), int32),
        "relevant_doc": ((b, self.max_relevant), int32),
        "example_index": ((b,), np.dtype(np.int64)),
    }

  @property
  def units(self) -> np.ndarray:
    """int64 [E, 2], per example: query index and positive slot.

    Column 0 indexes `data.examples`; column 1 is the pair's positive among
    the query's positives, or -1 for unit "query" (chosen per epoch).
    """
    return self._units_e2.copy()

  def examples_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Which examples batch `step` holds.

    Args:
      step: int >= 0.

    Returns:
      epochs_b int64 [B], the epoch of each row; examples_b int64 [B], its
      example (a row of `units`).
    """
    step = _check_int("step", step, 0)
    b, e = self.batch_size, self.num_examples
    positions_b = step * b + np.arange(b, dtype=np.int64)
    epochs_b = positions_b // e
    # A batch spans at most a few epochs (more only when B > E).
    examples_b = np.empty(b, np.int64)
    for epoch in np.unique(epochs_b):
      in_epoch = epochs_b == epoch
      examples_b[in_epoch] = self._order(int(epoch))[positions_b[in_epoch] % e]
    return epochs_b, examples_b

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """int64 [E], the examples in epoch `epoch`'s order."""
    # Seeded by (seed, epoch) alone, so any epoch's order can be rebuilt
    # without replaying the ones before it.
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)

  def _positive_slots(self, q: int, j: int, epoch: int) -> np.ndarray:
    """Indices into query q's positives for one example (module docstring)."""
    m = len(self._positive_docs[q])
    if self.positives == "one":
      if j >= 0:
        return np.array([j])
      # Rand1LH: each query starts at its own positive and moves one on per
      # epoch, so every positive is used once per m epochs.
      return np.array([(int(self._offsets[q]) + epoch) % m])
    count = min(m, self.max_positives)
    if j < 0:
      return np.arange(count)
    # The pair's own positive leads, the others follow in file order.
    return np.array([j] + [i for i in range(m) if i != j][: count - 1])

  def _sample_negatives(self, q: int, epoch: int, example: int,
                        count: int) -> np.ndarray:
    """`count` (or fewer, if none are mined) negatives' corpus indices."""
    pool = self._negative_docs[q]
    n = len(pool)
    if count == 0 or n == 0:
      return pool[:0]
    # Seeded per (seed, epoch, example): independent of which batch or
    # thread asks, so resuming reproduces the draws.
    rng = np.random.default_rng([self.seed, epoch, example])
    if n >= count:
      return pool[rng.choice(n, count, replace=False)]
    # Too few mined: use each once, then repeat some. Repeats keep the
    # group full, so the loss sees as many hard candidates per query.
    return np.concatenate(
        [pool[rng.permutation(n)], pool[rng.integers(0, n, count - n)]])

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of training step `step` (layout in the module docstring).

    A pure function of the data, the settings, the seed and `step`; safe to
    call from several threads.

    Args:
      step: int >= 0.

    Returns:
      dict of numpy arrays, keys and shapes as in `batch_spec`.
    """
    step = _check_int("step", step, 0)
    b, g = self.batch_size, self.group_size
    positions_b = step * b + np.arange(b, dtype=np.int64)
    epochs_b, examples_b = self.examples_at(step)
    queries_b = self._units_e2[examples_b, 0]
    passage_doc_bg = np.full((b, g), PAD_DOC, np.int32)
    counts_b = np.empty(b, np.int32)
    for i in range(b):
      q, j = (int(x) for x in self._units_e2[examples_b[i]])
      epoch = int(epochs_b[i])
      positives = self._positive_docs[q][self._positive_slots(q, j, epoch)]
      negatives = self._sample_negatives(q, epoch, int(examples_b[i]),
                                         g - len(positives))
      # Positives first: the losses read the first positive_counts rows of
      # each group as its positives.
      group = np.concatenate([positives, negatives])
      passage_doc_bg[i, :len(group)] = group
      counts_b[i] = len(positives)
    # Query-major flattening: query i's group is rows i*G .. i*G+G-1.
    passage_doc_p = passage_doc_bg.reshape(b * g)
    # PAD_DOC (-1) indexes the last entry of _doc_row_n: the padding row.
    rows_p = self._doc_row_n[passage_doc_p]
    return {
        "query_ids": self._query_ids_ql[queries_b],
        "query_mask": _mask(self._query_lengths_q[queries_b],
                            self.query_max_length),
        "passage_ids": self._doc_ids_rl[rows_p],
        "passage_mask": _mask(self._doc_lengths_r[rows_p],
                              self.passage_max_length),
        "positive_counts": counts_b,
        "passage_doc": passage_doc_p,
        "relevant_doc": self._relevant_qr[queries_b],
        "example_index": positions_b,
    }

  def texts_at(self, step: int, batch: dict[str, np.ndarray]
               ) -> tuple[list[str], list[str]]:
    """The texts of batch `step`'s passage rows and of their queries.

    For pair models (cross-encoders), which tokenise (query, passage)
    together: row p of both lists is passage row p of `batch` (which must be
    `batch_at(step)`) and its group's query; padding rows get "" as passage.

    Returns:
      (query_texts, passage_texts), both list[str] [B*G].
    """
    _, examples_b = self.examples_at(step)
    queries_b = self._units_e2[examples_b, 0]
    g = self.group_size
    query_texts = [self.data.examples[q].query for q in queries_b
                   for _ in range(g)]
    passage_texts = [self.data.doc_texts[d] if d != PAD_DOC else ""
                     for d in batch["passage_doc"]]
    return query_texts, passage_texts

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields batch_at(start_step), batch_at(start_step + 1), ... forever.

    With `prefetch` > 0 a background thread prepares the next batches
    (bounded queue) while the caller runs the device step. Closing the
    generator (or dropping it) stops the thread.

    Args:
      start_step: int >= 0, the first step, e.g. a restored checkpoint's.
    """
    # Checked now, not at the first next(): generators run lazily.
    step = _check_int("start_step", start_step, 0)
    if not self.prefetch:
      return (self.batch_at(t) for t in itertools.count(step))
    return self._prefetched(step)

  def _prefetched(self, step: int) -> Iterator[dict[str, np.ndarray]]:
    """`iterate` with a producer thread `prefetch` batches ahead."""
    # Bounded, so the producer stays at most `prefetch` batches ahead and
    # memory stays flat however slow the device step is.
    ready = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()

    def produce(step):
      while not stop.is_set():
        try:
          item = (self.batch_at(step), None)
        except Exception as e:  # pylint: disable=broad-except
          # Handed to the consumer, which re-raises it in its own thread.
          item = (None, e)
        # A timed put, so a consumer that stops reading (closed generator)
        # cannot leave this thread blocked forever on a full queue.
        while not stop.is_set():
          try:
            ready.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item[1] is not None:
          return
        step += 1

    thread = threading.Thread(target=produce, args=(step,),
                              name="TrainLoader", daemon=True)
    thread.start()
    try:
      while True:
        batch, error = ready.get()
        if error is not None:
          raise error
        yield batch
    finally:
      # Runs on close(), on garbage collection and after an error.
      stop.set()
      thread.join()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """Same as `iterate(0)`."""
    return self.iterate(0)

  def describe(self) -> str:
    """One line of counts for the training log."""
    mined_q = np.array([len(n) for n in self._negative_docs])
    return (
        f"{len(self.data.examples)} queries, {self.data.num_pairs} pairs,"
        f" {self.num_examples} examples/epoch (unit={self.unit},"
        f" positives={self.positives}), {self.steps_per_epoch} steps/epoch"
        f" at batch {self.batch_size} x group {self.group_size}, mean"
        f" {mined_q.mean():.1f} negatives/query (depth"
        f" {self.negative_depth}), {int((mined_q == 0).sum())} queries"
        " without negatives"
    )
