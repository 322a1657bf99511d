"""Pure step functions, jitted once by their callers.

Steps take and return pytrees: the model enters as `(graphdef, state)` and is
merged inside, so no NNX graph traversal happens per call (STYLE.md, 2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retrieval_jax import sharding
from retrieval_jax.layers import pooling as pooling_lib


def pool_states(model: nnx.Module, hidden_bld: jax.Array, mask_bl: jax.Array,
                pooling: str) -> jax.Array:
  """[B, L, D] -> float32 [B, D]: the model's own `pool` (trained poolers)
  when it has one, else `layers.pooling.pool`."""
  if hasattr(model, "pool"):
    return model.pool(hidden_bld, mask_bl, pooling)
  return pooling_lib.pool(hidden_bld, mask_bl, pooling)


def encode_step(graphdef: nnx.GraphDef, state: nnx.State,
                batch: dict[str, jax.Array], *, pooling: str,
                normalize: bool) -> jax.Array:
  """Embeds one batch of token ids.

  Args:
    graphdef: the encoder's static graph (from `nnx.split`).
    state: the encoder's parameters.
    batch: int32 `input_ids` [B, L], `attention_mask` [B, L] and optionally
      `token_type_ids` [B, L].
    pooling: "cls" or "mean" (masked).
    normalize: L2-normalise the pooled vectors.

  Returns:
    float32 embeddings [B, D]; all-padding rows give zero vectors.
  """
  model = nnx.merge(graphdef, state)
  hidden_bld = model(batch["input_ids"], batch["attention_mask"],
                     batch.get("token_type_ids"), deterministic=True)
  # Pool in float32 even when the encoder computes in bfloat16.
  emb_bd = pool_states(model, hidden_bld.astype(jnp.float32),
                       batch["attention_mask"], pooling)
  if normalize:
    emb_bd = pooling_lib.l2_normalize(emb_bd)
  return emb_bd


def make_encode_step(graphdef: nnx.GraphDef, mesh: Mesh, *, pooling: str,
                     normalize: bool):
  """Jits `encode_step` for `mesh`: params replicated, batch split on data.

  Returns:
    `fn(state, batch) -> emb_bd`; the batch size must be a multiple of
    `sharding.data_size(mesh)`.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = sharding.named_sharding(mesh, (sharding.BATCH, None))
  step = functools.partial(encode_step, graphdef, pooling=pooling,
                           normalize=normalize)
  return jax.jit(
      step,
      in_shardings=(replicated, batch_sharding),
      out_shardings=batch_sharding)


# ---------------------------------------------------------------------------
# Training.


def encode_tower(model_def, params, ids_bl: jax.Array, mask_bl: jax.Array,
                 dropout_rng: jax.Array | None, *, pooling: str,
                 normalize: bool) -> jax.Array:
  """Embeds a batch with trainable params (dropout on iff a key is given).

  Args:
    model_def: `train_state.ModelDef` of the encoder.
    params: the encoder's params (pure dict).
    ids_bl: int32 [B, L] token ids.
    mask_bl: int32 [B, L] attention mask.
    dropout_rng: PRNG key, or None for a deterministic pass.
    pooling: "cls" or "mean".
    normalize: L2-normalise the pooled vectors.

  Returns:
    float32 [B, D].
  """
  model = model_def.merge(params)
  hidden_bld = model(ids_bl, mask_bl, None,
                     deterministic=dropout_rng is None,
                     dropout_rng=dropout_rng)
  emb_bd = pool_states(model, hidden_bld.astype(jnp.float32), mask_bl,
                       pooling)
  if normalize:
    emb_bd = pooling_lib.l2_normalize(emb_bd)
  return emb_bd


