r"""Where the time goes: MiniLM-L6 encoder forward, JAX/XLA vs torch, one thread.

Where a CPU speed target against sentence-transformers is missed, this says why.
This script times, side by side in one process (interleaved rounds, best of
`--repeats`, so background load hits both sides alike), one thread each side
(torch.set_num_threads(1); one XLA CPU device, the process pinned to one
core by `--core`):

  * the six layers' dense matmuls exactly as `models/transformer_encoder.py`
    writes them (q/k/v `bld,dnh->blnh` einsums + bias, output `bqnh,nhd->bqd`,
    FFN `bld,df->blf` / `blf,fd->bld`) against HF BERT's `nn.Linear`s;
  * the attention core (scores, masked float32 softmax, context): the
    project's einsum paths (the former [B, L, N, H] layout and the current
    heads-major one) and `jax.nn.dot_product_attention(implementation=
    "xla")` against torch's `F.scaled_dot_product_attention` (HF's default
    "sdpa") and torch's eager matmul/softmax/matmul path;
  * the elementwise parts: exact-erf GELU on [B, L, F], residual add +
    LayerNorm on [B, L, D] (twice per layer);
  * the whole forward (ids -> token states), and the whole encode path
    (tokenize -> length buckets -> jitted step -> host) against
    `SentenceTransformer.encode` on the same texts, split into host and
    device time;
  * XLA's own view of the jitted forward: `compile().cost_analysis()` (flops,
    bytes), the optimized HLO's fusions, and, where the CPU runtime emits
    per-thunk trace events, a `jax.profiler` op-level time table.

Levers (`--levers`): attention via `jax.nn.dot_product_attention`, bfloat16
compute, smaller/larger pad multiples, and XLA CPU flags (each flag set runs
in a child process, since XLA reads flags once; each child again times torch
in the same process so its ratio stands on its own). Every lever reports
the cosine of its embeddings against the current float32 output.

  taskset -c 0 env PYTHONPATH=. python experiments/benchmarks/profile_encoder.py \
      --out experiments/benchmarks/results/profile_encoder --repeats 5

Writes OUT.json and OUT.md (markdown tables).
"""

import argparse
import contextlib
import functools
import glob
import gzip
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default="../shared/data/scifact")
  p.add_argument("--out", default="/tmp/profile_encoder")
  p.add_argument(
      "--core",
      type=int,
      default=None,
      help="pin to this core (default: first allowed core)",
  )
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--passage_length", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--encode_passages", type=int, default=128)
  p.add_argument("--encode_sentences", type=int, default=1024)
  p.add_argument("--encode_repeats", type=int, default=2)
  p.add_argument("--sections", default="components,hlo,encode,levers,flags")
  p.add_argument(
      "--flag_sets", default="default,ynn_dot,onednn,xnn,no_thunk,eigen_mt"
  )
  # Child mode: one flag set, whole forward only, prints one JSON line.
  p.add_argument("--child_forward", action="store_true")
  p.add_argument("--reference", default="")
  return p.parse_args(argv)


ARGS = _parse_args()
_core = ARGS.core if ARGS.core is not None else min(os.sched_getaffinity(0))
os.sched_setaffinity(0, [_core])
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from retrieval_jax import encoding  # noqa: E402
from retrieval_jax import pretrained  # noqa: E402
from retrieval_jax import sharding  # noqa: E402
from retrieval_jax import steps  # noqa: E402
from retrieval_jax.layers import core  # noqa: E402
from retrieval_jax.models import transformer_encoder as te  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from encode_vs_sentence_transformers import load_texts  # noqa: E402

# pylint: enable=g-import-not-at-top,wrong-import-position

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

FLAG_SETS = {
    "default": "",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "no_thunk": "--xla_cpu_use_thunk_runtime=false",
    "eigen_mt": "--xla_cpu_multi_thread_eigen=true",
}


# ----------------------------------------------------------------- timing


def _block(x):
  if isinstance(x, torch.Tensor):
    return x
  return jax.block_until_ready(x)


