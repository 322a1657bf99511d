"""MoCo (He et al. 2020; Contriever): momentum keys and a FIFO key queue.

The key encoder is an EMA of the query encoder; each step's keys join a
queue of the last K keys, the negatives of later steps. Pure functions on
arrays and pytrees: the state ({key params, queue_kd, queue_doc_k, ptr})
lives in the train state, so checkpoints hold it and resumes are exact.
"""

import jax
import jax.numpy as jnp

from retrieval_jax.losses import contrastive

EMPTY = -1  # queue_doc_k of a slot that holds no key yet


def ema_update(target, online, momentum: float):
  """`momentum * target + (1 - momentum) * online`, leaf by leaf.

  target: the key encoder's params; online: the query encoder's (no
  gradient flows into the result).
  """
  online = jax.lax.stop_gradient(online)
  return jax.tree.map(
      lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype),
      target,
      online,
  )


def init_queue(size: int, dim: int) -> dict[str, jax.Array]:
  """An empty queue: queue_kd float32 [K, D] zeros, queue_doc_k int32 [K]
  all EMPTY (masked out of the loss), ptr int32 [] 0."""
  return {
      "queue_kd": jnp.zeros((size, dim), jnp.float32),
      "queue_doc_k": jnp.full((size,), EMPTY, jnp.int32),
      "ptr": jnp.zeros((), jnp.int32),
  }


def enqueue(queue, keys_bd, doc_b) -> dict[str, jax.Array]:
  """Writes B keys at slots ptr, ptr+1, ... (mod K), overwriting the oldest.

  keys_bd: float [B, D], B <= K; doc_b: int32 [B] their documents. Returns
  the queue with ptr advanced by B mod K.
  """
  size = queue["queue_kd"].shape[0]
  b = keys_bd.shape[0]
  if b > size:
    raise ValueError(f"{b} keys do not fit a queue of {size}")
  slots_b = (queue["ptr"] + jnp.arange(b, dtype=jnp.int32)) % size
  keys_bd = jax.lax.stop_gradient(keys_bd).astype(queue["queue_kd"].dtype)
  return {
      "queue_kd": queue["queue_kd"].at[slots_b].set(keys_bd),
      "queue_doc_k": queue["queue_doc_k"].at[slots_b].set(doc_b),
      "ptr": (queue["ptr"] + b) % size,
  }


def queue_scores_and_masks(
    q_bd,
    k_bd,
    queue_kd,
    *,
    temperature: float,
    doc_b=None,
    queue_doc_k=None,
    in_batch: bool = True,
):
  """(scores, positive, valid) [B, B + K] over [in-batch keys ‖ queue].

  Row i's positive is its own key k_i (column i). Negatives: the other
  in-batch keys (if `in_batch`) and every filled queue slot; with doc ids,
  keys of row i's own document (doc_b[i]) are not negatives.
  """
  b, k = q_bd.shape[0], queue_kd.shape[0]
  keys_cd = jnp.concatenate(
      [jax.lax.stop_gradient(k_bd).astype(jnp.float32), queue_kd], axis=0
  )
  # float32 scores for the LSE over B + K columns.
  scores_bc = (
      jnp.einsum("bd,cd->bc", q_bd, keys_cd, preferred_element_type=jnp.float32)
      / temperature
  )
  eye_bb = jnp.eye(b, dtype=bool)
  positive_bc = jnp.concatenate([eye_bb, jnp.zeros((b, k), bool)], axis=1)
  in_batch_bb = jnp.ones((b, b), bool) if in_batch else eye_bb
  queue_bk = jnp.ones((b, k), bool)
  if queue_doc_k is not None:
    queue_bk &= (queue_doc_k != EMPTY)[None, :]
  if doc_b is not None:
    # A repeated document's key is another view of the positive.
    in_batch_bb &= eye_bb | (doc_b[:, None] != doc_b[None, :])
    if queue_doc_k is not None:
      queue_bk &= doc_b[:, None] != queue_doc_k[None, :]
  valid_bc = jnp.concatenate([in_batch_bb, queue_bk], axis=1)
  return scores_bc, positive_bc, valid_bc


def moco_loss(
    q_bd,
    k_bd,
    queue,
    *,
    temperature: float,
    doc_b=None,
    in_batch: bool = True,
    loss_fn=contrastive.info_nce,
):
  """`loss_fn` (default InfoNCE) on `queue_scores_and_masks` -> (loss, aux).

  q_bd: float [B, D] queries (gradient flows); k_bd: their keys (none
  does); queue: `init_queue`'s dict, read before this step's `enqueue`.
  """
  scores_bc, positive_bc, valid_bc = queue_scores_and_masks(
      q_bd,
      k_bd,
      queue["queue_kd"],
      temperature=temperature,
      doc_b=doc_b,
      queue_doc_k=queue["queue_doc_k"],
      in_batch=in_batch,
  )
  loss, aux = loss_fn(scores_bc, positive_bc, valid_bc)
  aux = dict(aux)
  aux["num_negatives"] = jnp.mean(
      jnp.sum(valid_bc & ~positive_bc, axis=-1).astype(jnp.float32)
  )
  return loss, aux
