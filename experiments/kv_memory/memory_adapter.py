"""A key-value memory as a continual query adapter over a frozen bi-encoder.

Query embeddings q (cached in <workdir>/embeddings_<name>.npz) are adapted
to q' = normalize(q + r(q)); documents stay as they are; the score is
cos(q', d). The residual r starts at zero: "dkvb" (`KeyValueMemory`, keys
by EMA k-means on unlabelled embeddings, then frozen) or "linear" (q W + b).
Both train on collection A's training queries, then on B's (a fresh
optimizer each, no replay, SumMargLH over the whole corpus); after each
stage both held-out sets are evaluated (nDCG@10). The question: how much of
A's gain survives training on B (README.md beside this file).
"""

import dataclasses
import functools
import json
import pathlib
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from retrieval_jax import encoding
from retrieval_jax import io
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run
from retrieval_jax.losses import contrastive
from retrieval_jax.models import key_value_memory as kvm

ADAPTERS = ("dkvb", "linear")


@dataclasses.dataclass(frozen=True)
class Split:
  """Embedded queries of one split with their qrels.

  Attributes:
    query_ids: list[str] [Q], judged queries in query-file order.
    queries_qe: float32 [Q, e] unit query embeddings.
    qrels: {query id: {doc id: label}}.
  """

  query_ids: list
  queries_qe: np.ndarray
  qrels: dict


@dataclasses.dataclass(frozen=True)
class Collection:
  """One collection: its corpus embeddings, training and held-out splits."""

  name: str
  doc_ids: list
  docs_ne: np.ndarray
  train: Split
  test: Split


def embed_collection(
    name: str,
    path: str,
    train_split: str,
    test_split: str,
    encoder: encoding.TextEncoder,
    cache: pathlib.Path,
    batch_size: int = 64,
) -> Collection:
  """Embeds a BEIR collection once; later runs read `cache` (an .npz).

  The cache key is the path, the splits and the encoder's settings; a
  different key embeds again.
  """
  key = json.dumps(
      {
          "path": str(path),
          "splits": [train_split, test_split],
          "max_length": encoder.max_length,
          "pooling": encoder.pooling,
          "normalize": encoder.normalize,
      },
      sort_keys=True,
  )
  collection = {
      s: beir.load_beir(path, split=s) for s in (train_split, test_split)
  }
  corpus = collection[test_split]
  splits_ids = {s: c.judged_queries() for s, c in collection.items()}
  arrays = None
  if cache.exists():
    with np.load(cache) as f:
      if str(f["key"]) == key:
        arrays = {k: f[k] for k in f.files if k != "key"}
  if arrays is None:
    start = time.perf_counter()
    arrays = {
        "docs": encoder.encode(
            corpus.doc_texts(), batch_size=batch_size, desc=f"{name}: corpus"
        )
    }
    for s, (_, texts) in splits_ids.items():
      arrays[s] = encoder.encode(
          texts, batch_size=batch_size, desc=f"{name}: {s} queries"
      )
    io.save_npz_atomic(cache, key=key, **arrays)
    logging.info("%s: embedded in %.0f s", name, time.perf_counter() - start)

  def split(s):
    ids, _ = splits_ids[s]
    return Split(
        ids,
        np.asarray(arrays[s], np.float32),
        {q: collection[s].qrels[q] for q in ids},
    )

  return Collection(
      name,
      list(corpus.doc_ids),
      np.asarray(arrays["docs"], np.float32),
      split(train_split),
      split(test_split),
  )


# ---------------------------------------------------------------------------
# Adapters.


