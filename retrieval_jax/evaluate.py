"""The `evaluate` and `encode` modes: a retriever on a BEIR directory.

`evaluate(config, workdir)` writes metrics.json ({measure: mean}),
metrics_per_query.json, run.trec, timing.json, stats.json (index size,
query latency) and config.json. `encode(config, workdir)` writes
corpus_shards/ (resumable, checksummed, `data/embedding_shards.py`), then
corpus_embeddings.npy (float32, corpus.jsonl order) and corpus_ids.json.

`config.model.pretrained` may be a hub id in the local Hugging Face cache;
a sentence-transformers model's prompts prefix queries and documents and
its `similarity_fn_name` picks the search metric unless the config says
otherwise; the SPLADE / ColBERT / cross-encoder retrievers take a
published checkpoint where they take a run (`use_checkpoints`).
"""

import json
import pathlib
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from retrieval_jax import api
from retrieval_jax import encoding
from retrieval_jax import errors
from retrieval_jax import io
from retrieval_jax import kinds
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.data import embedding_shards
from retrieval_jax.evaluation import evaluators
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import retrievers
from retrieval_jax.evaluation import trec_run


def check_data_path(
    config: ml_collections.ConfigDict, corpus_only: bool = False
) -> pathlib.Path:
  """Validates `config.data.path` up front, naming the key on failure."""
  path = pathlib.Path(config.data.path).expanduser()
  if not path.is_dir():
    raise errors.ConfigError(
        f"config.data.path={config.data.path!r}: no such directory (expected "
        "a BEIR directory with corpus.jsonl, queries.jsonl, qrels/)"
    )
  needed = ["corpus.jsonl"]
  if not corpus_only:
    needed += ["queries.jsonl", f"qrels/{config.data.split}.tsv"]
  missing = [n for n in needed if not (path / n).is_file()]
  if missing:
    raise errors.ConfigError(
        f"config.data.path={str(path)!r} (split "
        f"config.data.split={config.data.split!r}) lacks {missing}"
    )
  return path


def make_encoder(
    config: ml_collections.ConfigDict, mesh
) -> encoding.TextEncoder:
  """The pretrained text encoder described by `config.model`."""
  if config.model.dtype not in ("float32", "bfloat16"):
    raise errors.ConfigError(
        f"config.model.dtype={config.model.dtype!r}: expected 'float32' or "
        "'bfloat16'"
    )
  if config.model.pooling not in ("", "cls", "mean"):
    raise errors.ConfigError(
        f"config.model.pooling={config.model.pooling!r}: expected 'cls', "
        "'mean' or '' (checkpoint default)"
    )
  return api.load(
      config.model.pretrained,
      mesh=mesh,
      pooling=config.model.pooling,
      normalize=config.model.normalize,
      max_length=config.model.max_length,
      dtype=config.model.dtype,
  ).text_encoder


def _pretrained_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  try:
    return pretrained.resolve_model_dir(config.model.pretrained)
  except FileNotFoundError as e:
    raise errors.ConfigError(f"config.model.pretrained: {e}") from e


def resolve_prompts(
    config: ml_collections.ConfigDict, from_checkpoint: bool = True
) -> tuple[str, str]:
  """(query prompt, document prompt) of the dense encoder.

  `config.model.query_prompt` / `doc_prompt` win when set (not None; ""
  turns a prompt off); else the checkpoint's prompts (`from_checkpoint`:
  not for a trained run, which was trained without them).
  """
  checkpoint = pretrained.Prompts()
  if from_checkpoint:
    try:
      checkpoint = pretrained.read_prompts(_pretrained_dir(config))
    except ValueError as e:
      raise errors.ConfigError(f"config.model.pretrained: {e}") from e
  query = config.model.get("query_prompt")
  doc = config.model.get("doc_prompt")
  return (
      checkpoint.query if query is None else query,
      checkpoint.document if doc is None else doc,
  )


def resolve_metric(config: ml_collections.ConfigDict) -> str:
  """`config.search.metric`, or ("") the pretrained model's similarity.

  sentence-transformers' `similarity_fn_name` (cosine when unset) as the
  metric ranking like it; ConfigError when none does.
  """
  if config.search.metric:
    return config.search.metric
  model_dir = _pretrained_dir(config)
  normalize = config.model.normalize
  if normalize is None:
    normalize = pretrained.has_normalize_module(model_dir)
  try:
    return pretrained.read_prompts(model_dir).metric(normalize)
  except ValueError as e:
    raise errors.ConfigError(
        f"config.search.metric='' takes {model_dir}'s similarity: {e}; "
        "set config.search.metric to 'cosine' or 'dot'"
    ) from e


