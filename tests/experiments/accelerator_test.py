"""experiments/accelerator/run.sh --smoke end to end, and its pure pieces.

The smoke run is the wiring check of the accelerator benchmark: every
section runs on CPU at tiny sizes through the same code as on a GPU and
must produce finite, positive numbers; float32 embeddings must equal
sentence-transformers' (min cosine >= 0.9999). Oracles for the pieces: the
bf16 peak table's lookups, the FLOP count of a one-layer model worked out
by hand, and the markdown rows of a hand-made report.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

from absl.testing import absltest

from experiments.accelerator import benchmark
import test_util

_DATA = test_util.REPO.parent / "shared" / "data" / "scifact"


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


class PiecesTest(absltest.TestCase):

  def test_bf16_peak_lookup(self):
    self.assertEqual(benchmark.bf16_peak_tflops("NVIDIA H100 80GB HBM3"), 989)
    self.assertEqual(benchmark.bf16_peak_tflops("NVIDIA H100 PCIe"), 756)
    self.assertEqual(benchmark.bf16_peak_tflops("NVIDIA H200"), 989)
    self.assertEqual(benchmark.bf16_peak_tflops("NVIDIA A100-SXM4-80GB"), 312)
    self.assertIsNone(benchmark.bf16_peak_tflops("cpu"))

  def test_train_flops_by_hand(self):
    class Config:
      hidden_size, num_layers, intermediate_size = 4, 1, 8

    # Per token: 6 * (4*16 + 2*4*8) = 768 matmul FLOPs, plus attention
    # 12 * 1 layer * d 4 * L 3 = 144; 10 tokens.
    self.assertEqual(benchmark.train_flops(Config, 10, 3), 9120.0)

  def test_table_rows(self):
    sections = {
        "topk": {
            "status": "ok",
            "result": {
                "num_vectors": 10,
                "dim": 4,
                "num_queries": 2,
                "k": 1,
                "ours_ms": 2.0,
                "peer": "missing: No module named 'torch'",
            },
        },
        "m2": {"status": "error", "error": "boom", "result": {"rows": []}},
    }
    rows = benchmark.table_rows(sections)
    self.assertEqual(
        rows[0],
        (
            "topk",
            "ms, 10 x 4 bf16, 2 queries, k=1",
            "2.0",
            "missing: No module named 'torch'",
            "—",
        ),
    )
    self.assertEqual(rows[1], ("m2", "error", "boom", "", ""))


@absltest.skipUnless(_DATA.is_dir(), f"needs {_DATA}")
class SmokeRunTest(absltest.TestCase):

  def test_every_section_produces_numbers(self):
    out = pathlib.Path(self.create_tempdir().full_path)
    env = dict(os.environ, PYTHON=sys.executable)
    # The suite's 8 fake devices are for sharding tests; the benchmark sets
    # its own (one CPU device per core, as retrieval_jax.main).
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        ["bash", "experiments/accelerator/run.sh", "--smoke", "--out", out],
        cwd=test_util.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    self.assertEqual(
        proc.returncode, 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    )
    report = json.loads((out / "accelerator.json").read_text())
    self.assertEqual(report["meta"]["mode"], "smoke")
    self.assertEqual(report["meta"]["failed"], [])
    sections = report["sections"]
    self.assertEqual(list(sections), list(benchmark.SECTIONS))
    for name, rec in sections.items():
      self.assertEqual(rec["status"], "ok", (name, rec.get("error")))
      self.assertTrue(_positive(rec["seconds"]), name)

    parity = sections["parity"]["result"]
    self.assertGreaterEqual(parity["float32_highest"]["min_cosine"], 0.9999)
    self.assertLess(parity["float32_highest"]["max_abs_diff"], 1e-3)
    self.assertGreaterEqual(parity["bfloat16"]["min_cosine"], 0.99)

    encode = sections["encode"]["result"]
    for dtype in ("bfloat16", "float32"):
      for key in ("ours_texts_per_s", "peer_texts_per_s", "ratio"):
        self.assertTrue(_positive(encode[dtype][key]), (dtype, key))

    train = sections["train_step"]["result"]
    self.assertTrue(train["token_ids_identical"])
    self.assertTrue(_positive(train["flops_per_step"]))
    self.assertTrue(_positive(train["ratio"]))
    for side in ("ours", "peer"):
      for key in ("steps_per_s", "queries_per_s", "tflops"):
        self.assertTrue(_positive(train[side][key]), (side, key))
      self.assertTrue(math.isfinite(train[f"{side}_first_loss"]))

    (row,) = sections["m2"]["result"]["rows"]
    for key in ("m2_model", "m2_layer", "dense_layer", "dense_flash"):
      self.assertTrue(_positive(row[key]["ms"]), key)
      self.assertTrue(_positive(row[key]["xla_bytes"]["total"]), key)
    self.assertTrue(_positive(row["dense_flash_over_m2_layer"]))

    topk = sections["topk"]["result"]
    for key in ("ours_ms", "peer_ms", "ratio", "ours_queries_per_s"):
      self.assertTrue(_positive(topk[key]), key)
    # bf16-rounded peer scores may swap near-ties at the k-th place only.
    self.assertGreaterEqual(topk["overlap_at_k"], 0.8)

    ce = sections["cross_encoder"]["result"]
    self.assertEqual(ce["steps"], 2)
    for key in ("first_stage_ndcg_at_10", "rerank_ndcg_at_10"):
      self.assertBetween(ce[key], 0.0, 1.0)
    self.assertTrue(math.isfinite(ce["final_loss"]))

    table = (out / "accelerator.md").read_text()
    self.assertIn("| section | measure | retrieval_jax | peer | ratio |", table)
    for name in benchmark.SECTIONS:
      self.assertIn(f"| {name} |", table)
    self.assertNotIn("| error |", table)


if __name__ == "__main__":
  absltest.main()
