"""End to end: the evaluate and encode modes on the shipped LIMIT-small.

The full LIMIT-small run is the real acceptance check (all-MiniLM-L6-v2,
max length 256, cosine: Recall@2 = 0.162 in ../shared/data/DATA.md, computed
with sentence-transformers and pytrec_eval). SciFact and Cranfield take
minutes and are marked slow.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import pytrec_eval
from absl.testing import absltest

from configs import common
from configs import evaluate as evaluate_config
from retrieval_jax import evaluate
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run

_SHARED = common.REPO_ROOT.parent / "shared" / "data"


def _config(**overrides):
  config = evaluate_config.get_config()
  with config.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


class EvaluateModeTest(absltest.TestCase):

  def test_limit_small_matches_reference_and_pytrec_eval(self):
    workdir = pathlib.Path(self.create_tempdir())
    metrics = evaluate.evaluate(_config(), workdir)
    # Reference: 0.162 (sentence-transformers + pytrec_eval, DATA.md).
    self.assertAlmostEqual(metrics["recall@2"], 0.162, delta=0.005)
    self.assertAlmostEqual(metrics["recall@10"], 0.481, delta=0.005)
    self.assertAlmostEqual(metrics["ndcg@10"], 0.314, delta=0.005)
    # Per-query values equal pytrec_eval's on the written run file (ids with
    # spaces survive the round trip through run.trec).
    run = trec_run.read_run(workdir / "run.trec")
    self.assertLen(run, 1000)
    self.assertIn("Geneva Durben", set().union(*map(set, run.values())))
    qrels = {}
    for line in (common.REPO_ROOT / "data/limit-small/qrels/test.tsv"
                 ).read_text().splitlines()[1:]:
      q, d, s = line.split("\t")
      qrels.setdefault(q, {})[d] = int(s)
    per_query = json.loads((workdir / "metrics_per_query.json").read_text())
    names = {m: ir_metrics.to_pytrec_eval_name(m)
             for m in ("ndcg@10", "recall@2", "recall@100", "map")}
    # pytrec_eval is asked for "ndcg_cut.10" and answers "ndcg_cut_10".
    requests = {n.rsplit("_", 1)[0] + "." + n.rsplit("_", 1)[1]
                if n[-1].isdigit() else n for n in names.values()}
    reference = pytrec_eval.RelevanceEvaluator(qrels, requests).evaluate(run)
    for ours, theirs in names.items():
      for qid, value in reference.items():
        self.assertAlmostEqual(per_query[ours][qid], value[theirs], places=6,
                               msg=f"{ours} {qid}")
    for name in ("metrics.json", "timing.json", "config.json"):
      self.assertTrue((workdir / name).exists(), name)

  def test_encode_mode_writes_rows_in_file_order(self):
    workdir = pathlib.Path(self.create_tempdir())
    corpus_dir = pathlib.Path(self.create_tempdir())
    src = common.REPO_ROOT / "data/limit-small/corpus.jsonl"
    lines = src.read_text().splitlines()[:10]
    (corpus_dir / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    config = _config(**{"data.path": str(corpus_dir), "model.max_length": 64})
    docs_nd = evaluate.encode(config, workdir)
    saved = np.load(workdir / "corpus_embeddings.npy")
    ids = json.loads((workdir / "corpus_ids.json").read_text())
    self.assertEqual(saved.shape, (10, 384))
    self.assertEqual(saved.dtype, np.float32)
    self.assertEqual(ids, [json.loads(l)["_id"] for l in lines])
    np.testing.assert_array_equal(saved, docs_nd)
    # Unit norm (cosine model) and row i is document i: re-encoding one
    # document alone gives the same row.
    np.testing.assert_allclose(np.linalg.norm(saved, axis=1), 1.0, atol=1e-5)
    encoder = evaluate.make_encoder(config, evaluate.sharding.make_mesh(
        devices=jax.devices()[:1]))
    one = encoder.encode([(json.loads(lines[3]).get("title", "") + " " +
                           json.loads(lines[3])["text"]).strip()],
                         progress=False)
    np.testing.assert_allclose(one[0], saved[3], atol=1e-5)

  def test_missing_data_path_names_the_key(self):
    config = _config(**{"data.path": "/nonexistent/beir"})
    with self.assertRaisesRegex(evaluate.ConfigError,
                                r"config\.data\.path='/nonexistent/beir'"):
      evaluate.evaluate(config, self.create_tempdir())

  def test_missing_split_names_the_keys(self):
    config = _config(**{"data.split": "validation"})
    with self.assertRaisesRegex(
        evaluate.ConfigError,
        r"config\.data\.split='validation'.*qrels/validation\.tsv"):
      evaluate.evaluate(config, self.create_tempdir())

  def test_command_line_smoke(self):
    workdir = self.create_tempdir()
    proc = subprocess.run(
        [sys.executable, "-m", "retrieval_jax.main",
         "--config", str(common.REPO_ROOT / "configs/evaluate.py:smoke"),
         "--workdir", workdir.full_path, "--config.eval.run_tag=smoke"],
        cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("recall@2", proc.stdout)
    metrics = json.loads(
        (pathlib.Path(workdir.full_path) / "metrics.json").read_text())
    self.assertEqual(set(metrics), set(evaluate_config.get_config(
        "smoke").eval.measures))
    first = (pathlib.Path(workdir.full_path) / "run.trec").read_text(
    ).splitlines()[0].split()
    self.assertLen(first, 6)
    self.assertEqual(first[-1], "smoke")

  def test_command_line_bad_input_is_one_clear_line(self):
    # A malformed corpus line: the error names file and line, and the
    # process exits non-zero without a traceback.
    bad = pathlib.Path(self.create_tempdir())
    (bad / "qrels").mkdir()
    src = common.REPO_ROOT / "data/limit-small"
    lines = (src / "corpus.jsonl").read_text().splitlines()[:2]
    (bad / "corpus.jsonl").write_text(
        "\n".join(lines + ['{"_id": "x", "text": "cut'])+ "\n")
    (bad / "queries.jsonl").write_text((src / "queries.jsonl").read_text())
    (bad / "qrels/test.tsv").write_text((src / "qrels/test.tsv").read_text())
    for flag, expected in (
        ("--config.data.path=/nonexistent", "config.data.path='/nonexistent'"),
        (f"--config.data.path={bad}", f"{bad}/corpus.jsonl:3: malformed JSON")):
      proc = subprocess.run(
          [sys.executable, "-m", "retrieval_jax.main",
           "--config", str(common.REPO_ROOT / "configs/evaluate.py:smoke"),
           "--workdir", self.create_tempdir().full_path, flag],
          cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=600)
      self.assertNotEqual(proc.returncode, 0)
      self.assertIn(expected, proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)


@pytest.mark.slow
class ReferenceCollectionsTest(absltest.TestCase):
  """Full zero-shot runs against DATA.md's reference numbers (minutes)."""

  def _run(self, name):
    if not (_SHARED / name).is_dir():
      self.skipTest(f"{_SHARED / name} not present")
    return evaluate.evaluate(_config(**{"data.path": str(_SHARED / name)}),
                             self.create_tempdir())

  def test_scifact(self):
    metrics = self._run("scifact")
    self.assertAlmostEqual(metrics["ndcg@10"], 0.645, delta=0.002)

  def test_cranfield(self):
    metrics = self._run("cranfield")
    self.assertAlmostEqual(metrics["ndcg@10"], 0.382, delta=0.003)


if __name__ == "__main__":
  absltest.main()