# Retriever keys naming a trained run, or a published checkpoint, of a kind.
RUN_KEYS = (
    "splade_workdir",
    "inference_free_workdir",
    "colbert_workdir",
    "rerank_workdir",
)


def use_checkpoints(config: ml_collections.ConfigDict) -> None:
  """Points the retriever's run keys at published checkpoints.

  A key naming a model (directory or hub id, not a train workdir) becomes
  its resolved directory, so caches are keyed by the snapshot; the model is
  built by `kinds.load_checkpoint`. A splade / inference_free retriever
  with an empty key takes `config.model.pretrained` if that has an MLM head
  (zero-shot SPLADE); ConfigError if it has none.
  """
  r = config.retriever
  key = f"{r.kind}_workdir"
  if r.kind in ("splade", "inference_free") and not r.get(key, ""):
    why = ""
    try:
      model_dir = pretrained.resolve_model_dir(config.model.pretrained)
      if pretrained.has_mlm_head(pretrained.tensor_shapes(model_dir)):
        logging.info("%s: zero-shot, the checkpoint %s", r.kind, model_dir)
        r[key] = str(model_dir)
        return
      why = "has no MLM head (cls.predictions.*)"
    except FileNotFoundError as e:
      why = f"is not found ({e})"
    raise errors.ConfigError(
        f"config.retriever.{key} is empty: set it to the workdir of a "
        f"configs/train.py:scifact,{r.kind} run or to a SPLADE checkpoint "
        "(a BertForMaskedLM directory or hub id), or set "
        "config.model.pretrained to one (config.model.pretrained="
        f"{config.model.pretrained!r} {why})"
    )
  for key in RUN_KEYS:
    value = r.get(key, "")
    if (
        value
        and not (pathlib.Path(value).expanduser() / "checkpoints").is_dir()
    ):
      try:
        r[key] = str(pretrained.resolve_model_dir(value))
      except FileNotFoundError:
        pass  # `kinds.load_run` reports both readings.


def use_run(config: ml_collections.ConfigDict, mesh):
  """Points `config.retriever` at the trained run `config.run`.

  A bi-encoder run serves the dense retrievers (dense, hybrid, dense_prf)
  and a dense first stage: returns its encoder's factory (an AR2 run's
  ranker is then the default `rerank_workdir`). Any other kind sets
  `config.retriever.kind` to the retriever that serves it
  (`Kind.retriever`) and its run key, and returns None.
  """
  try:
    model, tokenizer, run_cfg, step = kinds.load_run(config.run, mesh)
  except (FileNotFoundError, ValueError) as e:
    raise errors.ConfigError(f"config.run={config.run!r}: {e}") from e
  kind = kinds.get(ml_collections.ConfigDict(run_cfg["model"]))
  r = config.retriever
  logging.info("config.run: a %s run at step %d", kind.name, step)
  if kind.retriever != "dense":
    r.kind = kind.retriever
    r[f"{kind.retriever}_workdir"] = config.run
    return None
  # A dense run is also the dense first stage of a re-ranking, and a run
  # with a ranker (AR2) re-ranks with it unless rerank_workdir says else.
  first_stage = r.kind in ("colbert", "rerank") and r.first_stage == "dense"
  if r.kind not in retrievers.DENSE_KINDS and not first_stage:
    raise errors.ConfigError(
        f"config.retriever.kind={r.kind!r}: a {kind.name} run is evaluated "
        f"by one of {retrievers.DENSE_KINDS}, or is the dense first stage "
        "of colbert / rerank (config.retriever.first_stage='dense')"
    )
  if (
      r.kind == "rerank"
      and not r.get("rerank_workdir", "")
      and (kind.name, "cross_encoder") in kinds.VIEWS
  ):
    r.rerank_workdir = config.run
  # The dense caches are keyed by the model: this run at this step.
  config.model.checkpoint = f"{pathlib.Path(config.run).resolve()}@{step}"
  if not config.search.metric:
    # As the run's own evaluations searched.
    config.search.metric = "cosine" if run_cfg["model"]["normalize"] else "dot"
  return lambda: kind.text_encoder(
      model, tokenizer, run_cfg, mesh, max_length=config.model.max_length
  )


def load_collection(
    config: ml_collections.ConfigDict, corpus_only: bool = False
) -> beir.BeirCollection:
  """Reads the BEIR directory with `beir.load_beir` (no TensorFlow)."""
  path = check_data_path(config, corpus_only)
  return beir.load_beir(
      path,
      split=None if corpus_only else config.data.split,
      on_unknown=config.data.on_unknown,
      corpus_only=corpus_only,
  )


