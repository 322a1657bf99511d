"""Imports TensorFlow with every GPU and TPU hidden from it.

JAX owns the accelerators; TF (TFDS tables, clu writers) would otherwise
reserve most GPU memory at device init. Import TF only as
`from retrieval_jax.data.tf_setup import tf`, before tensorflow_datasets/clu.
"""

from absl import logging

# TF >= 2.20 wheels load with RTLD_GLOBAL; a later `import triton` (3.7+, from
# PyPI's CUDA build of torch) then segfaults on TF's LLVM symbols
# (tensorflow#124205). Loaded first, triton keeps its own.
try:
  import triton  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def hide_accelerators() -> None:
  """Hides GPUs and TPUs from TF; RuntimeError if TF already holds one."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except ValueError:
      # This TF build knows no such device type.
      continue
    except RuntimeError as e:
      # TF is already initialised: harmless only if it found no such device.
      if tf.config.get_visible_devices(kind):
        raise RuntimeError(
            f"TensorFlow initialised its {kind}s before"
            " retrieval_jax.data.tf_setup could hide them; import it before"
            " anything that imports tensorflow"
        ) from e
  logging.log_first_n(
      logging.INFO, "TensorFlow devices: %s", 1, tf.config.get_visible_devices()
  )


hide_accelerators()
