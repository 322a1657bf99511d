"""The training state: a plain pytree, its abstract twin and its shardings.

The state is {step: int32 [], params: NNX Params as a pure dict, opt_state},
one structure for Orbax, jit shardings and donation; the static rest is bound
once into the step (`ModelDef`). Params shard by their logical axes under the
current rules; optimizer leaves shaped like a parameter follow it, the rest is
replicated. A kind may add an `extra` entry (`ExtraState`: a MoCo queue and
key encoder), saved and restored with the rest.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retrieval_jax import sharding

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """The static half of a split encoder (`nnx.split(model, nnx.Param, ...)`).

  `rest`: the non-Param NNX state (RNG streams; small, replicated);
  `logical_axes`: {param path: logical axis names} from `out_sharding`.
  """

  graphdef: nnx.GraphDef
  rest: nnx.State
  logical_axes: dict[tuple, tuple[str | None, ...]]

  def merge(self, params: PyTree) -> nnx.Module:
    """The module holding `params` (a pure dict); call inside jit."""
    return nnx.merge(self.graphdef, params, self.rest)


def split_model(model: nnx.Module) -> tuple[ModelDef, PyTree]:
  """Splits an NNX encoder into its static `ModelDef` and pure-dict params."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logical_axes = {}
  for path, variable in nnx.to_flat_state(params):
    axes = variable.get_metadata().get("out_sharding")
    logical_axes[tuple(path)] = (
        tuple(axes) if axes else (None,) * len(variable.shape)
    )
  return ModelDef(graphdef, rest, logical_axes), nnx.to_pure_dict(params)


def _path_key(entry) -> Any:
  """A tree-path entry as the plain key it stands for."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def param_shardings(
    model_def: ModelDef, params: PyTree, mesh: Mesh, rules=None
) -> PyTree:
  """NamedSharding per parameter from its logical axes and `rules`."""

  def one(path, leaf):
    del leaf
    key = tuple(_path_key(p) for p in path)
    return sharding.named_sharding(mesh, model_def.logical_axes[key], rules)

  return jax.tree_util.tree_map_with_path(one, params)


def opt_state_shardings(
    tx: optax.GradientTransformation,
    abstract_opt_state: PyTree,
    params_shardings: PyTree,
    mesh: Mesh,
) -> PyTree:
  """Optax state shardings: param-shaped leaves (moments) follow the param."""
  return optax.tree_map_params(
      tx,
      lambda _, shard: shard,
      abstract_opt_state,
      params_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding),
  )


@dataclasses.dataclass(frozen=True)
class ExtraState:
  """Training state a kind keeps beside the params, under `state["extra"]`.

  init: `(model_def, params) -> extra`, jittable (the step-0 value).
  shardings: `(abstract extra, param shardings, mesh) -> NamedSharding tree`.
  The kind's loss reads it and returns its next value (`steps.train_step`).
  """

  init: Callable[["ModelDef", PyTree], PyTree]
  shardings: Callable[[PyTree, PyTree, Mesh], PyTree]


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Abstract state (shapes, dtypes, shardings) and its shardings."""

  abstract: PyTree  # jax.ShapeDtypeStruct leaves with .sharding set
  shardings: PyTree  # NamedSharding leaves, same structure
  init_extra: Callable[[PyTree], PyTree] | None = None  # params -> extra


def state_layout(
    model_def: ModelDef,
    params: PyTree,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules=None,
    extra: ExtraState | None = None,
) -> StateLayout:
  """The state's abstract value and shardings: restore target, jit in/out.

  `params` may be abstract; `rules` None: `sharding.current_rules()`;
  `extra`: adds `state["extra"]`.
  """
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
  )
  p_shardings = param_shardings(model_def, abstract_params, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  o_shardings = opt_state_shardings(tx, abstract_opt, p_shardings, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = {
      "step": replicated,
      "params": p_shardings,
      "opt_state": o_shardings,
  }
  abstract = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": abstract_params,
      "opt_state": abstract_opt,
  }
  init_extra = None
  if extra is not None:
    init_extra = functools.partial(extra.init, model_def)
    abstract["extra"] = jax.eval_shape(init_extra, abstract_params)
    shardings["extra"] = extra.shardings(abstract["extra"], p_shardings, mesh)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      shardings,
  )
  return StateLayout(abstract, shardings, init_extra)


def create(
    params: PyTree, tx: optax.GradientTransformation, layout: StateLayout
) -> PyTree:
  """The step-0 state: `params` (host or device) placed, a fresh optimizer."""
  params = jax.device_put(params, layout.shardings["params"])
  # Jit the init so the moments are created directly in their shards.
  opt_state = jax.jit(tx.init, out_shardings=layout.shardings["opt_state"])(
      params
  )
  step = jax.device_put(jnp.zeros((), jnp.int32), layout.shardings["step"])
  state = {"step": step, "params": params, "opt_state": opt_state}
  if layout.init_extra is not None:
    state["extra"] = jax.jit(
        layout.init_extra, out_shardings=layout.shardings["extra"]
    )(params)
  return state


def variable_shardings(state: nnx.State, mesh: Mesh) -> PyTree:
  """A whole NNX state's shardings: by logical axes, else replicated."""

  def one(variable):
    axes = variable.get_metadata().get("out_sharding")
    return (
        sharding.named_sharding(mesh, axes)
        if axes
        else sharding.replicated(mesh)
    )

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def num_params(params: PyTree) -> int:
  """Total parameter count."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def map_params(fn: Callable[[Sequence, Any], Any], params: PyTree) -> PyTree:
  """`fn(path_keys, leaf)` over params, with plain keys (str / int)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(tuple(_path_key(p) for p in path), x), params
  )
