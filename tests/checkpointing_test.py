"""Tests for retrieval_jax.checkpointing on 8 fake CPU devices."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
import orbax.checkpoint as ocp

from retrieval_jax import checkpointing
from retrieval_jax import errors
from retrieval_jax import sharding
import test_util

# A one-process JAX job with the preemption service (started by
# jax.distributed.initialize) that sends itself SIGTERM, as a preempted
# machine receives, at step 5 of a polling loop.
_PREEMPTION_JOB = """
import json, os, signal, socket, sys, tempfile, time
import jax
s = socket.socket(); s.bind(("localhost", 0)); port = s.getsockname()[1]
s.close()
jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                           num_processes=1, process_id=0)
from retrieval_jax import checkpointing
ckpt = checkpointing.Checkpointer(tempfile.mkdtemp(), save_interval_steps=1,
                                  max_to_keep=None)
answers, deadline = [], time.monotonic() + 60
for step in range(100000):
  if step == 5:
    os.kill(os.getpid(), signal.SIGTERM)
  answers.append(ckpt.reached_preemption(step))
  if answers[-1] or time.monotonic() > deadline:
    break
  time.sleep(0.005)
ckpt.close()
print(json.dumps(answers))
"""


# Saves a 4 MB array under a 1 MB file-size limit (what a full disk does
# to a write) and prints the one-line error.
_FULL_DISK_JOB = """
import resource, signal, sys
import jax
from retrieval_jax import checkpointing, errors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
state = {"w": jax.random.normal(jax.random.key(0), (1024, 1024))}  # incompressible
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
ckpt = checkpointing.Checkpointer(sys.argv[1], save_interval_steps=1,
                                  max_to_keep=None)
try:
  ckpt.save(1, state, data={}, metadata={})
  ckpt.close()
except errors.CheckpointError as e:
  print("CheckpointError:", e)
"""

# Enters StopSignals and sends itself the signal in argv[1] twice.
_TWO_SIGNALS_JOB = """
import os, signal, sys, time
from retrieval_jax import checkpointing
signum = getattr(signal, sys.argv[1])
with checkpointing.StopSignals() as signals:
  os.kill(os.getpid(), signum)
  time.sleep(0.1)
  print("first:", signals.requested(), flush=True)
  os.kill(os.getpid(), signum)
  time.sleep(5)
print("still running")
"""


def _largest_state_file(step_dir):
  """The biggest file of a step's `state` item (an array data file)."""
  files = [
      os.path.join(root, name)
      for root, _, names in os.walk(os.path.join(step_dir, "state"))
      for name in names
  ]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_a_bit(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


class _Tiny(nnx.Module):
  """Two dense layers: kernels [16, 8] and [8, 32], rows divisible by 8."""

  def __init__(self, seed: int):
    rngs = nnx.Rngs(seed)
    self.up = nnx.Linear(16, 8, rngs=rngs)
    self.out = nnx.Linear(8, 32, rngs=rngs)


def _shard(tree, mesh, axis):
  """Matrices split by rows over `axis`, everything else replicated."""

  def one(x):
    spec = PartitionSpec(axis, None) if x.ndim == 2 else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, tree)


def _abstract(tree, mesh, axis):
  """The target a trainer builds: shapes, dtypes and shardings, no data."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      _shard(tree, mesh, axis),
  )


def _make_state(mesh, axis, seed=0, step=7):
  """A train state as the trainer holds it, placed on `mesh`.

  One adamw update makes the moments non-zero, so a restore that dropped or
  swapped them would show.
  """
  params = nnx.state(_Tiny(seed), nnx.Param)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  state = {
      "params": params,
      "opt_state": opt_state,
      "step": jnp.asarray(step, jnp.int32),
      "rng": jax.random.key_data(jax.random.key(seed)),
  }
  return jax.device_put(state, _shard(state, mesh, axis))


def _host(tree):
  """numpy copies, kept to compare against after the arrays are gone."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(test, actual, expected):
  """Same structure, and every leaf equal to the numpy copy `expected`."""
  test.assertEqual(jax.tree.structure(actual), jax.tree.structure(expected))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(jax.device_get(a)), e)


