"""End to end: BPR and JPQ smoke trainings through the CLI, then their indexes.

One workdir laid out as experiments/lth's: pseudo-queries of LIMIT-small
(crops, `pseudo_queries.py`), then `configs/train.py:bpr,smoke`,
`jpq,smoke`, `bpr,adapt,smoke` and `jpq,adapt,smoke` trained 2 steps each
by `python -m retrieval_jax.main` into <workdir>/runs/<name>. Checks:
* the evaluate mode reads the BPR run (float32 dense retrieval);
* the JPQ runs' checkpoints hold 46 x 8 codes in [0, 16) that are the
  starting encoder's corpus vectors assigned to the k-means centroids (the
  vectors re-embedded here), unchanged by training, while the centroid
  offset moved; the adaptation runs logged margin-MSE and hold the frozen
  teacher (= the pretrained weights);
* `Jpq.build_index` holds exactly the run's codes and the trained centroids;
* `experiments/lth/config.py:smoke` reuses the four runs and writes a
  table row per run and baseline (48-byte sign codes, 4-byte PQ codes).

Marked slow (five subprocess runs, about 15 minutes on 2 loaded cores).
"""

import json
import pathlib
import subprocess
import sys

from absl.testing import absltest
import jax
import numpy as np
import pytest

from experiments.lth import config as lth_config
from experiments.lth import pseudo_queries
from retrieval_jax import checkpointing
from retrieval_jax import encoding
from retrieval_jax import kinds
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.kinds import frozen_teacher
from retrieval_jax.kinds import jpq
from retrieval_jax.search import product_quantization
import test_util
from test_util import LIMIT_SMALL
from test_util import REPO


def _python(*args, timeout=1800):
  return subprocess.run(
      [sys.executable, *args],
      cwd=REPO,
      env=test_util.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


@pytest.mark.slow
class LearningToHashEndToEndTest(absltest.TestCase):

  def test_smoke_runs_and_experiment(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    config = lth_config.get_config("smoke")
    pairs = workdir / "pseudo_queries" / "limit-small.jsonl"
    pseudo_queries.write_pairs(LIMIT_SMALL, pairs, **config.pseudo_queries)
    for name in config.order:
      arg = config.runs[name].train_arg
      if config.runs[name].adapt:
        arg += f",pseudo_queries={pairs}"
      result = _python(
          "-m",
          "retrieval_jax.main",
          f"--config=configs/train.py:{arg}",
          f"--workdir={workdir / 'runs' / name}",
      )
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self.assertTrue((workdir / "runs" / name / "results.json").is_file())

    # The evaluate mode serves the BPR run as a dense retriever.
    result = _python(
        "-m",
        "retrieval_jax.main",
        "--mode=evaluate",
        "--config=configs/evaluate.py:smoke",
        f"--config.run={workdir / 'runs' / 'bpr'}",
        f"--workdir={workdir / 'bpr_evaluate'}",
        "--config.data.max_queries=16",
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    metrics = json.loads(
        (workdir / "bpr_evaluate" / "metrics.json").read_text()
    )
    self.assertBetween(metrics["ndcg@10"], 0.0, 1.0)

    # JPQ: codes = the starting encoder's vectors at the k-means centroids.
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    for name in ("jpq", "jpq_adapt"):
      run_dir = workdir / "runs" / name
      constants = jpq.read_run_constants(run_dir)
      codes_nm = constants[jpq.CODES]
      self.assertEqual(codes_nm.shape, (46, 8))
      self.assertBetween(int(codes_nm.min()), 0, 15)
      self.assertBetween(int(codes_nm.max()), 0, 15)
      model, tokenizer, run_cfg, step = kinds.load_run(run_dir, mesh)
      self.assertEqual(step, 2)
      offset = np.asarray(model.centroid_offset_mks[...])
      self.assertGreater(np.abs(offset).max(), 0.0)
      index = jpq.KIND.build_index(model, run_dir)
      got_c, got_codes = product_quantization.faiss_pq_arrays(
          index.faiss_index()
      )
      np.testing.assert_array_equal(got_codes, codes_nm)
      np.testing.assert_allclose(
          got_c,
          constants[jpq.CENTROIDS] + 2.0 * offset,
          rtol=test_util.FP32_RTOL,
          atol=test_util.FP32_ATOL,
      )
      # Re-embed the corpus with the starting encoder (the run's encoder
      # before training: the pretrained weights, offset unused).
      loaded = pretrained.load_pretrained(run_cfg["model"]["pretrained"])
      encoder = encoding.TextEncoder(
          loaded.model,
          tokenizer,
          mesh,
          pooling=run_cfg["model"]["pooling"],
          normalize=run_cfg["model"]["normalize"],
          max_length=run_cfg["model"]["max_length"],
      )
      ids, titles, texts = beir.read_corpus(beir.corpus_path(str(LIMIT_SMALL)))
      docs_nd = encoder.encode(
          [beir.doc_text(t, x) for t, x in zip(titles, texts)], progress=False
      )
      assigned = jpq.pq_index(constants[jpq.CENTROIDS], docs_nd=docs_nd)
      _, assigned_codes = product_quantization.faiss_pq_arrays(
          assigned.faiss_index()
      )
      # Random codes would agree on 1/16 of the entries; re-embedding moves
      # the vectors by float rounding only.
      self.assertGreater(np.mean(assigned_codes == codes_nm), 0.95)
      self.assertLen(ids, 46)

    for name in ("bpr_adapt", "jpq_adapt"):
      lines = (workdir / "runs" / name / "metrics.jsonl").read_text()
      last = json.loads(lines.splitlines()[-1])
      self.assertIn("train/margin_mse", last)
      manager = checkpointing.open_read_only(
          workdir / "runs" / name / "checkpoints"
      )
      try:
        tree = manager.item_metadata(2).get(checkpointing.STATE).tree
      finally:
        manager.close()
      self.assertIn(frozen_teacher.TEACHER, tree["extra"])

    # The experiment reuses the four runs.
    result = _python(
        "-m",
        "experiments.lth.run",
        "--config=experiments/lth/config.py:smoke",
        f"--workdir={workdir}",
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    rows = json.loads((workdir / "results.json").read_text())["limit-small"]
    self.assertContainsSubset(
        {"flat", "sign_rerank", "pq", "bpr", "bpr_flat", "jpq", "bpr_adapt"},
        set(rows),
    )
    self.assertEqual(rows["bpr"]["bytes_per_doc"], 48)
    self.assertEqual(rows["jpq"]["bytes_per_doc"], 4)
    for row in rows.values():
      self.assertBetween(row["metrics"]["ndcg@10"], 0.0, 1.0)
    table = (workdir / "table.md").read_text()
    self.assertIn("| JPQ (smoke): PQ, its codes (faiss ADC) | 4 |", table)


if __name__ == "__main__":
  absltest.main()