def interleaved(fns: dict, repeats: int, inner: int = 1) -> dict:
  """Best-of-`repeats` seconds per call; one call of each fn per round."""
  for fn in fns.values():  # warm-up (compile, allocator)
    _block(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(inner):
        out = fn()
      _block(out)
      times[name].append((time.perf_counter() - start) / inner)
  return {k: min(v) for k, v in times.items()}


# ----------------------------------------------------------------- setup


def load_models():
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top

  model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
  st = SentenceTransformer(str(model_dir), device="cpu")
  st.max_seq_length = ARGS.passage_length
  st.eval()
  loaded = pretrained.load_pretrained(str(model_dir))
  jx = encoding.TextEncoder.from_model(
      loaded, sharding.make_mesh(), max_length=ARGS.passage_length
  )
  return model_dir, st, loaded, jx


def make_batch(jx, texts, width=None):
  """int32 [B, W] ids / mask, W = longest row rounded up to 16 unless given."""
  ids = jx.tokenize(texts)[: ARGS.batch_size]
  w = width or -(-max(len(x) for x in ids) // 16) * 16
  input_ids = np.zeros((len(ids), w), np.int32)
  mask = np.zeros((len(ids), w), np.int32)
  for i, row in enumerate(ids):
    row = row[:w]
    input_ids[i, : len(row)] = row
    mask[i, : len(row)] = 1
  return input_ids, mask


def jax_params(loaded):
  """Per-layer weights as the module holds them (float32)."""
  layers = []
  for layer in loaded.model.layers:
    a, m = layer.attention, layer.mlp
    layers.append({
        k: jnp.asarray(v[...])
        for k, v in {
            "wq": a.query_dnh,
            "bq": a.query_bias_nh,
            "wk": a.key_dnh,
            "bk": a.key_bias_nh,
            "wv": a.value_dnh,
            "bv": a.value_bias_nh,
            "wo": a.out_nhd,
            "bo": a.out_bias_d,
            "wi": m.wi_df,
            "bi": m.bi_f,
            "wf": m.wo_fd,
            "bf": m.bo_d,
            "ln1s": layer.attention_norm.scale_d,
            "ln1b": layer.attention_norm.bias_d,
            "ln2s": layer.mlp_norm.scale_d,
            "ln2b": layer.mlp_norm.bias_d,
        }.items()
    })
  return layers


# ----------------------------------------------------------------- components


def jax_components(cfg):
  """Jitted single-layer pieces, written as the project's layer writes them."""
  n, h = cfg.num_heads, cfg.head_dim
  gelu = te.ACTIVATIONS[cfg.hidden_act]
  eps = cfg.layer_norm_eps

  @jax.jit
  def qkv(x, p):
    q = jnp.einsum("bld,dnh->blnh", x, p["wq"]) + p["bq"]
    k = jnp.einsum("bld,dnh->blnh", x, p["wk"]) + p["bk"]
    v = jnp.einsum("bld,dnh->blnh", x, p["wv"]) + p["bv"]
    return q * jnp.asarray(1.0 / math.sqrt(h), q.dtype), k, v

  @jax.jit
  def attn_out(ctx, p):
    return jnp.einsum("bqnh,nhd->bqd", ctx, p["wo"]) + p["bo"]

  @jax.jit
  def ffn_up(x, p):
    return jnp.einsum("bld,df->blf", x, p["wi"]) + p["bi"]

  @jax.jit
  def ffn_down(y, p):
    return jnp.einsum("blf,fd->bld", y, p["wf"]) + p["bf"]

  @jax.jit
  def gelu_only(y):
    return gelu(y)

  @jax.jit
  def add_ln(x, y, p):
    return core.layer_norm(x + y, p["ln1s"], p["ln1b"], eps)

  @jax.jit
  def attn_core_project(q, k, v, mask):
    # transformer_encoder.SelfAttention before the heads-major change.
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k)
    bias = jnp.where(mask.astype(bool), 0.0, te._MASK_BIAS)  # pylint: disable=protected-access
    logits = logits.astype(jnp.float32) + bias[:, None, None, :]
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)

  @jax.jit
  def attn_core_heads_major(q, k, v, mask):
    # The library's layout since the heads-major change: q/k/v come out of
    # the projections as [B, N, L, H] (transposes here stand for that).
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k)
    bias = jnp.where(mask.astype(bool), 0.0, te._MASK_BIAS)  # pylint: disable=protected-access
    logits = logits.astype(jnp.float32) + bias[:, None, None, :]
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnqk,bnkh->bnqh", probs, v)

  @jax.jit
  def attn_core_scores(q, k):
    return jnp.einsum("bqnh,bknh->bnqk", q, k)

  @jax.jit
  def attn_core_softmax(logits, mask):
    bias = jnp.where(mask.astype(bool), 0.0, te._MASK_BIAS)  # pylint: disable=protected-access
    return jax.nn.softmax(logits + bias[:, None, None, :], axis=-1)

  @jax.jit
  def attn_core_context(probs, v):
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)

  @jax.jit
  def attn_core_dpa(q, k, v, mask):
    # q is pre-scaled, so scale=1.
    m = mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(
        q, k, v, mask=m, scale=1.0, implementation="xla"
    )

  del n
  return dict(
      qkv=qkv,
      attn_out=attn_out,
      ffn_up=ffn_up,
      ffn_down=ffn_down,
      gelu=gelu_only,
      add_ln=add_ln,
      attn_core_project=attn_core_project,
      attn_core_heads_major=attn_core_heads_major,
      attn_scores=attn_core_scores,
      attn_softmax=attn_core_softmax,
      attn_context=attn_core_context,
      attn_core_dpa=attn_core_dpa,
  )


def torch_layer(st, i):
  return st[0].auto_model.encoder.layer[i]


