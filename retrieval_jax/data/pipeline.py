"""Training data for the trainers, and its step-indexed loader.

`TrainingData`: training queries over a corpus, from a BEIR qrels split, a
pairs file or a Tevatron file (`tevatron.py`: given negatives, optional
teacher scores); `negatives.mine` adds hard negatives. `TrainLoader`: fixed-shape
numpy batches, batch t a pure function of (data, settings, seed, t), so the
step is the only iterator state. No seqio: there is nothing to preprocess or
cache, and tokenizing stays with the loader, per model.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import itertools
import math
import operator
import os
import queue
import threading
import time
from typing import NamedTuple
import zlib

from absl import logging
import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.data import tevatron

UNITS = ("pair", "query")
POSITIVE_CHOICES = ("one", "all")
PAD_DOC = -1
_PAIRS_WHAT = (
    'training pairs, one {"query_id", "query", "doc_id", "title",'
    ' "text"} object per line'
)


class PairRow(NamedTuple):
  """One (query, positive) pair of a training source, with its line."""

  line: int
  query_id: str
  query: str
  doc_id: str
  positive: str  # beir.doc_text(title, text) of the positive.


@dataclasses.dataclass(frozen=True)
class TrainingExample:
  """One query: positives (file order, all known relevant), mined negatives.

  teacher_scores: a teacher's score of each candidate, positive_ids then
  negative_ids in order; () when there is no teacher.
  """

  query_id: str
  query: str
  positive_ids: tuple[str, ...]
  negative_ids: tuple[str, ...] = ()
  teacher_scores: tuple[float, ...] = ()

  @property
  def candidate_ids(self) -> tuple[str, ...]:
    """The docs a batch can give this query: positives, then negatives."""
    return self.positive_ids + self.negative_ids


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingData:
  """Training queries (first-appearance order) over the corpus they index."""

  examples: tuple[TrainingExample, ...]
  doc_ids: tuple[str, ...]
  doc_texts: tuple[str, ...]
  source: str = "<memory>"

  def __post_init__(self):
    for name in ("examples", "doc_ids", "doc_texts"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    # Every way to build or change the data passes here: the loader trusts it.
    if not self.examples:
      raise ValueError(f"{self.source}: no training queries")
    if len(self.doc_ids) != len(self.doc_texts):
      raise ValueError(
          f"{self.source}: {len(self.doc_ids)} doc ids but"
          f" {len(self.doc_texts)} doc texts"
      )
    if len(self.doc_index) != len(self.doc_ids):
      raise ValueError(f"{self.source}: the corpus has duplicate doc ids")
    seen = set()
    for ex in self.examples:
      self._check_example(ex, seen)

  def _check_example(self, ex: TrainingExample, seen: set[str]) -> None:
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
    for kind, ids in (
        ("positive", ex.positive_ids),
        ("negative", ex.negative_ids),
    ):
      missing = [d for d in ids if d not in self.doc_index]
      if missing:
        raise ValueError(
            f"{where}: {kind} doc {missing[0]!r} is not in the"
            f" corpus ({len(missing)} missing)"
        )
    relevant = positives.intersection(ex.negative_ids)
    if relevant:
      # A known relevant doc scored as a negative trains against the labels.
      raise ValueError(
          f"{where}: doc {sorted(relevant)[0]!r} is both a"
          " positive and a negative"
      )
    if ex.teacher_scores and (
        len(ex.teacher_scores) != len(ex.candidate_ids)
        or not np.all(np.isfinite(ex.teacher_scores))
    ):
      raise ValueError(
          f"{where}: {len(ex.teacher_scores)} teacher scores for"
          f" {len(ex.candidate_ids)} candidates (all must be finite)"
      )

  @functools.cached_property
  def doc_index(self) -> dict[str, int]:
    """dict, doc id -> corpus index."""
    return {doc_id: i for i, doc_id in enumerate(self.doc_ids)}

  @property
  def num_pairs(self) -> int:
    """int, the number of (query, positive) pairs."""
    return sum(len(ex.positive_ids) for ex in self.examples)

  @property
  def has_teacher_scores(self) -> bool:
    """Whether every query carries its candidates' teacher scores."""
    return all(ex.teacher_scores for ex in self.examples)

  @classmethod
  def from_beir(
      cls,
      directory: str | os.PathLike,
      split: str = "train",
      *,
      corpus_dir: str | os.PathLike | None = None,
  ) -> "TrainingData":
    """Reads the positives (score > 0, qrels order) of a BEIR qrels split.

    corpus_dir (default `directory`) supplies the corpus and must hold every
    positive; rows naming unknown ids are dropped with a warning.
    """
    directory = os.fspath(directory)
    # Resolve the files first, so a wrong split fails before any reading.
    qrels_file = beir.qrels_path(directory, split)
    corpus_dir = directory if corpus_dir is None else os.fspath(corpus_dir)
    beir.check_directory(corpus_dir)
    corpus_file = beir.corpus_path(corpus_dir)
    corpus = beir.read_corpus(beir.corpus_path(directory))
    rows = _qrels_pairs(directory, qrels_file, corpus)
    if os.path.abspath(corpus_dir) != os.path.abspath(directory):
      corpus = beir.read_corpus(corpus_file)
    return _from_rows(rows, corpus, corpus_file, qrels_file)

  @classmethod
  def from_pairs(
      cls, pairs_path: str | os.PathLike, corpus_dir: str | os.PathLike
  ) -> "TrainingData":
    """Reads a pairs file (see `read_pairs`) over `corpus_dir`'s corpus.jsonl.

    The corpus must hold every positive id, so a positive mined or sampled
    for another query is known by its index; the pairs give its text.
    """
    pairs_path = os.fspath(pairs_path)
    corpus_dir = os.fspath(corpus_dir)
    beir.check_directory(corpus_dir)
    corpus_file = beir.corpus_path(corpus_dir)
    rows = read_pairs(pairs_path)
    return _from_rows(
        rows, beir.read_corpus(corpus_file), corpus_file, pairs_path
    )

  @classmethod
  def from_tevatron(
      cls,
      path: str | os.PathLike,
      corpus_dir: str | os.PathLike | None = None,
      *,
      teacher_scores: bool = False,
  ) -> "TrainingData":
    """Reads a Tevatron file (`tevatron.read_tevatron`), negatives included.

    The corpus is `corpus_dir`'s corpus.jsonl (if given; the file's texts
    replace its copies) plus every passage of the file it lacks, in first
    appearance order. teacher_scores: the passages' "score"s (required on
    every passage) become the queries' `teacher_scores`.
    """
    path = os.fspath(path)
    rows = tevatron.read_tevatron(path, require_scores=teacher_scores)
    doc_ids, doc_texts = [], []
    if corpus_dir is not None:
      corpus_dir = os.fspath(corpus_dir)
      beir.check_directory(corpus_dir)
      ids, titles, bodies = beir.read_corpus(beir.corpus_path(corpus_dir))
      doc_ids = list(ids)
      doc_texts = [beir.doc_text(t, b) for t, b in zip(titles, bodies)]
    index = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    num_changed = 0
    examples = []
    for row in rows:
      passages = row.positives + row.negatives
      for p in passages:
        i = index.setdefault(p.doc_id, len(doc_ids))
        if i == len(doc_ids):
          doc_ids.append(p.doc_id)
          doc_texts.append(p.text)
        elif doc_texts[i] != p.text:
          # The file's text is the passage meant (as for pairs files).
          num_changed += 1
          doc_texts[i] = p.text
      examples.append(
          TrainingExample(
              row.query_id,
              row.query,
              tuple(p.doc_id for p in row.positives),
              tuple(p.doc_id for p in row.negatives),
              tuple(p.score for p in passages) if teacher_scores else (),
          )
      )
    if num_changed:
      logging.warning(
          "%s: %d passage texts differ from %s's corpus; using the former",
          path,
          num_changed,
          corpus_dir,
      )
    data = cls(examples, doc_ids, doc_texts, source=path)
    logging.info(
        "%s: %d training queries, %d pairs, %d given negatives, corpus of %d"
        " docs",
        path,
        len(examples),
        data.num_pairs,
        sum(len(ex.negative_ids) for ex in examples),
        len(doc_ids),
    )
    return data

  def with_negatives(
      self, negatives: Sequence[Sequence[str]]
  ) -> "TrainingData":
    """A copy whose queries carry `negatives` [Q][*], doc ids in rank order."""
    if len(negatives) != len(self.examples):
      # Usually a cache or a miner run over other queries.
      raise ValueError(
          f"{self.source}: got negatives for {len(negatives)} queries, the"
          f" data has {len(self.examples)}"
      )
    # New candidates: the old teacher scores no longer line up.
    examples = tuple(
        dataclasses.replace(ex, negative_ids=tuple(negs), teacher_scores=())
        for ex, negs in zip(self.examples, negatives)
    )
    # `replace` re-runs the constructor's checks on the new negatives.
    return dataclasses.replace(self, examples=examples)

  def without_queries(self, query_ids) -> "TrainingData":
    """A copy without the queries `query_ids` (a held-out split)."""
    drop = frozenset(query_ids)
    kept = tuple(ex for ex in self.examples if ex.query_id not in drop)
    return dataclasses.replace(self, examples=kept)

  def with_teacher_scores(
      self, scores: Sequence[Sequence[float]]
  ) -> "TrainingData":
    """A copy whose queries carry `scores` [Q][candidates] (`candidate_ids`
    order) as their teacher scores."""
    if len(scores) != len(self.examples):
      raise ValueError(
          f"{self.source}: got teacher scores for {len(scores)} queries, the"
          f" data has {len(self.examples)}"
      )
    examples = tuple(
        dataclasses.replace(ex, teacher_scores=tuple(map(float, row)))
        for ex, row in zip(self.examples, scores)
    )
    return dataclasses.replace(self, examples=examples)


