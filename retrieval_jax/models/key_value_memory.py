r"""Discrete key-value bottleneck: frozen codebook keys, learned values.

"Discrete Key-Value Bottleneck" (Träuble et al., ICML 2023, arXiv
2207.11240). On top of a frozen encoder's vector z in R^e:

1. C heads through fixed projections, h_c = z W_c in R^{d_k},
   W_c in R^{e x d_k} (Gaussian N(0, 1/e), frozen); or contiguous slices
   of z ("split", e = C d_k); or z itself ("none", C = 1, d_k = e).
2. Per head a key codebook K_c in R^{M x d_k} and a value codebook
   V_c in R^{M x d_v}; d_k and d_v are independent.
3. Selection of the nearest key(s),
     i_c = argmin_j ||h_c - K_c[j]||^2         (top-1), or
     I_c = the k nearest j                      (top-k).
4. Fetch, v_c = V_c[i_c] (top-k: the plain mean of V_c[j], j in I_c).
5. Decoder: "mean" (non-parametric), out = (1/C) sum_c v_c, so d_v is the
   output width (logits for classification); or "linear" (parametric),
   out = [v_1, ..., v_C] A + b with A in R^{C d_v x O}.

The selection is a hard argmin and is not differentiated (no
straight-through estimator): the task loss reaches only the fetched value
rows. d out / d V_c[j] is nonzero only for j in I_c, and z, the projections
and the keys get exactly zero gradient (z and both frozen arrays also pass
through `jax.lax.stop_gradient`). One training step therefore changes only
the value rows its batch fetched, which is what limits forgetting in
class-incremental learning.

Keys are learned before the task, as their own phase, by EMA k-means on
unlabelled data (`initialize_keys`, built from the plain functions
`ema_init_state`, `ema_update` and `reinit_dead_keys`); per key j,

  N_j <- g N_j + (1 - g) n_j,   S_j <- g S_j + (1 - g) sum_{h -> j} h,
  K_j = S_j / N_j,

with n_j the number of rows whose nearest key is j and decay g. Afterwards
keys and projections live in `Frozen` variables (an `nnx.Variable`
subclass, never an `nnx.Param`), so `nnx.grad`, `nnx.Optimizer` and the
`train_state` helpers, which all select `nnx.Param`, never touch them.

Memory: C M (d_k + d_v) codebook entries (plus C e d_k for random
projections and C d_v O + O for the linear decoder). The codebooks carry
the logical axis `sharding.CODEBOOK` on their head axis, so a large memory
splits over the mesh's `model` axis, head by head; selection, fetch and the
mean over heads are then local to each device up to one reduction.

Shape letters: b batch, e encoder width, c heads (C), m keys per codebook
(M), d key width (d_k), v value width (d_v), k selected keys per head,
o outputs.
"""

from collections.abc import Iterable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
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
  """A non-trainable array of the module state (projections, keys).

  Not an `nnx.Param`: optimizers and `nnx.grad` built on `nnx.Param`
  ignore it, and `nnx.state(model, Frozen)` selects it.
  """


def _normal(std: float = 1.0):
  """Initializer N(0, std^2), drawn as one flat vector then reshaped.

  Same law as an N-d draw; XLA's CPU compiler takes far longer on an N-d
  threefry draw than on a flat one (5 s against 0.4 s for [16, 64, 10]),
  and that compile is paid per shape in every fresh process.
  """

  def init(key, shape, dtype):
    return std * jax.random.normal(key, (int(np.prod(shape)),),
                                   dtype).reshape(shape)

  return init


def _uniform(bound: float):
  """Initializer U(-bound, bound), flat draw (see `_normal`)."""

  def init(key, shape, dtype):
    return jax.random.uniform(key, (int(np.prod(shape)),), dtype, -bound,
                              bound).reshape(shape)

  return init


def _positive(name: str, value: int) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}: expected a positive integer")


