r"""Embedding parity: this project's encoder vs sentence-transformers.

Encodes the probe texts of `sentences.py` with sentence-transformers (torch,
CPU) and with `retrieval_jax` (JAX), and reports per-text cosine similarity
and absolute difference of the final embeddings, in float32:

  1. our encoder on the reference token ids (isolates the model port);
  2. our tokenizer's ids vs the reference ids, and the full pipeline
     (our tokenizer + our encoder).

Command (from the repository root):

  PYTHONPATH=. python experiments/parity/compare_sentence_transformers.py \
      --write_fixture tests/fixtures/minilm_parity.npz

Acceptance: min cosine >= 0.99999 and max |diff| <= 1e-4 on every text.
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sentences as sentences_lib

from retrieval_jax import encoding
from retrieval_jax import pretrained
from retrieval_jax import sharding

MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4


def compare(ours_nd: np.ndarray, ref_nd: np.ndarray) -> dict[str, np.ndarray]:
  """Per-row cosine and max |diff| of two [N, D] float32 arrays."""
  ours64, ref64 = ours_nd.astype(np.float64), ref_nd.astype(np.float64)
  cos_n = (ours64 * ref64).sum(1) / np.maximum(
      np.linalg.norm(ours64, axis=1) * np.linalg.norm(ref64, axis=1), 1e-30
  )
  return {"cosine": cos_n, "abs_diff": np.abs(ours_nd - ref_nd).max(axis=1)}


def report(name: str, stats, groups: list[str], texts: list[str]) -> bool:
  """Prints overall and per-group worst cases; True if within tolerance."""
  cos_n, diff_n = stats["cosine"], stats["abs_diff"]
  ok = bool(cos_n.min() >= MIN_COSINE and diff_n.max() <= MAX_ABS_DIFF)
  print(
      f"[{name}] n={len(cos_n)} 1 - min cosine {1 - cos_n.min():.2e} "
      f"max |diff| {diff_n.max():.2e} -> {'PASS' if ok else 'FAIL'}"
  )
  for group in sorted(set(groups)):
    mask = np.array([g == group for g in groups])
    print(
        f"    {group:9s} n={mask.sum():3d} 1 - min cosine "
        f"{1 - cos_n[mask].min():.2e} max |diff| {diff_n[mask].max():.2e}"
    )
  worst = int(np.argmin(cos_n))
  print(f"    worst text #{worst}: {texts[worst][:60]!r}")
  return ok


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--model",
      default=pretrained.DEFAULT_MODEL,
      help="packaged model name or model directory",
  )
  parser.add_argument(
      "--max_length",
      type=int,
      default=256,
      help="sentence-transformers max_seq_length",
  )
  parser.add_argument(
      "--batch_size",
      type=int,
      default=32,
      help="sentence-transformers encode batch size",
  )
  parser.add_argument(
      "--write_fixture",
      default=None,
      help="write texts, reference ids and embeddings here",
  )
  args = parser.parse_args()

  import sentence_transformers
  import torch
  import transformers

  items = sentences_lib.build_sentences()
  groups = [g for g, _ in items]
  texts = [t for _, t in items]
  model_dir = pretrained.resolve_model_dir(args.model)
  print(
      f"{len(texts)} texts; model {model_dir}; jax {jax.__version__} on "
      f"{jax.devices()[0].platform}; torch {torch.__version__}; "
      f"sentence-transformers {sentence_transformers.__version__}; "
      f"transformers {transformers.__version__}"
  )

  # Reference: the model's own pipeline (Transformer, Pooling, Normalize).
  st = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
  st.max_seq_length = args.max_length
  start = time.perf_counter()
  ref_nd = st.encode(
      texts, batch_size=args.batch_size, convert_to_numpy=True
  ).astype(np.float32)
  print(f"sentence-transformers encode: {time.perf_counter() - start:.1f}s")
  features = st.preprocess(texts)
  ref_ids = {
      k: features[k].numpy().astype(np.int32)
      for k in ("input_ids", "attention_mask", "token_type_ids")
  }

  # Ours on the reference ids. Full float32 matmuls on every backend.
  loaded = pretrained.load_pretrained(model_dir)
  ours = encoding.TextEncoder.from_model(
      loaded,
      sharding.make_mesh(devices=jax.devices()[:1]),
      max_length=args.max_length,
  )
  if loaded.max_length != args.max_length:
    print(
        f"note: model metadata max_length {loaded.max_length}, "
        f"comparing at {args.max_length}"
    )
  start = time.perf_counter()
  with jax.default_matmul_precision("float32"):
    lengths = ref_ids["attention_mask"].sum(1)
    ours_nd = ours.encode_ids(
        [row[:n].tolist() for row, n in zip(ref_ids["input_ids"], lengths)],
        progress=False,
    )
  print(
      "retrieval_jax embed (incl. compiles): "
      f"{time.perf_counter() - start:.1f}s"
  )
  ok = report(
      "encoder on reference ids", compare(ours_nd, ref_nd), groups, texts
  )

  tokenizer = ours.tokenizer
  our_ids = tokenizer(
      texts, max_length=args.max_length, pad_to=ref_ids["input_ids"].shape[1]
  )
  lengths = ref_ids["attention_mask"].sum(1)
  mismatched = [
      i
      for i, n in enumerate(lengths)
      if not np.array_equal(our_ids["input_ids"][i], ref_ids["input_ids"][i])
      or our_ids["attention_mask"][i].sum() != n
  ]
  print(
      f"[tokenizer] ids equal on {len(texts) - len(mismatched)}/"
      f"{len(texts)} texts; mismatches: {mismatched[:10]}"
  )
  with jax.default_matmul_precision("float32"):
    full_nd = ours.encode(texts, progress=False)
  ok &= not mismatched
  ok &= report("tokenizer + encoder", compare(full_nd, ref_nd), groups, texts)

  if args.write_fixture:
    path = pathlib.Path(args.write_fixture)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "max_length": args.max_length,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "generator": "experiments/parity/compare_sentence_transformers.py",
    }
    # Texts as ASCII-escaped JSON bytes: NumPy string arrays would drop
    # trailing NULs and some texts hold control characters.
    np.savez_compressed(
        path,
        texts_json=np.frombuffer(json.dumps(texts).encode("ascii"), np.uint8),
        groups_json=np.frombuffer(json.dumps(groups).encode("ascii"), np.uint8),
        meta_json=np.frombuffer(json.dumps(meta).encode("ascii"), np.uint8),
        input_ids=ref_ids["input_ids"],
        attention_mask=ref_ids["attention_mask"].astype(np.int8),
        token_type_ids=ref_ids["token_type_ids"].astype(np.int8),
        embeddings=ref_nd,
    )
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
