r"""Encode throughput: retrieval_jax vs sentence-transformers, same run.

Both sides embed the same texts with all-MiniLM-L6-v2 (max length 256, mean
pooling, L2-normalised) on the same CPU threads; each is timed after a
warm-up pass (for JAX the warm-up includes compilation, reported apart), best
of `--repeats`. The embeddings are compared too, so speed never hides a
numerical difference.

  python experiments/benchmarks/encode_vs_sentence_transformers.py \
      --data ../shared/data/scifact --num_texts 2048 --threads 2

Texts: `sentences` splits SciFact abstracts into sentences (short inputs);
`passages` uses whole documents, truncated at 256 tokens.
"""

import argparse
import json
import os
import pathlib
import re
import time


def load_texts(data_dir: pathlib.Path, kind: str, n: int) -> list[str]:
  """The first `n` sentences or passages of a BEIR corpus, in file order."""
  texts = []
  with open(data_dir / "corpus.jsonl", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      if kind == "passages":
        texts.append((doc.get("title", "") + " " + doc["text"]).strip())
      else:
        texts += [
            s for s in re.split(r"(?<=[.!?])\s+", doc["text"]) if len(s) > 20
        ]
      if len(texts) >= n:
        break
  return texts[:n]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default="../shared/data/scifact")
  parser.add_argument(
      "--kind", choices=["sentences", "passages"], default="sentences"
  )
  parser.add_argument("--num_texts", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_length", type=int, default=256)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()

  # Same cores on both sides: pin the process to `threads` cores; torch gets
  # `threads` intra-op threads, JAX one CPU device per core (the evaluate
  # mode's default, see `sharding.use_cpu_cores_as_devices`).
  cores = sorted(os.sched_getaffinity(0))[: args.threads]
  os.sched_setaffinity(0, cores)

  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top

  from retrieval_jax import encoding  # pylint: disable=g-import-not-at-top
  from retrieval_jax import pretrained  # pylint: disable=g-import-not-at-top
  from retrieval_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.use_cpu_cores_as_devices(args.threads)
  torch.set_num_threads(args.threads)
  texts = load_texts(pathlib.Path(args.data), args.kind, args.num_texts)
  model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)

  st = SentenceTransformer(str(model_dir), device="cpu")
  st.max_seq_length = args.max_length

  def run_st():
    return st.encode(
        texts,
        batch_size=args.batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
    )

  jx = encoding.TextEncoder.from_pretrained(
      str(model_dir),
      sharding.make_mesh(),
      max_length=args.max_length,
      dtype=args.dtype,
  )

  def run_jax():
    return jx.encode(texts, batch_size=args.batch_size, progress=False)

  start = time.perf_counter()
  emb_jax = run_jax()  # Compiles one program per padded length.
  warmup_jax = time.perf_counter() - start
  emb_st = run_st()
  times = {"st": [], "jax": []}
  for _ in range(args.repeats):  # Interleaved, so drift hits both sides.
    for name, fn in (("st", run_st), ("jax", run_jax)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  best = {k: min(v) for k, v in times.items()}
  cos = np.sum(emb_jax * emb_st, -1) / (
      np.linalg.norm(emb_jax, axis=-1) * np.linalg.norm(emb_st, axis=-1)
  )
  n = len(texts)
  tokens = sum(len(x) for x in jx.tokenize(texts))
  print(
      f"{n} {args.kind}, {tokens / n:.1f} tokens/text on average, "
      f"{args.threads} threads, batch {args.batch_size}, {args.dtype}"
  )
  print(f"jax warm-up (compile + first pass): {warmup_jax:.1f} s")
  print(
      f"min cosine {cos.min():.7f}, max abs diff "
      f"{np.abs(emb_jax - emb_st).max():.2e}"
  )
  print(
      "| texts | sentence-transformers texts/s | retrieval_jax texts/s "
      "| ratio |"
  )
  print("|---|---:|---:|---:|")
  print(
      f"| {n} {args.kind} ({args.dtype}) | {n / best['st']:.1f} | "
      f"{n / best['jax']:.1f} | {best['st'] / best['jax']:.2f}x |"
  )


if __name__ == "__main__":
  main()
