"""Paths and float tolerances shared by the tests.

The collections beside the checkout (../shared/data, or the directory named
by RETRIEVAL_JAX_SHARED_DATA) are read-only; tests that need one skip when it
is absent. LIMIT-small ships with the repository and is always there.

The float-tolerance policy of the suite, and the constants that carry it,
are at the end.
"""

import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
LIMIT_SMALL = REPO / "data" / "limit-small"
SHARED_DATA = pathlib.Path(
    os.environ.get("RETRIEVAL_JAX_SHARED_DATA", REPO.parent / "shared" / "data")
)
SCIFACT = SHARED_DATA / "scifact"
CRANFIELD = SHARED_DATA / "cranfield"


def subprocess_env() -> dict[str, str]:
  """Environment for end-to-end tests that run the entry point.

  The job picks its own CPU device count (one per core), like a user's run:
  the suite's 8 fake devices must not leak into it. Less XLA optimisation
  compiles about 3x faster; every run uses the same flags, so programs that
  a test compares are the same.
  """
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


# Float tolerances. A tolerance is sized to the arithmetic, never to what one
# machine printed: XLA's CPU code (vector width, fused multiply-adds, matmul
# blocking, the order of a reduction) differs between x86 CPUs and between
# jaxlib builds, so float32 results move by a few ulps across machines.
# Shake out machine-dependent checks with XLA_FLAGS=--xla_cpu_max_isa=SSE4_2
# (emulates a CPU without AVX); fast-math flags are not a fair check.
#
# - Exact equality only where the result is bitwise fixed by construction:
#   integers and counts, copies and file round trips, the same jitted
#   function on the same inputs, float inputs on a dyadic grid (sums and
#   products of multiples of 1/8 are exact in float32), values set by a mask
#   (exact zeros), ranks and top-k ids whose scores have no near-ties.
# - float32, a short chain of ops (a few roundings of ~6e-8 each):
#   FP32_RTOL / FP32_ATOL.
# - float32 after a long chain: reductions or matmuls over hundreds of
#   terms, softmax / logsumexp over many items, FFTs, a whole encoder
#   forward pass, or two differently-ordered computations of the same value:
#   FP32_LONG_RTOL / FP32_LONG_ATOL, or a bound relative to the output scale.
# - float64 oracles: ~1e-12 on O(1) values, scaled with the largest term
#   where terms cancel.
# - bfloat16: about 1e-2 of the output scale.
# - Keep every tolerance at least ~100x below the error a real bug would
#   make, and compare values, not just shapes.
# - Top-k ids computed in float32 and compared against another computation
#   may swap where two scores are within rounding: check them with
#   `assert_same_topk`, or measure the data's smallest score gap first.
FP32_RTOL = 1e-5
FP32_ATOL = 1e-6
FP32_LONG_RTOL = 1e-4
FP32_LONG_ATOL = 1e-5


def assert_same_topk(got_ids, want_ids, scores, atol):
  """Top-k ids equal up to the order of near-tied scores.

  Args:
    got_ids, want_ids: [Q, k] int ids (-1 for padding).
    scores: [Q, N] the true (e.g. float64) score of every id.
    atol: two ids may trade places only where their true scores are within
      `atol` (float32 rounding); any other difference fails.
  """
  got_ids, want_ids = np.asarray(got_ids), np.asarray(want_ids)
  scores = np.asarray(scores, np.float64)
  np.testing.assert_array_equal(got_ids.shape, want_ids.shape)
  np.testing.assert_array_equal(got_ids < 0, want_ids < 0)
  for q, (got, want) in enumerate(zip(got_ids, want_ids)):
    real = got >= 0
    if len(set(got[real].tolist())) != real.sum():
      raise AssertionError(f"row {q}: repeated ids {got}")
    got, want = got[real], want[real]
    gap = np.abs(scores[q, got] - scores[q, want])
    if gap.max(initial=0.0) > atol:
      i = int(np.argmax(gap))
      raise AssertionError(
          f"row {q}, rank {i}: id {got[i]} (score {float(scores[q, got[i]])})"
          f" instead of {want[i]} (score {float(scores[q, want[i]])}): not a"
          f" near-tie within {atol}"
      )


def tiny_encoder(vocab_size: int = 100, seed: int = 0):
  """A 1-layer, width-16 BERT encoder (2 heads, FFN 32, 32 positions)."""
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  from retrieval_jax.models import transformer_encoder

  # pylint: enable=g-import-not-at-top
  config = transformer_encoder.EncoderConfig(
      vocab_size=vocab_size,
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      intermediate_size=32,
      max_position_embeddings=32,
  )
  return transformer_encoder.TransformerEncoder(config, rngs=nnx.Rngs(seed))