def holdout_query_ids(
    query_ids: Sequence[str], num: int, seed: int
) -> frozenset[str]:
  """`num` of `query_ids` (order and duplicates ignored), drawn by `seed`:
  training queries left out of training for model selection."""
  ids = sorted(set(query_ids))
  if not 0 < num < len(ids):
    raise ValueError(
        f"cannot hold out {num} of {len(ids)} queries: need 0 < num <"
        f" {len(ids)}"
    )
  order = np.random.default_rng(seed).permutation(len(ids))
  return frozenset(ids[i] for i in order[:num])


def read_pairs(path: str) -> list[PairRow]:
  """Validated PairRows of a pairs JSONL file, in file order.

  title is optional; score too, but if given a positive int (every line is a
  positive). A repeated (query_id, doc_id) pair raises BeirFormatError.
  """
  beir.require_file(path, _PAIRS_WHAT)
  rows = []
  seen = {}
  for lineno, obj in beir.read_json_objects(path):
    query_id = beir.json_id(path, lineno, obj, "query_id")
    doc_id = beir.json_id(path, lineno, obj, "doc_id")
    query, text = (
        beir.json_text(path, lineno, obj, key, required=True)
        for key in ("query", "text")
    )
    title = beir.json_text(path, lineno, obj, "title", required=False)
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
          f"duplicate pair for query {query_id!r} and doc"
          f" {doc_id!r} (first at line {first})",
      )
    rows.append(
        PairRow(lineno, query_id, query, doc_id, beir.doc_text(title, text))
    )
  if not rows:
    raise beir.BeirFormatError(path, None, "the file holds no pairs")
  return rows