def section_components(st, loaded, jx, texts_by_kind):
  cfg = loaded.config
  d, n, h, f = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.head_dim,
      cfg.intermediate_size,
  )
  params = jax_params(loaded)[0]
  jc = jax_components(cfg)
  tl = torch_layer(st, 0)
  sa = tl.attention.self
  results = {}
  for kind, (texts, width) in texts_by_kind.items():
    ids, mask = make_batch(jx, texts, width)
    b, l = ids.shape
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((b, l, d), np.float32)
    y_np = rng.standard_normal((b, l, f), np.float32)
    ctx_np = rng.standard_normal((b, l, n, h), np.float32) * 0.1
    q_np, k_np, v_np = (
        rng.standard_normal((b, l, n, h), np.float32) * 0.5 for _ in range(3)
    )
    logits_np = rng.standard_normal((b, n, l, l), np.float32)
    x, y, ctx = jnp.asarray(x_np), jnp.asarray(y_np), jnp.asarray(ctx_np)
    q, k, v = jnp.asarray(q_np), jnp.asarray(k_np), jnp.asarray(v_np)
    logits = jnp.asarray(logits_np)
    probs = jax.nn.softmax(logits, -1)
    m = jnp.asarray(mask)
    tx, ty = torch.from_numpy(x_np), torch.from_numpy(y_np)
    tctx = torch.from_numpy(ctx_np).reshape(b, l, d)
    # torch attention inputs in HF's [B, N, L, H] (transposed views).
    tq, tk, tv = (
        torch.from_numpy(a).transpose(1, 2) for a in (q_np, k_np, v_np)
    )
    tmask = torch.from_numpy(mask).bool()
    tadd = torch.zeros((b, 1, 1, l), dtype=torch.float32).masked_fill(
        ~tmask[:, None, None, :], torch.finfo(torch.float32).min
    )
    tlogits = torch.from_numpy(logits_np)
    tprobs = torch.softmax(tlogits, -1)

    def t_qkv():
      hs = (b, l, n, h)
      return (
          sa.query(tx).view(hs).transpose(1, 2),
          sa.key(tx).view(hs).transpose(1, 2),
          sa.value(tx).view(hs).transpose(1, 2),
      )

    def t_sdpa():
      o = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tadd, scale=1.0)
      return o.transpose(1, 2).contiguous()

    def t_eager():
      s = torch.matmul(tq, tk.transpose(2, 3)) + tadd
      p = torch.softmax(s, dim=-1)
      return torch.matmul(p, tv).transpose(1, 2).contiguous()

    pairs = {
        "qkv": (lambda: jc["qkv"](x, params), t_qkv, 3 * 2 * b * l * d * d),
        "attn_out": (
            lambda: jc["attn_out"](ctx, params),
            lambda: tl.attention.output.dense(tctx),
            2 * b * l * d * d,
        ),
        "ffn_up": (
            lambda: jc["ffn_up"](x, params),
            lambda: tl.intermediate.dense(tx),
            2 * b * l * d * f,
        ),
        "ffn_down": (
            lambda: jc["ffn_down"](y, params),
            lambda: tl.output.dense(ty),
            2 * b * l * d * f,
        ),
        "gelu": (lambda: jc["gelu"](y), lambda: F.gelu(ty), 0),
        "add_layernorm": (
            lambda: jc["add_ln"](x, x, params),
            lambda: tl.output.LayerNorm(tx + tx),
            0,
        ),
        "attn_scores": (
            lambda: jc["attn_scores"](q, k),
            lambda: torch.matmul(tq, tk.transpose(2, 3)),
            2 * b * n * l * l * h,
        ),
        "attn_softmax": (
            lambda: jc["attn_softmax"](logits, m),
            lambda: torch.softmax(tlogits + tadd, -1),
            0,
        ),
        "attn_context": (
            lambda: jc["attn_context"](probs, v),
            lambda: torch.matmul(tprobs, tv).transpose(1, 2).contiguous(),
            2 * b * n * l * l * h,
        ),
        "attn_core (former [B,L,N,H] einsums | torch sdpa)": (
            lambda: jc["attn_core_project"](q, k, v, m),
            t_sdpa,
            4 * b * n * l * l * h,
        ),
        "attn_core (heads-major einsums, library now | torch sdpa)": (
            lambda: jc["attn_core_heads_major"](q, k, v, m),
            t_sdpa,
            4 * b * n * l * l * h,
        ),
        "attn_core (jax.nn.dot_product_attention xla | torch eager)": (
            lambda: jc["attn_core_dpa"](q, k, v, m),
            t_eager,
            4 * b * n * l * l * h,
        ),
    }
    fns = {}
    for name, (fj, ft, _) in pairs.items():
      fns[("jax", name)] = fj
      fns[("torch", name)] = ft

    # Whole forward (ids -> token states), both sides.
    model = loaded.model
    fwd = jax.jit(lambda model, i, mk: model(i, mk))
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    tids, tm = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    am = st[0].auto_model
    fns[("jax", "whole_forward")] = lambda: fwd(model, jids, jmask)
    fns[("torch", "whole_forward")] = lambda: am(
        input_ids=tids, attention_mask=tm
    ).last_hidden_state
    with torch.inference_mode():
      best = interleaved(fns, ARGS.repeats)
    per_layer_names = list(pairs)
    rows = []
    whole = {s: best[(s, "whole_forward")] for s in ("jax", "torch")}
    counts = {"add_layernorm": 2}  # two residual LayerNorms per layer
    for name in per_layer_names:
      flops = pairs[name][2]
      c = counts.get(name, 1)
      tj, tt = best[("jax", name)], best[("torch", name)]
      rows.append({
          "component": name,
          "calls_per_forward": 6 * c,
          "jax_ms_per_forward": 1e3 * tj * 6 * c,
          "torch_ms_per_forward": 1e3 * tt * 6 * c,
          "jax_share": tj * 6 * c / whole["jax"],
          "torch_share": tt * 6 * c / whole["torch"],
          "torch_over_jax": tt / tj,
          "jax_gflops": flops / tj / 1e9 if flops else None,
          "torch_gflops": flops / tt / 1e9 if flops else None,
      })
    rows.append({
        "component": "whole_forward",
        "calls_per_forward": 1,
        "jax_ms_per_forward": 1e3 * whole["jax"],
        "torch_ms_per_forward": 1e3 * whole["torch"],
        "jax_share": 1.0,
        "torch_share": 1.0,
        "torch_over_jax": whole["torch"] / whole["jax"],
        "jax_gflops": None,
        "torch_gflops": None,
    })
    results[kind] = {
        "batch": [b, l],
        "real_tokens": int(mask.sum()),
        "rows": rows,
    }
    print(
        f"[components] {kind} {b}x{l}: whole forward jax "
        f"{1e3 * whole['jax']:.0f} ms, torch {1e3 * whole['torch']:.0f} ms",
        flush=True,
    )
  return results


