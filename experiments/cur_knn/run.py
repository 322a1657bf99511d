r"""The CUR k-NN experiment: recall of the exact cross-encoder top-k per budget.

`run(config, workdir)` (config.py; protocol in README.md): a seeded subset
of test queries, anchor queries and items; the exact cross-encoder score
matrices (cached in <workdir>/scores.npz, resumable); then annCUR, adaptive
CUR and dual-encoder / BM25 retrieve + re-rank at every budget, through a
counting scorer. Writes results.json, table.md and recall_at_<k>.png/.svg.

  python -m experiments.cur_knn.run --config experiments/cur_knn/config.py \
      --config.cross_encoder.workdir=TRAIN_WORKDIR --workdir DIR
"""

import json
import pathlib
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from experiments import entry
from experiments import plotting
from retrieval_jax import encoding
from retrieval_jax import errors
from retrieval_jax import io
from retrieval_jax import kinds
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.search import bm25
from retrieval_jax.search import cur_knn
from retrieval_jax.search import exact_topk

# ---------------------------------------------------------------------------
# Inputs.


def load_cross_encoder(train_workdir: str | pathlib.Path, mesh):
  """The trained cross-encoder of a train-mode workdir.

  Returns:
    (model, tokenizer, run config dict, checkpoint step).

  Raises:
    FileNotFoundError: no checkpoint in <train_workdir>/checkpoints.
    errors.ConfigError: the run did not train a cross-encoder.
  """
  try:
    return kinds.load_run(train_workdir, mesh, kinds=("cross_encoder",))
  except ValueError as e:
    raise errors.ConfigError(
        f"config.cross_encoder.workdir: {e} (train a cross-encoder with "
        "configs/train.py:scifact,cross_encoder)"
    ) from e


def select_subset(
    test: beir.BeirCollection,
    train: beir.BeirCollection,
    *,
    num_test_queries: int,
    num_anchor_queries: int,
    num_items: int,
    seed: int,
):
  """The experiment's queries and items (README.md, "Setup").

  Returns:
    (test query ids, anchor query ids, item corpus rows), the rows sorted.

  Raises:
    errors.ConfigError: too few queries or documents for the sizes asked.
  """
  rng = np.random.default_rng(seed)
  judged = test.judged_query_ids()
  if num_test_queries > len(judged):
    raise errors.ConfigError(
        f"config.subset.num_test_queries={num_test_queries}: the test split "
        f"judges only {len(judged)} queries"
    )
  test_ids = [
      judged[i]
      for i in sorted(rng.choice(len(judged), num_test_queries, replace=False))
  ]
  anchors_from = [q for q in train.judged_query_ids() if q not in set(test_ids)]
  if num_anchor_queries > len(anchors_from):
    raise errors.ConfigError(
        f"config.subset.num_anchor_queries={num_anchor_queries}: the "
        f"training split has only {len(anchors_from)} other judged queries"
    )
  anchor_ids = [
      anchors_from[i]
      for i in sorted(
          rng.choice(len(anchors_from), num_anchor_queries, replace=False)
      )
  ]
  row_of = {d: i for i, d in enumerate(test.doc_ids)}
  relevant = sorted({
      row_of[d]
      for q in test_ids
      for d, label in test.qrels[q].items()
      if label > 0
  })
  if num_items < len(relevant) or num_items > len(test.doc_ids):
    raise errors.ConfigError(
        f"config.subset.num_items={num_items}: need at least the "
        f"{len(relevant)} relevant documents and at most the corpus's "
        f"{len(test.doc_ids)}"
    )
  rest = np.setdiff1d(np.arange(len(test.doc_ids)), relevant)
  filler = rng.choice(rest, num_items - len(relevant), replace=False)
  return test_ids, anchor_ids, np.sort(np.concatenate([relevant, filler]))


