"""retrieval_jax: neural retrieval in JAX/Flax; `load` and `index` are the
notebook API (`retrieval_jax/api.py`)."""


def __getattr__(name):
  # Lazy: importing the package does not import JAX.
  if name in ("load", "index"):
    from retrieval_jax import api  # pylint: disable=g-import-not-at-top

    return getattr(api, name)
  raise AttributeError(f"module retrieval_jax has no attribute {name!r}")