def contrastive_loss(q_bd: jax.Array, p_cd: jax.Array, batch, *, loss_fn,
                     temperature: float, share_hard_negatives: bool):
  """A registry loss on the in-batch score matrix of the global batch.

  Args:
    q_bd: float32 [B, D] query embeddings.
    p_cd: float32 [B*G, D] passage embeddings, query-major groups.
    batch: the loader's batch ("positive_counts", "passage_doc",
      "relevant_doc" are read).
    loss_fn: `fn(scores_qc, positive_qc, valid_qc) -> (loss, aux)`.
    temperature: scores are divided by it.
    share_hard_negatives: other queries' hard negatives count as negatives.

  Returns:
    (float32 scalar loss, dict of float32 scalars).
  """
  # float32 scores whatever the encoder's dtype (softmax over many columns).
  scores_qc = jnp.einsum("bd,cd->bc", q_bd, p_cd,
                         preferred_element_type=jnp.float32) / temperature
  return in_batch_loss(scores_qc, batch, loss_fn=loss_fn,
                       share_hard_negatives=share_hard_negatives)


def in_batch_loss(scores_qc: jax.Array, batch, *, loss_fn,
                  share_hard_negatives: bool):
  """A registry loss on a [B, B*G] query x passage score matrix.

  Args:
    scores_qc: float32 scores of every query against every passage row of
      the global batch (query-major groups).
    batch, loss_fn, share_hard_negatives: as `contrastive_loss`.
  """
  # Imported here: losses depend on models/layers, not the other way round.
  from retrieval_jax.losses import contrastive  # pylint: disable=g-import-not-at-top
  group_size = scores_qc.shape[1] // scores_qc.shape[0]
  positive_qc, valid_qc = contrastive.group_masks(
      batch["positive_counts"], group_size, batch.get("passage_doc"),
      batch.get("relevant_doc"), share_hard_negatives=share_hard_negatives)
  return loss_fn(scores_qc, positive_qc, valid_qc)