def cached_scores(
    path: pathlib.Path,
    key: dict,
    scorer,
    num_queries: int,
    num_items: int,
    chunk: int,
) -> np.ndarray:
  """[num_queries, num_items] exact scores, `chunk` queries at a time.

  Finished rows are written to `path` (an .npz with the `key` they were
  computed under) after every chunk, atomically, so a stopped run resumes
  where it stopped; a different key starts again.
  """
  key_json = json.dumps(key, sort_keys=True)
  scores = np.zeros((num_queries, num_items), np.float32)
  done = 0
  if path.exists():
    with np.load(path) as f:
      if str(f["key"]) == key_json:
        done = int(f["done"])
        scores[:done] = f["scores"][:done]
        logging.info("%s: %d of %d query rows cached", path, done, num_queries)
  while done < num_queries:
    rows = np.arange(done, min(done + chunk, num_queries))
    start = time.perf_counter()
    scores[rows] = cur_knn.score_all(scorer, rows, num_items)
    done = rows[-1] + 1
    io.save_npz_atomic(path, key=key_json, done=done, scores=scores)
    logging.info(
        "scored query rows %d-%d (%d pairs/s); %d of %d done",
        rows[0],
        rows[-1],
        rows.size * num_items / (time.perf_counter() - start),
        done,
        num_queries,
    )
  return scores


def dual_encoder_ranking(config, mesh, query_texts, item_texts):
  """[Q, N] item indices by the pretrained bi-encoder's score, best first."""
  encoder = encoding.TextEncoder.from_pretrained(
      config.dual_encoder.pretrained,
      mesh,
      max_length=config.dual_encoder.max_length,
  )
  docs = encoder.encode(item_texts, batch_size=32, desc="dual encoder: items")
  queries = encoder.encode(
      query_texts, batch_size=32, desc="dual encoder: queries"
  )
  _, order = exact_topk.exact_topk(
      queries,
      docs,
      len(item_texts),
      metric="cosine" if encoder.normalize else "dot",
  )
  return np.asarray(order)


def bm25_ranking(query_texts, item_ids, item_texts) -> np.ndarray:
  """[Q, N] item indices by BM25 over the subset, -1 padded (no shared term)."""
  return bm25.Bm25Index.build(item_texts).search(query_texts, len(item_ids))[1]


# ---------------------------------------------------------------------------
# The comparison.


def ndcg_at_10(items_bk, test_ids, item_ids, qrels) -> float:
  """Mean nDCG@10 of per-query item lists (rank order, -1 = none)."""
  run = {}
  for q, row in zip(test_ids, np.asarray(items_bk)[:, :10].tolist()):
    run[q] = {item_ids[i]: float(10 - r) for r, i in enumerate(row) if i >= 0}
  metrics, _ = ir_metrics.evaluate(
      {q: qrels[q] for q in test_ids}, run, ["ndcg@10"]
  )
  return metrics["ndcg@10"]


def compare(
    s_test_qn,
    r_anc_qn,
    rankings: dict,
    *,
    budgets,
    ks,
    anchor_fractions,
    rounds: int,
    seed: int,
    test_ids,
    item_ids,
    qrels,
) -> list[dict]:
  """Every method at every budget: recall@k against the exact top-k,
  nDCG@10 and the mean calls per query (each checked against the budget).

  Args:
    s_test_qn: [Q, N] exact test scores.
    r_anc_qn: [k_q, N] exact anchor-query scores.
    rankings: {"dual encoder": [Q, N], "BM25": [Q, N]} first-stage orders.
    budgets, ks, anchor_fractions, rounds, seed: see config.py.
    test_ids, item_ids, qrels: for nDCG@10.

  Returns:
    Rows {"method", "budget", "calls", "recall@k"..., "ndcg@10"}.
  """
  q, n = s_test_qn.shape
  k_max = max(max(ks), 10)
  exact_order = np.argsort(-s_test_qn, axis=1, kind="stable")
  query_rows = np.arange(q)
  # ADACUR picks its own anchors; the index only supplies R.
  adaptive_index = cur_knn.build_index(
      r_anc_qn, cur_knn.random_anchor_items(n, 1, seed)
  )
  rows = []

  def add(method, budget, result, scorer):
    calls = np.asarray([scorer.per_query.get(i, 0) for i in range(q)])
    if method.startswith(("annCUR", "adaptive")) and not np.all(
        calls == budget
    ):
      raise AssertionError(f"{method}: calls {calls} != budget {budget}")
    if np.any(calls > budget):
      raise AssertionError(f"{method}: more calls than budget {budget}")
    row = {
        "method": method,
        "budget": int(budget),
        "calls": float(calls.mean()),
    }
    for k in ks:
      row[f"recall@{k}"] = cur_knn.top_k_recall(
          result.items_bk[:, :k], exact_order[:, :k]
      )
    row["ndcg@10"] = ndcg_at_10(result.items_bk, test_ids, item_ids, qrels)
    rows.append(row)

  for budget in budgets:
    for fraction in anchor_fractions:
      k_i = max(1, int(round(budget * fraction)))
      scorer = cur_knn.CountingScorer(cur_knn.matrix_scorer(s_test_qn))
      index = cur_knn.build_index(
          r_anc_qn, cur_knn.random_anchor_items(n, k_i, seed)
      )
      add(
          f"annCUR, k_i = {fraction:g}·B",
          budget,
          cur_knn.cur_search(index, query_rows, scorer, k_max, budget - k_i),
          scorer,
      )
    scorer = cur_knn.CountingScorer(cur_knn.matrix_scorer(s_test_qn))
    add(
        f"adaptive CUR, {rounds} rounds",
        budget,
        cur_knn.adaptive_cur_search(
            adaptive_index, query_rows, scorer, k_max, budget, rounds, seed=seed
        ),
        scorer,
    )
    for name, ranking in rankings.items():
      scorer = cur_knn.CountingScorer(cur_knn.matrix_scorer(s_test_qn))
      add(
          f"{name} + re-rank",
          budget,
          cur_knn.retrieve_and_rerank(
              query_rows, ranking, scorer, k_max, budget
          ),
          scorer,
      )
  return rows


