#!/usr/bin/env bash
# The accelerator benchmark (README.md beside this file):
#
#   bash experiments/accelerator/run.sh [--smoke] [--out DIR] [more options]
#
# Installs what the image lacks (ml_collections, bm25s, PyStemmer, PyYAML,
# the project) from the wheelhouse (build_wheelhouse.sh) with pip --no-index
# --no-deps into a folder put on PYTHONPATH, only for modules that are not
# importable; then runs experiments/accelerator/benchmark.py, which writes
# DIR/accelerator.json and DIR/accelerator.md (DIR default:
# /tmp/rj_accelerator, or $OUT on a device machine). Other options go to the
# benchmark (--sections, --isolate, --data, --model). --smoke: CPU only,
# tiny sizes. Exit status: the benchmark's (1 if any section failed).
#
# Environment: PYTHON (default python3), ACCELERATOR_WHEELHOUSE (default
# experiments/accelerator/wheelhouse), ACCELERATOR_SITE (install folder,
# default $TMPDIR/retrieval_jax_accelerator_site).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
cd "${REPO}"
PYTHON="${PYTHON:-python3}"
WHEELHOUSE="${ACCELERATOR_WHEELHOUSE:-${HERE}/wheelhouse}"
SITE="${ACCELERATOR_SITE:-${TMPDIR:-/tmp}/retrieval_jax_accelerator_site}"

args=()
out="${OUT:-/tmp/rj_accelerator}"
smoke=0
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --smoke) smoke=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

export PYTHONPATH="${REPO}:${SITE}${PYTHONPATH:+:${PYTHONPATH}}"
# JAX and torch share the device: JAX allocates as it goes instead of
# taking 75% of the memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
# Room for M2-BERT-80M's backward at 32k tokens (JAX's cap is 75% by default).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if ((smoke)); then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
fi

# import name -> wheel name, for what the image may lack.
missing="$("${PYTHON}" - <<'PY'
import importlib.util

need = {
    "retrieval_jax": "retrieval_jax",
    "ml_collections": "ml_collections",
    "bm25s": "bm25s",
    "Stemmer": "PyStemmer",
    "yaml": "PyYAML",
}
print(" ".join(w for m, w in need.items() if importlib.util.find_spec(m) is None))
PY
)"
if [[ -n "${missing}" ]]; then
  if [[ ! -d "${WHEELHOUSE}" ]]; then
    echo "error: not importable: ${missing}; no wheelhouse at ${WHEELHOUSE}" \
      "(build it with experiments/accelerator/build_wheelhouse.sh)" >&2
    exit 2
  fi
  echo "[accelerator] installing ${missing} from ${WHEELHOUSE} into ${SITE}"
  mkdir -p "${SITE}"
  # shellcheck disable=SC2086  # one word per requirement
  if ! "${PYTHON}" -m pip install --quiet --no-index --find-links "${WHEELHOUSE}" \
      --no-deps --ignore-requires-python --target "${SITE}" ${missing}; then
    # No pip in the image: a wheel is a zip of its import tree.
    echo "[accelerator] pip failed; unpacking the wheels instead"
    "${PYTHON}" - "${WHEELHOUSE}" "${SITE}" ${missing} <<'PY'
import pathlib
import sys
import zipfile

wheelhouse, site = pathlib.Path(sys.argv[1]), sys.argv[2]
for name in sys.argv[3:]:
  prefix = name.lower().replace("-", "_") + "-"
  wheels = [w for w in wheelhouse.glob("*.whl") if w.name.lower().startswith(prefix)]
  if not wheels:
    sys.exit(f"no wheel for {name} in {wheelhouse}")
  with zipfile.ZipFile(wheels[0]) as z:
    z.extractall(site)
PY
  fi
fi

mkdir -p "${out}"
exec "${PYTHON}" -m experiments.accelerator.benchmark --out "${out}" "${args[@]}"