def _assert_shardings(test, actual, abstract):
  """Every leaf is a jax.Array laid out as its target says."""
  test.assertEqual(jax.tree.structure(actual), jax.tree.structure(abstract))
  for (path, a), t in zip(
      jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(abstract)
  ):
    test.assertIsInstance(a, jax.Array, jax.tree_util.keystr(path))
    test.assertEqual(a.sharding, t.sharding, jax.tree_util.keystr(path))


class CheckpointerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertLen(jax.devices(), 8)
    self.mesh8 = sharding.make_mesh((8, 1, 1))
    self.dir = self.create_tempdir().full_path

  def _checkpointer(self, directory=None, **kwargs):
    kwargs = {"save_interval_steps": 1, "max_to_keep": None, **kwargs}
    ckpt = checkpointing.Checkpointer(directory or self.dir, **kwargs)
    self.addCleanup(ckpt.close)
    return ckpt

  @parameterized.named_parameters(
      ("one_device", (1, 1, 1), 1, None),
      ("data2_fsdp4", (2, 4, 1), 8, sharding.FSDP),
  )
  def test_restore_onto_another_mesh(self, shape, num_devices, axis):
    state = _make_state(self.mesh8, sharding.DATA)
    expected = _host(state)
    ckpt = self._checkpointer()
    self.assertTrue(ckpt.save(7, state, data={"step": 7}, metadata={}))
    ckpt.wait_until_finished()

    mesh = sharding.make_mesh(shape, devices=jax.devices()[:num_devices])
    abstract = _abstract(state, mesh, axis)
    restored, data, _ = ckpt.restore(None, abstract)

    _assert_trees_equal(self, restored, expected)
    _assert_shardings(self, restored, abstract)
    # The kernels really changed layout (8 row shards -> 1 or 4).
    kernel = restored["params"]["up"]["kernel"][...]
    self.assertEqual(
        kernel.sharding.shard_shape(kernel.shape),
        (16, 8) if axis is None else (4, 8),
    )
    self.assertIsInstance(restored["params"], nnx.State)
    self.assertIsInstance(restored["opt_state"][0], optax.ScaleByAdamState)
    self.assertEqual(restored["step"].dtype, jnp.int32)
    self.assertEqual(data, {"step": 7})

  def test_data_and_metadata_round_trip(self):
    state = _make_state(self.mesh8, sharding.DATA)
    data = {"step": 120, "seed": 0, "epoch": 1, "order": [3, 1, 2]}
    metadata = {
        "config": {"optim": {"lr": 3e-4}, "model": "tiny"},
        "note": "résumé",
    }
    expected_data = {"step": 120, "seed": 0, "epoch": 1, "order": [3, 1, 2]}
    ckpt = self._checkpointer()
    ckpt.save(120, state, data=data, metadata=metadata)
    # The loader moves on while the save is still being written.
    data["step"] = 121
    data["order"].append(9)
    _, data_out, metadata_out = ckpt.restore(
        120, _abstract(state, self.mesh8, sharding.DATA)
    )
    self.assertEqual(data_out, expected_data)
    self.assertEqual(metadata_out, metadata)

  def test_non_json_data_is_rejected_before_saving(self):
    state = _make_state(self.mesh8, sharding.DATA)
    ckpt = self._checkpointer()
    with self.assertRaisesRegex(TypeError, "data is not JSON"):
      ckpt.save(1, state, data={"seed": np.int64(0)}, metadata={})
    with self.assertRaisesRegex(TypeError, "metadata must be a dict"):
      ckpt.save(1, state, data={}, metadata=["config"])
    self.assertEqual(ckpt.all_steps(), [])

  def test_keeps_the_last_max_to_keep(self):
    state = _make_state(self.mesh8, sharding.DATA)
    ckpt = self._checkpointer(max_to_keep=2)
    for step in range(1, 5):
      self.assertTrue(ckpt.save(step, state, data={}, metadata={}))
    ckpt.wait_until_finished()
    self.assertEqual(ckpt.all_steps(), [3, 4])
    self.assertEqual(ckpt.latest_step(), 4)
    self.assertCountEqual(
        [n for n in os.listdir(self.dir) if n.isdigit()], ["3", "4"]
    )

  def test_interval_and_force(self):
    state = _make_state(self.mesh8, sharding.DATA)
    ckpt = self._checkpointer(save_interval_steps=5)
    self.assertFalse(ckpt.should_save(3))
    self.assertTrue(ckpt.should_save(5))
    self.assertFalse(ckpt.save(3, state, data={}, metadata={}))
    self.assertEqual(ckpt.all_steps(), [])
    self.assertTrue(ckpt.save(5, state, data={}, metadata={}))
    # Forced off the interval (a preemption or the last step).
    self.assertTrue(ckpt.save(7, state, data={}, metadata={}, force=True))
    # The same step twice is skipped, forced or not.
    self.assertFalse(ckpt.save(7, state, data={}, metadata={}, force=True))
    self.assertFalse(ckpt.should_save(5))
    self.assertTrue(ckpt.save(10, state, data={}, metadata={}))
    ckpt.wait_until_finished()
    self.assertEqual(ckpt.all_steps(), [5, 7, 10])
    with self.assertRaisesRegex(ValueError, "steps must increase"):
      ckpt.save(9, state, data={}, metadata={}, force=True)
    with self.assertRaisesRegex(TypeError, "integer"):
      ckpt.should_save(5.0)

  def test_bad_options(self):
    with self.assertRaisesRegex(ValueError, "save_interval_steps"):
      checkpointing.Checkpointer(
          self.dir, save_interval_steps=0, max_to_keep=None
      )
    with self.assertRaisesRegex(ValueError, "max_to_keep"):
      checkpointing.Checkpointer(self.dir, save_interval_steps=1, max_to_keep=0)

  def test_async_save_survives_donation(self):
    """`save` returns after the host copy: the caller may free the arrays."""
    state = _make_state(self.mesh8, sharding.DATA)
    expected = _host(state)
    abstract = _abstract(state, self.mesh8, sharding.DATA)
    ckpt = self._checkpointer(async_save=True)
    self.assertTrue(ckpt.save(1, state, data={"step": 1}, metadata={}))
    # What donating the state to the next train step does to its buffers.
    jax.tree.map(lambda x: x.delete(), state)
    ckpt.wait_until_finished()
    restored, _, _ = ckpt.restore(1, abstract)
    _assert_trees_equal(self, restored, expected)

  def test_interrupted_save_keeps_the_last_complete_checkpoint(self):
    state10 = _make_state(self.mesh8, sharding.DATA, seed=10, step=10)
    state20 = _make_state(self.mesh8, sharding.DATA, seed=20, step=20)
    abstract = _abstract(state10, self.mesh8, sharding.DATA)
    with self._checkpointer() as ckpt:
      ckpt.save(10, state10, data={"step": 10}, metadata={})
      ckpt.save(20, state20, data={"step": 20}, metadata={})
    # What a crash during the save of step 30 leaves behind: Orbax writes
    # into "<step>.orbax-checkpoint-tmp" and renames it only once complete.
    tmp = os.path.join(self.dir, "30" + ocp.path.atomicity.TMP_DIR_SUFFIX)
    shutil.copytree(os.path.join(self.dir, "20"), tmp)
    os.remove(os.path.join(tmp, ocp.path.atomicity.COMMIT_SUCCESS_FILE))
    shutil.rmtree(os.path.join(tmp, "metadata"))

    ckpt = self._checkpointer()
    self.assertEqual(ckpt.latest_step(), 20)
    self.assertEqual(ckpt.all_steps(), [10, 20])
    restored, data, _ = ckpt.restore(None, abstract)
    _assert_trees_equal(self, restored, _host(state20))
    self.assertEqual(data, {"step": 20})
    # The resumed run reaches step 30 again and saves it for real.
    state30 = _make_state(self.mesh8, sharding.DATA, seed=30, step=30)
    self.assertTrue(ckpt.save(30, state30, data={"step": 30}, metadata={}))
    restored, data, _ = ckpt.restore(30, abstract)
    _assert_trees_equal(self, restored, _host(state30))
    self.assertEqual(data, {"step": 30})

  def test_restore_errors(self):
    state = _make_state(self.mesh8, sharding.DATA)
    abstract = _abstract(state, self.mesh8, sharding.DATA)
    ckpt = self._checkpointer()
    with self.assertRaisesRegex(FileNotFoundError, "no checkpoint in"):
      ckpt.restore(None, abstract)
    ckpt.save(3, state, data={}, metadata={})
    with self.assertRaisesRegex(FileNotFoundError, r"available steps: \[3\]"):
      ckpt.restore(4, abstract)
    unsharded = dict(abstract, step=jax.ShapeDtypeStruct((), jnp.int32))
    with self.assertRaisesRegex(ValueError, r"\['step'\].*no sharding"):
      ckpt.restore(3, unsharded)
    wrong_shape = dict(
        abstract,
        step=jax.ShapeDtypeStruct(
            (2,), jnp.int32, sharding=abstract["step"].sharding
        ),
    )
    with self.assertRaisesRegex(ValueError, "shape"):
      ckpt.restore(3, wrong_shape)

  def test_restore_params_reads_only_the_params(self):
    state = _make_state(self.mesh8, sharding.DATA, seed=3)
    ckpt = self._checkpointer()
    ckpt.save(2, state, data={}, metadata={})
    mesh = sharding.make_mesh((2, 4, 1))
    abstract_params = _abstract(state["params"], mesh, sharding.FSDP)

    params = ckpt.restore_params(None, abstract_params)
    _assert_trees_equal(self, params, _host(state["params"]))
    _assert_shardings(self, params, abstract_params)

    with self.assertRaisesRegex(
        checkpointing.IncompatibleStateError, "no 'weights'.*'opt_state'"
    ):
      ckpt.restore_params(2, abstract_params, params_key="weights")

  def test_restore_params_from_is_read_only(self):
    state = _make_state(self.mesh8, sharding.DATA, seed=4)
    with self._checkpointer() as ckpt:
      ckpt.save(1, state, data={}, metadata={})
      ckpt.save(2, state, data={}, metadata={})
    before = sorted(os.listdir(self.dir))
    abstract_params = _abstract(
        state["params"],
        sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
        None,
    )
    params = checkpointing.restore_params_from(self.dir, abstract_params)
    _assert_trees_equal(self, params, _host(state["params"]))
    _assert_shardings(self, params, abstract_params)
    self.assertEqual(sorted(os.listdir(self.dir)), before)

    missing = os.path.join(self.dir, "nope")
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      checkpointing.restore_params_from(missing, abstract_params)
    self.assertFalse(os.path.exists(missing))
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(FileNotFoundError, "no checkpoint"):
      checkpointing.restore_params_from(empty, abstract_params)

  def test_reached_preemption_follows_a_sigterm(self):
    # No preemption service in this process: never preempted.
    self.assertFalse(self._checkpointer().reached_preemption(5))
    # With the service: False until the SIGTERM, then True at a later step
    # (the sync point is agreed asynchronously), and the job survives the
    # signal to save.
    proc = subprocess.run(
        [sys.executable, "-c", _PREEMPTION_JOB],
        env=test_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertTrue(answers[-1], "no preemption reported within 60 s")
    self.assertNotIn(True, answers[:-1])
    self.assertGreaterEqual(len(answers) - 1, 5)


class IntegrityTest(parameterized.TestCase):
  """Checksums, the walk-back past bad steps, and one-line save errors."""

  def setUp(self):
    super().setUp()
    self.mesh = sharding.make_mesh((8, 1, 1))
    self.dir = self.create_tempdir().full_path
    self.abstract = _abstract(
        _make_state(self.mesh, sharding.DATA), self.mesh, sharding.DATA
    )
    self.states = {}

  def _checkpointer(self, **kwargs):
    ckpt = checkpointing.Checkpointer(
        self.dir, save_interval_steps=1, max_to_keep=None, **kwargs
    )
    self.addCleanup(ckpt.close)
    return ckpt

  def _save(self, steps=(1, 2, 3), **kwargs):
    with self._checkpointer(**kwargs) as ckpt:
      for step in steps:
        state = _make_state(self.mesh, sharding.DATA, seed=step, step=step)
        self.states[step] = _host(state)
        ckpt.save(step, state, data={"step": step}, metadata={"s": step})

  @parameterized.parameters(True, False)
  def test_every_committed_step_has_checksums(self, async_save):
    self._save(async_save=async_save)
    for step in (1, 2, 3):
      step_dir = os.path.join(self.dir, str(step))
      with open(os.path.join(step_dir, checkpointing.CHECKSUMS_FILE)) as f:
        files = json.load(f)["files"]
      # Every array and metadata file, not only the small ones.
      self.assertIn(
          os.path.relpath(_largest_state_file(step_dir), step_dir), files
      )
      self.assertTrue(any(f.startswith("metadata/") for f in files))
      self.assertTrue(checkpointing.verify_checksums(step_dir))

  @parameterized.named_parameters(
      ("truncated", _truncate, "truncated"),
      ("bit_flip", _flip_a_bit, "does not match its saved sha256"),
      (
          "deleted_metadata",
          lambda p: os.remove(
              os.path.join(p.split("/state/")[0], "state", "_METADATA")
          ),
          "_METADATA is missing",
      ),
  )
  def test_walks_back_past_a_bad_latest_step(self, damage, message):
    self._save()
    damage(_largest_state_file(os.path.join(self.dir, "3")))
    ckpt = self._checkpointer()
    with self.assertLogs(level="ERROR") as logs:
      state, data, metadata = ckpt.restore(None, self.abstract)
    errors_logged = [l for l in logs.output if "cannot be restored" in l]
    self.assertLen(errors_logged, 1)
    self.assertIn("checkpoint 3", errors_logged[0])
    self.assertIn(message, errors_logged[0])
    _assert_trees_equal(self, state, self.states[2])
    self.assertEqual((data, metadata), ({"step": 2}, {"s": 2}))
    # Moved aside, never deleted; the run continues from step 2.
    self.assertCountEqual(
        [n for n in os.listdir(self.dir) if not n.startswith("_")],
        ["1", "2", "3" + checkpointing.CORRUPT_SUFFIX],
    )
    self.assertEqual(ckpt.latest_step(), 2)
    state3 = _make_state(self.mesh, sharding.DATA, seed=33, step=3)
    self.assertTrue(ckpt.save(3, state3, data={"step": 3}, metadata={}))
    ckpt.wait_until_finished()
    self.assertEqual(ckpt.all_steps(), [1, 2, 3])

  def test_nothing_restores_one_line_and_nothing_moved(self):
    self._save(steps=(1, 2))
    for step in (1, 2):
      _truncate(_largest_state_file(os.path.join(self.dir, str(step))))
    before = sorted(os.listdir(self.dir))
    ckpt = self._checkpointer()
    with self.assertRaises(errors.CheckpointError) as ctx:
      ckpt.restore(None, self.abstract)
    message = str(ctx.exception)
    self.assertNotIn("\n", message)
    self.assertRegex(message, r"step 2: .*truncated.*; step 1: .*truncated")
    self.assertEqual(sorted(os.listdir(self.dir)), before)
    # A named step is not walked back.
    with self.assertRaisesRegex(errors.CheckpointError, "checkpoint 2 in"):
      ckpt.restore(2, self.abstract)

  def test_a_changed_state_layout_is_refused_not_walked_back(self):
    self._save()
    ckpt = self._checkpointer()
    smaller = dict(self.abstract, opt_state=self.abstract["opt_state"][:1])
    with self.assertRaisesRegex(
        checkpointing.IncompatibleStateError,
        r"checkpoint 3 .* does not fit .*arrays the run does not have",
    ):
      ckpt.restore(None, smaller)
    calls = []

    def refuse(step, metadata):
      calls.append((step, metadata))
      raise errors.ConfigError("config.model.pretrained changed")

    with self.assertRaisesRegex(errors.ConfigError, "model.pretrained"):
      ckpt.restore(None, self.abstract, check_metadata=refuse)
    self.assertEqual(calls, [(3, {"s": 3})])
    self.assertEqual(ckpt.all_steps(), [1, 2, 3])  # nothing moved

  def test_readers_skip_a_bad_step_and_leave_the_owner_s_files(self):
    self._save(steps=(1, 2))
    _flip_a_bit(_largest_state_file(os.path.join(self.dir, "2")))
    # The owner's save in flight, as `--mode=export` beside training sees it.
    in_flight = os.path.join(self.dir, "6" + ocp.path.atomicity.TMP_DIR_SUFFIX)
    os.makedirs(os.path.join(in_flight, "state"))
    with open(os.path.join(in_flight, "state", "part"), "wb") as f:
      f.write(b"being written")
    before = sorted(os.listdir(self.dir))
    one_device = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params_target = _abstract(self.states[1]["params"], one_device, None)
    step, metadata, params = checkpointing.read_run_checkpoint(
        self.dir, lambda metadata: params_target
    )
    self.assertEqual((step, metadata), (1, {"s": 1}))
    _assert_trees_equal(self, params, self.states[1]["params"])
    params = checkpointing.restore_params_from(self.dir, params_target)
    _assert_trees_equal(self, params, self.states[1]["params"])
    with self.assertRaisesRegex(errors.CheckpointError, "sha256"):
      checkpointing.read_run_checkpoint(self.dir, lambda m: params_target, 2)
    self.assertEqual(sorted(os.listdir(self.dir)), before)
    with open(os.path.join(in_flight, "state", "part"), "rb") as f:
      self.assertEqual(f.read(), b"being written")
    # A missing run directory is reported, not created.
    missing = os.path.join(self.dir, "no_run", "checkpoints")
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      checkpointing.open_read_only(missing)
    self.assertFalse(os.path.exists(os.path.dirname(missing)))

  def test_a_failed_save_is_one_line_naming_the_cause(self):
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_JOB, self.dir],
        env=test_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [l for l in proc.stdout.splitlines() if "CheckpointError" in l]
    self.assertLen(lines, 1, proc.stdout + proc.stderr[-3000:])
    self.assertIn("saving checkpoint 1 in", lines[0])
    self.assertIn("File too large", lines[0])
    self.assertEqual(
        [n for n in os.listdir(self.dir) if n.isdigit()], []
    )  # nothing committed


