r"""Discrete key-value bottleneck experiments: one dispatch on the variant.

`config.experiment` (config.py): "digits" and "toy" run the class-incremental
comparison (class_incremental.py), "retrieval" the continual query adapter
(memory_adapter.py).

  python -m experiments.kv_memory.run \
      --config experiments/kv_memory/config.py[:toy|:retrieval][,smoke] \
      --workdir DIR
"""

from experiments import entry
from experiments.kv_memory import class_incremental
from experiments.kv_memory import memory_adapter
from retrieval_jax import errors


def run(config, workdir):
  """Runs the experiment `config.experiment` names; returns its results."""
  if config.experiment == "retrieval":
    return memory_adapter.run(config, workdir)
  if config.experiment in ("digits", "toy"):
    return class_incremental.run_experiment(config, workdir)
  raise errors.ConfigError(
      f"config.experiment={config.experiment!r}: "
      "expected 'digits', 'toy' or 'retrieval'"
  )


if __name__ == "__main__":
  entry.main(run)