def nearest_keys(keys_cmd: jax.Array, h_bcd: jax.Array,
                 top_k: int = 1) -> jax.Array:
  """Indices of the `top_k` nearest keys per head, nearest first.

  ||h - K_j||^2 = ||h||^2 - 2 h.K_j + ||K_j||^2; the first term is the same
  for every j, so the ranking uses ||K_j||^2 - 2 h.K_j (one matmul, no
  [B, C, M, d] difference tensor). Ties go to the lower index.

  Args:
    keys_cmd: [C, M, d] keys.
    h_bcd: [B, C, d] projected rows.
    top_k: keys per head, 1 <= top_k <= M.

  Returns:
    [B, C, top_k] int32 key indices.
  """
  dtype = jnp.promote_types(jnp.promote_types(keys_cmd.dtype, h_bcd.dtype),
                            jnp.float32)
  keys_cmd = keys_cmd.astype(dtype)
  score_bcm = (jnp.sum(jnp.square(keys_cmd), axis=-1)[None]
               - 2 * jnp.einsum("bcd,cmd->bcm", h_bcd.astype(dtype),
                                keys_cmd, precision=_HIGHEST))
  if top_k == 1:
    return jnp.argmin(score_bcm, axis=-1)[..., None].astype(jnp.int32)
  return jax.lax.top_k(-score_bcm, top_k)[1].astype(jnp.int32)


def gather_values(values_cmv: jax.Array, idx_bck: jax.Array) -> jax.Array:
  """Per-head rows V_c[idx[b, c, k]]: [C, M, v] x [B, C, k] -> [B, C, k, v].

  A gather batched over the head axis (vmap), so with heads sharded each
  device gathers from its own codebooks; its gradient is a scatter-add
  into exactly the fetched rows.
  """
  return jax.vmap(lambda v_mv, i_bk: v_mv[i_bk], in_axes=(0, 1),
                  out_axes=1)(values_cmv, idx_bck)


