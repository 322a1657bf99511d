r"""Baselines on the long-document task, next to a trained M2 run.

Given the workdir of a `configs/m2_long_docs.py` run (which built the
collection in <workdir>/long_docs and evaluated the trained M2 encoder), this
scores on the same test queries:

  * BM25 (bm25s, Lucene BM25 with the shared data's settings) over the
    whole documents;
  * all-MiniLM-L6-v2 with documents truncated to 512 tokens (its position
    table ends there), through the evaluate mode;
  * the idf-weighted mean of all-MiniLM-L6-v2's input word embeddings (no
    layer, no training) over the whole document and over its first 512
    tokens: what a reader of every token gets from term weighting alone;

and prints one table with the M2 row from the run's results.json.

  python -m retrieval_jax.main --config configs/m2_long_docs.py \
      --workdir /tmp/rj_m2_long_docs
  PYTHONPATH=. python experiments/m2_long_docs/run_baselines.py \
      --workdir /tmp/rj_m2_long_docs
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

from retrieval_jax import pretrained
from retrieval_jax.data import beir
from retrieval_jax.data import features
from retrieval_jax.data import negatives
from retrieval_jax.data import tokenizers
from retrieval_jax.evaluation import ir_metrics

MEASURES = ("ndcg@10", "recall@1", "recall@10", "mrr@10")
REPO = pathlib.Path(__file__).resolve().parents[2]


def bm25_row(collection_dir: pathlib.Path, split: str) -> dict[str, float]:
  """BM25 over whole documents, top 100 per judged query."""
  collection = beir.load_beir(str(collection_dir), split=split)
  judged = [q for q in collection.query_ids if q in collection.qrels]
  text_of = dict(zip(collection.query_ids, collection.queries))
  start = time.perf_counter()
  ranked = negatives.bm25_negatives(
      [text_of[q] for q in judged],
      collection.doc_ids,
      collection.doc_texts(),
      [set() for _ in judged],
      depth=100,
  )
  elapsed = time.perf_counter() - start
  # Scores only need to order the list: 1/rank keeps BM25's order.
  run = {
      q: {d: 1.0 / (r + 1) for r, d in enumerate(docs)}
      for q, docs in zip(judged, ranked)
  }
  # A query BM25 cannot score (no term shared with any document) keeps a
  # single unjudged placeholder, so it counts with 0 on every measure.
  run = {q: docs or {"<no match>": 0.0} for q, docs in run.items()}
  means, _ = ir_metrics.evaluate(
      {q: collection.qrels[q] for q in judged}, run, MEASURES
  )
  means["seconds"] = elapsed
  return means


def bag_of_embeddings_rows(
    collection_dir: pathlib.Path, split: str, max_length: int
) -> dict[str, dict[str, float]]:
  """Idf-weighted mean word embedding of MiniLM, whole vs truncated docs.

  Idf (Lucene BM25's) over the collection's whole documents; cosine; exact
  search. Word embeddings only: no position or type embedding, no layer.
  """
  model_dir = pretrained.resolve_model_dir("all-MiniLM-L6-v2")
  tokenizer = tokenizers.from_pretrained_dir(model_dir)
  state = pretrained.read_state_dict(model_dir)
  (name,) = [k for k in state if k.endswith("word_embeddings.weight")]
  table_vd = np.asarray(state[name], np.float64)
  collection = beir.load_beir(str(collection_dir), split=split)
  judged = [q for q in collection.query_ids if q in collection.qrels]
  text_of = dict(zip(collection.query_ids, collection.queries))
  unlimited = 1 << 30
  doc_ids = [
      tokenizer.encode(t, unlimited)[1:-1] for t in collection.doc_texts()
  ]
  idf_v = features.idf_from_corpus(doc_ids, table_vd.shape[0])

  def embed(ids: list[int]) -> np.ndarray:
    w = idf_v[ids].astype(np.float64)
    v = (w[:, None] * table_vd[ids]).sum(0) / w.sum()
    return v / np.linalg.norm(v)

  queries_qd = np.stack(
      [embed(tokenizer.encode(text_of[q], unlimited)[1:-1]) for q in judged]
  )
  rows = {}
  for label, limit in (
      ("whole document", None),
      (f"first {max_length}", max_length),
  ):
    start = time.perf_counter()
    # The first `limit` tokens of the model's input: [CLS] and [SEP] excluded.
    docs_nd = np.stack([embed(ids[: limit and limit - 2]) for ids in doc_ids])
    scores_qn = queries_qd @ docs_nd.T
    run = {}
    for q, row in zip(judged, scores_qn):
      top = np.argsort(-row, kind="stable")[:100]
      run[q] = {collection.doc_ids[j]: float(row[j]) for j in top}
    means, _ = ir_metrics.evaluate(
        {q: collection.qrels[q] for q in judged}, run, MEASURES
    )
    means["seconds"] = time.perf_counter() - start
    rows[f"MiniLM word embeddings, idf-weighted mean, {label}"] = means
  return rows


def minilm_row(
    collection_dir: pathlib.Path, split: str, out: pathlib.Path, max_length: int
) -> dict[str, float]:
  """all-MiniLM-L6-v2 at `max_length` tokens through the evaluate mode."""
  workdir = out / f"minilm_{max_length}"
  cmd = [
      sys.executable,
      "-m",
      "retrieval_jax.main",
      "--config",
      str(REPO / "configs" / "evaluate.py"),
      "--workdir",
      str(workdir),
      "--mode",
      "evaluate",
      f"--config.data.path={collection_dir}",
      f"--config.data.split={split}",
      f"--config.model.max_length={max_length}",
      "--config.search.top_k=100",
      "--config.encode.batch_size=16",
      f"--config.eval.measures={MEASURES!r}",
  ]
  start = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO)
  metrics = json.loads((workdir / "metrics.json").read_text())
  metrics = metrics.get("metrics", metrics)
  row = {k: metrics[k] for k in MEASURES if k in metrics}
  row["seconds"] = time.perf_counter() - start
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--workdir",
      required=True,
      help="workdir of a configs/m2_long_docs.py run",
  )
  parser.add_argument("--split", default="test")
  parser.add_argument("--minilm_max_length", type=int, default=512)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  collection_dir = workdir / "long_docs"
  manifest = json.loads((collection_dir / "manifest.json").read_text())
  rows = {}
  results_file = workdir / "results.json"
  if results_file.is_file():
    after = json.loads(results_file.read_text()).get("after", {})
    rows["M2 (this run)"] = {
        k: after.get(f"eval/long_docs/{k}") for k in MEASURES
    }
  rows["BM25"] = bm25_row(collection_dir, args.split)
  rows[f"all-MiniLM-L6-v2 @ {args.minilm_max_length}"] = minilm_row(
      collection_dir, args.split, workdir / "baselines", args.minilm_max_length
  )
  rows.update(
      bag_of_embeddings_rows(collection_dir, args.split, args.minilm_max_length)
  )
  out = {"collection": manifest.get("summary", {}), "rows": rows}
  (workdir / "baselines.json").write_text(json.dumps(out, indent=1) + "\n")
  print("| model | " + " | ".join(MEASURES) + " |")
  print("|---|" + "---:|" * len(MEASURES))
  for name, row in rows.items():
    cells = [
        f"{row[k]:.4f}" if row.get(k) is not None else "-" for k in MEASURES
    ]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
