"""Bi-encoder: one pooled vector per text, tied towers, in-batch losses.

The encoder architecture (`config.model.architecture`: BERT or the M2
long-convolution encoder) is the kind's model itself. Training takes any
`losses.LOSSES` objective on the [B, B*G] score matrix, or distils a
teacher's scores of each query's group (`config.loss.teacher`, a
`base.DISTILLATION_LOSSES` name, optionally plus weighted InfoNCE),
optionally with GradCache; evaluations during training are exact dense
retrieval.
"""

import functools
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp

from retrieval_jax import encoding
from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax.errors import ConfigError
from retrieval_jax.evaluation import evaluators
from retrieval_jax.kinds import base
from retrieval_jax.layers import pooling as pooling_lib


def encode(model, ids_bl, mask_bl, rng, *, pooling: str, normalize: bool):
  """[B, L] ids and mask -> float32 [B, D] (dropout on iff `rng`)."""
  hidden_bld = model(
      ids_bl, mask_bl, None, deterministic=rng is None, dropout_rng=rng
  )
  emb_bd = steps.pool_states(
      model, hidden_bld.astype(jnp.float32), mask_bl, pooling
  )
  if not normalize:
    return emb_bd
  # The loader's padding rows (doc -1, e.g. a Tevatron query without
  # negatives) pool to 0, where the norm's gradient is 0/0 = NaN and
  # poisons every parameter. The losses mask them out, so any non-zero
  # stand-in gives the same loss and a finite gradient.
  empty_b1 = jnp.sum(mask_bl, axis=-1, keepdims=True) == 0
  return pooling_lib.l2_normalize(jnp.where(empty_b1, 1.0, emb_bd))


def contrastive_loss(
    q_bd,
    p_cd,
    batch,
    *,
    loss_fn,
    temperature: float,
    share_hard_negatives: bool = True,
    sharded_mesh=None,
    distill_loss: str = "",
    infonce_weight: float = 0.0,
):
  """A registry loss on the in-batch scores q . p / temperature.

  Args:
    q_bd: float32 [B, D] queries; p_cd: float32 [B*G, D] passages in
      query-major groups.
    batch: reads "positive_counts", "passage_doc", "relevant_doc".
    loss_fn: `fn(scores_qc, positive_qc, valid_qc) -> (loss, aux)`.
    temperature: scores are divided by it.
    share_hard_negatives: other queries' hard negatives count as negatives.
    sharded_mesh: a mesh to compute the loss shard by shard on
      (`losses.sharded_contrastive`: the [B, B*G] scores never gathered);
      None computes it on the global batch.
    distill_loss: a `base.DISTILLATION_LOSSES` name: `base.distillation_loss`
      against batch "teacher_scores" [B*G] instead of `loss_fn`, plus
      infonce_weight times InfoNCE.
  """
  if sharded_mesh is not None:
    batch_axes = sharding.logical_to_spec((sharding.BATCH,))[0]
    return losses.sharded_contrastive.sharded_contrastive_loss(
        loss_fn,
        q_bd,
        p_cd,
        batch["positive_counts"],
        batch.get("passage_doc"),
        batch.get("relevant_doc"),
        temperature=temperature,
        group_size=p_cd.shape[0] // q_bd.shape[0],
        mesh=sharded_mesh,
        axis_names=(
            (batch_axes,)
            if isinstance(batch_axes, str)
            else tuple(batch_axes or ())
        ),
        share_hard_negatives=share_hard_negatives,
    )
  # float32 scores whatever the encoder's dtype (softmax over many columns).
  scores_qc = (
      jnp.einsum("bd,cd->bc", q_bd, p_cd, preferred_element_type=jnp.float32)
      / temperature
  )
  if distill_loss:
    return base.distillation_loss(
        scores_qc,
        batch,
        loss_name=distill_loss,
        infonce_weight=infonce_weight,
        share_hard_negatives=share_hard_negatives,
    )
  return base.in_batch_loss(
      scores_qc,
      batch,
      loss_fn=loss_fn,
      share_hard_negatives=share_hard_negatives,
  )


def loss(
    model,
    batch,
    rng,
    step,
    *,
    loss_fn,
    temperature: float,
    pooling: str,
    normalize: bool,
    share_hard_negatives: bool = True,
    sharded_mesh=None,
    distill_loss: str = "",
    infonce_weight: float = 0.0,
):
  """The bi-encoder's training loss on one batch (see `base.TrainSpec`).

  Batch: query_ids / query_mask [B, Lq], passage_ids / passage_mask
  [B*G, Lp], positive_counts [B], passage_doc [B*G], relevant_doc [B, R];
  with distill_loss, teacher_scores [B*G] float32.
  """
  del step
  q_rng, p_rng = base.split_rng(rng)
  enc = functools.partial(encode, pooling=pooling, normalize=normalize)
  q_bd = enc(model, batch["query_ids"], batch["query_mask"], q_rng)
  p_cd = enc(model, batch["passage_ids"], batch["passage_mask"], p_rng)
  return contrastive_loss(
      q_bd,
      p_cd,
      batch,
      loss_fn=loss_fn,
      temperature=temperature,
      share_hard_negatives=share_hard_negatives,
      sharded_mesh=sharded_mesh,
      distill_loss=distill_loss,
      infonce_weight=infonce_weight,
  )