# ----------------------------------------------------------------- HLO


def section_hlo(loaded, jx, passages):
  ids, mask = make_batch(jx, passages, ARGS.passage_length)
  fwd = jax.jit(lambda model, i, mk: model(i, mk))
  lowered = fwd.lower(loaded.model, jnp.asarray(ids), jnp.asarray(mask))
  compiled = lowered.compile()
  out = {}
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out["cost_analysis"] = {
        k: float(v)
        for k, v in ca.items()
        if k
        in (
            "flops",
            "bytes accessed",
            "transcendentals",
            "optimal_seconds",
            "utilization",
        )
    }
  except Exception as e:  # pylint: disable=broad-except
    out["cost_analysis_error"] = repr(e)
  text = compiled.as_text()
  out["hlo_chars"] = len(text)
  entry = text[text.find("ENTRY") :]
  ops = re.findall(r"=\s+\S+\s+(\w[\w-]*)\(", entry)
  out["entry_ops"] = {}
  for o in ops:
    out["entry_ops"][o] = out["entry_ops"].get(o, 0) + 1
  out["fusion_kinds"] = {}
  for kind in re.findall(r"kind=(k\w+)", entry):
    out["fusion_kinds"][kind] = out["fusion_kinds"].get(kind, 0) + 1
  hlo_path = pathlib.Path(ARGS.out + ".forward_hlo.txt")
  hlo_path.parent.mkdir(parents=True, exist_ok=True)
  hlo_path.write_text(text)
  out["hlo_file"] = str(hlo_path)

  # Op-level times from the profiler: the thunk runtime emits one trace
  # event per thunk (fusion / dot / custom call) when tracing is on.
  jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
  jax.block_until_ready(fwd(loaded.model, jids, jmask))
  with tempfile.TemporaryDirectory() as tmp:
    try:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(2):
          jax.block_until_ready(fwd(loaded.model, jids, jmask))
      traces = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
      events = json.load(gzip.open(traces[0]))
      events = (
          events.get("traceEvents", events)
          if isinstance(events, dict)
          else events
      )
      per = {}
      total = 0.0
      for ev in events:
        if ev.get("ph") != "X":
          continue
        name = ev.get("name", "")
        dur = float(ev.get("dur", 0)) / 2  # per forward (2 traced runs)
        per.setdefault(name, [0.0, 0])
        per[name][0] += dur
        per[name][1] += 1
      # Group thunk names by op family (fusion.12 -> fusion).
      fam = {}
      for name, (dur, cnt) in per.items():
        key = re.sub(r"[._]\d+$", "", name)
        key = re.sub(r"\.\d+", "", key)
        fam.setdefault(key, [0.0, 0])
        fam[key][0] += dur
        fam[key][1] += cnt
      top = sorted(per.items(), key=lambda kv: -kv[1][0])[:40]
      out["trace_top_events_us"] = [
          [k, round(v[0], 1), v[1] // 2] for k, v in top
      ]
      out["trace_all_us"] = [[k, v[0], v[1] // 2] for k, v in per.items()]
      out["trace_families_us"] = sorted(
          ([k, round(v[0], 1), v[1] // 2] for k, v in fam.items()),
          key=lambda r: -r[1],
      )[:30]
      del total
    except Exception as e:  # pylint: disable=broad-except
      out["trace_error"] = repr(e)
  # Map fusion names to what they compute (ops inside each fused body).
  bodies = {}
  for m in re.finditer(r"\n%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", text, re.S):
    body = m.group(2)
    has = [
        o
        for o in (
            "dot",
            "convolution",
            "exponential",
            "erf",
            "reduce",
            "rsqrt",
            "divide",
            "tanh",
            "transpose",
            "copy",
        )
        if f" {o}(" in body
    ]
    # jnp-level names inside the fusion (erfc: GELU, square/rsqrt: LayerNorm).
    has += sorted(
        {n.split("/")[-1] for n in re.findall(r'op_name="([^"]*)"', body)}
        - set(has)
    )
    bodies[m.group(1)] = has
  fmap = {}
  for m in re.finditer(
      r"\n\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*? (fusion|dot|copy|"
      r"transpose|reduce|custom-call)\((.*)",
      entry,
  ):
    name, op, rest = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    contents = bodies.get(called.group(1), []) if called else [op]
    kind = re.search(r"kind=(k\w+)", rest)
    meta = re.search(r'op_name="([^"]*)"', rest)
    fmap[name] = {
        "op": op,
        "kind": kind.group(1) if kind else "",
        "contents": contents,
        "op_name": meta.group(1)[-60:] if meta else "",
    }
  out["fusion_map"] = fmap

  specs = {
      "bld,dnh->blnh": "qkv matmuls",
      "bqnh,nhd->bqd": "attn out matmul",
      "bld,df->blf": "ffn up matmul",
      "blf,fd->bld": "ffn down matmul",
      "bqnh,bknh->bnqk": "attn scores matmul",
      "bnqk,bknh->bqnh": "attn context matmul",
  }

  def category(info):
    c = info.get("contents", [])
    if "dot" in c or "convolution" in c or info.get("op") == "dot":
      label = next(
          (v for k, v in specs.items() if k in info.get("op_name", "")),
          "other matmul",
      )
      fused = [o for o in ("exp", "erfc", "rsqrt") if o in c]
      return label + (f" (+ fused {'/'.join(fused)})" if fused else "")
    if "erf" in c or "erfc" in c or "tanh" in c:
      return "gelu"
    if "exponential" in c or "exp" in c or "reduce_max" in c:
      return "softmax (exp, reductions)"
    if "rsqrt" in c or "square" in c or "reduce_sum" in c:
      return "layernorm (+ residual add)"
    return "other (copies, transposes, adds, gathers)"

  if "trace_top_events_us" in out:
    cats = {}
    total = 0.0
    for name, us, _ in out.pop("trace_all_us"):
      if name not in fmap:
        continue
      c = category(fmap[name])
      cats[c] = cats.get(c, 0.0) + us
      total += us
    out["trace_categories_us"] = {
        k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])
    }
    out["trace_thunks_total_us"] = round(total, 1)
  return out


# ----------------------------------------------------------------- encode


def section_encode(st, jx, texts_by_kind):
  out = {}
  for kind, texts in texts_by_kind.items():
    bs = ARGS.batch_size

    def run_st():
      return st.encode(
          texts, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True
      )

    def run_jax():
      return jx.encode(texts, batch_size=bs, progress=False)

    def st_tokenize():
      lens = np.argsort([-len(t) for t in texts])
      for i in range(0, len(texts), bs):
        st.tokenize([texts[j] for j in lens[i : i + bs]])

    def jax_tokenize():
      return jx.tokenize(texts)

    ids = jx.tokenize(texts)

    def jax_pad():
      return list(
          jx._batches(
              ids,
              batch_size=bs,
              pad_multiple=16,  # pylint: disable=protected-access
              max_length=jx.max_length,
          )
      )

    batches = jax_pad()

    def jax_device():  # the jitted step alone, inputs already padded
      outs = [jx._step(jx.state, b) for _, b in batches]  # pylint: disable=protected-access
      return jax.block_until_ready(outs)

    def jax_device_put_only():
      return jax.block_until_ready([jax.device_put(b) for _, b in batches])

    fns = {
        "st.encode": run_st,
        "jax.encode": run_jax,
        "st.tokenize": st_tokenize,
        "jax.tokenize": jax_tokenize,
        "jax.pad_batches": jax_pad,
        "jax.step_only": jax_device,
        "jax.device_put": jax_device_put_only,
    }
    with torch.inference_mode():
      best = interleaved(fns, ARGS.encode_repeats)
    emb_j, emb_s = run_jax(), run_st()
    cos = float(
        (
            np.sum(emb_j * emb_s, -1)
            / (np.linalg.norm(emb_j, axis=-1) * np.linalg.norm(emb_s, axis=-1))
        ).min()
    )
    n = len(texts)
    out[kind] = {
        "texts": n,
        "tokens_per_text": float(np.mean([len(x) for x in ids])),
        "padded_tokens": int(sum(b["input_ids"].size for _, b in batches)),
        "seconds": best,
        "texts_per_s": {
            "st": n / best["st.encode"],
            "jax": n / best["jax.encode"],
        },
        "ratio_st_over_jax": best["st.encode"] / best["jax.encode"],
        "host_share_jax": (
            (best["jax.tokenize"] + best["jax.pad_batches"])
            / best["jax.encode"]
        ),
        "host_share_st_tokenize": best["st.tokenize"] / best["st.encode"],
        "min_cos_vs_st": cos,
    }
    print(
        f"[encode] {kind}: st {n / best['st.encode']:.1f} texts/s, jax "
        f"{n / best['jax.encode']:.1f} texts/s, ratio "
        f"{best['st.encode'] / best['jax.encode']:.2f}",
        flush=True,
    )
  return out


# ----------------------------------------------------------------- levers


def _dpa_self_attention_call(self, x_bld, mask_bl, *, deterministic, rng):
  """SelfAttention.__call__ with the core via jax.nn.dot_product_attention."""
  del rng
  assert deterministic
  dt = self.dtype
  q = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.query_dnh[...].astype(dt)
  ) + self.query_bias_nh[...].astype(dt)
  k = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.key_dnh[...].astype(dt)
  ) + self.key_bias_nh[...].astype(dt)
  v = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.value_dnh[...].astype(dt)
  ) + self.value_bias_nh[...].astype(dt)
  ctx = jax.nn.dot_product_attention(
      q, k, v, mask=mask_bl.astype(bool)[:, None, None, :], implementation="xla"
  )
  return jnp.einsum(
      "bqnh,nhd->bqd", ctx, self.out_nhd[...].astype(dt)
  ) + self.out_bias_d[...].astype(dt)


