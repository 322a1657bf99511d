"""Paths shared by the tests: the repository and the real test collections.

The collections beside the checkout (../shared/data, or the directory named
by RETRIEVAL_JAX_SHARED_DATA) are read-only; tests that need one skip when it
is absent. LIMIT-small ships with the repository and is always there.
"""

import os
import pathlib

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
