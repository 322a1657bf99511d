r"""A/B: SelfAttention with [B, L, N, H] (before) vs heads-major [B, N, L, H]
(now) attention einsums; whole encode step, one thread, vs torch, same process.

  taskset -c 0 env PYTHONPATH=. python experiments/benchmarks/ab_attention_layout.py

Rounds interleaved (before, now, torch), best of --repeats; prints min cosine
of the new embeddings against the old ones (fp32 parity).
"""

import argparse
import functools
import math
import os
import pathlib
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--data", default="../shared/data/scifact")
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--batch_size", type=int, default=64)
ARGS = p.parse_args()
os.sched_setaffinity(0, [min(os.sched_getaffinity(0))])

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from encode_vs_sentence_transformers import load_texts  # noqa: E402
from retrieval_jax import pretrained, steps  # noqa: E402
from retrieval_jax.data import tokenizers  # noqa: E402
from retrieval_jax.layers import core  # noqa: E402
from retrieval_jax.models import transformer_encoder as te  # noqa: E402

torch.set_num_threads(1)


def before_call(self, x_bld, mask_bl, *, deterministic, rng):
  """SelfAttention.__call__ as it was before the heads-major change."""
  dt = self.dtype
  q_blnh = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.query_dnh[...].astype(dt)
  ) + self.query_bias_nh[...].astype(dt)
  k_blnh = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.key_dnh[...].astype(dt)
  ) + self.key_bias_nh[...].astype(dt)
  v_blnh = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.value_dnh[...].astype(dt)
  ) + self.value_bias_nh[...].astype(dt)
  q_blnh = q_blnh * jnp.asarray(1.0 / math.sqrt(q_blnh.shape[-1]), dt)
  logits_bnqk = jnp.einsum("bqnh,bknh->bnqk", q_blnh, k_blnh)
  bias_bk = jnp.where(mask_bl.astype(bool), 0.0, te._MASK_BIAS)  # pylint: disable=protected-access
  logits_bnqk = logits_bnqk.astype(jnp.float32) + bias_bk[
      :, None, None, :
  ].astype(jnp.float32)
  probs_bnqk = jax.nn.softmax(logits_bnqk, axis=-1).astype(dt)
  probs_bnqk = core.dropout(self.dropout, probs_bnqk, deterministic, rng)
  context_bqnh = jnp.einsum("bnqk,bknh->bqnh", probs_bnqk, v_blnh)
  return jnp.einsum(
      "bqnh,nhd->bqd", context_bqnh, self.out_nhd[...].astype(dt)
  ) + self.out_bias_d[...].astype(dt)


def step_fn(model, batch):
  g, s = nnx.split(model)
  f = jax.jit(
      functools.partial(steps.encode_step, g, pooling="mean", normalize=True)
  )
  jax.block_until_ready(f(s, batch))  # trace now
  return lambda: f(s, batch)


def main():
  model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
  loaded = pretrained.load_pretrained(str(model_dir))
  tok = tokenizers.WordPieceTokenizer.from_pretrained_dir(loaded.model_dir)
  st = SentenceTransformer(str(model_dir), device="cpu")
  am = st[0].auto_model
  data = pathlib.Path(ARGS.data)
  kinds = {
      "passages": load_texts(data, "passages", ARGS.batch_size),
      "sentences": load_texts(data, "sentences", 512)[-ARGS.batch_size :],
  }
  print(
      f"jax {jax.__version__} torch {torch.__version__} "
      f"loadavg {os.getloadavg()}"
  )
  for kind, texts in kinds.items():
    ids = [tok.encode(t, 256) for t in texts]
    w = -(-max(map(len, ids)) // 16) * 16
    x = np.zeros((len(ids), w), np.int32)
    m = np.zeros_like(x)
    for i, r in enumerate(ids):
      x[i, : len(r)], m[i, : len(r)] = r, 1
    batch = {
        "input_ids": jnp.asarray(x),
        "attention_mask": jnp.asarray(m),
        "token_type_ids": jnp.zeros_like(jnp.asarray(x)),
    }
    now = step_fn(loaded.model, batch)
    orig = te.SelfAttention.__call__
    te.SelfAttention.__call__ = before_call
    try:
      before = step_fn(loaded.model, batch)
    finally:
      te.SelfAttention.__call__ = orig
    tx, tm = torch.from_numpy(x).long(), torch.from_numpy(m).long()
    fns = {
        "before": before,
        "now": now,
        "torch": lambda: am(input_ids=tx, attention_mask=tm),
    }
    times = {k: [] for k in fns}
    with torch.inference_mode():
      for _ in range(ARGS.repeats):
        for k, f in fns.items():
          s = time.perf_counter()
          jax.block_until_ready(f()) if k != "torch" else f()
          times[k].append(time.perf_counter() - s)
    b = {k: min(v) for k, v in times.items()}
    e0, e1 = np.asarray(before(), np.float64), np.asarray(now(), np.float64)
    cos = (
        (e0 * e1).sum(-1)
        / np.linalg.norm(e0, axis=-1)
        / np.linalg.norm(e1, axis=-1)
    )
    print(
        f"| {kind} {x.shape[0]}x{w} | {1e3 * b['before']:.0f} | "
        f"{1e3 * b['now']:.0f} | {1e3 * b['torch']:.0f} | "
        f"{b['before'] / b['now']:.2f}x | {b['torch'] / b['before']:.2f} | "
        f"{b['torch'] / b['now']:.2f} | {cos.min():.8f} |",
        flush=True,
    )
  print(f"loadavg {os.getloadavg()}")


if __name__ == "__main__":
  main()