def _qrels_pairs(
    directory: str,
    qrels_file: str,
    corpus: tuple[list[str], list[str], list[str]],
) -> list[PairRow]:
  """The judgments with score > 0 and known ids, in qrels file order."""
  doc_ids, titles, texts = corpus
  query_ids, queries = beir.read_queries(beir.queries_path(directory))
  rows = beir.read_qrels_rows(qrels_file)
  # Validation and the unknown-id policy; `qrels` holds the rows we keep.
  qrels = beir.qrels_from_rows(qrels_file, rows, query_ids, doc_ids, "warn")
  query_text = dict(zip(query_ids, queries))
  doc_index = {doc_id: i for i, doc_id in enumerate(doc_ids)}
  # Rows, not the dict: grouping by query would reorder non-contiguous files.
  pairs = [
      PairRow(
          row.line,
          row.query_id,
          query_text[row.query_id],
          row.doc_id,
          beir.doc_text(
              titles[doc_index[row.doc_id]], texts[doc_index[row.doc_id]]
          ),
      )
      for row in rows
      if row.score > 0 and row.doc_id in qrels.get(row.query_id, {})
  ]
  if not pairs:
    raise beir.BeirFormatError(
        qrels_file, None, "no judgment has a positive score"
    )
  if len(rows) > len(pairs):
    logging.info(
        "%s: %d judgments skipped (score <= 0 or unknown id)",
        qrels_file,
        len(rows) - len(pairs),
    )
  return pairs