class KeyValueMemory(nnx.Module):
  """Discrete key-value bottleneck over frozen vectors z [B, e].

  Build with `KeyValueMemory(e, C, M, d_k, d_v, rngs=nnx.Rngs(0))`, set the
  keys with `initialize_keys`, then train the values (and the linear
  decoder) with any optimizer over `nnx.Param`.

  Attributes:
    projection_ced: Frozen [C, e, d_k] Gaussian N(0, 1/e) projections
      ("random" only; None otherwise).
    keys_cmd: Frozen [C, M, d_k] keys (N(0, 1) until initialised).
    values_cmv: Param [C, M, d_v] values (zeros or N(0, 1)).
    kernel_cvo, bias_o: Param [C, d_v, O] and [O], the linear decoder's
      weights ("linear" only); [v_1..v_C] A = sum_c v_c A_c.
  """

  def __init__(self, input_dim: int, num_heads: int, num_keys: int,
               key_dim: int, value_dim: int, *, projection: str = "random",
               decoder: str = "mean", num_outputs: int | None = None,
               top_k: int = 1, value_init: str = "zeros",
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Args:
      input_dim: e, width of z.
      num_heads: C, number of codebooks.
      num_keys: M, keys (and values) per codebook.
      key_dim: d_k.
      value_dim: d_v; the output width of the "mean" decoder.
      projection: "random" (Gaussian, frozen), "split" (z reshaped to
        [C, d_k], needs e = C d_k) or "none" (C = 1, d_k = e).
      decoder: "mean" (non-parametric) or "linear" (parametric).
      num_outputs: O; required by "linear"; "mean" accepts None or d_v.
      top_k: keys averaged per head (1 = the paper's top-1).
      value_init: "zeros" (untrained cells give zero logits) or "normal".
      dtype: storage dtype of every array.
      rngs: draws the `params` keys.
    """
    for name, value in (("input_dim", input_dim), ("num_heads", num_heads),
                        ("num_keys", num_keys), ("key_dim", key_dim),
                        ("value_dim", value_dim), ("top_k", top_k)):
      _positive(name, value)
    if projection not in PROJECTIONS:
      raise ValueError(f"projection={projection!r}: expected one of "
                       f"{PROJECTIONS}")
    if decoder not in DECODERS:
      raise ValueError(f"decoder={decoder!r}: expected one of {DECODERS}")
    if value_init not in VALUE_INITS:
      raise ValueError(f"value_init={value_init!r}: expected one of "
                       f"{VALUE_INITS}")
    if projection == "split" and input_dim != num_heads * key_dim:
      raise ValueError(
          f"projection='split' needs input_dim = num_heads * key_dim; got "
          f"input_dim={input_dim}, num_heads={num_heads}, key_dim={key_dim}")
    if projection == "none" and (num_heads != 1 or key_dim != input_dim):
      raise ValueError(
          f"projection='none' needs num_heads=1 and key_dim=input_dim; got "
          f"num_heads={num_heads}, key_dim={key_dim}, input_dim={input_dim}")
    if top_k > num_keys:
      raise ValueError(f"top_k={top_k}: at most num_keys={num_keys}")
    if decoder == "mean" and num_outputs not in (None, value_dim):
      raise ValueError(f"num_outputs={num_outputs!r}: the mean decoder "
                       f"outputs value_dim={value_dim}")
    if decoder == "linear":
      _positive("num_outputs", num_outputs)
    self.input_dim, self.num_heads, self.num_keys = (input_dim, num_heads,
                                                     num_keys)
    self.key_dim, self.value_dim, self.top_k = key_dim, value_dim, top_k
    self.projection, self.decoder = projection, decoder
    self.num_outputs = value_dim if decoder == "mean" else num_outputs
    if projection != "random":
      self.projection_ced = None
    else:
      # std 1/sqrt(e): each coordinate of h has the mean square of z's
      # coordinates, so keys live on the scale of the data.
      self.projection_ced = Frozen(
          _normal(1 / np.sqrt(input_dim))(
              rngs.params(), (num_heads, input_dim, key_dim), dtype),
          out_sharding=(sharding.CODEBOOK, None, None), eager_sharding=False)
    self.keys_cmd = Frozen(
        _normal()(rngs.params(), (num_heads, num_keys, key_dim), dtype),
        out_sharding=(sharding.CODEBOOK, None, None), eager_sharding=False)
    init = nnx.initializers.zeros if value_init == "zeros" else _normal()
    self.values_cmv = core.param(init, rngs, (num_heads, num_keys, value_dim),
                                 dtype, (sharding.CODEBOOK, None, None))
    if decoder == "linear":
      bound = 1 / np.sqrt(num_heads * value_dim)
      self.kernel_cvo = core.param(_uniform(bound), rngs,
                                   (num_heads, value_dim, num_outputs), dtype,
                                   (sharding.CODEBOOK, None, None))
      self.bias_o = core.param(nnx.initializers.zeros, rngs, (num_outputs,),
                               dtype, (None,))

  def project(self, z_be: jax.Array) -> jax.Array:
    """Per-head queries: [B, e] -> [B, C, d_k]; no gradient reaches z."""
    if z_be.ndim != 2 or z_be.shape[1] != self.input_dim:
      raise ValueError(f"z_be.shape={z_be.shape}: expected [B, "
                       f"{self.input_dim}]")
    z_be = jax.lax.stop_gradient(z_be)
    if self.projection == "random":
      w_ced = jax.lax.stop_gradient(self.projection_ced[...])
      return jnp.einsum("be,ced->bcd", z_be, w_ced.astype(z_be.dtype),
                        precision=_HIGHEST)
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
    return (jnp.einsum("bcv,cvo->bo", v_bcv, self.kernel_cvo[...])
            + self.bias_o[...])


# Key initialisation (EMA k-means) runs as its own phase, on the keys array.


@jax.jit
def ema_init_state(keys_cmd: jax.Array, initial_count: Any = 1.0
                   ) -> tuple[jax.Array, jax.Array]:
  """EMA statistics that reproduce `keys_cmd`: N_0 = c, S_0 = c K_0.

  With assignments that never change (n_j rows of mean mu_j per step),

    K_t - mu_j = g^t N_0 / N_t (K_0 - mu_j),  N_t = g^t N_0 + (1 - g^t) n_j,

  so K_t -> mu_j, and K_t - mu_j = g^t (K_0 - mu_j) exactly when N_0 = n_j.
  A small count lets the first batches move the keys far.

  Args:
    keys_cmd: [C, M, d] starting keys.
    initial_count: N_0, a scalar or [C, M].

  Returns:
    counts_cm [C, M] and sums_cmd [C, M, d], in the keys' dtype.
  """
  counts_cm = jnp.broadcast_to(
      jnp.asarray(initial_count, keys_cmd.dtype), keys_cmd.shape[:2])
  return counts_cm, counts_cm[..., None] * keys_cmd


@jax.jit
def ema_update(keys_cmd: jax.Array, counts_cm: jax.Array,
               sums_cmd: jax.Array, h_bcd: jax.Array, decay: Any
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One EMA k-means step on a batch of projected rows.

  Each row goes to its nearest key per head; then N_j <- g N_j + (1-g) n_j,
  S_j <- g S_j + (1-g) sum_{h -> j} h and K_j = S_j / N_j for the keys
  that got rows. A key without rows keeps its value bit for bit (S_j / N_j
  is only its old value up to rounding), while its count keeps decaying,
  which is what `reinit_dead_keys` reads.

  Args:
    keys_cmd: [C, M, d] keys.
    counts_cm: [C, M] EMA counts N.
    sums_cmd: [C, M, d] EMA sums S.
    h_bcd: [B, C, d] projected rows (`KeyValueMemory.project`).
    decay: g in [0, 1).

  Returns:
    (keys_cmd, counts_cm, sums_cmd), updated.
  """
  num_heads = keys_cmd.shape[0]
  idx_bc = nearest_keys(keys_cmd, h_bcd)[..., 0]
  head_bc = jnp.broadcast_to(jnp.arange(num_heads), idx_bc.shape)
  # Scatter-adds: no [B, C, M] one-hot.
  n_cm = jnp.zeros_like(counts_cm).at[head_bc, idx_bc].add(1)
  s_cmd = jnp.zeros_like(sums_cmd).at[head_bc, idx_bc].add(
      h_bcd.astype(sums_cmd.dtype))
  counts_cm = decay * counts_cm + (1 - decay) * n_cm
  sums_cmd = decay * sums_cmd + (1 - decay) * s_cmd
  # N_j >= (1 - g) n_j > 0 where a row landed; the floor only guards the
  # branch that `where` discards.
  safe_cm = jnp.maximum(counts_cm, jnp.finfo(counts_cm.dtype).tiny)
  keys_cmd = jnp.where((n_cm > 0)[..., None],
                       (sums_cmd / safe_cm[..., None]).astype(keys_cmd.dtype),
                       keys_cmd)
  return keys_cmd, counts_cm, sums_cmd


@jax.jit
def reinit_dead_keys(keys_cmd: jax.Array, counts_cm: jax.Array,
                     sums_cmd: jax.Array, h_ncd: jax.Array, threshold: Any,
                     seed: Any, stream: Any = 0, reset_count: Any = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Replaces keys with EMA count below `threshold` by random data rows.

  For head c, each dead key gets row h[n, c] with n uniform over the N rows
  (independently per key, drawn from `seed` and `stream`); its statistics
  restart at N = reset_count, S = reset_count * key. Live keys are
  untouched.

  Args:
    keys_cmd, counts_cm, sums_cmd: [C, M, d], [C, M], [C, M, d] EMA state.
    h_ncd: [N, C, d] projected data rows.
    threshold: keys with count < threshold are dead.
    seed: int seed of the row draws.
    stream: int, folded into the seed (e.g. the EMA step).
    reset_count: restart count (default: `threshold`).

  Returns:
    (keys_cmd, counts_cm, sums_cmd).
  """
  num_heads, num_keys = counts_cm.shape
  reset_count = threshold if reset_count is None else reset_count
  key = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
  rows_cm = jax.random.randint(key, (num_heads * num_keys,), 0,
                               h_ncd.shape[0]).reshape(num_heads, num_keys)
  fresh_cmd = h_ncd[rows_cm, jnp.arange(num_heads)[:, None]].astype(
      keys_cmd.dtype)
  dead_cm = counts_cm < threshold
  keys_cmd = jnp.where(dead_cm[..., None], fresh_cmd, keys_cmd)
  counts_cm = jnp.where(dead_cm, jnp.asarray(reset_count, counts_cm.dtype),
                        counts_cm)
  sums_cmd = jnp.where(dead_cm[..., None], counts_cm[..., None] * keys_cmd,
                       sums_cmd)
  return keys_cmd, counts_cm, sums_cmd


def initialize_keys(model: KeyValueMemory,
                    data: jax.Array | np.ndarray | Iterable[Any],
                    steps: int, decay: float = 0.9, seed: int = 0, *,
                    initial_count: float = 1.0,
                    dead_threshold: float | None = None) -> jax.Array:
  """Sets `model.keys_cmd` by EMA k-means on unlabelled data, in place.

  Starting keys are random projected data rows of the first batch, drawn
  per head (without replacement when the batch has >= M rows). Then
  `steps` EMA updates run, each on the whole array (full-batch) or on the
  next batch of an iterable; with `dead_threshold`, keys whose count falls
  below it are re-drawn from the current batch after every update. The
  result is written into the Frozen keys; training never changes it.

  Args:
    model: the memory (its projections are already fixed).
    data: [N, e] array, or an iterable of [B, e] arrays (at least one).
    steps: EMA updates (>= 0); an iterable may end earlier.
    decay: EMA decay g.
    seed: draws the starting rows and the re-drawn rows.
    initial_count: N_0 of every key (see `ema_init_state`).
    dead_threshold: None (no re-initialisation) or a count.

  Returns:
    [C, M] final EMA counts (key usage; small = rarely selected).
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
  # Starting rows from numpy's generator (no PRNG kernels to compile);
  # re-drawn rows after update t come from stream t of `seed`.
  rng = np.random.default_rng(seed)
  if rows >= num_keys:
    rows_cm = np.stack([rng.permutation(rows)[:num_keys]
                        for _ in range(model.num_heads)])
  else:
    rows_cm = rng.integers(0, rows, (model.num_heads, num_keys))
  keys_cmd = jnp.asarray(
      np.asarray(h_bcd)[rows_cm, np.arange(model.num_heads)[:, None]],
      model.keys_cmd[...].dtype)
  counts_cm, sums_cmd = ema_init_state(keys_cmd, initial_count)
  for step in range(steps):
    # A full array is projected once; an iterable's batches one by one.
    if step > 0 and not full_batch:
      batch = next(batches, None)
      if batch is None:
        break
      h_bcd = project(state, jnp.asarray(batch))
    keys_cmd, counts_cm, sums_cmd = ema_update(keys_cmd, counts_cm, sums_cmd,
                                               h_bcd, decay)
    if dead_threshold is not None:
      keys_cmd, counts_cm, sums_cmd = reinit_dead_keys(
          keys_cmd, counts_cm, sums_cmd, h_bcd, dead_threshold, seed,
          step + 1)
  model.keys_cmd[...] = keys_cmd
  return counts_cm


def state_shardings(model: nnx.Module, mesh: Mesh,
                    rules=None) -> nnx.State:
  """NamedSharding per variable of `nnx.state(model)` (Frozen included).

  Each variable's logical axes (`out_sharding` metadata) map through
  `rules`; variables without them are replicated. Place a split model with
  `jax.device_put(state, state_shardings(model, mesh))`.
  """
  return jax.tree.map(
      lambda v: sharding.named_sharding(
          mesh, v.get_metadata().get("out_sharding") or (None,) * v.ndim,
          rules),
      nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