class StopSignalsTest(parameterized.TestCase):

  @parameterized.parameters("SIGTERM", "SIGINT")
  def test_first_signal_is_recorded_and_handlers_restored(self, name):
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    with self.assertLogs(level="WARNING") as logs:
      with checkpointing.StopSignals() as signals:
        self.assertIsNone(signals.requested())
        os.kill(os.getpid(), signum)
        self.assertEqual(signals.requested(), name)
    self.assertIn(f"{name}: finishing the current step", logs.output[0])
    self.assertEqual(signal.getsignal(signum), before)

  def test_off_the_main_thread_it_does_nothing(self):
    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(
        target=lambda: checkpointing.StopSignals().__enter__()
    )
    thread.start()
    thread.join()
    self.assertEqual(signal.getsignal(signal.SIGTERM), before)

  @parameterized.parameters(
      ("SIGTERM", -signal.SIGTERM), ("SIGINT", -signal.SIGINT)
  )
  def test_a_second_signal_exits_at_once(self, name, returncode):
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_SIGNALS_JOB, name],
        env=test_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    self.assertEqual(proc.stdout.strip(), f"first: {name}")
    self.assertIn(f"{name} again: exiting now", proc.stderr)
    self.assertEqual(proc.returncode, returncode)  # killed by the signal


