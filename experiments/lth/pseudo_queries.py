r"""Pseudo-queries cut from a target corpus, written as a training pairs file.

GPL-style domain adaptation needs queries on the target corpus. GPL writes
them with a T5 query generator, whose weights this repository does not
have; these are NOT generated queries but pieces of each document:
  title     its title (documents without one are skipped);
  sentence  one sentence of its text (`data.spans.split_sentences`), drawn
            with a seeded generator: ICT's query with keep_prob 1, the
            passage keeping the sentence;
  crop      a run of 10-50 % of its words (Contriever's span ratios, for
            one-sentence corpora such as LIMIT).
The positive is the document exactly as corpus.jsonl has it, so training
reads the passages that JPQ's codes, the teacher and the evaluation see.
Query ids are "<method>:<doc id>:<i>"; the file has `data.pipeline.read_pairs`'
layout. Deterministic: document n draws from default_rng([seed, n]).

  python -m experiments.lth.pseudo_queries \
      --corpus ../shared/data/scifact --out /tmp/scifact_pseudo.jsonl
"""

import argparse
import json
import math
import os

import numpy as np

from retrieval_jax import io
from retrieval_jax.data import beir
from retrieval_jax.data import spans

METHODS = ("title", "sentence", "crop")
# Contriever's crop ratios (data/spans.py's defaults).
MIN_CROP, MAX_CROP = 0.1, 0.5


def document_queries(
    title: str, text: str, *, method: str, per_doc: int, rng
) -> list[str]:
  """Up to `per_doc` distinct pseudo-queries of one document."""
  if method == "title":
    return [title.strip()] if title.strip() else []
  if method == "sentence":
    sentences = spans.split_sentences("", text)
    picks = rng.permutation(len(sentences))[:per_doc]
    return list(dict.fromkeys(sentences[i] for i in sorted(picks)))
  if method != "crop":
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  words = text.split()
  if not words:
    return []
  lo = max(1, math.ceil(MIN_CROP * len(words)))
  hi = max(lo, math.floor(MAX_CROP * len(words)))
  out = []
  for _ in range(per_doc):
    length = int(rng.integers(lo, hi + 1))
    start = int(rng.integers(0, len(words) - length + 1))
    out.append(" ".join(words[start : start + length]))
  return list(dict.fromkeys(out))


def pseudo_query_pairs(
    doc_ids, titles, texts, *, method: str, per_doc: int = 1, seed: int = 0
) -> list[dict]:
  """Pairs {query_id, query, doc_id, title, text}, corpus order."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  if per_doc < 1:
    raise ValueError(f"per_doc={per_doc}: must be >= 1")
  pairs = []
  for n, (doc_id, title, text) in enumerate(zip(doc_ids, titles, texts)):
    if not text.strip():
      continue  # a pairs file's positive needs text (Cranfield has 2 empty)
    rng = np.random.default_rng([seed, n])
    queries = document_queries(
        title, text, method=method, per_doc=per_doc, rng=rng
    )
    for i, query in enumerate(queries):
      pairs.append({
          "query_id": f"{method}:{doc_id}:{i}",
          "query": query,
          "doc_id": doc_id,
          "title": title,
          "text": text,
      })
  return pairs


def write_pairs(
    corpus_dir, out_path, *, method: str, per_doc: int = 1, seed: int = 0
) -> dict:
  """Writes the pseudo-query pairs of `corpus_dir`'s corpus.jsonl.

  Atomic (`io.write_text_atomic`). Returns a summary: counts, settings.
  """
  doc_ids, titles, texts = beir.read_corpus(
      beir.corpus_path(os.fspath(corpus_dir))
  )
  pairs = pseudo_query_pairs(
      doc_ids, titles, texts, method=method, per_doc=per_doc, seed=seed
  )
  if not pairs:
    raise ValueError(
        f"{corpus_dir}: method {method!r} finds no pseudo-query in any "
        "document (no titles? use 'sentence' or 'crop')"
    )
  io.write_text_atomic(
      out_path,
      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
  )
  return {
      "corpus": os.fspath(corpus_dir),
      "method": method,
      "per_doc": per_doc,
      "seed": seed,
      "num_docs": len(doc_ids),
      "num_pairs": len(pairs),
      "docs_without_query": len(doc_ids) - len({p["doc_id"] for p in pairs}),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--corpus", required=True, help="BEIR directory")
  parser.add_argument("--out", required=True, help="pairs JSONL to write")
  parser.add_argument("--method", default="sentence", choices=METHODS)
  parser.add_argument("--per_doc", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  summary = write_pairs(
      args.corpus,
      args.out,
      method=args.method,
      per_doc=args.per_doc,
      seed=args.seed,
  )
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