def format_tables(rows: list[dict], ks, references: dict) -> str:
  """Markdown: one recall table per k, one nDCG@10 table, the references."""
  methods = list(dict.fromkeys(r["method"] for r in rows))
  budgets = sorted({r["budget"] for r in rows})
  at = {(r["method"], r["budget"]): r for r in rows}
  out = []
  for measure in [f"recall@{k}" for k in ks] + ["ndcg@10"]:
    title = (
        f"Top-{measure.split('@')[1]} recall against the exact cross-encoder"
        if measure.startswith("recall")
        else "nDCG@10 of the pipeline's top 10"
    )
    out.append(f"**{title}** (columns: CE calls per query)\n")
    out.append("| method | " + " | ".join(str(b) for b in budgets) + " |")
    out.append("|---|" + "---:|" * len(budgets))
    for m in methods:
      cells = []
      for b in budgets:
        r = at.get((m, b))
        cell = "" if r is None else f"{r[measure]:.3f}"
        if r is not None and r["calls"] < b:
          cell += f" ({r['calls']:.0f} calls)"
        cells.append(cell)
      out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("")
  out.append(
      "**References, nDCG@10 on the same queries and items:** "
      + ", ".join(f"{k} {v:.3f}" for k, v in references.items())
  )
  return "\n".join(out) + "\n"


def write_plots(workdir: pathlib.Path, rows: list[dict], ks) -> None:
  """recall_at_<k>.png and .svg: recall against budget, a curve per method."""
  methods = list(dict.fromkeys(r["method"] for r in rows))
  for k in ks:
    series = []
    for m in methods:
      mine = sorted(
          (r for r in rows if r["method"] == m), key=lambda r: r["budget"]
      )
      series.append(
          plotting.Series(
              m,
              [r["budget"] for r in mine],
              [r[f"recall@{k}"] for r in mine],
              markers=True,
          )
      )
    plotting.line_plot(
        workdir / f"recall_at_{k}",
        series,
        title=f"top-{k} recall against the exact cross-encoder",
        xlabel="cross-encoder calls per query",
        ylabel=f"top-{k} recall",
        y_range=(0.0, 1.0),
        legend="lower right",
    )


# ---------------------------------------------------------------------------
# The job.


