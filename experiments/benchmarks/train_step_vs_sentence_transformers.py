r"""Train-step throughput: retrieval_jax vs sentence-transformers, same run.

Both sides fine-tune all-MiniLM-L6-v2 on the same batch: B SciFact test
queries, each with its relevant document and G - 1 other documents as hard
negatives (B·G passages), contrastive loss over cosine similarities scaled
by 20 (temperature 0.05) with every passage of the batch a candidate,
dropout on, AdamW at lr 2e-5 (weight decay 0.01, torch's default, on every
parameter on both sides), no gradient clipping.

  ours  the trainer's pieces: `pretrained.load_pretrained`,
        `train_state.split_model`, `optax.adamw`, `train_state.state_layout`
        + `create` on a data-parallel mesh of one XLA CPU device per core,
        `steps.make_train_step` with the "infonce" loss, mean pooling,
        normalised embeddings; the batch placed with `steps.put_batch`.
  peer  `SentenceTransformer` + `losses.MultipleNegativesRankingLoss(scale=20)`
        on (anchor, positive, negative_1..negative_{G-1}) columns, in a
        hand-written loop: forward + loss, backward, `torch.optim.AdamW`
        step, zero_grad; torch uses `--threads` intra-op threads.

Same token counts on both sides: every passage is a document of at least
`--max_length` tokens, truncated to it, and queries are padded to
`--max_length` (padding="max_length"), so each step runs B + B·G sequences
of exactly `--max_length` positions through the encoder in both frameworks.
Each side tokenizes with its own tokenizer, before any timing (tokenization
is in neither timed region); the ids are checked to be identical. The same
batch is reused every step.

Timing: each side runs `--warmup` steps first (the first JAX one compiles;
its time is reported), then `--repeats` rounds of `--steps` steps, the two
sides alternating (the order swaps every round, so background load and
thermal drift hit both alike). A JAX step counts as done when its loss is
ready (`jax.block_until_ready`); the round also waits for the state. Per
side: best and median steps/s and queries/s over the rounds; the ratio is
ours / peer throughput (> 1: retrieval_jax is faster).

  PYTHONPATH=. python \
      experiments/benchmarks/train_step_vs_sentence_transformers.py \
      --data ../shared/data/scifact --batch_size 32 --group_size 8 \
      --max_length 128 --steps 3 --repeats 3 --threads 2

Prints per-round timings, then a markdown row:
  | workload | threads | ours steps/s | ours queries/s | peer steps/s |
  | peer queries/s | ratio (ours/peer) |
"""

import argparse
import functools
import json
import os
import pathlib
import shlex
import statistics
import sys
import time


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--data",
      default="../shared/data/scifact",
      help="BEIR directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).",
  )
  parser.add_argument("--split", default="test")
  parser.add_argument(
      "--batch_size", type=int, default=32, help="queries per step."
  )
  parser.add_argument(
      "--group_size",
      type=int,
      default=8,
      help="passages per query: 1 positive + G-1 negatives.",
  )
  parser.add_argument(
      "--max_length",
      type=int,
      default=128,
      help="tokens per query and per passage (both padded or truncated to it).",
  )
  parser.add_argument(
      "--steps", type=int, default=3, help="timed steps per round."
  )
  parser.add_argument(
      "--repeats", type=int, default=3, help="rounds per side, interleaved."
  )
  parser.add_argument(
      "--warmup",
      type=int,
      default=2,
      help="untimed steps per side before the rounds.",
  )
  parser.add_argument(
      "--threads",
      type=int,
      default=len(os.sched_getaffinity(0)),
      help="CPU cores for both (default: all available).",
  )
  parser.add_argument("--lr", type=float, default=2e-5)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


ARGS = _parse_args()
# XLA sizes its thread pool from the CPUs this process may run on, so pinning
# must happen before JAX starts; torch then gets the same cores.
_cpus = sorted(os.sched_getaffinity(0))
if len(_cpus) > ARGS.threads:
  os.sched_setaffinity(0, _cpus[: ARGS.threads])
