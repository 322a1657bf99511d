"""Tests for retrieval_jax.metric_logging."""

import glob
import json
import os
import time
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import metric_logging as ml


class MetricLoggerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = self.create_tempdir().full_path
    self.path = os.path.join(self.workdir, ml.METRICS_FILE)

  def test_jsonl_round_trip(self):
    with ml.MetricLogger(self.workdir) as logger:
      self.assertEqual(logger.path, self.path)
      logger.write(
          1,
          {
              "train/loss": jnp.float32(0.5),
              "perf/examples_per_s": np.float64(1234.5),
              "train/lr": 3e-4,
          },
      )
      # Flushed per record: readable while the run is still going.
      self.assertLen(ml.read_metrics(self.path), 1)
      logger.write(
          np.int64(2),
          {
              "eval/scifact/ndcg@10": jnp.array([0.25]),
              "train/finite": jnp.bool_(True),
          },
      )
    records = ml.read_metrics(self.workdir)
    self.assertEqual(
        records,
        [
            {
                "step": 1,
                "train/loss": 0.5,
                "perf/examples_per_s": 1234.5,
                "train/lr": 3e-4,
            },
            {"step": 2, "eval/scifact/ndcg@10": 0.25, "train/finite": 1.0},
        ],
    )
    for record in records:
      for value in record.values():
        self.assertIn(type(value), (int, float))

  def test_appends_across_loggers(self):
    with ml.MetricLogger(self.workdir) as logger:
      logger.write(1, {"train/loss": 1.0})
    with ml.MetricLogger(self.workdir) as logger:
      logger.write(2, {"train/loss": 0.5})
    self.assertEqual([r["step"] for r in ml.read_metrics(self.path)], [1, 2])

  def test_writes_jax_scalars_under_a_transfer_guard(self):
    """The trainer logs inside jax.transfer_guard("disallow")."""
    loss = jnp.float32(0.125)
    with ml.MetricLogger(self.workdir) as logger:
      with jax.transfer_guard("disallow"):
        logger.write(3, {"train/loss": loss})
    self.assertEqual(
        ml.read_metrics(self.path), [{"step": 3, "train/loss": 0.125}]
    )

  def test_non_primary_writes_nothing(self):
    workdir = os.path.join(self.workdir, "worker1")
    with ml.MetricLogger(workdir, is_primary=False) as logger:
      self.assertIsNone(logger.path)
      logger.write(1, {"train/loss": 1.0})
      logger.write_hparams({"lr": 1e-3})
    self.assertFalse(os.path.exists(workdir))

  def test_truncated_last_line_is_skipped(self):
    good = json.dumps({"step": 1, "train/loss": 1.0}) + "\n"
    with open(self.path, "w", encoding="utf-8") as f:
      f.write(good + '{"step": 2, "train/lo')
    self.assertEqual(
        ml.read_metrics(self.path), [{"step": 1, "train/loss": 1.0}]
    )

  def test_resumed_logger_drops_the_partial_record(self):
    with open(self.path, "w", encoding="utf-8") as f:
      f.write('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')
    with ml.MetricLogger(self.workdir) as logger:
      logger.write(2, {"train/loss": 0.5})
    self.assertEqual(
        ml.read_metrics(self.path),
        [
            {"step": 1, "train/loss": 1.0},
            {"step": 2, "train/loss": 0.5},
        ],
    )

  def test_resumed_logger_keeps_a_record_missing_its_newline(self):
    with open(self.path, "w", encoding="utf-8") as f:
      f.write('{"step": 1, "train/loss": 1.0}')
    self.assertLen(ml.read_metrics(self.path), 1)
    with ml.MetricLogger(self.workdir) as logger:
      logger.write(2, {"train/loss": 0.5})
    self.assertEqual([r["step"] for r in ml.read_metrics(self.path)], [1, 2])

  def test_corrupt_middle_line_raises(self):
    with open(self.path, "w", encoding="utf-8") as f:
      f.write('{"step": 1}\nnot json\n{"step": 2}\n')
    with self.assertRaisesRegex(ValueError, r"metrics.jsonl:2: not a JSON"):
      ml.read_metrics(self.path)

  def test_bad_metrics_raise(self):
    with ml.MetricLogger(self.workdir) as logger:
      with self.assertRaisesRegex(ValueError, "'train/emb' must be a numeric"):
        logger.write(1, {"train/emb": np.zeros((2, 3))})
      with self.assertRaisesRegex(ValueError, "'step' is the step"):
        logger.write(1, {"step": 1.0})
      with self.assertRaisesRegex(TypeError, "step must be"):
        logger.write(1.5, {"train/loss": 1.0})
    with self.assertRaisesRegex(ValueError, "closed"):
      logger.write(2, {"train/loss": 1.0})
    self.assertEqual(ml.read_metrics(self.path), [])

  @absltest.skipUnless(
      ml.tensorboard_available(), "TensorBoard events need `tensorboard`"
  )
  def test_tensorboard_event_file(self):
    with ml.MetricLogger(self.workdir) as logger:
      logger.write_hparams({
          "optim": {"lr": 1e-3, "betas": (0.9, 0.99)},
          "model": "tiny",
          "init_from": None,
      })
      logger.write(1, {"train/loss": 1.0})
      logger.write(2, {"train/loss": 0.25})
    events = glob.glob(os.path.join(self.workdir, "events.out.tfevents.*"))
    self.assertLen(events, 1)
    # Round trip: TensorBoard's own reader gets the scalars back.
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
    from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

    acc = event_accumulator.EventAccumulator(
        events[0], size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    got = [
        (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
        for e in acc.Tensors("train/loss")
    ]
    self.assertEqual(got, [(1, 1.0), (2, 0.25)])

  def test_resume_rolls_back_the_steps_logged_again(self):
    # A run killed after logging steps 1-5, with a checkpoint at step 4.
    with ml.MetricLogger(self.workdir) as logger:
      for step in range(1, 6):
        logger.write(step, {"train/loss": float(step)})
      logger.write(4, {"eval/dev/ndcg@10": 0.5})  # an eval after the save
    with open(self.path, "a", encoding="utf-8") as f:
      f.write('{"step": 6, "train/lo')  # cut by the kill
    inode = os.stat(self.path).st_ino
    with ml.MetricLogger(self.workdir, rerun_from=5) as logger:
      for step in (5, 6):
        logger.write(step, {"train/loss": -float(step)})
    records = ml.read_metrics(self.path)
    self.assertEqual(
        [(r["step"], sorted(r)) for r in records],
        [(s, ["step", "train/loss"]) for s in (1, 2, 3, 4)]
        + [(4, ["eval/dev/ndcg@10", "step"])]
        + [(s, ["step", "train/loss"]) for s in (5, 6)],
    )
    self.assertEqual(records[-1]["train/loss"], -6.0)  # the rerun's values
    # Rewritten through a temp file and a rename, not in place.
    self.assertNotEqual(os.stat(self.path).st_ino, inode)
    self.assertEqual(
        [n for n in os.listdir(self.workdir) if n.endswith(".tmp")], []
    )

  def test_fresh_start_over_an_old_file_drops_it(self):
    with ml.MetricLogger(self.workdir) as logger:
      logger.write(1, {"train/loss": 1.0})
    with ml.MetricLogger(self.workdir, rerun_from=0) as logger:
      logger.write(1, {"train/loss": 2.0})
    self.assertEqual(
        ml.read_metrics(self.path), [{"step": 1, "train/loss": 2.0}]
    )

  @absltest.skipUnless(
      ml.tensorboard_available(), "TensorBoard events need `tensorboard`"
  )
  def test_tensorboard_shows_one_value_per_step_after_a_resume(self):
    # The reader TensorBoard's server uses (data_ingester ->
    # plugin_event_multiplexer -> plugin_event_accumulator).
    from tensorboard.backend.event_processing import plugin_event_accumulator  # pylint: disable=g-import-not-at-top
    from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

    with ml.MetricLogger(self.workdir) as logger:
      for step in range(1, 6):
        logger.write(step, {"train/loss": float(step)})
    # Resumed from a checkpoint at step 3 (event files are named by the
    # second; a real resume is seconds later).
    with mock.patch.object(ml.time, "time", return_value=time.time() + 5):
      with ml.MetricLogger(self.workdir, rerun_from=4) as logger:
        for step in (4, 5, 6):
          logger.write(step, {"train/loss": -float(step)})
    acc = plugin_event_accumulator.EventAccumulator(
        self.workdir, size_guidance={plugin_event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    got = [
        (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
        for e in acc.Tensors("train/loss")
    ]
    self.assertEqual(
        got,
        [(1, 1.0), (2, 2.0), (3, 3.0)] + [(s, -float(s)) for s in (4, 5, 6)],
    )

  def test_without_tensorboard_logs_and_writes_jsonl(self):
    # As if `tensorboard` could not be imported.
    self.enter_context(mock.patch.object(ml, "tb_summary", None))
    self.enter_context(
        mock.patch.object(
            ml, "_WRITERS_IMPORT_ERROR", ImportError("No module 'tensorboard'")
        )
    )
    self.assertFalse(ml.tensorboard_available())
    with self.assertLogs(level="WARNING") as logs:
      logger = ml.MetricLogger(self.workdir)
    self.assertIn("install tensorboard", "\n".join(logs.output))
    with self.assertLogs(level="INFO") as logs:
      logger.write(4, {"train/loss": 0.5})
      logger.write_hparams({"lr": 1e-3})
    logger.close()
    self.assertIn("[4] train/loss=0.5", "\n".join(logs.output))
    self.assertEqual(
        ml.read_metrics(self.path), [{"step": 4, "train/loss": 0.5}]
    )
    self.assertEmpty(
        glob.glob(os.path.join(self.workdir, "events.out.tfevents.*"))
    )


class CheckFiniteTest(absltest.TestCase):

  def test_finite_passes(self):
    ml.check_finite({"train/loss": jnp.float32(1.0), "g": np.ones(3)}, 5)

  def test_nan_names_the_metric_and_step(self):
    metrics = {
        "train/loss": jnp.float32(np.nan),
        "train/acc": 0.5,
        "train/grad_norm": np.float64(np.inf),
    }
    with self.assertRaisesRegex(
        ml.NonFiniteError, r"step 12: train/loss=nan, train/grad_norm=inf"
    ) as cm:
      ml.check_finite(metrics, 12)
    self.assertEqual(cm.exception.step, 12)
    self.assertEqual(cm.exception.names, ["train/loss", "train/grad_norm"])
    self.assertIsInstance(cm.exception, FloatingPointError)

  def test_keys_limit_the_check(self):
    metrics = {"train/loss": 1.0, "eval/x": float("nan")}
    ml.check_finite(metrics, 1, keys=["train/loss"])
    with self.assertRaises(ml.NonFiniteError):
      ml.check_finite(metrics, 1, keys=["eval/x"])
    with self.assertRaisesRegex(KeyError, "no metrics named"):
      ml.check_finite(metrics, 1, keys=["train/lost"])

  def test_nan_inside_an_array(self):
    with self.assertRaisesRegex(ml.NonFiniteError, "g=<array>"):
      ml.check_finite({"g": jnp.array([1.0, jnp.nan])}, 0)


if __name__ == "__main__":
  absltest.main()
