"""Test-suite set-up: 8 fake CPU devices, so sharded paths run everywhere.

The flag must be in the environment before JAX creates its CPU client, which
happens at the first device query, after collection imports the modules.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _FLAG
  ).strip()
# TensorFlow (used by the data builders) must never take an accelerator, and
# its C++ logging would drown the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# absltest helpers (create_tempdir, ...) read absl flags; under pytest nobody
# parses them, so mark them parsed with their defaults.
from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()
