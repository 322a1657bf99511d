"""trec_eval's document order for one query's run.

Score descending, then doc id descending (code points, as `strcmp` on UTF-8).
Scores compare as float32, trec_eval's C `float`, so float64 scores differing
only below float32 precision tie. Fusion and the IR metrics both rank this way.
"""

from collections.abc import Mapping, Sequence
import heapq

import numpy as np

# One query's run: {doc id: score} or (doc id, score) pairs.
DocScores = Mapping[str, float] | Sequence[tuple[str, float]]


def as_float32(scores: np.ndarray) -> np.ndarray:
  """Rounds float64 scores to float32 as trec_eval's C `float` field does."""
  # Out-of-range doubles become +-inf, as the x86 conversion does.
  with np.errstate(over="ignore"):
    return np.asarray(scores, np.float64).astype(np.float32)


def trec_eval_sorted(doc_scores: DocScores,
                     k: int | None = None) -> list[tuple[str, float]]:
  """Returns (doc id, score) pairs in trec_eval's order, optionally the top k.

  Args:
    doc_scores: one query's run, {doc id: score} or (doc id, score) pairs.
    k: keep only the first k pairs (None keeps all).

  Returns:
    The pairs sorted by score descending, then doc id descending, each with
    its original score.
  """
  items = list(doc_scores.items() if isinstance(doc_scores, Mapping)
               else doc_scores)
  # Keys (float32 score, id, position); the position returns the original.
  scores32 = as_float32(np.fromiter((s for _, s in items), np.float64,
                                    len(items))).tolist()
  keys = zip(scores32, (doc for doc, _ in items), range(len(items)))
  if k is None:
    ranked = sorted(keys, reverse=True)
  else:
    ranked = heapq.nlargest(k, keys)
  return [items[i] for _, _, i in ranked]
