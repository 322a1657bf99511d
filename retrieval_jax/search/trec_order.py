"""trec_eval's document order for one query's run (fusion and metrics use it).

Score descending, then doc id descending (code points, as `strcmp` on UTF-8).
Scores compare as float32, trec_eval's C `float`, so finer differences tie.
"""

from collections.abc import Mapping, Sequence
import heapq

import numpy as np

DocScores = Mapping[str, float] | Sequence[tuple[str, float]]


def as_float32(scores: np.ndarray) -> np.ndarray:
  """Rounds float64 scores to float32 as trec_eval's C `float` field does."""
  # Out-of-range doubles become +-inf, as the x86 conversion does.
  with np.errstate(over="ignore"):
    return np.asarray(scores, np.float64).astype(np.float32)


def trec_eval_sorted(
    doc_scores: DocScores, k: int | None = None
) -> list[tuple[str, float]]:
  """(doc id, original score) pairs in trec_eval's order; the top k if given."""
  items = list(
      doc_scores.items() if isinstance(doc_scores, Mapping) else doc_scores
  )
  # Keys (float32 score, id, position); the position recovers the original.
  scores32 = as_float32(
      np.fromiter((s for _, s in items), np.float64, len(items))
  ).tolist()
  keys = zip(scores32, (doc for doc, _ in items), range(len(items)))
  if k is None:
    ranked = sorted(keys, reverse=True)
  else:
    ranked = heapq.nlargest(k, keys)
  return [items[i] for _, _, i in ranked]
