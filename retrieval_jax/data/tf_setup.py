"""Imports TensorFlow with every GPU and TPU hidden from it.

TensorFlow is only a side library here (preparing TFDS tables, clu's
writers); JAX owns the accelerators. Left alone, TF reserves most of each GPU's memory the
moment it initialises its devices, and JAX then runs out. Every project
module imports TF through this one:

  from retrieval_jax.data.tf_setup import tf

so the devices are hidden before anything else can initialise them. Import it
before `tensorflow_datasets` or `clu`, which import TF themselves.
"""

from absl import logging
import tensorflow as tf


def hide_accelerators() -> None:
  """Makes GPUs and TPUs invisible to TensorFlow; idempotent.

  Raises:
    RuntimeError: TF had already initialised its devices with an accelerator
      visible, so it may hold accelerator memory that JAX needs. Import this
      module before anything else touches TF.
  """
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except ValueError:
      # This TF build knows no such device type: nothing to hide.
      continue
    except RuntimeError as e:
      # Raised once TF's runtime is initialised. Harmless if it found no
      # device of this kind (CPU-only hosts); otherwise the damage is done.
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