def _flat_self_attention_call(self, x_bld, mask_bl, *, deterministic, rng):
  """SelfAttention.__call__ with the projections as plain 2-D matmuls:
  one fused [D, 3·N·H] QKV GEMM and a [N·H, D] output GEMM (torch's layout);
  the attention core is the project's, verbatim."""
  del rng
  assert deterministic
  dt = self.dtype
  b, l, d = x_bld.shape
  n, h = self.query_bias_nh.shape
  w = jnp.concatenate(
      [
          self.query_dnh[...].reshape(d, n * h),
          self.key_dnh[...].reshape(d, n * h),
          self.value_dnh[...].reshape(d, n * h),
      ],
      1,
  ).astype(dt)
  bias = jnp.concatenate([
      self.query_bias_nh[...].reshape(-1),
      self.key_bias_nh[...].reshape(-1),
      self.value_bias_nh[...].reshape(-1),
  ]).astype(dt)
  qkv = (x_bld.reshape(b * l, d) @ w + bias).reshape(b, l, 3, n, h)
  q_blnh, k_blnh, v_blnh = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  q_blnh = q_blnh * jnp.asarray(1.0 / math.sqrt(h), dt)
  logits_bnqk = jnp.einsum("bqnh,bknh->bnqk", q_blnh, k_blnh)
  bias_bk = jnp.where(mask_bl.astype(bool), 0.0, te._MASK_BIAS)  # pylint: disable=protected-access
  logits_bnqk = logits_bnqk.astype(jnp.float32) + bias_bk[:, None, None, :]
  probs_bnqk = jax.nn.softmax(logits_bnqk, axis=-1).astype(dt)
  context_bqnh = jnp.einsum("bnqk,bknh->bqnh", probs_bnqk, v_blnh)
  out = context_bqnh.reshape(b * l, n * h) @ self.out_nhd[...].reshape(
      n * h, d
  ).astype(dt)
  return (out + self.out_bias_d[...].astype(dt)).reshape(b, l, d)