class ResumeOrInitTest(absltest.TestCase):
  """The resume order: own checkpoint, then init_from, then scratch."""

  def setUp(self):
    super().setUp()
    self.mesh = sharding.make_mesh((2, 4, 1))
    self.calls = 0
    self.abstract = _abstract(
        _make_state(self.mesh, sharding.FSDP), self.mesh, sharding.FSDP
    )

  def _init_fn(self):
    self.calls += 1
    return _make_state(self.mesh, sharding.FSDP, seed=0, step=0)

  def _checkpointer(self, directory):
    ckpt = checkpointing.Checkpointer(
        directory, save_interval_steps=1, max_to_keep=None
    )
    self.addCleanup(ckpt.close)
    return ckpt

  def test_scratch(self):
    ckpt = self._checkpointer(self.create_tempdir().full_path)
    state, data, source = checkpointing.resume_or_init(
        ckpt, self.abstract, init_fn=self._init_fn
    )
    self.assertEqual(source, "scratch")
    self.assertIsNone(data)
    self.assertEqual(self.calls, 1)
    _assert_trees_equal(self, state, _host(self._init_fn()))

  def test_init_from_replaces_only_the_params(self):
    other = self.create_tempdir().full_path
    # The other run trained on 8 data shards; this one shards over fsdp.
    other_state = _make_state(
        sharding.make_mesh((8, 1, 1)), sharding.DATA, seed=5, step=900
    )
    with self._checkpointer(other) as other_ckpt:
      other_ckpt.save(900, other_state, data={"step": 900}, metadata={})

    ckpt = self._checkpointer(self.create_tempdir().full_path)
    state, data, source = checkpointing.resume_or_init(
        ckpt, self.abstract, init_fn=self._init_fn, init_from=other
    )
    self.assertEqual(source, f"init_from:{other}")
    self.assertIsNone(data)
    fresh = _host(self._init_fn())
    _assert_trees_equal(self, state["params"], _host(other_state["params"]))
    _assert_trees_equal(self, state["opt_state"], fresh["opt_state"])
    self.assertEqual(int(state["step"]), 0)
    _assert_shardings(self, state, self.abstract)

  def test_init_from_at_a_given_step(self):
    other = self.create_tempdir().full_path
    states = {
        step: _make_state(self.mesh, sharding.FSDP, seed=seed, step=step)
        for step, seed in ((900, 5), (950, 6))
    }
    with self._checkpointer(other) as other_ckpt:
      for step, state in states.items():
        other_ckpt.save(step, state, data={"step": step}, metadata={})
    for init_step, want in ((None, 950), (900, 900)):
      ckpt = self._checkpointer(self.create_tempdir().full_path)
      state, _, source = checkpointing.resume_or_init(
          ckpt,
          self.abstract,
          init_fn=self._init_fn,
          init_from=other,
          init_step=init_step,
      )
      with self.subTest(init_step=init_step):
        _assert_trees_equal(
            self, state["params"], _host(states[want]["params"])
        )
        self.assertEqual(
            source, f"init_from:{other}" + ("" if init_step is None else "@900")
        )

  def test_own_checkpoint_wins_over_init_from(self):
    other = self.create_tempdir().full_path
    with self._checkpointer(other) as other_ckpt:
      other_ckpt.save(
          900,
          _make_state(self.mesh, sharding.FSDP, seed=5),
          data={},
          metadata={},
      )
    workdir = self.create_tempdir().full_path
    own = _make_state(self.mesh, sharding.FSDP, seed=6, step=40)
    expected = _host(own)
    with self._checkpointer(workdir) as ckpt:
      ckpt.save(40, own, data={"step": 40, "seed": 0}, metadata={})

    state, data, source = checkpointing.resume_or_init(
        self._checkpointer(workdir),
        self.abstract,
        init_fn=self._init_fn,
        init_from=other,
    )
    self.assertEqual(source, "checkpoint:40")
    self.assertEqual(data, {"step": 40, "seed": 0})
    self.assertEqual(self.calls, 0)
    _assert_trees_equal(self, state, expected)


if __name__ == "__main__":
  absltest.main()
