r"""Learning-to-hash runs as compressed indexes: train, index, search, score.

`run(config, workdir)` (config.py; protocol in README.md), per dataset:
the pretrained encoder's embeddings through experiments/compression's
`dense_inputs` (the evaluate mode, float32 exact; its dense cache), and
the untrained rows (float32 exact, sign bits + re-rank, PQ). Then every run
of `config.order`: trained with configs/train.py into <workdir>/runs/<name>
(reused when its results.json exists; adaptation runs first write their
pseudo-query pairs), its index built by its kind's `build_index`, saved,
reloaded, searched for the top `search.top_k` and scored like the
compression table (same columns, `compression.run.table`). BPR's corpus
and queries come from the evaluate mode on the run (its dense cache); JPQ's
queries from its trained query encoder, its documents from its codes (the
run's corpus) or the pretrained embeddings (another corpus).

  python -m experiments.lth.run \
      --config experiments/lth/config.py --workdir /tmp/rj_lth
"""

import ast
import json
import pathlib
import time

from absl import logging
import jax
import ml_collections

from configs import train as train_config
from experiments import entry
from experiments.compression import run as compression_run
from experiments.lth import pseudo_queries
from retrieval_jax import errors
from retrieval_jax import io
from retrieval_jax import kinds
from retrieval_jax import sharding
from retrieval_jax import train
from retrieval_jax.search import compression


def _dataset_config(config, name: str, cache_dir: pathlib.Path, run=""):
  """The evaluate config of one dataset (unlocked copy)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.data.path = config.datasets[name]
  cfg.encode.cache_dir = str(cache_dir)
  cfg.run = str(run)
  return cfg


def index_row(index, evaluator, queries_qd, *, label, directory, config):
  """One table row: the index saved, reloaded, searched, scored, timed."""
  index.save(directory)
  index = compression.load(directory)  # what a later run would search
  k = evaluator.top_k
  start = time.perf_counter()
  scores_qk, ids_qk = index.search(queries_qd, k)
  search_s = time.perf_counter() - start
  return {
      "label": label,
      "kind": index.config["kind"],
      "config": index.config,
      "bytes_per_doc": index.bytes_per_doc,
      "index_bytes": index.nbytes,
      "search_all_s": search_s,
      "ms_per_query": compression_run.latency_ms(
          index, queries_qd, k, config.latency_queries
      ),
      "metrics": evaluator.score_ranking(scores_qk, ids_qk).metrics,
  }


def baselines(config, name: str, workdir: pathlib.Path):
  """(rows, inputs) of the pretrained encoder on one dataset.

  inputs: (evaluator, docs_nd, queries_qd, metric) for the runs.
  """
  base = workdir / "pretrained"
  cfg = _dataset_config(config, name, base / f"cache_{name}")
  evaluator, docs_nd, queries_qd, reference = compression_run.dense_inputs(
      cfg, base
  )
  metric = json.loads((base / f"{name}_dense" / "config.json").read_text())[
      "search"
  ]["metric"]
  row = lambda index, label, method: index_row(
      index,
      evaluator,
      queries_qd,
      label=label,
      directory=workdir / name / method,
      config=config,
  )
  depth = config.rerank_depth
  rows = {
      "flat": row(
          compression.build("flat", docs_nd, metric=metric),
          "all-MiniLM-L6-v2, float32 exact",
          "flat",
      ),
      "sign_rerank": row(
          compression.build("sign", docs_nd, metric=metric, rerank_depth=depth),
          f"untrained sign bits + re-rank of Hamming top {depth}",
          "sign_rerank",
      ),
      "pq": row(
          compression.build("pq", docs_nd, metric=metric, **config.pq),
          f"untrained PQ m={config.pq.m}, {config.pq.nbits} bits (faiss ADC)",
          "pq",
      ),
  }
  rows["flat"]["evaluate_mode_metrics"] = reference
  # The starting encoder's corpus vectors as the encode mode writes them:
  # a JPQ run on this corpus reads them instead of re-embedding it.
  emb_dir = base / f"{name}_corpus"
  io.save_npy_atomic(emb_dir / "corpus_embeddings.npy", docs_nd)
  io.write_json_atomic(
      emb_dir / "corpus_ids.json", list(evaluator.collection.doc_ids)
  )
  return rows, (evaluator, docs_nd, queries_qd, metric)


def train_run(config, name: str, workdir: pathlib.Path) -> pathlib.Path:
  """Trains `config.runs[name]` into <workdir>/runs/<name> (or reuses it)."""
  run_dir = workdir / "runs" / name
  if (run_dir / "results.json").is_file():
    logging.info("%s: reusing the trained run in %s", name, run_dir)
    return run_dir
  train.train_and_evaluate(training_config(config, name, workdir), run_dir)
  return run_dir


def training_config(config, name: str, workdir: pathlib.Path):
  """configs/train.py's config of `config.runs[name]`, with its overrides;
  an adaptation run's pseudo-queries are written first."""
  spec = config.runs[name]
  arg = spec.train_arg
  if spec.adapt:
    pairs = workdir / "pseudo_queries" / f"{spec.adapt}.jsonl"
    if not pairs.is_file():
      summary = pseudo_queries.write_pairs(
          config.datasets[spec.adapt], pairs, **config.pseudo_queries
      )
      io.write_json_atomic(pairs.with_suffix(".summary.json"), summary)
      logging.info("pseudo-queries: %s", summary)
    arg += f",pseudo_queries={pairs}"
  cfg = train_config.get_config(arg)
  for override in spec.overrides:
    # Locked: a key the training config lacks is an error, not a new key.
    key, sep, value = override.partition("=")
    try:
      if not sep:
        raise ValueError("no '='")
      cfg.update_from_flattened_dict({key: ast.literal_eval(value)})
    except (AttributeError, KeyError, ValueError, SyntaxError, TypeError) as e:
      raise errors.ConfigError(
          f"config.runs.{name}.overrides: {override!r} is not key=value of "
          f"a key of the training config ({e})"
      ) from None
  cfg.unlock()
  corpus = pathlib.Path(cfg.data.corpus_path or cfg.data.path)
  if (
      spec.adapt
      and corpus.resolve()
      != pathlib.Path(config.datasets[spec.adapt]).resolve()
  ):
    raise errors.ConfigError(
        f"config.runs.{name}: train argument {spec.train_arg!r} trains on "
        f"{corpus}, not on the adapt dataset {config.datasets[spec.adapt]}"
    )
  # The pretrained embeddings `baselines` saved of the training corpus.
  names = [
      d
      for d, path in config.datasets.items()
      if pathlib.Path(path).resolve() == corpus.resolve()
  ]
  embeddings = workdir / "pretrained" / f"{names[0] if names else ''}_corpus"
  if (
      cfg.model.kind == "jpq"
      and names
      and (embeddings / "corpus_embeddings.npy").is_file()
      and cfg.model.max_length == config.model.max_length
      and cfg.model.pretrained == config.model.pretrained
  ):
    cfg.model.jpq_init = str(embeddings / "corpus_embeddings.npy")
  return cfg