@contextlib.contextmanager
def _patched_attention(fn):
  orig = te.SelfAttention.__call__
  te.SelfAttention.__call__ = fn
  try:
    yield
  finally:
    te.SelfAttention.__call__ = orig


def _encode_fn(loaded):
  """jitted encode step (mean pool + L2) for a model; fresh trace each call."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  g, s = nnx.split(loaded.model)
  step = jax.jit(
      functools.partial(steps.encode_step, g, pooling="mean", normalize=True)
  )
  return lambda batch: step(s, batch)


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(
      (
          np.sum(a * b, -1)
          / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
      ).min()
  )


def section_levers(st, loaded, jx, texts_by_kind, raw_texts):
  out = {}
  model_dir = loaded.model_dir
  bf16 = pretrained.load_pretrained(str(model_dir), dtype=jnp.bfloat16)
  am = st[0].auto_model
  for kind, (texts, width) in texts_by_kind.items():
    ids, mask = make_batch(jx, texts, width)
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "token_type_ids": jnp.zeros_like(jnp.asarray(ids)),
    }
    base = _encode_fn(loaded)
    with _patched_attention(_dpa_self_attention_call):
      dpa = _encode_fn(loaded)
      jax.block_until_ready(dpa(batch))  # trace while patched
    with _patched_attention(_flat_self_attention_call):
      flat = _encode_fn(loaded)
      jax.block_until_ready(flat(batch))
    bf = _encode_fn(bf16)
    tids, tm = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()

    def torch_fwd():
      return am(input_ids=tids, attention_mask=tm).last_hidden_state

    fns = {
        "current": lambda: base(batch),
        "dot_product_attention": lambda: dpa(batch),
        "2-D projections, fused QKV": lambda: flat(batch),
        "bfloat16": lambda: bf(batch),
        "torch": torch_fwd,
    }
    with torch.inference_mode():
      best = interleaved(fns, ARGS.repeats)
    ref = np.asarray(base(batch))
    rows = ids.shape[0]
    out[kind] = {
        name: {
            "ms": 1e3 * t,
            "torch_over_this": best["torch"] / t,
            "speedup_vs_current": best["current"] / t,
            "min_cos_vs_current": (
                _cos(np.asarray(fns[name]())[:rows], ref)
                if name != "torch"
                else None
            ),
        }
        for name, t in best.items()
    }
    print(
        f"[levers] {kind}: "
        + ", ".join(
            f"{k} {v['ms']:.0f} ms (cos {v['min_cos_vs_current']})"
            for k, v in out[kind].items()
        ),
        flush=True,
    )

  # Pad multiples on the whole encode path (compile excluded: warm-up).
  pm = {}
  for kind, texts in raw_texts.items():
    ref = jx.encode(texts, batch_size=ARGS.batch_size, progress=False)
    fns = {
        m: functools.partial(
            jx.encode,
            texts,
            batch_size=ARGS.batch_size,
            pad_multiple=m,
            progress=False,
        )
        for m in ((8, 16, 32) if kind == "sentences" else (8, 16))
    }
    best = interleaved(fns, ARGS.encode_repeats)
    ids = jx.tokenize(texts)
    pm[kind] = {
        str(m): {
            "s": t,
            "speedup_vs_16": best[16] / t,
            "padded_tokens": int(
                sum(
                    b["input_ids"].size
                    for _, b in jx._batches(
                        ids,
                        batch_size=ARGS.batch_size,  # pylint: disable=protected-access
                        pad_multiple=m,
                        max_length=jx.max_length,
                    )
                )
            ),
            "min_cos_vs_16": _cos(fns[m](), ref),
        }
        for m, t in best.items()
    }
    print(
        f"[levers] pad multiples {kind}: "
        + ", ".join(f"{m}: {v['s']:.2f}s" for m, v in pm[kind].items()),
        flush=True,
    )
  out["pad_multiple"] = pm
  return out


def child_forward(st, loaded, jx, texts_by_kind):
  """One flag set: current encode step vs torch, cos vs the reference."""
  ref = np.load(ARGS.reference) if ARGS.reference else None
  res = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
  base = _encode_fn(loaded)
  am = st[0].auto_model
  for kind, (texts, width) in texts_by_kind.items():
    ids, mask = make_batch(jx, texts, width)
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "token_type_ids": jnp.zeros_like(jnp.asarray(ids)),
    }
    tids, tm = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    fns = {
        "jax": lambda: base(batch),
        "torch": (
            lambda: am(input_ids=tids, attention_mask=tm).last_hidden_state
        ),
    }
    with torch.inference_mode():
      best = interleaved(fns, ARGS.repeats)
    emb = np.asarray(base(batch))
    res[kind] = {
        "jax_ms": 1e3 * best["jax"],
        "torch_ms": 1e3 * best["torch"],
        "torch_over_jax": best["torch"] / best["jax"],
    }
    if ref is not None:
      res[kind]["min_cos_vs_default"] = _cos(emb, ref[kind])
    else:
      res[kind]["embeddings"] = emb.tolist()
  print("CHILD_JSON " + json.dumps(res), flush=True)


def section_flags(texts_by_kind_unused):
  del texts_by_kind_unused
  script = str(pathlib.Path(__file__).resolve())
  common = [
      sys.executable,
      script,
      "--child_forward",
      "--data",
      ARGS.data,
      "--core",
      str(_core),
      "--repeats",
      str(ARGS.repeats),
      "--batch_size",
      str(ARGS.batch_size),
  ]
  out = {}
  ref_path = ARGS.out + ".default_emb.npz"
  for name in ARGS.flag_sets.split(","):
    env = dict(os.environ)
    env["XLA_FLAGS"] = FLAG_SETS[name]
    cmd = list(common)
    if name != "default":
      cmd += ["--reference", ref_path]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=False
    )
    line = [l for l in proc.stdout.splitlines() if l.startswith("CHILD_JSON ")]
    if not line:
      out[name] = {"error": (proc.stderr or proc.stdout)[-800:]}
      print(f"[flags] {name}: failed", flush=True)
      continue
    res = json.loads(line[0][len("CHILD_JSON ") :])
    if name == "default":
      np.savez(
          ref_path,
          **{
              k: np.asarray(v["embeddings"], np.float32)
              for k, v in res.items()
              if isinstance(v, dict)
          },
      )
      for v in res.values():
        if isinstance(v, dict):
          v.pop("embeddings")
          v["min_cos_vs_default"] = 1.0
    out[name] = res
    print(
        f"[flags] {name}: "
        + ", ".join(
            f"{k} {v['torch_over_jax']:.2f}x (cos"
            f" {v['min_cos_vs_default']:.7f})"
            for k, v in res.items()
            if isinstance(v, dict)
        ),
        flush=True,
    )
  return out


# ----------------------------------------------------------------- report


def _md(report) -> str:
  lines = [
      f"# Encoder profile ({report['env']['cpu']})",
      "",
      f"env: {json.dumps(report['env'])}",
      "",
  ]
  for kind, res in report.get("components", {}).items():
    b, l = res["batch"]
    lines += [
        (
            f"## Components, {kind}: batch {b} x {l} tokens "
            f"({res['real_tokens']} real), fp32, 1 thread each"
        ),
        "",
        (
            "| component | calls | XLA ms | torch ms | XLA share | torch share"
            " | torch/XLA | XLA GFLOP/s | torch GFLOP/s |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
      g = lambda v: "" if v is None else f"{v:.1f}"
      lines.append(
          f"| {r['component']} | {r['calls_per_forward']} | "
          f"{r['jax_ms_per_forward']:.1f} | {r['torch_ms_per_forward']:.1f} | "
          f"{100 * r['jax_share']:.1f}% | {100 * r['torch_share']:.1f}% | "
          f"{r['torch_over_jax']:.2f} | {g(r['jax_gflops'])} | "
          f"{g(r['torch_gflops'])} |"
      )
    lines.append("")
  if "encode" in report:
    lines += [
        "## Whole encode path (texts -> normalised embeddings)",
        "",
        (
            "| texts | st texts/s | ours texts/s | ratio | our tokenize s |"
            " our pad s | our step-only s | st tokenize s | st encode s |"
            " ours encode s | min cos |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, r in report["encode"].items():
      s = r["seconds"]
      lines.append(
          f"| {r['texts']} {kind} ({r['tokens_per_text']:.0f} tok) | "
          f"{r['texts_per_s']['st']:.1f} | {r['texts_per_s']['jax']:.1f} | "
          f"{r['ratio_st_over_jax']:.2f} | {s['jax.tokenize']:.3f} | "
          f"{s['jax.pad_batches']:.3f} | {s['jax.step_only']:.2f} | "
          f"{s['st.tokenize']:.3f} | {s['st.encode']:.2f} | "
          f"{s['jax.encode']:.2f} | {r['min_cos_vs_st']:.7f} |"
      )
    lines.append("")
  if "levers" in report:
    lines += [
        "## Levers (one batch, encode step)",
        "",
        (
            "| batch | variant | ms | torch/this | vs current | min cos vs"
            " current |"
        ),
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, r in report["levers"].items():
      if kind == "pad_multiple":
        continue
      for name, v in r.items():
        c = v["min_cos_vs_current"]
        lines.append(
            f"| {kind} | {name} | {v['ms']:.0f} | "
            f"{v['torch_over_this']:.2f} | "
            f"{v['speedup_vs_current']:.2f} | "
            f"{'' if c is None else f'{c:.7f}'} |"
        )
    lines += [
        "",
        (
            "| texts | pad multiple | encode s | padded tokens |"
            " speed-up vs 16 | min cos vs 16 |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, r in report["levers"].get("pad_multiple", {}).items():
      for m, v in r.items():
        lines.append(
            f"| {kind} | {m} | {v['s']:.2f} | {v['padded_tokens']} | "
            f"{v['speedup_vs_16']:.2f} | {v['min_cos_vs_16']:.7f} |"
        )
    lines.append("")
  if "flags" in report:
    lines += [
        "## XLA CPU flags (child process each; encode step vs torch)",
        "",
        (
            "| flags | batch | XLA ms | torch ms | torch/XLA | min cos vs"
            " default |"
        ),
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in report["flags"].items():
      if "error" in r:
        lines.append(f"| {name} | error | | | | |")
        continue
      for kind, v in r.items():
        if isinstance(v, dict):
          lines.append(
              f"| `{r['xla_flags'] or '(none)'}` | {kind} | "
              f"{v['jax_ms']:.0f} | {v['torch_ms']:.0f} | "
              f"{v['torch_over_jax']:.2f} | "
              f"{v['min_cos_vs_default']:.7f} |"
          )
    lines.append("")
  if "hlo" in report:
    h = report["hlo"]
    lines += [
        "## XLA's view of the passage forward",
        "",
        f"cost_analysis: {json.dumps(h.get('cost_analysis'))}",
        "",
        f"entry ops: {json.dumps(h.get('entry_ops'))}",
        "",
    ]
    if "trace_top_events_us" in h:
      lines += [
          (
              "| trace event | us per forward | count | what (fusion root /"
              " contents) |"
          ),
          "|---|---:|---:|---|",
      ]
      for name, us, cnt in h["trace_top_events_us"][:25]:
        what = h.get("fusion_map", {}).get(name, {})
        what = (
            ",".join(what.get("contents", [])) + " " + what.get("op_name", "")
        ).strip()
        lines.append(f"| {name} | {us:.0f} | {cnt} | {what} |")
      lines += [
          "",
          "| category (XLA thunks, profiler) | us per forward | share |",
          "|---|---:|---:|",
      ]
      tot = h.get("trace_thunks_total_us", 0) or 1
      for c, us in h.get("trace_categories_us", {}).items():
        lines.append(f"| {c} | {us:.0f} | {100 * us / tot:.1f}% |")
    else:
      lines.append(f"trace: {h.get('trace_error')}")
    lines.append("")
  return "\n".join(lines)


def main():
  sections = set(ARGS.sections.split(","))
  model_dir, st, loaded, jx = load_models()
  del model_dir
  data = pathlib.Path(ARGS.data)
  passages = load_texts(data, "passages", max(ARGS.encode_passages, 256))
  sentences = load_texts(data, "sentences", max(ARGS.encode_sentences, 256))
  # Batches for the component timings: the first 64 passages at 256 tokens
  # (nearly all reach it), the 64 longest of the first sentences at their
  # padded width (multiple of 16).
  sent_ids = jx.tokenize(sentences)
  order = np.argsort([len(x) for x in sent_ids])
  mid = order[len(order) // 2 - ARGS.batch_size // 2 :][: ARGS.batch_size]
  sent_batch = [sentences[i] for i in mid]  # median-length sentences
  by_kind = {
      "passages": (passages[: ARGS.batch_size], ARGS.passage_length),
      "sentences": (sent_batch, None),
  }
  if ARGS.child_forward:
    child_forward(st, loaded, jx, by_kind)
    return
  report = {
      "env": {
          "cpu": next(
              (
                  l.split(":", 1)[1].strip()
                  for l in open("/proc/cpuinfo")
                  if l.startswith("model name")
              ),
              "?",
          ),
          "core": _core,
          "loadavg_start": os.getloadavg(),
          "python": platform.python_version(),
          "jax": jax.__version__,
          "torch": torch.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "torch_threads": torch.get_num_threads(),
          "devices": str(jax.devices()),
      }
  }
  raw = {
      "passages": passages[: ARGS.encode_passages],
      "sentences": sentences[: ARGS.encode_sentences],
  }
  if "components" in sections:
    report["components"] = section_components(st, loaded, jx, by_kind)
  if "hlo" in sections:
    report["hlo"] = section_hlo(loaded, jx, passages)
  if "encode" in sections:
    report["encode"] = section_encode(st, jx, raw)
  if "levers" in sections:
    report["levers"] = section_levers(st, loaded, jx, by_kind, raw)
  if "flags" in sections:
    report["flags"] = section_flags(by_kind)
  report["env"]["loadavg_end"] = os.getloadavg()
  out = pathlib.Path(ARGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=1))
  out.with_suffix(".md").write_text(_md(report))
  print(_md(report))


if __name__ == "__main__":
  main()