elif len(_cpus) < ARGS.threads:
  print(f"warning: only {len(_cpus)} CPUs available, asked {ARGS.threads}")

# pylint: disable=g-import-not-at-top,wrong-import-position
from retrieval_jax import sharding

# Before JAX creates its CPU client: one XLA device per core, as main.py does.
sharding.use_cpu_cores_as_devices(ARGS.threads)

import jax
import numpy as np
import optax
import sentence_transformers
import torch
from jax.sharding import NamedSharding, PartitionSpec
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import losses as st_losses

from retrieval_jax import losses
from retrieval_jax import pretrained
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.data import tokenizers
from retrieval_jax.kinds import bi_encoder

# pylint: enable=g-import-not-at-top,wrong-import-position

TEMPERATURE = 0.05  # = sentence-transformers' scale 20.
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default.


def load_batch_texts(
    data_dir: pathlib.Path,
    split: str,
    tokenizer,
    batch_size: int,
    group_size: int,
    max_length: int,
    seed: int,
) -> tuple[list[str], list[list[str]]]:
  """B queries and, per query, its positive then G - 1 negative passages.

  Only documents that fill `max_length` tokens are used, so truncation gives
  every passage exactly `max_length` tokens. The positive is the query's
  first judged document that is long enough (queries without one are
  skipped); negatives are drawn (seeded) from the other long documents, none
  relevant to any query of the batch, and no document appears twice.

  Returns:
    (queries [B], groups [B][G]) as raw strings.
  """
  docs = {}
  with open(data_dir / "corpus.jsonl", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      docs[doc["_id"]] = (doc.get("title", "") + " " + doc["text"]).strip()
  queries = {}
  with open(data_dir / "queries.jsonl", encoding="utf-8") as f:
    for line in f:
      q = json.loads(line)
      queries[q["_id"]] = q["text"]
  qrels = {}
  with open(data_dir / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
    next(f)  # Header.
    for line in f:
      qid, did, score = line.rstrip("\n").split("\t")
      if int(score) > 0:
        qrels.setdefault(qid, []).append(did)

  content = max_length - 2  # [CLS] and [SEP] take two positions.
  long_enough = {}

  def is_long(did):
    if did not in long_enough:
      ids = tokenizer.tokenize_to_ids(docs[did], limit=content)
      long_enough[did] = len(ids) >= content
    return long_enough[did]

  chosen_q, positives = [], []
  for qid, dids in qrels.items():
    pos = next((d for d in dids if d in docs and is_long(d)), None)
    if pos is None or pos in positives:
      continue
    chosen_q.append(qid)
    positives.append(pos)
    if len(chosen_q) == batch_size:
      break
  if len(chosen_q) < batch_size:
    raise SystemExit(
        f"{data_dir}: only {len(chosen_q)} {split} queries have "
        f"a relevant document of >= {max_length} tokens; "
        f"--batch_size {batch_size} needs that many"
    )
  relevant = {d for q in chosen_q for d in qrels[q]}
  rng = np.random.default_rng(seed)
  pool = (
      did
      for did in (list(docs)[i] for i in rng.permutation(len(docs)))
      if did not in relevant and is_long(did)
  )
  groups = []
  for pos in positives:
    negatives = [next(pool, None) for _ in range(group_size - 1)]
    if None in negatives:
      raise SystemExit(
          f"{data_dir}: too few documents of >= {max_length} "
          "tokens for the negatives"
      )
    groups.append([docs[pos]] + [docs[d] for d in negatives])
  return [queries[q] for q in chosen_q], groups


def _summary(times: list[float], steps_per_round: int, batch_size: int):
  """Best and median steps/s over rounds, and the same in queries/s."""
  rates = [steps_per_round / t for t in times]
  best, median = max(rates), statistics.median(rates)
  return {
      "best": best,
      "median": median,
      "best_q": best * batch_size,
      "median_q": median * batch_size,
  }


def main():
  args = ARGS
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  # Random bits that do not depend on how arrays are sharded (as main.py).
  jax.config.update("jax_threefry_partitionable", True)
  b, g, length = args.batch_size, args.group_size, args.max_length
  print(
      f"jax {jax.__version__} ({len(jax.devices())} CPU devices), "
      f"torch {torch.__version__}, sentence-transformers "
      f"{sentence_transformers.__version__}; threads={args.threads} "
      f"cpus={sorted(os.sched_getaffinity(0))} loadavg={os.getloadavg()}"
  )
  if os.getloadavg()[0] > args.threads:
    # torch's OpenMP workers spin at barriers and slow down several-fold
    # when other processes share their cores; XLA suffers less, so a busy
    # machine inflates the ratio.
    print(
        f"warning: load average {os.getloadavg()[0]:.1f} exceeds "
        f"{args.threads} threads; timings are not representative"
    )

  # --- Data, tokenized by each side's own tokenizer, outside any timing.
  loaded = pretrained.load_pretrained(pretrained.DEFAULT_MODEL)
  tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
      loaded.model_dir
  )
  query_texts, groups = load_batch_texts(
      pathlib.Path(args.data), args.split, tokenizer, b, g, length, args.seed
  )
  passage_texts = [p for group in groups for p in group]  # Query-major.
  q_tok = tokenizer(query_texts, max_length=length, pad_to=length)
  p_tok = tokenizer(passage_texts, max_length=length, pad_to=length)
  host_batch = {
      "query_ids": q_tok["input_ids"],
      "query_mask": q_tok["attention_mask"],
      "passage_ids": p_tok["input_ids"],
      "passage_mask": p_tok["attention_mask"],
      # One positive per query, in the first slot of its group.
      "positive_counts": np.ones((b,), np.int32),
      # Every passage is a distinct document; its own index is its id.
      "passage_doc": np.arange(b * g, dtype=np.int32),
      "relevant_doc": (np.arange(b, dtype=np.int32) * g)[:, None],
  }

  st = SentenceTransformer(str(loaded.model_dir), device="cpu")
  st.max_seq_length = length
  pad_full = {"processing_kwargs": {"text": {"padding": "max_length"}}}
  # Columns: anchor, positive, negative_1..negative_{G-1}; row i of every
  # column belongs to query i.
  columns = [query_texts] + [[grp[k] for grp in groups] for k in range(g)]
  features = [st.preprocess(col, **pad_full) for col in columns]
  st_passage_ids = torch.stack(
      [f["input_ids"] for f in features[1:]], dim=1
  ).reshape(b * g, -1)
  if not (
      np.array_equal(features[0]["input_ids"].numpy(), host_batch["query_ids"])
      and np.array_equal(st_passage_ids.numpy(), host_batch["passage_ids"])
  ):
    raise SystemExit("token ids differ between the two tokenizers")
  query_tokens = host_batch["query_mask"].sum(1).mean()
  passage_tokens = host_batch["passage_mask"].sum(1).mean()
  print(
      f"batch: {b} queries ({query_tokens:.1f} real tokens on average, "
      f"padded to {length}) x {g} passages ({passage_tokens:.1f} real "
      f"tokens on average, truncated to {length}); token ids identical"
  )

  # --- Ours: what train.py builds.
  mesh = sharding.make_mesh((-1, 1, 1))
  model_def, params = train_state.split_model(loaded.model)
  tx = optax.adamw(args.lr, weight_decay=WEIGHT_DECAY)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
  del params, loaded
  batch_spec = {k: v.shape for k, v in host_batch.items()}
  step_fn = steps.make_train_step(
      mesh,
      layout.shardings,
      batch_spec,
      model_def=model_def,
      tx=tx,
      # What the bi-encoder kind's train_spec builds for this config.
      loss_fn=functools.partial(
          bi_encoder.loss,
          loss_fn=losses.get_loss("infonce").fn,
          temperature=TEMPERATURE,
          pooling="mean",
          normalize=True,
      ),
      dropout=True,
  )
  batch = steps.put_batch(host_batch, steps.batch_shardings(mesh, batch_spec))
  rng = jax.device_put(
      jax.random.PRNGKey(args.seed), NamedSharding(mesh, PartitionSpec())
  )

  def run_ours(n):
    nonlocal state
    loss = None
    for _ in range(n):
      # As in the trainer: hidden host<->device copies would be errors.
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, batch, rng)
      loss = jax.block_until_ready(metrics["loss"])
    jax.block_until_ready(state)
    return float(loss)

  # --- Peer: sentence-transformers, hand-written loop.
  loss_module = st_losses.MultipleNegativesRankingLoss(
      st, scale=1 / TEMPERATURE
  )
  optimizer = torch.optim.AdamW(
      st.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY
  )
  st.train()  # Dropout on.

  def run_peer(n):
    loss = None
    for _ in range(n):
      loss = loss_module(features, labels=None)
      loss.backward()
      optimizer.step()
      optimizer.zero_grad()
    return float(loss.detach())

  # --- Warm-up, then interleaved rounds.
  start = time.perf_counter()
  first_loss_ours = run_ours(1)  # Compiles.
  compile_s = time.perf_counter() - start
  if args.warmup > 1:
    run_ours(args.warmup - 1)
  first_loss_peer = run_peer(1)
  if args.warmup > 1:
    run_peer(args.warmup - 1)
  # Both first losses are on the pretrained weights: they differ only by
  # the dropout masks.
  print(
      f"jax first step (compile + run): {compile_s:.1f} s; first-step "
      f"loss ours {first_loss_ours:.4f}, peer {first_loss_peer:.4f}"
  )
  times = {"ours": [], "peer": []}
  sides = [("ours", run_ours), ("peer", run_peer)]
  for r in range(args.repeats):
    for name, fn in (sides if r % 2 == 0 else sides[::-1]):
      start = time.perf_counter()
      loss = fn(args.steps)
      elapsed = time.perf_counter() - start
      times[name].append(elapsed)
      print(
          f"round {r + 1} {name}: {args.steps} steps in {elapsed:.2f} s "
          f"({args.steps / elapsed:.3f} steps/s), loss {loss:.4f}"
      )

  ours = _summary(times["ours"], args.steps, b)
  peer = _summary(times["peer"], args.steps, b)
  ratio = ours["best"] / peer["best"]
  ratio_median = ours["median"] / peer["median"]
  print(
      f"ours: best {ours['best']:.3f} steps/s ({ours['best_q']:.1f} "
      f"queries/s), median {ours['median']:.3f} steps/s "
      f"({ours['median_q']:.1f} queries/s)"
  )
  print(
      f"peer: best {peer['best']:.3f} steps/s ({peer['best_q']:.1f} "
      f"queries/s), median {peer['median']:.3f} steps/s "
      f"({peer['median_q']:.1f} queries/s)"
  )
  print(f"ratio ours/peer: {ratio:.2f} (best), {ratio_median:.2f} (median)")
  workload = (
      f"MiniLM-L6, {b} q x {g} p, len {length}, "
      f"{args.steps} steps x {args.repeats}"
  )
  print(
      "| workload | threads | ours steps/s (best / median) | ours queries/s "
      "| sentence-transformers steps/s (best / median) "
      "| sentence-transformers queries/s | ratio (ours/peer) |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|")
  print(
      f"| {workload} | {args.threads} | {ours['best']:.3f} / "
      f"{ours['median']:.3f} | {ours['best_q']:.1f} | {peer['best']:.3f} / "
      f"{peer['median']:.3f} | {peer['best_q']:.1f} | {ratio:.2f} |"
  )
  print(
      "command: PYTHONPATH=. python "
      + " ".join(shlex.quote(a) for a in sys.argv)
  )


if __name__ == "__main__":
  main()