def _chunk_rows(x, num_chunks: int):
  """[N, ...] -> [num_chunks, N / num_chunks, ...], rows strided.

  Chunk k holds rows k, k + num_chunks, ...: with the batch split over
  devices in contiguous blocks, every chunk then keeps rows on every device
  (a contiguous split would put a whole chunk on one device).
  """
  n = x.shape[0]
  x = x.reshape((n // num_chunks, num_chunks) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def _unchunk_rows(x):
  """Inverse of `_chunk_rows`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((-1,) + x.shape[2:])


def _grad_cache_value_and_grad(params, batch, rngs, *, encode, loss_from_reps,
                               query_chunks: int, passage_chunks: int):
  """Loss and param gradients via cached representation gradients.

  GradCache (Gao et al. 2021): (1) embed every chunk without keeping
  activations, (2) take the loss and its gradient w.r.t. the embeddings on
  the full batch, (3) re-run each chunk's forward pass with the same dropout
  key and pull its cached embedding gradient back to the params (a VJP),
  summing over chunks. The result equals the full-batch gradient because
  the loss couples examples only through their embeddings; peak activation
  memory is one chunk's.
  """
  q_rng, p_rng = rngs
  towers = (
      (batch["query_ids"], batch["query_mask"], q_rng, query_chunks),
      (batch["passage_ids"], batch["passage_mask"], p_rng, passage_chunks),
  )

  def chunk_inputs(ids, mask, rng, num_chunks):
    keys = (None if rng is None else jax.random.split(rng, num_chunks))
    return _chunk_rows(ids, num_chunks), _chunk_rows(mask, num_chunks), keys

  inputs = [chunk_inputs(*t) for t in towers]

  def embed_all(ids_kbl, mask_kbl, keys):
    # lax.map: one chunk's activations alive at a time, nothing stored for
    # a backward pass (no gradient is taken through this).
    if keys is None:
      emb = jax.lax.map(lambda xs: encode(params, xs[0], xs[1], None),
                        (ids_kbl, mask_kbl))
    else:
      emb = jax.lax.map(lambda xs: encode(params, *xs),
                        (ids_kbl, mask_kbl, keys))
    return _unchunk_rows(emb)

  q_bd, p_cd = (embed_all(*x) for x in inputs)
  (loss, aux), (dq_bd, dp_cd) = jax.value_and_grad(
      loss_from_reps, argnums=(0, 1), has_aux=True)(q_bd, p_cd)

  def pull_back(grads, ids_kbl, mask_kbl, keys, demb):
    demb_kbd = _chunk_rows(demb, ids_kbl.shape[0])

    def body(acc, xs):
      ids, mask, key, g = xs
      _, vjp = jax.vjp(lambda prm: encode(prm, ids, mask, key), params)
      return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    if keys is None:
      body_fn = lambda acc, x: body(acc, (x[0], x[1], None, x[2]))
      xs = (ids_kbl, mask_kbl, demb_kbd)
    else:
      body_fn = body
      xs = (ids_kbl, mask_kbl, keys, demb_kbd)
    grads, _ = jax.lax.scan(body_fn, grads, xs)
    return grads

  grads = jax.tree.map(jnp.zeros_like, params)
  grads = pull_back(grads, *inputs[0], dq_bd)
  grads = pull_back(grads, *inputs[1], dp_cd)
  return (loss, aux), grads


def train_step(state, batch, rng, *, model_def, tx, loss_fn,
               temperature: float, pooling: str, normalize: bool,
               dropout: bool, share_hard_negatives: bool = True,
               grad_cache_chunks: tuple[int, int] | None = None,
               learning_rate_fn=None):
  """One optimizer step of a bi-encoder with tied towers.

  Args:
    state: {"step", "params", "opt_state"} (see `train_state`).
    batch: the loader's arrays: query_ids / query_mask [B, Lq], passage_ids /
      passage_mask [B*G, Lp], positive_counts [B], passage_doc [B*G],
      relevant_doc [B, R].
    rng: the run's base PRNG key; this step's dropout keys are derived from
      it and `state["step"]`, so a resumed run draws the same masks.
    model_def: `train_state.ModelDef`.
    tx: the optax optimizer.
    loss_fn: a registry loss `fn(scores_qc, positive_qc, valid_qc)`.
    temperature: similarity scale (scores / temperature).
    pooling: "cls" or "mean".
    normalize: L2-normalise embeddings (cosine similarity).
    dropout: train with dropout.
    share_hard_negatives: see `contrastive_loss`.
    grad_cache_chunks: (query chunks, passage chunks) to run GradCache with;
      None computes the whole batch at once.
    learning_rate_fn: schedule, only to report the rate in the metrics.

  Returns:
    (new state, metrics): float32 scalars "loss", "grad_norm", "param_norm",
    "update_norm", "learning_rate" and the loss's own aux values.
  """
  step_rng = jax.random.fold_in(rng, state["step"])
  rngs = ((None, None) if not dropout else
          tuple(jax.random.split(step_rng, 2)))
  encode = functools.partial(encode_tower, model_def, pooling=pooling,
                             normalize=normalize)
  loss_from_reps = functools.partial(
      contrastive_loss, batch=batch, loss_fn=loss_fn, temperature=temperature,
      share_hard_negatives=share_hard_negatives)

  if grad_cache_chunks is None:

    def loss_of_params(params):
      q_bd = encode(params, batch["query_ids"], batch["query_mask"], rngs[0])
      p_cd = encode(params, batch["passage_ids"], batch["passage_mask"],
                    rngs[1])
      return loss_from_reps(q_bd, p_cd)

    (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        state["params"])
  else:
    (loss, aux), grads = _grad_cache_value_and_grad(
        state["params"], batch, rngs, encode=encode,
        loss_from_reps=loss_from_reps, query_chunks=grad_cache_chunks[0],
        passage_chunks=grad_cache_chunks[1])

  return _apply_gradients(state, grads, loss, aux, tx=tx,
                          learning_rate_fn=learning_rate_fn)


def _apply_gradients(state, grads, loss, aux, *, tx, learning_rate_fn):
  """The optimizer update and the step's metrics, shared by every step."""
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
  }
  if learning_rate_fn is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state["step"]),
                                           jnp.float32)
  metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
  new_state = {"step": state["step"] + 1, "params": params,
               "opt_state": opt_state}
  return new_state, metrics