class LinearAdapter(nnx.Module):
  """r(q) = q W + b, zero at initialisation."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    del rngs  # Zero init: nothing to draw.
    self.kernel_ee = nnx.Param(jnp.zeros((dim, dim), jnp.float32))
    self.bias_e = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, q_be: jax.Array) -> jax.Array:
    return q_be @ self.kernel_ee[...] + self.bias_e[...]


def make_adapter(
    kind: str, dim: int, settings, key_data_ne: np.ndarray, seed: int
) -> nnx.Module:
  """A zero-residual adapter; "dkvb" gets its keys from `key_data_ne`."""
  rngs = nnx.Rngs(seed)
  if kind == "linear":
    return LinearAdapter(dim, rngs=rngs)
  if kind != "dkvb":
    raise ValueError(f"adapter={kind!r}: expected one of {ADAPTERS}")
  memory = kvm.KeyValueMemory(
      dim,
      settings.num_heads,
      settings.num_keys,
      settings.key_dim,
      dim,
      rngs=rngs,
  )
  kvm.initialize_keys(
      memory, key_data_ne, settings.ema_steps, settings.ema_decay, seed
  )
  return memory


def adapt(residual: nnx.Module, q_be: jax.Array) -> jax.Array:
  """q' = normalize(q + r(q)), [B, e] -> [B, e]."""
  out_be = q_be + residual(q_be)
  return out_be / jnp.maximum(
      jnp.linalg.norm(out_be, axis=-1, keepdims=True), 1e-12
  )


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_on(
    graphdef,
    tx,
    params,
    rest,
    opt_state,
    queries_qe,
    docs_ne,
    positive_qn,
    batches_tb,
    temperature,
):
  """One optimizer step per row of `batches_tb` (query rows), in one loop.

  The loss is SumMargLH over the whole corpus: −log of the softmax mass on
  the query's relevant documents, scores cos(q', d) / temperature.

  Returns:
    (params, opt_state, mean loss).
  """

  def loss_fn(params, pick_b):
    q_be = adapt(nnx.merge(graphdef, params, rest), queries_qe[pick_b])
    scores_bn = q_be @ docs_ne.T / temperature
    loss, _ = contrastive.sum_marg_lh(
        scores_bn, positive_qn[pick_b], jnp.ones_like(scores_bn, bool)
    )
    return loss

  def body(t, carry):
    params, opt_state, total = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, batches_tb[t])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, total + loss

  params, opt_state, total = jax.lax.fori_loop(
      0,
      batches_tb.shape[0],
      body,
      (params, opt_state, jnp.zeros((), jnp.float32)),
  )
  return params, opt_state, total / batches_tb.shape[0]


def positives(split: Split, doc_ids) -> np.ndarray:
  """bool [Q, N]: the split's relevant (label > 0) documents per query."""
  row_of = {d: i for i, d in enumerate(doc_ids)}
  out = np.zeros((len(split.query_ids), len(doc_ids)), bool)
  for i, q in enumerate(split.query_ids):
    for d, label in split.qrels[q].items():
      if label > 0 and d in row_of:
        out[i, row_of[d]] = True
  return out


def ndcg_at_10(residual: nnx.Module | None, collection: Collection) -> float:
  """nDCG@10 of the held-out queries through the adapter (None: none)."""
  q_qe = jnp.asarray(collection.test.queries_qe)
  if residual is not None:
    q_qe = adapt(residual, q_qe)
  scores_qn = np.asarray(q_qe @ jnp.asarray(collection.docs_ne).T)
  k = min(100, scores_qn.shape[1])
  top_qk = np.argsort(-scores_qn, axis=1, kind="stable")[:, :k]
  run = trec_run.run_from_topk(
      collection.test.query_ids,
      collection.doc_ids,
      np.take_along_axis(scores_qn, top_qk, 1),
      top_qk,
  )
  metrics, _ = ir_metrics.evaluate(collection.test.qrels, run, ["ndcg@10"])
  return metrics["ndcg@10"]


