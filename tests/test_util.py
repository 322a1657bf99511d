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
    os.environ.get("RETRIEVAL_JAX_SHARED_DATA",
                   REPO.parent / "shared" / "data"))
SCIFACT = SHARED_DATA / "scifact"
CRANFIELD = SHARED_DATA / "cranfield"
