"""Tests for io.lock_workdir: one process per workdir, no stale locks."""

import os
import signal
import socket
import subprocess
import sys

from absl.testing import absltest

from retrieval_jax import errors
from retrieval_jax import io
import test_util

# Holds the lock of argv[1], says so, then waits to be killed.
_HOLDER = """
import sys, time
from retrieval_jax import io
with io.lock_workdir(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def _start_holder(workdir):
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, workdir],
      env=test_util.subprocess_env(),
      stdout=subprocess.PIPE,
      text=True,
  )
  assert proc.stdout.readline().strip() == "locked"
  return proc


class WorkdirLockTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = os.path.join(self.create_tempdir().full_path, "run")

  def test_second_process_is_refused_naming_the_holder(self):
    holder = _start_holder(self.workdir)
    self.addCleanup(holder.kill)
    with self.assertRaises(errors.WorkdirBusyError) as ctx:
      with io.lock_workdir(self.workdir):
        self.fail("entered a locked workdir")
    message = str(ctx.exception)
    self.assertIn(f"pid {holder.pid} on host {socket.gethostname()}", message)
    self.assertIn(self.workdir, message)
    self.assertNotIn("\n", message)

  def test_a_killed_holder_frees_the_lock(self):
    holder = _start_holder(self.workdir)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs
    holder.wait()
    self.assertTrue(os.path.exists(os.path.join(self.workdir, io.LOCK_FILE)))
    with io.lock_workdir(self.workdir) as path:
      with open(path, encoding="utf-8") as f:
        self.assertIn(f"pid={os.getpid()} ", f.read())

  def test_released_on_exit_and_reentrant(self):
    with io.lock_workdir(self.workdir):
      with io.lock_workdir(self.workdir + "/"):  # the same directory
        pass
      # Still held after the inner block: another process is refused.
      proc = subprocess.run(
          [sys.executable, "-c", _HOLDER, self.workdir],
          env=test_util.subprocess_env(),
          capture_output=True,
          text=True,
          timeout=120,
      )
      self.assertNotEqual(proc.returncode, 0)
      self.assertIn("WorkdirBusyError", proc.stderr)
      self.assertIn(f"pid {os.getpid()}", proc.stderr)
    holder = _start_holder(self.workdir)  # free once the outer block ends
    holder.kill()
    holder.wait()

  def test_creates_the_workdir_and_reports_os_errors(self):
    with io.lock_workdir(self.workdir):
      self.assertTrue(os.path.isdir(self.workdir))
    a_file = os.path.join(self.workdir, "file")
    with open(a_file, "w", encoding="utf-8"):
      pass
    with self.assertRaises(NotADirectoryError):
      with io.lock_workdir(os.path.join(a_file, "run")):
        pass


if __name__ == "__main__":
  absltest.main()