def _same_corpus(run_cfg: dict, path: str) -> bool:
  data = run_cfg["data"]
  corpus = data.get("corpus_path") or data["path"]
  return pathlib.Path(corpus).resolve() == pathlib.Path(path).resolve()


def run_rows(config, name, run_dir, dataset, inputs, workdir, mesh) -> dict:
  """The trained run `name`'s row(s) on one dataset."""
  spec = config.runs[name]
  evaluator, docs_nd, _, _ = inputs
  out_dir = workdir / dataset / name
  model, tokenizer, run_cfg, step = kinds.load_run(run_dir, mesh)
  kind = kinds.get(ml_collections.ConfigDict(run_cfg["model"]))
  logging.info("%s: a %s run at step %d on %s", name, kind.name, step, dataset)
  if kind.name == "bpr":
    # The evaluate mode on the run: its encoder's corpus and queries.
    eval_dir = workdir / "runs" / name / "eval"
    cfg = _dataset_config(
        config, dataset, eval_dir / f"cache_{dataset}", run=run_dir
    )
    evaluator, docs_bd, queries_qd, _ = compression_run.dense_inputs(
        cfg, eval_dir
    )
    depth = config.rerank_depth
    return {
        f"{name}_flat": index_row(
            compression.build("flat", docs_bd, metric="dot"),
            evaluator,
            queries_qd,
            label=f"{spec.label}: its encoder, float32 exact",
            directory=out_dir / "flat",
            config=config,
        ),
        name: index_row(
            kind.build_index(model, run_dir, docs_bd, rerank_depth=depth),
            evaluator,
            queries_qd,
            label=f"{spec.label}: sign bits + re-rank of Hamming top {depth}",
            directory=out_dir / "sign_rerank",
            config=config,
        ),
    }
  if kind.name != "jpq":
    raise errors.ConfigError(
        f"config.runs.{name}: a {kind.name} run; expected bpr or jpq"
    )
  encoder = kind.text_encoder(
      model, tokenizer, run_cfg, mesh, max_length=config.model.max_length
  )
  with jax.default_matmul_precision(config.model.matmul_precision):
    queries_qd = encoder.encode_queries(
        evaluator.query_texts,
        batch_size=config.encode.batch_size,
        desc=f"{name}: queries",
    )
  own = _same_corpus(run_cfg, config.datasets[dataset])
  index = kind.build_index(model, run_dir, None if own else docs_nd)
  where = "its codes" if own else "documents assigned to its centroids"
  return {
      name: index_row(
          index,
          evaluator,
          queries_qd,
          label=f"{spec.label}: PQ, {where} (faiss ADC)",
          directory=out_dir / "pq",
          config=config,
      )
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Baselines, then every run; writes results.json and table.md."""
  import faiss  # pylint: disable=g-import-not-at-top

  faiss.omp_set_num_threads(config.faiss_threads)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  unknown = [
      (n, d)
      for n in config.order
      for d in config.runs[n].datasets
      if d not in config.datasets
  ]
  if unknown:
    raise errors.ConfigError(
        f"config.runs: {unknown} name datasets outside config.datasets "
        f"({list(config.datasets)})"
    )
  results, inputs = {}, {}
  for dataset in config.datasets:
    results[dataset], inputs[dataset] = baselines(config, dataset, workdir)
  mesh = sharding.make_mesh(config.mesh.shape)
  for name in config.order:
    run_dir = train_run(config, name, workdir)
    for dataset in config.runs[name].datasets:
      results[dataset].update(
          run_rows(
              config, name, run_dir, dataset, inputs[dataset], workdir, mesh
          )
      )
      io.write_json_atomic(workdir / "results.json", results)
  io.write_json_atomic(workdir / "results.json", results)
  text = compression_run.table(results)
  io.write_text_atomic(workdir / "table.md", text)
  print(text)
  return results


if __name__ == "__main__":
  entry.main(run)
