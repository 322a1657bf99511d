r"""Discrete key-value bottleneck: frozen codebook keys, learned values.

Träuble et al., "Discrete Key-Value Bottleneck", ICML 2023 (2207.11240). A
frozen z [B, e] is projected to C heads; each picks its nearest key(s) in a
frozen codebook [M, d_k] and fetches the matching learned values [M, d_v]; a
"mean" or "linear" decoder combines the heads. The argmin has no gradient, so a
step changes only the fetched value rows (what limits forgetting). Keys come
from EMA k-means (`initialize_keys`); codebooks shard heads on `CODEBOOK`.

Letters: b batch, e z width, c heads, m keys, d key / v value width, k top-k.
"""

from collections.abc import Iterable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.layers import core

PROJECTIONS = ("random", "split", "none")
DECODERS = ("mean", "linear")
VALUE_INITS = ("zeros", "normal")

# Distances decide a hard argmin: reduced-precision matmuls (TF32 on GPU,
# bf16 passes on TPU) would move rows across cell boundaries.
_HIGHEST = jax.lax.Precision.HIGHEST


class Frozen(nnx.Variable):
  """Non-trainable state (projections, keys): `nnx.Param` optimizers skip it."""


def _normal(std: float = 1.0):
  """Initializer N(0, std^2), drawn flat then reshaped.

  An N-d threefry draw compiles slower on CPU (5 s vs 0.4 s for [16, 64, 10]).
  """

  def init(key, shape, dtype):
    return std * jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(
        shape
    )

  return init


def _uniform(bound: float):
  """Initializer U(-bound, bound), flat draw (see `_normal`)."""

  def init(key, shape, dtype):
    return jax.random.uniform(
        key, (int(np.prod(shape)),), dtype, -bound, bound
    ).reshape(shape)

  return init


def _positive(name: str, value: int) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}: expected a positive integer")


def nearest_keys(
    keys_cmd: jax.Array, h_bcd: jax.Array, top_k: int = 1
) -> jax.Array:
  """[B, C, top_k] int32 indices of each head's nearest keys, nearest first.

  Ranks by ||K_j||^2 - 2 h.K_j (one matmul, no [B, C, M, d] difference
  tensor); ties go to the lower index.
  """
  dtype = jnp.promote_types(
      jnp.promote_types(keys_cmd.dtype, h_bcd.dtype), jnp.float32
  )
  keys_cmd = keys_cmd.astype(dtype)
  score_bcm = jnp.sum(jnp.square(keys_cmd), axis=-1)[None] - 2 * jnp.einsum(
      "bcd,cmd->bcm", h_bcd.astype(dtype), keys_cmd, precision=_HIGHEST
  )
  if top_k == 1:
    return jnp.argmin(score_bcm, axis=-1)[..., None].astype(jnp.int32)
  return jax.lax.top_k(-score_bcm, top_k)[1].astype(jnp.int32)


def gather_values(values_cmv: jax.Array, idx_bck: jax.Array) -> jax.Array:
  """Rows V_c[idx]: [C, M, v] x [B, C, k] -> [B, C, k, v]; vmap over heads."""
  return jax.vmap(lambda v_mv, i_bk: v_mv[i_bk], in_axes=(0, 1), out_axes=1)(
      values_cmv, idx_bck
  )