def run_sequence(collections: list[Collection], settings) -> dict:
  """Trains each adapter on the collections in order; evaluates after each.

  Args:
    collections: [A, B, ...], trained in this order.
    settings: adapter and optimisation settings (config.py's
      `retrieval` block: adapters, num_heads, num_keys, key_dim, ema_steps,
      ema_decay, learning_rate, steps, batch_size, temperature, seed).

  Returns:
    {"zero_shot": {name: nDCG@10}, adapter: [{"after": name, "ndcg@10":
    {name: value}, "loss": mean loss of the stage}, ...]}.
  """
  dim = collections[0].docs_ne.shape[1]
  unlabelled = np.concatenate(
      [x for c in collections for x in (c.docs_ne, c.train.queries_qe)]
  )
  out = {"zero_shot": {c.name: ndcg_at_10(None, c) for c in collections}}
  rng = np.random.default_rng(settings.seed)
  for kind in settings.adapters:
    residual = make_adapter(kind, dim, settings, unlabelled, settings.seed)
    graphdef, params, rest = nnx.split(residual, nnx.Param, ...)
    tx = optax.adam(settings.learning_rate)
    stages = []
    for c in collections:
      # A fresh optimizer per collection: sequential fine-tuning, no replay.
      opt_state = tx.init(params)
      batches_tb = rng.integers(
          0, len(c.train.query_ids), (settings.steps, settings.batch_size)
      )
      start = time.perf_counter()
      params, opt_state, loss = train_on(
          graphdef,
          tx,
          params,
          rest,
          opt_state,
          jnp.asarray(c.train.queries_qe),
          jnp.asarray(c.docs_ne),
          jnp.asarray(positives(c.train, c.doc_ids)),
          jnp.asarray(batches_tb, jnp.int32),
          settings.temperature,
      )
      model = nnx.merge(graphdef, params, rest)
      stages.append({
          "after": c.name,
          "loss": float(loss),
          "seconds": time.perf_counter() - start,
          "ndcg@10": {d.name: ndcg_at_10(model, d) for d in collections},
      })
      logging.info("%s after %s: %s", kind, c.name, stages[-1])
    out[kind] = stages
  return out


def format_table(results: dict, names: list[str]) -> str:
  """Markdown: nDCG@10 of each collection after each stage, and what of
  the first collection's gain the later stages keep."""
  first = names[0]
  head = (
      ["adapter", "stage"]
      + [f"{n} nDCG@10" for n in names]
      + [f"{first} gain kept"]
  )
  lines = [
      "| " + " | ".join(head) + " |",
      "|---|---|" + "---:|" * (len(names) + 1),
  ]
  zero = results["zero_shot"]
  lines.append(
      "| none (zero-shot) | | "
      + " | ".join(f"{zero[n]:.4f}" for n in names)
      + " | |"
  )
  for kind in ADAPTERS:
    if kind not in results:
      continue
    stages = results[kind]
    gain = stages[0]["ndcg@10"][first] - zero[first]
    for s in stages:
      kept = s["ndcg@10"][first] - zero[first]
      share = f"{kept / gain:.0%}" if gain > 0 else "n/a (no gain)"
      lines.append(
          f"| {kind} | after {s['after']} | "
          + " | ".join(f"{s['ndcg@10'][n]:.4f}" for n in names)
          + f" | {share} |"
      )
  return "\n".join(lines) + "\n"


def run(config, workdir) -> dict:
  """The retrieval-memory experiment of config.py:retrieval.

  Writes <workdir>/embeddings_<name>.npz (cache), retrieval.json and
  retrieval.md (the table); returns the results.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cfg = config.retrieval
  mesh = sharding.make_mesh(config.mesh.shape)
  encoder = encoding.TextEncoder.from_pretrained(
      cfg.encoder, mesh, max_length=cfg.max_length
  )
  collections = []
  for block in cfg.collections:
    collections.append(
        embed_collection(
            block.name,
            block.path,
            block.train_split,
            block.test_split,
            encoder,
            workdir / f"embeddings_{block.name}.npz",
        )
    )
  results = run_sequence(collections, cfg)
  names = [c.name for c in collections]
  table = format_table(results, names)
  print(table, flush=True)
  io.write_text_atomic(workdir / "retrieval.md", table)
  io.write_json_atomic(workdir / "retrieval.json", results)
  return results
