"""Self-supervised (query, positive) pairs cut from a corpus, step-indexed.

ICT (Lee et al. 2019; Chang et al. 2020): a sentence of a passage is the
query, the passage without it (kept with probability `keep_prob`, 0.1 as in
the ICT paper) the positive. Cropping (Contriever, Izacard et al. 2022): two
spans of 10-50 % of a document's tokens, drawn independently. Body First
Selection and Wiki Link Prediction need sections and hyperlinks, which BEIR
corpora (SciFact, Cranfield, LIMIT) lack: they are not built here.

Spans are cut from token ids, not text: Contriever's ratios count tokens,
the bounds then hold exactly and every span fits its width, and each document
is tokenized once, not per step. ICT splits sentences on text (a title is a
sentence), then tokenizes each; WordPiece never joins across whitespace, so
their concatenation is the passage's ids. `SpanLoader` emits the batches of
`pipeline.TrainLoader` (group size 1): batch t is a pure function of
(corpus, settings, seed, t), so a resumed run sees the same batches.
"""

from collections.abc import Iterator, Sequence
import functools
import itertools
import math
import os
import re
import time

from absl import logging
import numpy as np

from retrieval_jax.data import beir
from retrieval_jax.data import pipeline

TASKS = ("ict", "crop")
# A sentence ends at . ! or ? followed by white space (abstract-style prose).
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")


def split_sentences(title: str, text: str) -> list[str]:
  """The title (if any) then the sentences of `text`, none empty."""
  parts = [title.strip()] + _SENTENCE_END_RE.split(text.strip())
  return [p for p in parts if p]


def crop_bounds(
    num_tokens: int, min_ratio: float, max_ratio: float
) -> tuple[int, int]:
  """Inclusive (lo, hi) span lengths: ceil(min·n) .. floor(max·n), >= 1."""
  lo = max(1, math.ceil(min_ratio * num_tokens))
  hi = max(lo, math.floor(max_ratio * num_tokens))
  return lo, min(hi, num_tokens)


def crop_pair(
    ids: Sequence[int],
    rng: np.random.Generator,
    min_ratio: float = 0.1,
    max_ratio: float = 0.5,
) -> tuple[list[int], list[int]]:
  """Two independent random spans of `ids`, lengths in `crop_bounds`."""
  lo, hi = crop_bounds(len(ids), min_ratio, max_ratio)
  spans = []
  for _ in range(2):
    length = int(rng.integers(lo, hi + 1))
    start = int(rng.integers(0, len(ids) - length + 1))
    spans.append(list(ids[start : start + length]))
  return spans[0], spans[1]


def ict_pair(
    sentences: Sequence[Sequence[int]],
    rng: np.random.Generator,
    keep_prob: float = 0.1,
) -> tuple[list[int], list[int], bool]:
  """(query ids, context ids, kept): a random sentence and its passage.

  sentences: >= 2 token-id lists. The query sentence stays in the context
  with probability `keep_prob` (kept=True), else is removed.
  """
  if len(sentences) < 2:
    raise ValueError(f"ICT needs >= 2 sentences, got {len(sentences)}")
  i = int(rng.integers(len(sentences)))
  kept = bool(rng.random() < keep_prob)
  context = [
      tok for j, s in enumerate(sentences) if kept or j != i for tok in s
  ]
  return list(sentences[i]), context, kept