class KeyValueMemory(nnx.Module):
  """Bottleneck over frozen z [B, e]; `initialize_keys`, then train the Params.

  projection_ced: Frozen [C, e, d_k] N(0, 1/e) ("random" only, else None);
  keys_cmd: Frozen [C, M, d_k]; values_cmv: Param [C, M, d_v];
  kernel_cvo, bias_o: the "linear" decoder's Params [C, d_v, O] and [O].
  """

  def __init__(
      self,
      input_dim: int,
      num_heads: int,
      num_keys: int,
      key_dim: int,
      value_dim: int,
      *,
      projection: str = "random",
      decoder: str = "mean",
      num_outputs: int | None = None,
      top_k: int = 1,
      value_init: str = "zeros",
      dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Widths e, C, M, d_k, d_v; O = `num_outputs` ("linear"; "mean": d_v).

    `projection`: "random" (Gaussian, frozen), "split" (z as [C, d_k]: e = C
    d_k) or "none" (C = 1, d_k = e); `top_k`: keys averaged per head (1 = the
    paper's); `value_init` "zeros" gives untrained cells zero logits.
    """
    for name, value in (
        ("input_dim", input_dim),
        ("num_heads", num_heads),
        ("num_keys", num_keys),
        ("key_dim", key_dim),
        ("value_dim", value_dim),
        ("top_k", top_k),
    ):
      _positive(name, value)
    if projection not in PROJECTIONS:
      raise ValueError(
          f"projection={projection!r}: expected one of {PROJECTIONS}"
      )
    if decoder not in DECODERS:
      raise ValueError(f"decoder={decoder!r}: expected one of {DECODERS}")
    if value_init not in VALUE_INITS:
      raise ValueError(
          f"value_init={value_init!r}: expected one of {VALUE_INITS}"
      )
    if projection == "split" and input_dim != num_heads * key_dim:
      raise ValueError(
          "projection='split' needs input_dim = num_heads * key_dim; got "
          f"input_dim={input_dim}, num_heads={num_heads}, key_dim={key_dim}"
      )
    if projection == "none" and (num_heads != 1 or key_dim != input_dim):
      raise ValueError(
          "projection='none' needs num_heads=1 and key_dim=input_dim; got "
          f"num_heads={num_heads}, key_dim={key_dim}, input_dim={input_dim}"
      )
    if top_k > num_keys:
      raise ValueError(f"top_k={top_k}: at most num_keys={num_keys}")
    if decoder == "mean" and num_outputs not in (None, value_dim):
      raise ValueError(
          f"num_outputs={num_outputs!r}: the mean decoder "
          f"outputs value_dim={value_dim}"
      )
    if decoder == "linear":
      _positive("num_outputs", num_outputs)
    self.input_dim, self.num_heads, self.num_keys = (
        input_dim,
        num_heads,
        num_keys,
    )
    self.key_dim, self.value_dim, self.top_k = key_dim, value_dim, top_k
    self.projection, self.decoder = projection, decoder
    self.num_outputs = value_dim if decoder == "mean" else num_outputs
    if projection != "random":
      self.projection_ced = None
    else:
      # std 1/sqrt(e) keeps h on the scale of z's coordinates.
      self.projection_ced = Frozen(
          _normal(1 / np.sqrt(input_dim))(
              rngs.params(), (num_heads, input_dim, key_dim), dtype
          ),
          out_sharding=(sharding.CODEBOOK, None, None),
          eager_sharding=False,
      )
    self.keys_cmd = Frozen(
        _normal()(rngs.params(), (num_heads, num_keys, key_dim), dtype),
        out_sharding=(sharding.CODEBOOK, None, None),
        eager_sharding=False,
    )
    init = nnx.initializers.zeros if value_init == "zeros" else _normal()
    self.values_cmv = core.param(
        init,
        rngs,
        (num_heads, num_keys, value_dim),
        dtype,
        (sharding.CODEBOOK, None, None),
    )
    if decoder == "linear":
      bound = 1 / np.sqrt(num_heads * value_dim)
      self.kernel_cvo = core.param(
          _uniform(bound),
          rngs,
          (num_heads, value_dim, num_outputs),
          dtype,
          (sharding.CODEBOOK, None, None),
      )
      self.bias_o = core.param(
          nnx.initializers.zeros, rngs, (num_outputs,), dtype, (None,)
      )

  def project(self, z_be: jax.Array) -> jax.Array:
    """Per-head queries: [B, e] -> [B, C, d_k]; no gradient reaches z."""
    if z_be.ndim != 2 or z_be.shape[1] != self.input_dim:
      raise ValueError(
          f"z_be.shape={z_be.shape}: expected [B, {self.input_dim}]"
      )
    z_be = jax.lax.stop_gradient(z_be)
    if self.projection == "random":
      w_ced = jax.lax.stop_gradient(self.projection_ced[...])
      return jnp.einsum(
          "be,ced->bcd", z_be, w_ced.astype(z_be.dtype), precision=_HIGHEST
      )
    return z_be.reshape(z_be.shape[0], self.num_heads, self.key_dim)

  def select(self, z_be: jax.Array) -> jax.Array:
    """Selected key indices [B, C, top_k] int32, nearest first."""
    keys_cmd = jax.lax.stop_gradient(self.keys_cmd[...])
    return nearest_keys(keys_cmd, self.project(z_be), self.top_k)

  def fetch(self, idx_bck: jax.Array) -> jax.Array:
    """Mean of the selected values per head: [B, C, k] -> [B, C, d_v]."""
    return jnp.mean(gather_values(self.values_cmv[...], idx_bck), axis=2)

  def __call__(self, z_be: jax.Array) -> jax.Array:
    """[B, e] -> [B, O] outputs (logits for classification)."""
    v_bcv = self.fetch(self.select(z_be))
    if self.decoder == "mean":
      return jnp.mean(v_bcv, axis=1)
    return (
        jnp.einsum("bcv,cvo->bo", v_bcv, self.kernel_cvo[...])
        + self.bias_o[...]
    )


@jax.jit
def ema_init_state(
    keys_cmd: jax.Array, initial_count: Any = 1.0
) -> tuple[jax.Array, jax.Array]:
  """EMA stats reproducing `keys_cmd`: N_0 = c (scalar or [C, M]), S_0 = c K_0.

  With fixed assignments (n_j rows of mean mu_j per step), K_t - mu_j =
  g^t N_0 / N_t (K_0 - mu_j), N_t = g^t N_0 + (1 - g^t) n_j: exactly g^t decay
  when N_0 = n_j; a small count lets the first batches move the keys far.
  """
  counts_cm = jnp.broadcast_to(
      jnp.asarray(initial_count, keys_cmd.dtype), keys_cmd.shape[:2]
  )
  return counts_cm, counts_cm[..., None] * keys_cmd


@jax.jit
def ema_update(
    keys_cmd: jax.Array,
    counts_cm: jax.Array,
    sums_cmd: jax.Array,
    h_bcd: jax.Array,
    decay: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One EMA k-means step (decay g) on projected rows; returns the new state.

  N_j <- g N_j + (1-g) n_j, S_j <- g S_j + (1-g) sum_{h -> j} h, K_j = S_j / N_j
  for keys that got rows; others keep their value bit for bit, counts decay.
  """
  num_heads = keys_cmd.shape[0]
  idx_bc = nearest_keys(keys_cmd, h_bcd)[..., 0]
  head_bc = jnp.broadcast_to(jnp.arange(num_heads), idx_bc.shape)
  # Scatter-adds: no [B, C, M] one-hot.
  n_cm = jnp.zeros_like(counts_cm).at[head_bc, idx_bc].add(1)
  s_cmd = (
      jnp.zeros_like(sums_cmd)
      .at[head_bc, idx_bc]
      .add(h_bcd.astype(sums_cmd.dtype))
  )
  counts_cm = decay * counts_cm + (1 - decay) * n_cm
  sums_cmd = decay * sums_cmd + (1 - decay) * s_cmd
  # N_j > 0 where a row landed: the floor only guards the discarded branch.
  safe_cm = jnp.maximum(counts_cm, jnp.finfo(counts_cm.dtype).tiny)
  keys_cmd = jnp.where(
      (n_cm > 0)[..., None],
      (sums_cmd / safe_cm[..., None]).astype(keys_cmd.dtype),
      keys_cmd,
  )
  return keys_cmd, counts_cm, sums_cmd


@jax.jit
def reinit_dead_keys(
    keys_cmd: jax.Array,
    counts_cm: jax.Array,
    sums_cmd: jax.Array,
    h_ncd: jax.Array,
    threshold: Any,
    seed: Any,
    stream: Any = 0,
    reset_count: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Replaces keys with EMA count < `threshold` by random rows of `h_ncd`.

  A dead key of head c gets h[n, c], n uniform (int `seed`, `stream`); its
  stats restart at N = reset_count (default `threshold`), S = N * key.
  """
  num_heads, num_keys = counts_cm.shape
  reset_count = threshold if reset_count is None else reset_count
  key = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
  rows_cm = jax.random.randint(
      key, (num_heads * num_keys,), 0, h_ncd.shape[0]
  ).reshape(num_heads, num_keys)
  fresh_cmd = h_ncd[rows_cm, jnp.arange(num_heads)[:, None]].astype(
      keys_cmd.dtype
  )
  dead_cm = counts_cm < threshold
  keys_cmd = jnp.where(dead_cm[..., None], fresh_cmd, keys_cmd)
  counts_cm = jnp.where(
      dead_cm, jnp.asarray(reset_count, counts_cm.dtype), counts_cm
  )
  sums_cmd = jnp.where(
      dead_cm[..., None], counts_cm[..., None] * keys_cmd, sums_cmd
  )
  return keys_cmd, counts_cm, sums_cmd


def initialize_keys(
    model: KeyValueMemory,
    data: jax.Array | np.ndarray | Iterable[Any],
    steps: int,
    decay: float = 0.9,
    seed: int = 0,
    *,
    initial_count: float = 1.0,
    dead_threshold: float | None = None,
) -> jax.Array:
  """Sets `model.keys_cmd` in place by EMA k-means; returns [C, M] counts.

  Keys start as random projected rows of the first batch; then `steps` updates
  on `data` ([N, e], or an iterable of [B, e] that may end earlier), re-drawing
  keys below `dead_threshold` (None: never) after each.
  """
  if steps < 0:
    raise ValueError(f"steps={steps}: expected >= 0")
  if not 0 <= decay < 1:
    raise ValueError(f"decay={decay}: expected 0 <= decay < 1")
  full_batch = isinstance(data, (np.ndarray, jax.Array))
  batches = iter(()) if full_batch else iter(data)
  first = data if full_batch else next(batches, None)
  if first is None:
    raise ValueError("data: the iterable yielded no batch")
  graphdef, state = nnx.split(model)
  project = jax.jit(lambda s, z: nnx.merge(graphdef, s).project(z))
  h_bcd = project(state, jnp.asarray(first))
  rows, num_keys = h_bcd.shape[0], model.num_keys
  # numpy draws the starting rows: no PRNG kernels to compile.
  rng = np.random.default_rng(seed)
  if rows >= num_keys:
    rows_cm = np.stack(
        [rng.permutation(rows)[:num_keys] for _ in range(model.num_heads)]
    )
  else:
    rows_cm = rng.integers(0, rows, (model.num_heads, num_keys))
  keys_cmd = jnp.asarray(
      np.asarray(h_bcd)[rows_cm, np.arange(model.num_heads)[:, None]],
      model.keys_cmd[...].dtype,
  )
  counts_cm, sums_cmd = ema_init_state(keys_cmd, initial_count)
  for step in range(steps):
    if step > 0 and not full_batch:
      batch = next(batches, None)
      if batch is None:
        break
      h_bcd = project(state, jnp.asarray(batch))
    keys_cmd, counts_cm, sums_cmd = ema_update(
        keys_cmd, counts_cm, sums_cmd, h_bcd, decay
    )
    if dead_threshold is not None:
      keys_cmd, counts_cm, sums_cmd = reinit_dead_keys(
          keys_cmd, counts_cm, sums_cmd, h_bcd, dead_threshold, seed, step + 1
      )
  model.keys_cmd[...] = keys_cmd
  return counts_cm
