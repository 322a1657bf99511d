"""MoCo bi-encoder: in-batch keys plus a queue of past keys as negatives.

Contriever's recipe (Izacard et al. 2022) on any pairs, usually
`config.data.format = "corpus"` (ICT or cropping, `data/spans.py`): the
query tower is the trained encoder; the passage tower is its momentum copy
(`config.model.moco_momentum`), run without dropout or gradient; each
step's keys enter a FIFO queue of `config.model.moco_queue_size`. Following
MoCo's code, the key encoder is updated (with the params before this
step's optimizer update) before the keys are computed. The queue and key
params sit in `state["extra"]`, so checkpoints resume them exactly.
Evaluation and export are the bi-encoder's, on the query encoder.
"""

import functools

import jax
import jax.numpy as jnp

from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import train_state
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import base
from retrieval_jax.kinds import bi_encoder

_ENCODE_PROBE = 2  # tokens of the dummy text that sizes the queue


def init_extra(model_def, params, *, queue_size: int, pooling, normalize):
  """Step-0 MoCo state: key params = params, an empty queue of K x D."""

  def embed(prm):
    ids = jnp.zeros((1, _ENCODE_PROBE), jnp.int32)
    return bi_encoder.encode(
        model_def.merge(prm),
        ids,
        jnp.ones_like(ids),
        None,
        pooling=pooling,
        normalize=normalize,
    )

  dim = jax.eval_shape(embed, params).shape[-1]
  return {
      "key_params": params,
      "queue": losses.moco.init_queue(queue_size, dim),
  }


def extra_shardings(abstract_extra, param_shardings, mesh):
  """Key params as the params; the queue's K rows on the batch axes."""
  del abstract_extra
  return {
      "key_params": param_shardings,
      "queue": {
          "queue_kd": sharding.named_sharding(mesh, (sharding.BATCH, None)),
          "queue_doc_k": sharding.named_sharding(mesh, (sharding.BATCH,)),
          "ptr": sharding.replicated(mesh),
      },
  }


def loss(
    model,
    batch,
    rng,
    step,
    extra,
    *,
    loss_fn,
    momentum: float,
    temperature: float,
    pooling: str,
    normalize: bool,
    in_batch: bool,
):
  """`(loss, (aux, next extra))` of one batch (`base.TrainSpec.extra`).

  Batch: query_ids / query_mask [B, Lq], passage_ids / passage_mask
  [B, Lp] (G = 1), passage_doc [B] (keys of the same document are masked).
  """
  del step
  q_rng, _ = base.split_rng(rng)
  model_def, params = train_state.split_model(model)
  key_params = losses.moco.ema_update(extra["key_params"], params, momentum)
  enc = functools.partial(
      bi_encoder.encode, pooling=pooling, normalize=normalize
  )
  q_bd = enc(model, batch["query_ids"], batch["query_mask"], q_rng)
  k_bd = jax.lax.stop_gradient(
      enc(
          model_def.merge(key_params),
          batch["passage_ids"],
          batch["passage_mask"],
          None,
      )
  )
  doc_b = batch["passage_doc"]
  value, aux = losses.moco.moco_loss(
      q_bd,
      k_bd,
      extra["queue"],
      temperature=temperature,
      doc_b=doc_b,
      in_batch=in_batch,
      loss_fn=loss_fn,
  )
  queue = losses.moco.enqueue(extra["queue"], k_bd, doc_b)
  return value, (aux, {"key_params": key_params, "queue": queue})


class MoCo(bi_encoder.BiEncoder):
  """See the module docstring."""

  name = "moco"
  model_keys = ("moco_momentum", "moco_queue_size", "moco_in_batch")
  dense_negatives = False

  def validate(self, config) -> None:
    super().validate(config)
    model, batch_size = config.model, config.train.batch_size
    if not 0.0 <= model.moco_momentum <= 1.0:
      raise ConfigError(
          f"config.model.moco_momentum={model.moco_momentum}: must be in [0, 1]"
      )
    size = model.moco_queue_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ConfigError(
          f"config.model.moco_queue_size={size!r}: must be an integer >= 1"
      )
    if size % batch_size:
      # MoCo's rule: whole batches per queue, evenly split over devices.
      raise ConfigError(
          f"config.model.moco_queue_size={size} must be a multiple of "
          f"config.train.batch_size={batch_size}"
      )
    if config.data.group_size != 1:
      raise ConfigError(
          "config.model.kind='moco' takes one positive per query and no "
          "hard negatives: set config.data.group_size=1 (is "
          f"{config.data.group_size})"
      )
    if self.loss_spec(config).positives != losses.ONE:
      raise ConfigError(
          f"config.loss.name={config.loss.name!r}: MoCo's key is the one "
          "positive; use a one-positive loss (infonce)"
      )

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    del loader, tokenizer, mesh
    model = config.model
    extra = train_state.ExtraState(
        init=functools.partial(
            init_extra,
            queue_size=model.moco_queue_size,
            pooling=model.pooling,
            normalize=model.normalize,
        ),
        shardings=extra_shardings,
    )
    return base.TrainSpec(
        featurize=base.take_keys(),
        loss=functools.partial(
            loss,
            loss_fn=loss_spec.fn,
            momentum=float(model.moco_momentum),
            temperature=config.loss.temperature,
            pooling=model.pooling,
            normalize=model.normalize,
            in_batch=bool(model.moco_in_batch),
        ),
        extra=extra,
    )


KIND = MoCo()