def format_table(metrics: dict[str, float], title: str) -> str:
  """A two-column text table of measures and values."""
  width = max(len(k) for k in metrics)
  lines = [title, "-" * (width + 10)]
  lines += [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()]
  return "\n".join(lines)


@sharding.uses_config_rules
def validate(config: ml_collections.ConfigDict, *, mode: str) -> None:
  """Checks the evaluate/encode config before any work; ConfigError names
  the key."""

  def fail(key, message):
    raise errors.ConfigError(f"config.{key}={config_get(key)!r}: {message}")

  def config_get(key):
    value = config
    for part in key.split("."):
      value = value[part]
    return value

  positive = ["encode.batch_size", "encode.pad_multiple", "model.max_length"]
  if mode == "evaluate":
    positive += ["search.top_k", "search.chunk_size"]
  if mode == "encode" and "shard_size" in config.encode:
    positive.append("encode.shard_size")
  if config.encode.get("dtype", "float32") not in embedding_shards.DTYPES:
    fail("encode.dtype", f"expected one of {embedding_shards.DTYPES}")
  for key in positive:
    value = config_get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      fail(key, "expected a positive integer")
  if config.data.max_queries < 0:
    fail("data.max_queries", "expected >= 0 (0: all)")
  if config.model.get("architecture", "bert") != "bert":
    fail(
        "model.architecture",
        "the evaluate and encode modes read pretrained BERT-family"
        " checkpoints; evaluate another architecture (M2) through"
        " --config.run=WORKDIR of its training run",
    )
  if config.model.dtype not in ("float32", "bfloat16"):
    fail("model.dtype", "expected 'float32' or 'bfloat16'")
  if config.model.pooling not in ("", "cls", "mean"):
    fail("model.pooling", "expected 'cls', 'mean' or '' (checkpoint default)")
  if config.data.on_unknown not in ("warn", "error", "ignore"):
    fail("data.on_unknown", "expected 'warn', 'error' or 'ignore'")
  if mode == "evaluate":
    if config.search.metric not in ("", "cosine", "dot"):
      fail("search.metric", "expected 'cosine', 'dot' or '' (the model's)")
    if not config.eval.measures:
      fail("eval.measures", "expected at least one measure")
    for name in config.eval.measures:
      try:
        ir_metrics.parse_measure(name)
      except ValueError as e:
        fail("eval.measures", str(e))
  try:
    shape = tuple(config.mesh.shape)
    if len(shape) != len(sharding.MESH_AXES):
      raise ValueError(f"expected {len(sharding.MESH_AXES)} axes")
    sharding.make_mesh(shape)
  except (TypeError, ValueError) as e:
    fail("mesh.shape", str(e))


def evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, float]:
  """Runs the evaluate mode; returns the mean metrics (also written)."""
  validate(config, mode="evaluate")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  mesh = sharding.make_mesh(config.mesh.shape)
  encoder_fn = lambda: make_encoder(config, mesh)
  run_encoder_fn = None
  if config.get("run", ""):
    run_encoder_fn = use_run(config, mesh)
    encoder_fn = run_encoder_fn or encoder_fn
  use_checkpoints(config)
  retrievers.validate(config)
  r = config.retriever
  if r.kind in retrievers.DENSE_KINDS or (
      r.kind in ("colbert", "rerank") and r.first_stage == "dense"
  ):
    config.search.metric = resolve_metric(config)
    query_prompt, doc_prompt = resolve_prompts(
        config, from_checkpoint=run_encoder_fn is None
    )
    prompted = encoder_fn
    encoder_fn = lambda: prompted().with_prompts(query_prompt, doc_prompt)
    if query_prompt or doc_prompt:
      logging.info("prompts: query %r, document %r", query_prompt, doc_prompt)
      # The dense caches are keyed by config.model.checkpoint: add them.
      config.model.checkpoint = config.model.get("checkpoint", "") + (
          "|prompts=" + json.dumps([query_prompt, doc_prompt])
      )
  config.search.metric = config.search.metric or "cosine"  # Unused.
  collection = load_collection(config)
  evaluator = evaluators.RetrievalEvaluator(
      collection,
      measures=config.eval.measures,
      relevance_level=config.eval.relevance_level,
      top_k=config.search.top_k,
      metric=config.search.metric,
      chunk_size=config.search.chunk_size,
      max_queries=config.data.max_queries,
      name="evaluate",
  )
  kind = config.retriever.kind
  logging.info(
      "evaluating %s (%s) on %d docs, %d queries (split %s)",
      kind,
      config.model.pretrained,
      len(collection.doc_ids),
      len(evaluator.query_ids),
      config.data.split,
  )
  result, stats = retrievers.retrieve(
      config, evaluator, encoder_fn, mesh, workdir
  )
  trec_run.write_run(workdir / "run.trec", result.run, tag=config.eval.run_tag)
  io.write_json_atomic(workdir / "metrics.json", result.metrics)
  io.write_json_atomic(workdir / "metrics_per_query.json", result.per_query)
  timing = dict(
      result.timing,
      total_s=time.perf_counter() - start,
      num_docs=len(collection.doc_ids),
      num_queries=len(evaluator.query_ids),
  )
  io.write_json_atomic(workdir / "timing.json", timing)
  io.write_json_atomic(workdir / "stats.json", dict(stats, retriever=kind))
  io.write_json_atomic(
      workdir / "config.json", json.loads(config.to_json_best_effort())
  )
  print(
      format_table(
          result.metrics,
          f"{pathlib.Path(config.data.path).name} ({config.data.split},"
          f" {len(evaluator.query_ids)} queries, {len(collection.doc_ids)}"
          f" docs, retriever {kind})",
      )
  )
  for part, metrics in stats.get("parts", {}).items():
    print(f"  {part}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  phases = ", ".join(
      f"{k[:-2]} {v:.1f} s"
      for k, v in timing.items()
      if k.endswith("_s") and not k.endswith("_per_s")
  )
  print(f"time: {phases}")
  index = stats.get("index", "")  # dense searches: exact or which index
  if index:
    index = f" ({index}, {stats['bytes_per_doc']:.0f} B/doc)"
  print(
      f"index {stats['index_bytes'] / 2**20:.1f} MiB{index}, search "
      f"{stats['search_ms_per_query']:.2f} ms/query (one at a time), "
      f"query encoding {stats['encode_ms_per_query']:.2f} ms/query"
  )
  print(
      f"wrote {workdir}/metrics.json, metrics_per_query.json, run.trec, "
      "stats.json"
  )
  return result.metrics