# Batch keys of a cross-encoder step (`TrainLoader.pair_batch_at`).
PAIR_KEYS = ("pair_ids", "pair_mask", "pair_types", "pair_markers",
             "positive_counts", "passage_doc")


def group_labels(positive_counts_b: jax.Array, passage_doc_p: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """[B, G] positive and valid masks of the loader's query-major groups.

  Row i's group is passages i*G .. i*G+G-1, its first positive_counts[i]
  are positives; padding passages (doc -1) are invalid.
  """
  b = positive_counts_b.shape[0]
  valid_bg = (passage_doc_p >= 0).reshape(b, -1)
  slot_g = jnp.arange(valid_bg.shape[1])
  positive_bg = (slot_g[None, :] < positive_counts_b[:, None]) & valid_bg
  return positive_bg, valid_bg


def cross_encoder_loss(scores_bg: jax.Array, positive_bg: jax.Array,
                       valid_bg: jax.Array, *, loss_name: str,
                       teacher_bg: jax.Array | None = None):
  """A registry loss on the [B, G] pair scores of each query's group.

  Names of `losses.LOSSES` (InfoNCE, LSEPair, ...) take the scores as
  logits over the group, positives in the first slots; names of
  `losses.LISTWISE_LOSSES` ("bce", "listnet", ...) take 1/0 labels, or
  the teacher's scores `teacher_bg` when given (distillation, e.g.
  "kl_distillation": KL(softmax(teacher) || softmax(scores))).
  """
  from retrieval_jax import losses  # pylint: disable=g-import-not-at-top
  if loss_name in losses.LISTWISE_LOSSES:
    labels_bg = (positive_bg.astype(jnp.float32) if teacher_bg is None
                 else teacher_bg.astype(jnp.float32))
    return losses.LISTWISE_LOSSES[loss_name](scores_bg, labels_bg, valid_bg)
  if teacher_bg is not None:
    raise ValueError(f"loss {loss_name!r} takes no teacher scores")
  return losses.get_loss(loss_name).fn(scores_bg, positive_bg, valid_bg)


def cross_encoder_train_step(state, batch, rng, *, model_def, tx,
                             loss_name: str, dropout: bool,
                             learning_rate_fn=None):
  """One optimizer step of a cross-encoder on the loader's pair groups.

  Args:
    state: {"step", "params", "opt_state"} (see `train_state`).
    batch: `PAIR_KEYS`: pair_ids / pair_mask / pair_types [B*G, L],
      pair_markers [B*G, 2] (the "emb" head's marker positions),
      positive_counts [B], passage_doc [B*G]; optionally teacher_scores
      [B*G] float32, the distillation targets of a list loss.
    rng: the run's base key; dropout keys fold in the step.
    model_def: `train_state.ModelDef` of a `models.cross_encoder.CrossEncoder`.
    tx: the optax optimizer.
    loss_name: see `cross_encoder_loss`.
    dropout: train with dropout.
    learning_rate_fn: schedule, only to report the rate.

  Returns:
    (new state, metrics), as `train_step`.
  """
  dropout_rng = (jax.random.fold_in(rng, state["step"]) if dropout else None)
  positive_bg, valid_bg = group_labels(batch["positive_counts"],
                                       batch["passage_doc"])

  def loss_of_params(params):
    model = model_def.merge(params)
    scores_p = model(batch["pair_ids"], batch["pair_mask"],
                     batch["pair_types"], batch["pair_markers"],
                     deterministic=not dropout, dropout_rng=dropout_rng)
    teacher_p = batch.get("teacher_scores")
    return cross_encoder_loss(
        scores_p.reshape(valid_bg.shape), positive_bg, valid_bg,
        loss_name=loss_name,
        teacher_bg=(None if teacher_p is None
                    else teacher_p.reshape(valid_bg.shape)))

  (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
      state["params"])
  return _apply_gradients(state, grads, loss, aux, tx=tx,
                          learning_rate_fn=learning_rate_fn)


# Batch keys of a ColBERT step: its own tokenisation (query [MASK]
# augmentation, [Q]/[D] markers) with separate score masks.
COLBERT_KEYS = ("query_ids", "query_mask", "query_score_mask", "passage_ids",
                "passage_mask", "passage_score_mask", "positive_counts",
                "passage_doc", "relevant_doc")


def bag_of_tokens(ids_bl: jax.Array, mask_bl: jax.Array, weight_v: jax.Array,
                  special_ids: tuple[int, ...]) -> jax.Array:
  """Inference-free queries: [B, V] = 1[token j in the query] * weight_j.

  Each token counts once (a max, not a sum, over positions); special
  tokens and padding give 0.
  """
  keep_bl = mask_bl.astype(bool)
  for i in special_ids:
    keep_bl &= ids_bl != i
  b, v = ids_bl.shape[0], weight_v.shape[0]
  rows_bl = jnp.broadcast_to(jnp.arange(b)[:, None], ids_bl.shape)
  bag_bv = jnp.zeros((b, v), jnp.float32).at[rows_bl, ids_bl].max(
      keep_bl.astype(jnp.float32))
  return bag_bv * jax.nn.relu(weight_v.astype(jnp.float32))[None, :]


def representation_train_step(state, batch, rng, *, model_def, tx, loss_fn,
                              kind: str, dropout: bool,
                              share_hard_negatives: bool = True,
                              flops_q: float = 0.0, flops_d: float = 0.0,
                              flops_warmup_steps: int = 0,
                              idf_v: np.ndarray | None = None,
                              special_ids: tuple[int, ...] = (),
                              colbert_chunk: int | None = None,
                              learning_rate_fn=None):
  """One optimizer step of a learned sparse or late-interaction retriever.

  Scores are raw (no temperature), as SPLADE and ColBERT train:
    splade          q_v . d_v of the max-pooled log(1 + ReLU) MLM weights,
                    plus lambda_q(t) FLOPS(q) + lambda_d(t) FLOPS(d)
    inference_free  sum over the query's tokens of idf_j d_j (no query
                    encoder), plus lambda_d(t) FLOPS(d): FLOPS on the raw
                    weights is IDF-aware, since the loss sees idf_j d_j
    colbert         MaxSim over L2-normalised token vectors

  lambda(t) = lambda * min(1, (t / flops_warmup_steps)^2) (quadratic
  warm-up; 0 steps = no warm-up).

  Args:
    state: {"step", "params", "opt_state"}.
    batch: `train.STEP_KEYS` (splade, inference_free) or `COLBERT_KEYS`.
    rng: the run's base key; dropout keys fold in the step.
    model_def: `train_state.ModelDef` of a `Splade` or `ColBERT`.
    tx: the optax optimizer.
    loss_fn: a registry loss on the [B, B*G] scores.
    kind: "splade", "inference_free" or "colbert".
    dropout: train with dropout.
    share_hard_negatives: see `contrastive_loss`.
    flops_q, flops_d: the regularisers' final weights.
    flops_warmup_steps: T of the quadratic warm-up.
    idf_v: [V] idf of the training corpus (inference_free).
    special_ids: token ids left out of inference-free query bags.
    colbert_chunk: passages per MaxSim chunk (bounds memory; None = all).
    learning_rate_fn: schedule, only to report the rate.

  Returns:
    (new state, metrics) as `train_step`, plus "flops_q"/"flops_d" and the
    mean non-zero terms per query / passage ("l0_q", "l0_d") for sparse
    kinds.
  """
  from retrieval_jax.losses import regularizers  # pylint: disable=g-import-not-at-top
  from retrieval_jax.search import late_interaction  # pylint: disable=g-import-not-at-top
  step_rng = jax.random.fold_in(rng, state["step"])
  rngs = ((None, None) if not dropout else
          tuple(jax.random.split(step_rng, 2)))
  warmup = (regularizers.quadratic_warmup(state["step"], flops_warmup_steps)
            if flops_warmup_steps else 1.0)
  valid_c = batch["passage_doc"] >= 0

  def run(model, ids, mask, key):
    return model(ids, mask, None, deterministic=key is None, dropout_rng=key)

  def loss_of_params(params):
    model = model_def.merge(params)
    extra = {}
    if kind == "colbert":
      q_bld = run(model, batch["query_ids"], batch["query_mask"], rngs[0])
      p_cld = run(model, batch["passage_ids"], batch["passage_mask"],
                  rngs[1])
      scores_qc = late_interaction.maxsim_all(
          q_bld, batch["query_score_mask"], p_cld,
          batch["passage_score_mask"], chunk_size=colbert_chunk)
      reg = 0.0
    else:
      p_cv = run(model, batch["passage_ids"], batch["passage_mask"], rngs[1])
      if kind == "splade":
        q_bv = run(model, batch["query_ids"], batch["query_mask"], rngs[0])
        reg_q = regularizers.flops(q_bv)
      else:
        q_bv = bag_of_tokens(batch["query_ids"], batch["query_mask"],
                             jnp.asarray(idf_v), special_ids)
        reg_q = jnp.zeros((), jnp.float32)
      reg_d = regularizers.flops(p_cv, valid_c)
      scores_qc = jnp.einsum("bv,cv->bc", q_bv, p_cv,
                             preferred_element_type=jnp.float32)
      reg = warmup * (flops_q * reg_q + flops_d * reg_d)
      extra = {"flops_q": reg_q, "flops_d": reg_d,
               "l0_q": jnp.mean(jnp.sum(q_bv > 0, axis=-1)),
               "l0_d": jnp.sum(jnp.where(valid_c, jnp.sum(p_cv > 0, -1), 0))
                       / jnp.maximum(jnp.sum(valid_c), 1)}
    loss, aux = in_batch_loss(scores_qc, batch, loss_fn=loss_fn,
                              share_hard_negatives=share_hard_negatives)
    return loss + reg, dict(aux, ranking_loss=loss, **extra)

  (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
      state["params"])
  return _apply_gradients(state, grads, loss, aux, tx=tx,
                          learning_rate_fn=learning_rate_fn)


def batch_shardings(mesh: Mesh, batch_spec: dict[str, tuple]) -> dict:
  """NamedSharding per batch key: the leading (example) axis on the data axes.

  Args:
    mesh: the device mesh.
    batch_spec: {key: shape} of the loader's batch.
  """
  return {k: sharding.named_sharding(mesh, (sharding.BATCH,) +
                                     (None,) * (len(shape) - 1))
          for k, shape in batch_spec.items()}


def make_train_step(mesh: Mesh, state_shardings, batch_spec: dict[str, tuple],
                    step_fn=train_step, **step_kwargs):
  """Jits `train_step` once for `mesh`, donating the state.

  Args:
    mesh: the device mesh.
    state_shardings: from `train_state.state_layout(...).shardings`.
    batch_spec: {key: shape} of every batch the loader yields.
    step_fn: `train_step` (bi-encoder) or `cross_encoder_train_step`.
    **step_kwargs: the static arguments of `step_fn`.

  Returns:
    `fn(state, batch, rng) -> (state, metrics)`; the batch must already be
    placed with `batch_shardings` (see `put_batch`).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  step = functools.partial(step_fn, **step_kwargs)
  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_shardings(mesh, batch_spec),
                    replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0)


def put_batch(batch: dict[str, np.ndarray], shardings: dict) -> dict:
  """Places a host batch (the *global* batch) on the mesh.

  Every process holds the same global batch on its host (the loader is a
  pure function of the step); each device receives just its rows, so this
  works unchanged when the mesh spans several processes.
  """
  out = {}
  for key, array in batch.items():
    target = shardings[key]
    index_map = target.addressable_devices_indices_map(array.shape)
    pieces = [jax.device_put(array[index], device)
              for device, index in index_map.items()]
    out[key] = jax.make_array_from_single_device_arrays(
        array.shape, target, pieces)
  return out