def _from_rows(
    rows: Sequence[PairRow],
    corpus: tuple[list[str], list[str], list[str]],
    corpus_file: str,
    source: str,
) -> TrainingData:
  """Groups pairs by query over `corpus`; positive texts come from `rows`."""
  doc_ids, titles, bodies = corpus
  doc_index = {doc_id: i for i, doc_id in enumerate(doc_ids)}
  doc_texts = [beir.doc_text(t, b) for t, b in zip(titles, bodies)]
  # given: doc id -> (text, first query); groups: query id -> (text, docs).
  given = {}
  groups = {}
  num_changed = 0
  for line, query_id, query, doc_id, positive in rows:
    i = doc_index.get(doc_id)
    if i is None:
      raise beir.BeirFormatError(
          source, line, f"doc {doc_id!r} is not in {corpus_file}"
      )
    if doc_id in given:
      # One doc id is one passage: two texts would make its index ambiguous.
      if given[doc_id][0] != positive:
        raise beir.BeirFormatError(
            source,
            line,
            f"doc {doc_id!r} has a different text than for"
            f" query {given[doc_id][1]!r}",
        )
    else:
      given[doc_id] = (positive, query_id)
      # The source's text is the positive meant; the corpus copy may differ.
      num_changed += doc_texts[i] != positive
      doc_texts[i] = positive
    group = groups.setdefault(query_id, (query, []))
    if group[0] != query:
      raise beir.BeirFormatError(
          source, line, f"query {query_id!r} has two different texts"
      )
    group[1].append(doc_id)
  if num_changed:
    logging.warning(
        "%s: %d positive texts differ from %s; using the former",
        source,
        num_changed,
        corpus_file,
    )
  examples = [
      TrainingExample(query_id, query, tuple(positives))
      for query_id, (query, positives) in groups.items()
  ]
  data = TrainingData(examples, doc_ids, doc_texts, source=source)
  logging.info(
      "%s: %d training queries, %d pairs, corpus of %d docs from %s",
      source,
      len(examples),
      data.num_pairs,
      len(doc_ids),
      corpus_file,
  )
  return data


def check_int(name: str, value, minimum: int) -> int:
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


