r"""Forward time vs length: one M2 layer vs one dense attention layer, same run.

Both are complete blocks of width 768 (the M2-BERT-80M-32k shapes):

  m2     `M2Layer(M2_CONFIGS["m2-bert-80m-32k"])`: gated bidirectional long
         convolutions (FFT) + residual long convolution + block-diagonal
         GLU with post-LayerNorm residual.
  dense  `EncoderLayer(EncoderConfig(hidden_size=768, num_heads=12,
         intermediate_size=3072))`: 12-head softmax self-attention, add &
         norm, GELU feed-forward, add & norm (BERT-base's block).

Batch 1, float32, deterministic forward, input x [1, L, 768] standard normal
and an all-ones mask. Each side is a jitted pure function of (state, x,
mask) that merges the NNX graph inside. Compilation is ahead of time and
excluded; one warm-up call follows (excluded; it sizes the number of
repeats N: as many as fit in `--budget_s` per length, between 2 and
`--repeats`); then N calls per side, the two sides alternating so
background load hits both alike. Reported: best and median wall time
(`block_until_ready`).

Dense attention at long L. Materialised logits are 12 x L x L float32: 3.2
GB at 8k, 12.9 GB at 16k, 51.5 GB at 32k. For L >= `--block_from` the dense
layer therefore computes the same exact attention in blocks of
`--query_block` queries against all keys (`jax.lax.map` over the blocks):
the same FLOPs (projections, QK^T, softmax, PV) with O(L x block) memory,
from the EncoderLayer's own parameters and its LayerNorm / feed-forward
modules. The blocked path is checked against `EncoderLayer.__call__` at
`--check_lengths` (max |diff| < 1e-4, also with a padded mask) and both are
timed there, so the switch of path can be judged.

Fits: slope of log(best time) on log(L) (numpy polyfit) for each side over
all lengths measured, and over L >= 4096; the crossover (smallest measured
L where M2 is faster than dense) and dense/M2 at L = 8192.

Memory: a batch-1 forward of the full encoder `M2Encoder(M2_CONFIGS[
"m2-bert-80m-32k"])` on `--memory_length` random token ids, in a fresh
subprocess (the parent's arrays and executables do not count): XLA's
compiled memory analysis (argument / output / temp bytes) and the peak RSS
of the process around the forward (ru_maxrss, and the kernel's VmHWM
high-water mark reset just before the forward) minus its RSS before it;
also the forward time and the parameter count.

  PYTHONPATH=. python experiments/m2_scaling/scaling.py \
      --out /tmp/m2_scaling.json

Prints a markdown table (L | M2 ms | dense ms | dense/M2 | dense attention),
the fits, and the memory numbers; writes everything to `--out` as JSON.

Shape letters: b batch, l / q / k positions (all, queries, keys), c query
block index, n heads, h head width, d model width.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models import m2_encoder
from retrieval_jax.models import transformer_encoder

_M2_PRESET = "m2-bert-80m-32k"
_WIDTH = 768  # model width of both layers
_TIMES_TO_MS = 1e3
# Additive bias of padding keys, the value the dense encoder uses: finite so
# a fully padded row still gives a uniform softmax, and exp() of it is 0.
_MASK_BIAS = -0.5 * float(np.finfo(np.float32).max)


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--lengths",
      type=_ints,
      default=[2**p for p in range(9, 16)],
      help="comma-separated sequence lengths (default 512,...,32768).",
  )
  parser.add_argument(
      "--repeats",
      type=int,
      default=10,
      help="most timed calls per side and length (>= 2).",
  )
  parser.add_argument(
      "--budget_s",
      type=float,
      default=30.0,
      help=(
          "timed seconds per length (both sides) that set "
          "the number of repeats; at least 2 are always run."
      ),
  )
  parser.add_argument(
      "--block_from",
      type=int,
      default=4096,
      help="dense attention runs in query blocks for L >= this.",
  )
  parser.add_argument(
      "--query_block",
      type=int,
      default=1024,
      help="queries per block of the blocked attention.",
  )
  parser.add_argument(
      "--max_dense_length",
      type=int,
      default=32768,
      help="dense layer not run above this length.",
  )
  parser.add_argument(
      "--check_lengths",
      type=_ints,
      default=[512, 2048],
      help=(
          "lengths where blocked == full attention is "
          "asserted and both are timed (empty: no check)."
      ),
  )
  parser.add_argument(
      "--skip_memory",
      action="store_true",
      help="skip the full-encoder memory measurement.",
  )
  parser.add_argument("--memory_length", type=int, default=32768)
  parser.add_argument(
      "--memory_repeats",
      type=int,
      default=2,
      help="timed forwards of the full encoder.",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON results path.")
  parser.add_argument(
      "--memory_child", action="store_true", help=argparse.SUPPRESS
  )  # The subprocess's own mode.
  args = parser.parse_args()
  if args.repeats < 2:
    parser.error("--repeats must be >= 2")
  return args


def blocked_attention(
    attn: transformer_encoder.SelfAttention,
    x_bld: jax.Array,
    mask_bl: jax.Array,
    block: int,
) -> jax.Array:
  """Exact multi-head self-attention, computed `block` queries at a time.

  The same math as `SelfAttention.__call__` (deterministic): q/k/v
  projections, logits scaled by 1/sqrt(head width), additive mask and
  softmax in float32, output projection. Each block's softmax covers all
  keys, so the result is exact; only the [N, block, L] logits of one block
  are live at a time instead of [N, L, L].

  Args:
    attn: the layer whose parameters are used.
    x_bld: [B, L, D] states in the layer's compute dtype.
    mask_bl: [B, L] nonzero for real tokens.
    block: queries per block; L need not be a multiple (the last block is
      padded with zero queries, whose outputs are dropped).

  Returns:
    [B, L, D] attention output.
  """
  dt = attn.dtype
  b, length, _ = x_bld.shape

  def project(w_dnh, bias_nh):
    return jnp.einsum("bld,dnh->blnh", x_bld, w_dnh[...].astype(dt)) + bias_nh[
        ...
    ].astype(dt)

  q_blnh = project(attn.query_dnh, attn.query_bias_nh)
  k_blnh = project(attn.key_dnh, attn.key_bias_nh)
  v_blnh = project(attn.value_dnh, attn.value_bias_nh)
  n, h = q_blnh.shape[2:]
  q_blnh = q_blnh * jnp.asarray(1.0 / math.sqrt(h), dt)
  bias_bk = jnp.where(mask_bl.astype(bool), 0.0, _MASK_BIAS).astype(jnp.float32)
  blocks = -(-length // block)
  q_blnh = jnp.pad(
      q_blnh, ((0, 0), (0, blocks * block - length), (0, 0), (0, 0))
  )
  q_cbqnh = jnp.swapaxes(q_blnh.reshape(b, blocks, block, n, h), 0, 1)

  def one_block(q_bqnh):
    logits_bnqk = jnp.einsum("bqnh,bknh->bnqk", q_bqnh, k_blnh)
    logits_bnqk = logits_bnqk.astype(jnp.float32) + bias_bk[:, None, None, :]
    probs_bnqk = jax.nn.softmax(logits_bnqk, axis=-1).astype(dt)
    return jnp.einsum("bnqk,bknh->bqnh", probs_bnqk, v_blnh)

  # lax.map runs the blocks one after another (a loop, not a vmap), which
  # is what bounds the live logits to one block.
  ctx_cbqnh = jax.lax.map(one_block, q_cbqnh)
  ctx_blnh = jnp.swapaxes(ctx_cbqnh, 0, 1).reshape(b, blocks * block, n, h)
  ctx_blnh = ctx_blnh[:, :length]
  return jnp.einsum(
      "blnh,nhd->bld", ctx_blnh, attn.out_nhd[...].astype(dt)
  ) + attn.out_bias_d[...].astype(dt)


def blocked_layer(
    layer: transformer_encoder.EncoderLayer,
    x_bld: jax.Array,
    mask_bl: jax.Array,
    block: int,
) -> jax.Array:
  """`EncoderLayer` forward (deterministic) with blocked attention.

  Args:
    layer: supplies every parameter and the LayerNorm / feed-forward modules.
    x_bld: [B, L, D] states. mask_bl: [B, L] mask.
    block: queries per attention block.

  Returns:
    [B, L, D] states, equal to `layer(x_bld, mask_bl, deterministic=True)`
    up to float rounding.
  """
  # Dropout is the identity in a deterministic forward, so the residual
  # branches are added as they are.
  x_bld = layer.attention_norm(
      x_bld + blocked_attention(layer.attention, x_bld, mask_bl, block)
  )
  return layer.mlp_norm(x_bld + layer.mlp(x_bld))


def _jitted_forward(module: nnx.Module, call):
  """(jitted fn(state, x, mask), state) running `call(module, x, mask)`."""
  graphdef, state = nnx.split(module)

  def forward(state, x_bld, mask_bl):
    return call(nnx.merge(graphdef, state), x_bld, mask_bl)

  return jax.jit(forward), state


def _m2_call(layer, x_bld, mask_bl):
  return layer(x_bld, mask_bl, deterministic=True, rng=None)


def _dense_call(block: int | None):
  """Full attention (`block` None) or blocked attention forward."""
  if block is None:
    return lambda layer, x, mask: layer(x, mask, deterministic=True, rng=None)
  return lambda layer, x, mask: blocked_layer(layer, x, mask, block)


def _compile(fn, *args):
  """(compiled executable, compile seconds)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _time_call(compiled, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def _inputs(length: int, seed: int):
  x_bld = jax.random.normal(
      jax.random.key(seed), (1, length, _WIDTH), jnp.float32
  )
  return x_bld, jnp.ones((1, length), jnp.int32)


def check_blocked(dense_layer, lengths, block, seed) -> list[dict]:
  """Asserts blocked == full attention layer; times both (best of 3)."""
  results = []
  for length in lengths:
    blk = max(1, min(block, length // 2))  # >= 2 blocks at every length.
    full_fn, state = _jitted_forward(dense_layer, _dense_call(None))
    blocked_fn, _ = _jitted_forward(dense_layer, _dense_call(blk))
    x_bld, ones_bl = _inputs(length, seed)
    # A padded mask too: the last quarter is padding.
    padded_bl = ones_bl.at[:, 3 * length // 4 :].set(0)
    diffs = []
    for mask_bl in (ones_bl, padded_bl):
      want = np.asarray(full_fn(state, x_bld, mask_bl))
      got = np.asarray(blocked_fn(state, x_bld, mask_bl))
      diffs.append(float(np.abs(want - got).max()))
    full_c, _ = _compile(full_fn, state, x_bld, ones_bl)
    blocked_c, _ = _compile(blocked_fn, state, x_bld, ones_bl)
    times = {"full": [], "blocked": []}
    for _ in range(3):
      times["full"].append(_time_call(full_c, state, x_bld, ones_bl))
      times["blocked"].append(_time_call(blocked_c, state, x_bld, ones_bl))
    row = {
        "length": length,
        "block": blk,
        "max_abs_diff": max(diffs),
        "max_abs_diff_padded_mask": diffs[1],
        "full_ms": min(times["full"]) * _TIMES_TO_MS,
        "blocked_ms": min(times["blocked"]) * _TIMES_TO_MS,
    }
    print(
        f"check L={length} block={blk}: max|blocked - full| = "
        f"{diffs[0]:.2e} (all-ones mask), {diffs[1]:.2e} (padded mask); "
        f"full {row['full_ms']:.1f} ms, blocked {row['blocked_ms']:.1f} ms",
        flush=True,
    )
    assert max(diffs) < 1e-4, row
    results.append(row)
  return results


def measure_length(m2_layer, dense_layer, length: int, args) -> dict:
  """Times both layers at one length (see the module doc)."""
  x_bld, mask_bl = _inputs(length, args.seed)
  sides = {"m2": _jitted_forward(m2_layer, _m2_call)}
  path = None
  if length <= args.max_dense_length:
    block = args.query_block if length >= args.block_from else None
    path = "full" if block is None else f"blocked ({block} queries)"
    sides["dense"] = _jitted_forward(dense_layer, _dense_call(block))
  compiled, compile_s, warmup_s = {}, {}, {}
  for name, (fn, state) in sides.items():
    compiled[name], compile_s[name] = _compile(fn, state, x_bld, mask_bl)
    warmup_s[name] = _time_call(compiled[name], state, x_bld, mask_bl)
  per_round = sum(warmup_s.values())
  repeats = max(2, min(args.repeats, int(args.budget_s / per_round)))
  times = {name: [] for name in sides}
  for _ in range(repeats):
    for name, (_, state) in sides.items():
      times[name].append(_time_call(compiled[name], state, x_bld, mask_bl))
  row = {
      "length": length,
      "repeats": repeats,
      "dense_path": path,
      "loadavg": os.getloadavg(),
  }
  for name in sides:
    row[name] = {
        "best_ms": min(times[name]) * _TIMES_TO_MS,
        "median_ms": statistics.median(times[name]) * _TIMES_TO_MS,
        "times_ms": [t * _TIMES_TO_MS for t in times[name]],
        "compile_s": compile_s[name],
        "warmup_ms": warmup_s[name] * _TIMES_TO_MS,
    }
  summary = " ".join(
      f"{name} best {row[name]['best_ms']:.1f} ms median "
      f"{row[name]['median_ms']:.1f} ms (compile {compile_s[name]:.1f} s);"
      for name in sides
  )
  print(
      f"L={length} N={repeats}: {summary} dense path: {path} "
      f"loadavg {row['loadavg'][0]:.2f}",
      flush=True,
  )
  return row


def slope(lengths, times) -> float | None:
  """Least-squares slope of log(time) on log(length); None below 2 points."""
  if len(lengths) < 2:
    return None
  return float(np.polyfit(np.log(lengths), np.log(times), 1)[0])


def summarize(rows: list[dict]) -> dict:
  """Slopes, crossover length and the dense/M2 ratio at 8192."""
  out = {}
  for name in ("m2", "dense"):
    have = [r for r in rows if name in r]
    for stat in ("best_ms", "median_ms"):
      out[f"{name}_slope_{stat[:-3]}"] = slope(
          [r["length"] for r in have], [r[name][stat] for r in have]
      )
    long_rows = [r for r in have if r["length"] >= 4096]
    out[f"{name}_slope_best_from_4096"] = slope(
        [r["length"] for r in long_rows],
        [r[name]["best_ms"] for r in long_rows],
    )
    # Local slope between consecutive measured lengths.
    out[f"{name}_local_slopes"] = [
        (
            b["length"],
            slope(
                [a["length"], b["length"]],
                [a[name]["best_ms"], b[name]["best_ms"]],
            ),
        )
        for a, b in zip(have, have[1:])
    ]
  both = [r for r in rows if "dense" in r]
  faster = [
      r["length"] for r in both if r["m2"]["best_ms"] < r["dense"]["best_ms"]
  ]
  out["crossover_length"] = min(faster) if faster else None
  out["crossover_below_range"] = (
      bool(both) and bool(faster) and (min(faster) == both[0]["length"])
  )
  at_8k = [r for r in both if r["length"] == 8192]
  out["dense_over_m2_at_8192"] = (
      at_8k[0]["dense"]["best_ms"] / at_8k[0]["m2"]["best_ms"]
      if at_8k
      else None
  )
  return out


def _proc_status_kb(field: str) -> int:
  """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def _reset_hwm() -> bool:
  """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def memory_child(args) -> dict:
  """Full-encoder forward at `--memory_length`: memory and time."""
  config = m2_encoder.M2_CONFIGS[_M2_PRESET]
  model = m2_encoder.M2Encoder(config, rngs=nnx.Rngs(args.seed))
  params = nnx.state(model, nnx.Param)
  num_params = int(sum(v.size for v in jax.tree.leaves(params)))
  graphdef, state = nnx.split(model)
  del model, params
  log = lambda msg: print(f"memory child: {msg}", file=sys.stderr, flush=True)
  log(f"built {_M2_PRESET}, {num_params:,} parameters")

  def forward(state, ids_bl, mask_bl):
    return nnx.merge(graphdef, state)(ids_bl, mask_bl, deterministic=True)

  length = args.memory_length
  ids_bl = jax.random.randint(
      jax.random.key(args.seed + 1),
      (1, length),
      1,
      config.vocab_size,
      jnp.int32,
  )
  mask_bl = jnp.ones((1, length), jnp.int32)
  compiled, compile_s = _compile(jax.jit(forward), state, ids_bl, mask_bl)
  log(f"compiled for L={length} in {compile_s:.1f} s")
  stats = compiled.memory_analysis()
  xla = None
  if stats is not None:
    xla = {
        name: int(getattr(stats, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "temp", "alias", "generated_code")
    }
  rss_before_kb = _proc_status_kb("VmRSS")
  maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  hwm_reset = _reset_hwm()
  times = []
  for _ in range(args.memory_repeats):
    times.append(_time_call(compiled, state, ids_bl, mask_bl))
    log(f"forward {times[-1]:.1f} s")
  maxrss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  hwm_kb = _proc_status_kb("VmHWM")
  return {
      "preset": _M2_PRESET,
      "length": length,
      "num_params": num_params,
      "compile_s": compile_s,
      "forward_s": times,
      "xla_memory_bytes": xla,
      "rss_before_forward_mb": rss_before_kb / 1024,
      "ru_maxrss_before_forward_mb": maxrss_before_kb / 1024,
      "ru_maxrss_after_forward_mb": maxrss_after_kb / 1024,
      "peak_minus_before_mb": (maxrss_after_kb - rss_before_kb) / 1024,
      "vmhwm_reset": hwm_reset,
      "vmhwm_after_forward_mb": hwm_kb / 1024,
      "vmhwm_minus_before_mb": (hwm_kb - rss_before_kb) / 1024,
  }


def run_memory_subprocess(args) -> dict:
  """Runs `memory_child` in a fresh interpreter; returns its results."""
  cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--memory_child",
      "--memory_length",
      str(args.memory_length),
      "--memory_repeats",
      str(args.memory_repeats),
      "--seed",
      str(args.seed),
  ]
  start = time.perf_counter()
  # The child's progress lines and errors go straight to our stderr.
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
  wall_s = time.perf_counter() - start
  lines = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"memory subprocess failed (rc {proc.returncode})")
  result = json.loads(lines[-1][len("MEMORY ") :])
  result["subprocess_wall_s"] = wall_s
  return result


def _fmt(value, spec: str, missing: str = "n/a") -> str:
  return missing if value is None else format(value, spec)


def print_report(rows, fits, checks, memory) -> None:
  """The README's table, the fits and the memory numbers."""
  print()
  print("| L | M2 ms | dense ms | dense/M2 | dense attention |")
  print("|---:|---:|---:|---:|---|")
  for r in rows:
    dense = r.get("dense")
    ratio = dense["best_ms"] / r["m2"]["best_ms"] if dense else None
    print(
        f"| {r['length']:,} | {r['m2']['best_ms']:.1f} "
        f"| {_fmt(dense and dense['best_ms'], '.1f', 'not run')} "
        f"| {_fmt(ratio, '.2f')} | {r['dense_path'] or 'not run'} |"
    )
  print()
  print(
      "log-log slope (best times, all lengths): M2 "
      f"{_fmt(fits['m2_slope_best'], '.3f')}, dense "
      f"{_fmt(fits['dense_slope_best'], '.3f')}; medians: M2 "
      f"{_fmt(fits['m2_slope_median'], '.3f')}, dense "
      f"{_fmt(fits['dense_slope_median'], '.3f')}; L >= 4096: M2 "
      f"{_fmt(fits['m2_slope_best_from_4096'], '.3f')}, dense "
      f"{_fmt(fits['dense_slope_best_from_4096'], '.3f')}"
  )
  for name in ("m2", "dense"):
    local = ", ".join(
        f"{l}: {_fmt(s, '.2f')}" for l, s in fits[f"{name}_local_slopes"]
    )
    print(f"{name} local slope (to L): {local}")
  cross = fits["crossover_length"]
  note = (
      " (M2 already faster at the shortest length)"
      if fits["crossover_below_range"]
      else ""
  )
  print(
      "crossover (smallest L with M2 faster): "
      f"{_fmt(cross, ',', 'none measured')}{note}; dense/M2 at 8192: "
      f"{_fmt(fits['dense_over_m2_at_8192'], '.2f')}"
  )
  m2_slope = fits["m2_slope_best"]
  print(f"M2 slope <= 1.3: {'n/a' if m2_slope is None else m2_slope <= 1.3}")
  for c in checks:
    print(
        f"blocked attention check L={c['length']}: max|diff| "
        f"{c['max_abs_diff']:.2e}; full {c['full_ms']:.1f} ms vs blocked "
        f"{c['blocked_ms']:.1f} ms"
    )
  if memory:
    xla = memory["xla_memory_bytes"] or {}
    gib = lambda v: _fmt(None if v is None else v / 2**30, ".3f")
    print(
        f"\n{memory['preset']} ({memory['num_params']:,} parameters), "
        f"batch 1 x {memory['length']:,} tokens:"
    )
    print(
        f"  XLA memory analysis: arguments {gib(xla.get('argument'))} GiB, "
        f"output {gib(xla.get('output'))} GiB, temp "
        f"{gib(xla.get('temp'))} GiB"
    )
    print(
        f"  RSS before forward {memory['rss_before_forward_mb']:.0f} MB; "
        f"peak (ru_maxrss) {memory['ru_maxrss_after_forward_mb']:.0f} MB "
        "(before the forward: "
        f"{memory['ru_maxrss_before_forward_mb']:.0f} MB); peak - before "
        f"{memory['peak_minus_before_mb']:.0f} MB; VmHWM reset "
        f"{memory['vmhwm_reset']}: peak - before "
        f"{memory['vmhwm_minus_before_mb']:.0f} MB"
    )
    print(
        f"  forward {', '.join(f'{t:.2f}' for t in memory['forward_s'])} s"
        f" (compile {memory['compile_s']:.1f} s)"
    )


def main():
  args = _parse_args()
  if args.memory_child:
    print("MEMORY " + json.dumps(memory_child(args)), flush=True)
    return
  print(
      f"jax {jax.__version__} devices={jax.devices()} "
      f"cpus={len(os.sched_getaffinity(0))} loadavg={os.getloadavg()}",
      flush=True,
  )
  m2_config = m2_encoder.M2_CONFIGS[_M2_PRESET]
  assert m2_config.hidden_size == _WIDTH, m2_config
  dense_config = transformer_encoder.EncoderConfig(
      hidden_size=_WIDTH,
      num_heads=12,
      intermediate_size=3072,
      max_position_embeddings=32768,
  )
  m2_layer = m2_encoder.M2Layer(m2_config, rngs=nnx.Rngs(args.seed))
  dense_layer = transformer_encoder.EncoderLayer(
      dense_config, rngs=nnx.Rngs(args.seed)
  )
  checks = check_blocked(
      dense_layer, args.check_lengths, args.query_block, args.seed
  )
  rows = [
      measure_length(m2_layer, dense_layer, length, args)
      for length in sorted(args.lengths)
  ]
  fits = summarize(rows)
  memory = None if args.skip_memory else run_memory_subprocess(args)
  print_report(rows, fits, checks, memory)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(
          {
              "args": vars(args),
              "jax": jax.__version__,
              "cpus": len(os.sched_getaffinity(0)),
              "checks": checks,
              "rows": rows,
              "fits": fits,
              "memory": memory,
          },
          f,
          indent=1,
      )
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