@sharding.uses_config_rules
def encode(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> np.ndarray:
  """Runs the encode mode; returns the [N, D] corpus embeddings.

  Shards in <workdir>/corpus_shards (`data/embedding_shards.py`): a rerun
  encodes only the missing or damaged ones; several processes split them,
  each on its own devices. Then corpus_embeddings.npy / corpus_ids.json
  (`config.encode.consolidate`).
  """
  validate(config, mode="encode")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  multi = jax.process_count() > 1
  try:
    # Each process encodes its own shards: a mesh of its local devices.
    mesh = sharding.make_mesh(
        config.mesh.shape, devices=jax.local_devices() if multi else None
    )
  except ValueError as e:
    raise errors.ConfigError(
        f"config.mesh.shape={tuple(config.mesh.shape)}: {e} (the encode mode"
        " meshes each process's local devices)"
    ) from e
  collection = load_collection(config, corpus_only=True)
  encoder = make_encoder(config, mesh).with_prompts(*resolve_prompts(config))
  directory = workdir / embedding_shards.DEFAULT_DIR
  shard_size = config.encode.get("shard_size", 100_000)
  dtype = config.encode.get("dtype", "float32")
  start = time.perf_counter()
  with jax.default_matmul_precision(config.model.matmul_precision):
    manifest, encoded = embedding_shards.write(
        directory,
        key_parts=retrievers.corpus_key_parts(config, encoder),
        doc_ids=collection.doc_ids,
        texts=collection.doc_texts(),
        encode_fn=lambda texts: encoder.encode_documents(
            texts,
            batch_size=config.encode.batch_size,
            pad_multiple=config.encode.pad_multiple,
            sort_by_length=config.encode.sort_by_length,
            desc="encode",
        ),
        shard_size=shard_size,
        dtype=dtype,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        barrier=multihost_utils.sync_global_devices,
    )
  elapsed = time.perf_counter() - start
  written = f"{directory}/"
  if config.encode.get("consolidate", True):
    if jax.process_index() == 0:
      embedding_shards.consolidate(
          directory,
          workdir / "corpus_embeddings.npy",
          workdir / "corpus_ids.json",
      )
    if multi:
      multihost_utils.sync_global_devices("encode: consolidated")
    written += ", corpus_embeddings.npy (float32), corpus_ids.json"
  docs_nd, _ = embedding_shards.read(directory, verify=False)
  shards = manifest["shards"]
  n = sum(shards[i]["rows"][1] - shards[i]["rows"][0] for i in encoded)
  owned = len(range(jax.process_index(), len(shards), jax.process_count()))
  print(
      (f"process {jax.process_index()}: " if multi else "")
      + f"encoded {len(encoded)} of {owned} shards ({n} docs; the rest were"
      f" finished before); {manifest['num_docs']} docs, {manifest['dim']}-d"
      f" {dtype}, in {elapsed:.1f} s: {written}"
  )
  return docs_nd