def pad_tokens(
    id_lists: Sequence[Sequence[int]], width: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads id lists: ids_nl int32 [N, width], lengths_n int32 [N]."""
  ids_nl = np.full((len(id_lists), width), pad_id, np.int32)
  lengths_n = np.zeros(len(id_lists), np.int32)
  for i, ids in enumerate(id_lists):
    ids_nl[i, : len(ids)] = ids
    lengths_n[i] = len(ids)
  return ids_nl, lengths_n


def length_mask(lengths_n: np.ndarray, width: int) -> np.ndarray:
  """int32 [N, width], 1 on the first lengths_n[i] positions of row i."""
  return (np.arange(width)[None, :] < lengths_n[:, None]).astype(np.int32)


class TrainLoader:
  """Deterministic, step-indexed batches of query groups.

  An example is a query (unit "query") or a (query, positive) pair ("pair").
  Epoch e visits all E examples in `default_rng([seed, e]).permutation(E)`
  order; batch t holds stream items [t*B, (t+1)*B), maybe of two epochs.

  Positives: "one"/"pair": the pair's own; "one"/"query": Rand1LH,
  (crc32(query_id + str(seed)) + e) mod m, each used once per m epochs;
  "all": min(m, max_positives) in file order, a pair's own first. Hard
  negatives fill each group of G: drawn without replacement from the top
  `negative_depth` (rng seeded by seed, epoch, example); a shorter list is
  used whole, then topped up; none mined leaves padding (doc -1, zero mask).

  Batch (B = batch_size, G = group_size, R = max_relevant), fixed shapes so
  the step compiles once; no token type ids (single segments):
    query_ids, query_mask      int32 [B, Lq]
    passage_ids, passage_mask  int32 [B*G, Lp], query i's group in rows
                               i*G .. i*G+G-1, positives first
    positive_counts int32 [B], 1..G; example_index int64 [B], stream position
    passage_doc     int32 [B*G], corpus index, -1 = padding
    relevant_doc    int32 [B, R], every known relevant doc, -1 padded
    teacher_scores  float32 [B*G], the row's teacher score (0 on padding);
                    only when the data has them (`has_teacher_scores`)
  """

  def __init__(
      self,
      data: TrainingData,
      tokenizer,
      *,
      batch_size: int,
      group_size: int,
      unit: str,
      positives: str,
      max_positives: int = 4,
      query_max_length: int,
      passage_max_length: int,
      seed: int,
      negative_depth: int = 100,
      max_relevant: int | None = None,
      prefetch: int = 2,
  ):
    """Validates the settings and tokenizes the data.

    Lq / Lp (query_max_length / passage_max_length) count [CLS] and [SEP];
    max_relevant R defaults to the most positives of any query; prefetch:
    batches `iterate` prepares on a thread (0: none).
    """
    if not isinstance(data, TrainingData):
      raise ValueError(f"data must be a TrainingData, got {type(data)}")
    self.data = data
    self.tokenizer = tokenizer
    self.batch_size = check_int("batch_size", batch_size, 1)
    self.group_size = check_int("group_size", group_size, 1)
    self.unit = _check_choice("unit", unit, UNITS)
    self.positives = _check_choice("positives", positives, POSITIVE_CHOICES)
    self.max_positives = check_int("max_positives", max_positives, 1)
    # [CLS] and [SEP] need two positions.
    self.query_max_length = check_int("query_max_length", query_max_length, 2)
    self.passage_max_length = check_int(
        "passage_max_length", passage_max_length, 2
    )
    # numpy's SeedSequence takes only non-negative entropy.
    self.seed = check_int("seed", seed, 0)
    self.negative_depth = check_int("negative_depth", negative_depth, 1)
    self.prefetch = check_int("prefetch", prefetch, 0)
    if self.positives == "all" and self.group_size < self.max_positives:
      # Cutting positives to fit would change the loss without a word.
      raise ValueError(
          f"group_size={self.group_size} < max_positives="
          f"{self.max_positives}: with positives='all' a group must have"
          " room for max_positives positives"
      )
    examples = data.examples
    most = max(examples, key=lambda ex: len(ex.positive_ids))
    num_most = len(most.positive_ids)
    if max_relevant is None:
      max_relevant = num_most
    self.max_relevant = check_int("max_relevant", max_relevant, 1)
    if self.max_relevant < num_most:
      # A relevant doc missing from "relevant_doc" would be scored negative.
      raise ValueError(
          f"max_relevant={self.max_relevant} but query {most.query_id!r} has"
          f" {num_most} positives"
      )
    # Some queries may lack negatives; all of them means mining was forgotten.
    needs_negatives = self.group_size > (
        1 if self.positives == "one" else min(num_most, self.max_positives)
    )
    if needs_negatives and not any(ex.negative_ids for ex in examples):
      raise ValueError(
          f"group_size={self.group_size} asks for hard negatives but no query"
          " of the data has any; mine them first"
          " (negatives.mine) or lower group_size"
      )

    doc_index = data.doc_index
    self._positive_docs = [
        np.array([doc_index[d] for d in ex.positive_ids], np.int32)
        for ex in examples
    ]
    self._negative_docs = [
        np.array(
            [doc_index[d] for d in ex.negative_ids[: self.negative_depth]],
            np.int32,
        )
        for ex in examples
    ]
    # crc32, not the per-process salted hash(): restarts keep the positives.
    self._offsets = np.array(
        [
            zlib.crc32((ex.query_id + str(self.seed)).encode("utf-8"))
            for ex in examples
        ],
        np.int64,
    )
    scored = [bool(ex.teacher_scores) for ex in examples]
    if any(scored) and not all(scored):
      # A batch would mix targets with rows that have none.
      raise ValueError(
          f"{scored.count(False)} of {len(scored)} queries have no teacher"
          " scores; score every query or none"
      )
    # Query -> {corpus index: teacher score} over its candidates, or None.
    self._teacher_scores = (
        [
            dict(
                zip((doc_index[d] for d in ex.candidate_ids), ex.teacher_scores)
            )
            for ex in examples
        ]
        if all(scored)
        else None
    )
    self._relevant_qr = np.full(
        (len(examples), self.max_relevant), PAD_DOC, np.int32
    )
    for q, docs in enumerate(self._positive_docs):
      self._relevant_qr[q, : len(docs)] = docs
    # Example -> (query index, positive slot; -1 for unit "query").
    if self.unit == "query":
      units = [(q, -1) for q in range(len(examples))]
    else:
      units = [
          (q, j)
          for q, ex in enumerate(examples)
          for j in range(len(ex.positive_ids))
      ]
    self._units_e2 = np.array(units, np.int64)
    # Straddling batches need two epochs' orders; lru_cache is thread-safe.
    self._order = functools.lru_cache(maxsize=8)(self._epoch_order)
    self._tokenize()

  def _tokenize(self) -> None:
    """Tokenizes every query and every doc a batch can hold, once."""
    start = time.perf_counter()
    encode = self.tokenizer.encode
    pad_id = self.tokenizer.pad_id
    self._query_ids_ql, self._query_lengths_q = pad_tokens(
        [encode(ex.query, self.query_max_length) for ex in self.data.examples],
        self.query_max_length,
        pad_id,
    )
    # Only docs a batch can hold: most of a large corpus is never used.
    used_docs = np.unique(
        np.concatenate(self._positive_docs + self._negative_docs)
    )
    # Corpus index -> token row; the extra last row is PAD_DOC's padding.
    self._doc_row_n = np.full(len(self.data.doc_ids) + 1, -1, np.int32)
    self._doc_row_n[used_docs] = np.arange(len(used_docs), dtype=np.int32)
    self._doc_row_n[PAD_DOC] = len(used_docs)
    texts = self.data.doc_texts
    self._doc_ids_rl, self._doc_lengths_r = pad_tokens(
        [encode(texts[i], self.passage_max_length) for i in used_docs] + [[]],
        self.passage_max_length,
        pad_id,
    )
    logging.info(
        "TrainLoader: tokenized %d queries and %d docs in %.1f s",
        len(self.data.examples),
        len(used_docs),
        time.perf_counter() - start,
    )

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
    spec = {
        "query_ids": ((b, lq), int32),
        "query_mask": ((b, lq), int32),
        "passage_ids": ((b * g, lp), int32),
        "passage_mask": ((b * g, lp), int32),
        "positive_counts": ((b,), int32),
        "passage_doc": ((b * g,), int32),
        "relevant_doc": ((b, self.max_relevant), int32),
        "example_index": ((b,), np.dtype(np.int64)),
    }
    if self._teacher_scores is not None:
      spec["teacher_scores"] = ((b * g,), np.dtype(np.float32))
    return spec

  @property
  def units(self) -> np.ndarray:
    """int64 [E, 2]: query index, positive slot (-1 for unit "query")."""
    return self._units_e2.copy()

  def examples_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(epochs_b, examples_b) int64 [B]: each row's epoch and `units` row."""
    step = check_int("step", step, 0)
    b, e = self.batch_size, self.num_examples
    positions_b = step * b + np.arange(b, dtype=np.int64)
    epochs_b = positions_b // e
    examples_b = np.empty(b, np.int64)
    for epoch in np.unique(epochs_b):
      in_epoch = epochs_b == epoch
      examples_b[in_epoch] = self._order(int(epoch))[positions_b[in_epoch] % e]
    return epochs_b, examples_b

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """int64 [E], the examples in epoch `epoch`'s order."""
    # Seeded by (seed, epoch) alone: any epoch rebuilds without replay.
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples
    )

  def _positive_slots(self, q: int, j: int, epoch: int) -> np.ndarray:
    """Indices into query q's positives for one example (class docstring)."""
    m = len(self._positive_docs[q])
    if self.positives == "one":
      if j >= 0:
        return np.array([j])
      return np.array([(int(self._offsets[q]) + epoch) % m])
    count = min(m, self.max_positives)
    if j < 0:
      return np.arange(count)
    return np.array([j] + [i for i in range(m) if i != j][: count - 1])

  def _sample_negatives(
      self, q: int, epoch: int, example: int, count: int
  ) -> np.ndarray:
    """`count` (or fewer, if none are mined) negatives' corpus indices."""
    pool = self._negative_docs[q]
    n = len(pool)
    if count == 0 or n == 0:
      return pool[:0]
    # Seeded per (seed, epoch, example): resuming reproduces the draws.
    rng = np.random.default_rng([self.seed, epoch, example])
    if n >= count:
      return pool[rng.choice(n, count, replace=False)]
    # Too few mined: each once, then repeats, keeping the group full.
    return np.concatenate(
        [pool[rng.permutation(n)], pool[rng.integers(0, n, count - n)]]
    )

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step` (see the class docstring); thread-safe."""
    step = check_int("step", step, 0)
    b, g = self.batch_size, self.group_size
    positions_b = step * b + np.arange(b, dtype=np.int64)
    epochs_b, examples_b = self.examples_at(step)
    queries_b = self._units_e2[examples_b, 0]
    passage_doc_bg = np.full((b, g), PAD_DOC, np.int32)
    teacher_bg = np.zeros((b, g), np.float32)
    counts_b = np.empty(b, np.int32)
    for i in range(b):
      q, j = (int(x) for x in self._units_e2[examples_b[i]])
      epoch = int(epochs_b[i])
      positives = self._positive_docs[q][self._positive_slots(q, j, epoch)]
      negatives = self._sample_negatives(
          q, epoch, int(examples_b[i]), g - len(positives)
      )
      # Positives first: the losses read the first positive_counts rows of
      # each group as its positives.
      group = np.concatenate([positives, negatives])
      passage_doc_bg[i, : len(group)] = group
      counts_b[i] = len(positives)
      if self._teacher_scores is not None:
        scores = self._teacher_scores[q]
        teacher_bg[i, : len(group)] = [scores[int(d)] for d in group]
    passage_doc_p = passage_doc_bg.reshape(b * g)
    # PAD_DOC (-1) indexes the last entry of _doc_row_n: the padding row.
    rows_p = self._doc_row_n[passage_doc_p]
    batch = {
        "query_ids": self._query_ids_ql[queries_b],
        "query_mask": length_mask(
            self._query_lengths_q[queries_b], self.query_max_length
        ),
        "passage_ids": self._doc_ids_rl[rows_p],
        "passage_mask": length_mask(
            self._doc_lengths_r[rows_p], self.passage_max_length
        ),
        "positive_counts": counts_b,
        "passage_doc": passage_doc_p,
        "relevant_doc": self._relevant_qr[queries_b],
        "example_index": positions_b,
    }
    if self._teacher_scores is not None:
      batch["teacher_scores"] = teacher_bg.reshape(b * g)
    return batch

  def texts_at(
      self, step: int, batch: dict[str, np.ndarray]
  ) -> tuple[list[str], list[str]]:
    """(query_texts, passage_texts) [B*G] of `batch`, = batch_at(step).

    For pair models (cross-encoders); padding rows get "" as passage.
    """
    _, examples_b = self.examples_at(step)
    queries_b = self._units_e2[examples_b, 0]
    g = self.group_size
    query_texts = [
        self.data.examples[q].query for q in queries_b for _ in range(g)
    ]
    passage_texts = [
        self.data.doc_texts[d] if d != PAD_DOC else ""
        for d in batch["passage_doc"]
    ]
    return query_texts, passage_texts

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields batch_at(start_step), batch_at(start_step + 1), ... forever.

    With `prefetch` > 0 a thread prepares the next batches; closing the
    generator stops it.
    """
    # Checked now, not at the first next(): generators run lazily.
    step = check_int("start_step", start_step, 0)
    if not self.prefetch:
      return (self.batch_at(t) for t in itertools.count(step))
    return self._prefetched(step)

  def _prefetched(self, step: int) -> Iterator[dict[str, np.ndarray]]:
    """`iterate` with a producer thread `prefetch` batches ahead."""
    # Bounded: the producer stays `prefetch` ahead, memory stays flat.
    ready = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()

    def produce(step):
      while not stop.is_set():
        try:
          item = (self.batch_at(step), None)
        except Exception as e:  # pylint: disable=broad-except
          # Handed to the consumer, which re-raises it in its own thread.
          item = (None, e)
        # Timed put: a consumer that stopped reading cannot block it forever.
        while not stop.is_set():
          try:
            ready.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item[1] is not None:
          return
        step += 1

    thread = threading.Thread(
        target=produce, args=(step,), name="TrainLoader", daemon=True
    )
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