def _check(config) -> None:
  sub = config.subset
  for key in ("num_test_queries", "num_anchor_queries", "num_items"):
    if sub[key] < 1:
      raise errors.ConfigError(f"config.subset.{key}={sub[key]}: must be >= 1")
  if not config.cross_encoder.workdir:
    raise errors.ConfigError(
        "config.cross_encoder.workdir is empty: set it to the workdir of a "
        "configs/train.py:scifact,cross_encoder run"
    )
  budgets = list(config.search.budgets)
  if not budgets or min(budgets) < 2 or max(budgets) > sub.num_items:
    raise errors.ConfigError(
        f"config.search.budgets={tuple(budgets)}: each must be in [2, "
        f"config.subset.num_items={sub.num_items}]"
    )
  if not all(0 < f < 1 for f in config.search.anchor_fractions):
    raise errors.ConfigError(
        "config.search.anchor_fractions: each must be in (0, 1)"
    )
  if max(config.search.ks) > min(budgets):
    raise errors.ConfigError(
        f"config.search.ks={tuple(config.search.ks)}: k must not exceed the "
        f"smallest budget {min(budgets)}"
    )
  path = pathlib.Path(config.data.path)
  needs = ["corpus.jsonl", "queries.jsonl"] + [
      f"qrels/{config.data[k]}.tsv" for k in ("test_split", "train_split")
  ]
  missing = [f for f in needs if not (path / f).is_file()]
  if missing:
    raise errors.ConfigError(
        f"config.data.path={str(path)!r} lacks {missing} (a BEIR directory "
        "with test and train qrels)"
    )


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """The whole experiment (README.md); returns results.json's dict."""
  _check(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape)
  test = beir.load_beir(config.data.path, split=config.data.test_split)
  train = beir.load_beir(config.data.path, split=config.data.train_split)
  sub = config.subset
  test_ids, anchor_ids, item_rows = select_subset(
      test,
      train,
      num_test_queries=sub.num_test_queries,
      num_anchor_queries=sub.num_anchor_queries,
      num_items=sub.num_items,
      seed=sub.seed,
  )
  text_of = dict(zip(test.query_ids, test.queries))
  doc_texts = test.doc_texts()
  item_ids = [test.doc_ids[i] for i in item_rows]
  item_texts = [doc_texts[i] for i in item_rows]
  print(
      f"subset: {len(test_ids)} test queries, {len(anchor_ids)} anchor "
      f"queries, {len(item_ids)} items",
      flush=True,
  )

  model, tokenizer, run_config, step = load_cross_encoder(
      config.cross_encoder.workdir, mesh
  )
  pair_max_length = run_config["data"]["pair_max_length"]
  queries = [text_of[q] for q in anchor_ids + test_ids]
  scorer = encoding.PairScorer(
      model,
      tokenizer,
      queries,
      item_texts,
      max_length=pair_max_length,
      batch_size=config.cross_encoder.batch_size,
      mesh=mesh,
      desc="cross-encoder",
  )
  key = {
      "workdir": str(config.cross_encoder.workdir),
      "step": step,
      "queries": anchor_ids + test_ids,
      "items": item_ids,
      "pair_max_length": pair_max_length,
  }
  with jax.default_matmul_precision("float32"):
    scores = cached_scores(
        workdir / "scores.npz",
        key,
        scorer,
        len(queries),
        len(item_ids),
        config.cross_encoder.chunk_queries,
    )
  r_anc_qn, s_test_qn = scores[: len(anchor_ids)], scores[len(anchor_ids) :]

  test_texts = [text_of[q] for q in test_ids]
  rankings = {
      "dual encoder": dual_encoder_ranking(
          config, mesh, test_texts, item_texts
      ),
      "BM25": bm25_ranking(test_texts, item_ids, item_texts),
  }
  s = config.search
  rows = compare(
      s_test_qn,
      r_anc_qn,
      rankings,
      budgets=list(s.budgets),
      ks=list(s.ks),
      anchor_fractions=list(s.anchor_fractions),
      rounds=s.rounds,
      seed=s.seed,
      test_ids=test_ids,
      item_ids=item_ids,
      qrels=test.qrels,
  )
  exact = np.argsort(-s_test_qn, axis=1, kind="stable")
  references = {
      "exact cross-encoder over all items": ndcg_at_10(
          exact, test_ids, item_ids, test.qrels
      ),
      "dual encoder alone": ndcg_at_10(
          rankings["dual encoder"], test_ids, item_ids, test.qrels
      ),
      "BM25 alone": ndcg_at_10(
          rankings["BM25"], test_ids, item_ids, test.qrels
      ),
  }
  table = format_tables(rows, list(s.ks), references)
  print(table, flush=True)
  io.write_text_atomic(workdir / "table.md", table)
  write_plots(workdir, rows, list(s.ks))
  results = {
      "rows": rows,
      "references": references,
      "cross_encoder": {
          "workdir": str(config.cross_encoder.workdir),
          "step": step,
          "head": run_config["model"]["head"],
          "pair_max_length": pair_max_length,
      },
      "subset": {
          "test_queries": test_ids,
          "anchor_queries": anchor_ids,
          "items": item_ids,
      },
      "config": json.loads(config.to_json_best_effort()),
  }
  io.write_json_atomic(workdir / "results.json", results)
  return results


if __name__ == "__main__":
  entry.main(run)