def _chunk_rows(x, num_chunks: int):
  """[N, ...] -> [num_chunks, N / num_chunks, ...], rows strided.

  Chunk k holds rows k, k + num_chunks, ...: with the batch split over
  devices in contiguous blocks, every chunk keeps rows on every device.
  """
  x = x.reshape((x.shape[0] // num_chunks, num_chunks) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def _unchunk_rows(x):
  """Inverse of `_chunk_rows`."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def grad_cache_value_and_grad(
    model_def,
    params,
    batch,
    rng,
    step,
    *,
    query_chunks: int,
    passage_chunks: int,
    **loss_kwargs,
):
  """`loss`'s value and param gradients through GradCache.

  GradCache (Gao et al. 2021): embed every chunk without keeping
  activations, take the loss's gradient w.r.t. the embeddings on the full
  batch, then re-run each chunk with the same dropout key and pull its
  cached gradient back to the params (a VJP), summed over chunks. Equal to
  the full-batch gradient (the loss couples examples only through their
  embeddings); peak activation memory is one chunk's.
  """
  del step
  q_rng, p_rng = base.split_rng(rng)
  pooling, normalize = loss_kwargs.pop("pooling"), loss_kwargs.pop("normalize")

  def enc(prm, ids, mask, key):
    return encode(
        model_def.merge(prm),
        ids,
        mask,
        key,
        pooling=pooling,
        normalize=normalize,
    )

  def chunked(ids, mask, key, num_chunks):
    keys = None if key is None else jax.random.split(key, num_chunks)
    return _chunk_rows(ids, num_chunks), _chunk_rows(mask, num_chunks), keys

  towers = [
      chunked(batch["query_ids"], batch["query_mask"], q_rng, query_chunks),
      chunked(
          batch["passage_ids"], batch["passage_mask"], p_rng, passage_chunks
      ),
  ]

  def embed_all(ids_kbl, mask_kbl, keys):
    # lax.map: one chunk's activations alive at a time, none kept.
    if keys is None:
      return _unchunk_rows(
          jax.lax.map(
              lambda xs: enc(params, xs[0], xs[1], None), (ids_kbl, mask_kbl)
          )
      )
    return _unchunk_rows(
        jax.lax.map(lambda xs: enc(params, *xs), (ids_kbl, mask_kbl, keys))
    )

  q_bd, p_cd = (embed_all(*t) for t in towers)
  (value, aux), (dq_bd, dp_cd) = jax.value_and_grad(
      functools.partial(contrastive_loss, batch=batch, **loss_kwargs),
      argnums=(0, 1),
      has_aux=True,
  )(q_bd, p_cd)

  def pull_back(grads, ids_kbl, mask_kbl, keys, demb):
    demb_kbd = _chunk_rows(demb, ids_kbl.shape[0])

    def body(acc, xs):
      ids, mask, key, g = xs
      _, vjp = jax.vjp(lambda prm: enc(prm, ids, mask, key), params)
      return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    if keys is None:
      return jax.lax.scan(
          lambda acc, x: body(acc, (x[0], x[1], None, x[2])),
          grads,
          (ids_kbl, mask_kbl, demb_kbd),
      )[0]
    return jax.lax.scan(body, grads, (ids_kbl, mask_kbl, keys, demb_kbd))[0]

  grads = jax.tree.map(jnp.zeros_like, params)
  grads = pull_back(grads, *towers[0], dq_bd)
  grads = pull_back(grads, *towers[1], dp_cd)
  return (value, aux), grads


def dense_towers(
    module,
    *,
    pooling: str,
    normalize: bool,
    query_max_length: int,
    passage_max_length: int,
    query_module=None,
) -> dict[str, base.ServingTower]:
  """Serving towers `fn(ids_bl, mask_bl) -> float32 [B, D]` of an encoder.

  `steps.encode_step`, the evaluator's step, so exported embeddings match
  by construction; query_module unties the query tower.
  """

  def tower_fn(model, input_ids_bl, attention_mask_bl):
    graphdef, state = nnx.split(model)
    batch = {"input_ids": input_ids_bl, "attention_mask": attention_mask_bl}
    return steps.encode_step(
        graphdef, state, batch, pooling=pooling, normalize=normalize
    )

  info = {"pooling": pooling, "normalize": bool(normalize)}
  return {
      "query": base.ServingTower(
          tower_fn,
          module if query_module is None else query_module,
          query_max_length,
          info=info,
      ),
      "passage": base.ServingTower(
          tower_fn, module, passage_max_length, info=info
      ),
  }


class DenseEvaluator:
  """`config.evals` as exact dense retrieval with the params being trained.

  One `TextEncoder` (one compiled step per padded width) serves every
  evaluation; only its parameters change between calls.
  """

  def __init__(self, config, model_def, tokenizer, mesh, workdir):

    del workdir  # Collections are parsed directly; nothing is prepared.
    self.config, self.model_def, self.mesh = config, model_def, mesh
    self.tokenizer, self._encoder = tokenizer, None
    self.evals = {}
    for name, ev in config.evals.items():
      collection = base.eval_collection(config, name)
      self.evals[name] = evaluators.RetrievalEvaluator(
          collection,
          measures=ev.measures,
          relevance_level=1,
          top_k=ev.top_k,
          metric="cosine" if config.model.normalize else "dot",
          max_queries=ev.max_queries,
          name=name,
      )

  def encoder(self, params) -> encoding.TextEncoder:
    """The text encoder holding `params` (built once, then updated)."""
    model = self.model_def.merge(params)
    if self._encoder is None:
      self._encoder = encoding.TextEncoder(
          model,
          self.tokenizer,
          self.mesh,
          pooling=self.config.model.pooling,
          normalize=self.config.model.normalize,
          max_length=self.config.model.max_length,
      )
    else:
      self._encoder.set_module(model)
    return self._encoder

  def run(self, params, out_dir=None) -> dict[str, float]:
    """{"eval/<name>/<measure>": value} over every evaluator; with
    `out_dir`, each one's run.trec and per-query values go to
    <out_dir>/<name>/."""
    if not self.evals:
      return {}
    encoder = self.encoder(params)
    out = {}
    with jax.default_matmul_precision(self.config.model.matmul_precision):
      for name, evaluator in self.evals.items():
        result = evaluator.run(
            encoder,
            batch_size=self.config.evals[name].batch_size,
            pad_multiple=16,
            sort_by_length=True,
            mesh=self.mesh,
        )
        out.update(
            {f"eval/{name}/{k}": float(v) for k, v in result.metrics.items()}
        )
        if out_dir is not None and jax.process_index() == 0:
          evaluators.write_result(
              result, pathlib.Path(out_dir) / name, tag=name
          )
    return out


class BiEncoder(base.Kind):
  """See the module docstring."""

  name = "bi_encoder"
  architectures = ("bert", "m2")
  dense_negatives = True
  trains_with_evals = True
  distills = True

  def validate(self, config) -> None:
    super().validate(config)
    q_chunks, p_chunks = config.train.grad_cache_chunks
    batch_size = config.train.batch_size
    if (q_chunks or p_chunks) and not (q_chunks and p_chunks):
      raise ConfigError(
          "config.train.grad_cache_chunks: set both (query, "
          "passage) chunk counts, or (0, 0) for no GradCache"
      )
    if q_chunks and (
        batch_size % q_chunks
        or (batch_size * config.data.group_size) % p_chunks
    ):
      raise ConfigError(
          "config.train.grad_cache_chunks="
          f"{tuple(config.train.grad_cache_chunks)} must divide the "
          f"{batch_size} queries and {batch_size * config.data.group_size} "
          "passages of a batch"
      )

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0):
    del model_cfg, tokenizer, seed
    return loaded.model

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    del loader, tokenizer
    kwargs = dict(
        loss_fn=loss_spec.fn,
        temperature=config.loss.temperature,
        pooling=config.model.pooling,
        normalize=config.model.normalize,
        share_hard_negatives=config.loss.share_hard_negatives,
        sharded_mesh=mesh if config.loss.get("sharded") else None,
        distill_loss=config.loss.name if config.loss.get("teacher") else "",
        infonce_weight=config.loss.get("infonce_weight", 0.0),
    )
    q_chunks, p_chunks = config.train.grad_cache_chunks
    value_and_grad = None
    if q_chunks:
      value_and_grad = functools.partial(
          grad_cache_value_and_grad,
          query_chunks=q_chunks,
          passage_chunks=p_chunks,
          **kwargs,
      )
    return base.TrainSpec(
        featurize=base.teacher_featurizer(config),
        loss=functools.partial(loss, **kwargs),
        value_and_grad=value_and_grad,
    )

  def train_evaluator(self, config, model_def, tokenizer, mesh, workdir):
    return DenseEvaluator(config, model_def, tokenizer, mesh, workdir)

  def text_encoder(self, model, tokenizer, run_cfg, mesh, *, max_length):
    return encoding.TextEncoder(
        model,
        tokenizer,
        mesh,
        pooling=run_cfg["model"]["pooling"],
        normalize=run_cfg["model"]["normalize"],
        max_length=max_length,
    )

  def serving_towers(
      self, model, tokenizer, run_cfg, export_cfg, *, corpus_texts
  ):
    del tokenizer, corpus_texts
    return dense_towers(
        model,
        pooling=run_cfg["model"]["pooling"],
        normalize=run_cfg["model"]["normalize"],
        query_max_length=export_cfg.query_max_length,
        passage_max_length=export_cfg.passage_max_length,
    )


KIND = BiEncoder()
