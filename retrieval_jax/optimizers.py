"""Optimizers and learning-rate schedules from the `optim` config block.

The fields are documented in `configs/train.py`. Weight decay follows BERT:
matrices and embedding tables decay, biases and LayerNorm parameters do not
(decaying a LayerNorm scale towards 0 fights the normalisation).
"""

from typing import Any

import jax
import ml_collections
import optax

from retrieval_jax import errors

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adam", "sgd")


class OptimizerConfigError(errors.ConfigError):
  """An `optim.*` value is invalid; the message names the key."""


def warmup_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
  """Warm-up length in steps: `warmup_steps`, else a fraction of the total."""
  if optim.get("warmup_steps", 0):
    return int(optim.warmup_steps)
  return int(round(optim.get("warmup_fraction", 0.0) * total_steps))


def make_schedule(
    optim: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then the configured decay.

  Returns step -> learning rate; the decay ends at `total_steps`.
  """
  if optim.decay not in SCHEDULES:
    raise OptimizerConfigError(
        f"config.optim.decay={optim.decay!r}: expected one of {SCHEDULES}"
    )
  if optim.learning_rate <= 0:
    raise OptimizerConfigError(
        f"config.optim.learning_rate={optim.learning_rate}: must be > 0"
    )
  peak = float(optim.learning_rate)
  end = peak * float(optim.end_factor)
  warmup = min(warmup_steps(optim, total_steps), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if optim.decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif optim.decay == "cosine":
    after = optax.cosine_decay_schedule(
        peak, decay_steps, alpha=float(optim.end_factor)
    )
  else:
    after = optax.constant_schedule(peak)
  if not warmup:
    return after
  # From 0, as sentence-transformers / HF do: the first update is a no-op.
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), after], [warmup]
  )


def decay_mask(params: Any, decay_all: bool = False) -> Any:
  """True for the leaves weight decay applies to (ndim >= 2 by default)."""
  return jax.tree.map(lambda x: decay_all or x.ndim >= 2, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain described by `optim` (fields: `configs/train.py`).

  Returns (transformation, learning-rate schedule) over `total_steps`.
  """
  if optim.name not in OPTIMIZERS:
    raise OptimizerConfigError(
        f"config.optim.name={optim.name!r}: expected one of {OPTIMIZERS}"
    )
  if optim.clip_norm < 0:
    raise OptimizerConfigError(
        f"config.optim.clip_norm={optim.clip_norm}: must be >= 0"
    )
  schedule = make_schedule(optim, total_steps)
  parts = []
  if optim.clip_norm:
    parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
  if optim.name == "adamw":
    decay_all = bool(optim.get("decay_norms_and_biases", False))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=float(optim.weight_decay),
            mask=lambda p: decay_mask(p, decay_all),
        )
    )
  elif optim.name == "adam":
    parts.append(optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps))
  else:
    parts.append(optax.sgd(schedule))
  return optax.chain(*parts), schedule
