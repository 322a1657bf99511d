r"""Train-step split: forward vs forward+backward of the MiniLM-L6 encoder,
JAX vs torch, 1 thread each, one [B, 128] batch of real SciFact passages.

  PYTHONPATH=. taskset -c 0 python experiments/benchmarks/profile_train_split.py

Loss on both sides: sum of squared mean-pooled embeddings (the encoder's
share of a train step; no optimizer, no dropout). Interleaved, best of 3.
"""

import os
import pathlib
import sys
import time

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
from retrieval_jax import pretrained  # noqa: E402
from retrieval_jax.data import tokenizers  # noqa: E402

torch.set_num_threads(1)
B, L = int(os.environ.get("B", 40)), 128
model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
loaded = pretrained.load_pretrained(str(model_dir))
tok = tokenizers.WordPieceTokenizer.from_pretrained_dir(loaded.model_dir)
texts = load_texts(pathlib.Path("../shared/data/scifact"), "passages", B)
ids = np.zeros((B, L), np.int32)
mask = np.zeros_like(ids)
for i, t in enumerate(texts):
  r = tok.encode(t, L)
  ids[i, : len(r)], mask[i, : len(r)] = r, 1
graphdef, params, rest = nnx.split(loaded.model, nnx.Param, ...)
ji, jm = jnp.asarray(ids), jnp.asarray(mask)


def loss(p):
  h = nnx.merge(graphdef, p, rest)(ji, jm)
  e = (h * jm[..., None]).sum(1) / jm.sum(1, keepdims=True)
  return jnp.sum(e * e)


fwd = jax.jit(loss)
grad = jax.jit(jax.value_and_grad(loss))
st = SentenceTransformer(str(model_dir), device="cpu")
am = st[0].auto_model
am.train(False)
ti, tm = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()


def t_loss():
  h = am(input_ids=ti, attention_mask=tm).last_hidden_state
  e = (h * tm[..., None]).sum(1) / tm.sum(1, keepdim=True)
  return (e * e).sum()


def t_fwd():
  with torch.no_grad():
    return t_loss()


def t_grad():
  am.zero_grad(set_to_none=True)
  v = t_loss()
  v.backward()
  return v


fns = {
    "jax fwd": lambda: jax.block_until_ready(fwd(params)),
    "torch fwd": t_fwd,
    "jax fwd+bwd": lambda: jax.block_until_ready(grad(params)),
    "torch fwd+bwd": t_grad,
}
for f in fns.values():
  f()
times = {k: [] for k in fns}
for _ in range(3):
  for k, f in fns.items():
    s = time.perf_counter()
    f()
    times[k].append(time.perf_counter() - s)
b = {k: min(v) for k, v in times.items()}
print(f"B={B} L={L} loadavg {os.getloadavg()}")
print("| side | fwd s | fwd+bwd s | bwd share |")
print("|---|---:|---:|---:|")
for side in ("jax", "torch"):
  f, g = b[f"{side} fwd"], b[f"{side} fwd+bwd"]
  print(f"| {side} | {f:.2f} | {g:.2f} | {(g - f) / g:.0%} |")
print(
    f"torch/jax: fwd {b['torch fwd'] / b['jax fwd']:.2f}, "
    f"fwd+bwd {b['torch fwd+bwd'] / b['jax fwd+bwd']:.2f}"
)