class CorpusLoader:
  """What the corpus-only loaders share: `from_beir`, `steps_per_epoch`
  (ceil(num_examples / batch_size)) and `iterate` over their `batch_at`."""

  batch_size: int

  @classmethod
  def from_beir(cls, directory: str | os.PathLike, tokenizer, **kwargs):
    """Over `directory`/corpus.jsonl alone (no queries or qrels needed)."""
    path = beir.corpus_path(os.fspath(directory))
    doc_ids, titles, texts = beir.read_corpus(path)
    return cls(doc_ids, titles, texts, tokenizer, source=path, **kwargs)

  @property
  def num_examples(self) -> int:
    raise NotImplementedError

  @property
  def steps_per_epoch(self) -> int:
    return math.ceil(self.num_examples / self.batch_size)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields batch_at(start_step), batch_at(start_step + 1), ... forever."""
    step = pipeline.check_int("start_step", start_step, 0)
    return (self.batch_at(t) for t in itertools.count(step))


class SpanLoader(CorpusLoader):
  """Deterministic, step-indexed batches of ICT or cropping pairs.

  Examples are the usable documents (crop: >= 2 tokens; ICT: >= 2 sentences
  in the first Lp - 2 tokens); epoch e visits them in
  `default_rng([seed, e]).permutation(E)` order, and example x of epoch e
  draws its spans from `default_rng([seed, e, x])`. Crops come from the
  document's first Lp - 2 tokens; a query span is cut to Lq - 2. Batches
  have `pipeline.TrainLoader`'s keys with G = 1 and R = 1 (the document
  itself, so a repeated document is masked as an in-batch negative).
  """

  def __init__(
      self,
      doc_ids: Sequence[str],
      titles: Sequence[str],
      texts: Sequence[str],
      tokenizer,
      *,
      task: str,
      batch_size: int,
      query_max_length: int,
      passage_max_length: int,
      seed: int,
      keep_prob: float = 0.1,
      min_crop: float = 0.1,
      max_crop: float = 0.5,
      source: str = "<memory>",
  ):
    """Checks the settings and tokenizes the corpus once."""
    if task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 0.0 <= keep_prob <= 1.0:
      raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    if not 0.0 < min_crop <= max_crop <= 1.0:
      raise ValueError(
          f"need 0 < min_crop <= max_crop <= 1, got {min_crop}, {max_crop}"
      )
    self.task, self.keep_prob = task, float(keep_prob)
    self.min_crop, self.max_crop = float(min_crop), float(max_crop)
    self.batch_size = pipeline.check_int("batch_size", batch_size, 1)
    self.query_max_length = pipeline.check_int(
        "query_max_length", query_max_length, 3
    )
    self.passage_max_length = pipeline.check_int(
        "passage_max_length", passage_max_length, 3
    )
    self.seed = pipeline.check_int("seed", seed, 0)
    self.tokenizer, self.source = tokenizer, source
    self.num_docs = len(doc_ids)
    start = time.perf_counter()
    # _docs[x]: crop: the ids window; ict: its sentences' id lists.
    self._docs, doc_index = [], []
    budget = self.passage_max_length - 2
    for d, (title, text) in enumerate(zip(titles, texts)):
      if task == "crop":
        ids = tokenizer.tokenize_to_ids(beir.doc_text(title, text), budget)
        usable = len(ids) >= 2
      else:
        ids, used = [], 0
        for sentence in split_sentences(title, text):
          if used >= budget:
            break
          tokens = tokenizer.tokenize_to_ids(sentence, budget - used)
          if tokens:
            ids.append(tokens)
            used += len(tokens)
        usable = len(ids) >= 2
      if usable:
        self._docs.append(ids)
        doc_index.append(d)
    if not self._docs:
      need = "2 tokens" if task == "crop" else "2 sentences"
      raise ValueError(f"{source}: no document has {need} for {task!r}")
    self._doc_index = np.array(doc_index, np.int32)
    self._order = functools.lru_cache(maxsize=8)(self._epoch_order)
    logging.info(
        "SpanLoader: %d of %d documents usable for %s, tokenized in %.1f s",
        len(self._docs),
        self.num_docs,
        task,
        time.perf_counter() - start,
    )

  @property
  def num_examples(self) -> int:
    """E, usable documents (examples per epoch)."""
    return len(self._docs)

  @property
  def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Key -> (shape, dtype) of every batch."""
    b, lq, lp = self.batch_size, self.query_max_length, self.passage_max_length
    int32 = np.dtype(np.int32)
    return {
        "query_ids": ((b, lq), int32),
        "query_mask": ((b, lq), int32),
        "passage_ids": ((b, lp), int32),
        "passage_mask": ((b, lp), int32),
        "positive_counts": ((b,), int32),
        "passage_doc": ((b,), int32),
        "relevant_doc": ((b, 1), int32),
        "example_index": ((b,), np.dtype(np.int64)),
        "kept": ((b,), int32),
    }

  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples
    )

  def examples_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(epochs_b, examples_b) int64 [B] of batch `step`."""
    step = pipeline.check_int("step", step, 0)
    positions_b = step * self.batch_size + np.arange(self.batch_size)
    epochs_b = positions_b // self.num_examples
    examples_b = np.array(
        [
            self._order(int(e))[p % self.num_examples]
            for e, p in zip(epochs_b, positions_b)
        ],
        np.int64,
    )
    return epochs_b, examples_b

  def pair(self, epoch: int, example: int) -> tuple[list[int], list[int], bool]:
    """(query ids, positive ids, ICT kept) without specials, of one example."""
    rng = np.random.default_rng([self.seed, epoch, example])
    doc = self._docs[example]
    if self.task == "crop":
      query, positive = crop_pair(doc, rng, self.min_crop, self.max_crop)
      return query, positive, False
    return ict_pair(doc, rng, self.keep_prob)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step` (class docstring)."""
    epochs_b, examples_b = self.examples_at(step)
    tok, lq, lp = self.tokenizer, self.query_max_length, self.passage_max_length
    queries, passages, kept = [], [], []
    for e, x in zip(epochs_b, examples_b):
      query, positive, was_kept = self.pair(int(e), int(x))
      queries.append([tok.cls_id, *query[: lq - 2], tok.sep_id])
      passages.append([tok.cls_id, *positive[: lp - 2], tok.sep_id])
      kept.append(was_kept)
    q_ids, q_len = pipeline.pad_tokens(queries, lq, tok.pad_id)
    p_ids, p_len = pipeline.pad_tokens(passages, lp, tok.pad_id)
    doc_b = self._doc_index[examples_b]
    return {
        "query_ids": q_ids,
        "query_mask": pipeline.length_mask(q_len, lq),
        "passage_ids": p_ids,
        "passage_mask": pipeline.length_mask(p_len, lp),
        "positive_counts": np.ones(self.batch_size, np.int32),
        "passage_doc": doc_b,
        "relevant_doc": doc_b[:, None].copy(),
        "example_index": (
            step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        ),
        "kept": np.array(kept, np.int32),
    }

  def describe(self) -> str:
    """One line of counts for the training log."""
    return (
        f"{self.task} pairs from {self.num_examples} of {self.num_docs}"
        f" documents ({self.source}), {self.steps_per_epoch} steps/epoch at"
        f" batch {self.batch_size}"
    )
