"""Host-side text encoding: tokenize, bucket by length, run the jitted step.

Texts are tokenized once, sorted by length and cut into fixed-size batches
whose padded length is rounded up to `pad_multiple`. Batches of similar length
waste little compute on padding, and the rounding bounds the number of
distinct shapes (one compile each). Results come back in input order.
"""

import dataclasses
from absl import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax.data import tokenizers


@dataclasses.dataclass
class TextEncoder:
  """A pretrained encoder ready to embed text on a mesh.

  Attributes:
    graphdef: static graph of the NNX encoder.
    state: its parameters, replicated on `mesh`.
    tokenizer: the model's WordPiece tokenizer.
    pooling: "cls" or "mean".
    normalize: whether embeddings are L2-normalised.
    max_length: tokens per text, [CLS] and [SEP] included.
    mesh: devices the batch is split over.
  """
  graphdef: nnx.GraphDef
  state: nnx.State
  tokenizer: tokenizers.WordPieceTokenizer
  pooling: str
  normalize: bool
  max_length: int
  mesh: Mesh

  def __post_init__(self):
    self._step = steps.make_encode_step(
        self.graphdef, self.mesh, pooling=self.pooling,
        normalize=self.normalize)

  @classmethod
  def from_pretrained(cls, name_or_path: str, mesh: Mesh, *,
                      pooling: str = "", normalize: bool | None = None,
                      max_length: int | None = None,
                      dtype: str = "float32") -> "TextEncoder":
    """Loads weights and tokenizer from local files.

    Args:
      name_or_path: packaged model name or checkpoint directory.
      mesh: the device mesh.
      pooling: "cls" / "mean", or "" for the checkpoint's own setting.
      normalize: L2-normalise; None for the checkpoint's own setting.
      max_length: token budget per text; None for the checkpoint's.
      dtype: compute dtype, "float32" or "bfloat16".
    """
    loaded = pretrained.load_pretrained(name_or_path, dtype=jnp.dtype(dtype))
    return cls.from_model(loaded, mesh, pooling=pooling, normalize=normalize,
                          max_length=max_length)

  @classmethod
  def from_model(cls, loaded: pretrained.PretrainedModel, mesh: Mesh, *,
                 pooling: str = "", normalize: bool | None = None,
                 max_length: int | None = None) -> "TextEncoder":
    """Wraps an imported model; empty/None arguments keep its pipeline's."""
    graphdef, state = nnx.split(loaded.model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return cls(
        graphdef=graphdef,
        state=state,
        tokenizer=tokenizers.WordPieceTokenizer.from_pretrained_dir(
            loaded.model_dir),
        pooling=pooling or loaded.pooling,
        normalize=loaded.normalize if normalize is None else normalize,
        max_length=max_length or loaded.max_length,
        mesh=mesh)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, [CLS] ... [SEP], truncated to `max_length`."""
    return [self.tokenizer.encode(t, self.max_length) for t in texts]

  def encode(self, texts: Sequence[str], *, batch_size: int = 64,
             pad_multiple: int = 16, sort_by_length: bool = True,
             desc: str = "encode", progress: bool = True) -> np.ndarray:
    """Embeds `texts`.

    Args:
      texts: N strings.
      batch_size: texts per step; rounded up to a multiple of the data axes.
      pad_multiple: padded lengths are multiples of this (capped at
        `max_length`).
      sort_by_length: bucket by token count (longest first).
      desc: progress-bar label.
      progress: show a progress bar.

    Returns:
      float32 [N, D] embeddings in the order of `texts`.
    """
    ids = self.tokenize(texts)
    return self.encode_ids(ids, batch_size=batch_size,
                           pad_multiple=pad_multiple,
                           sort_by_length=sort_by_length, desc=desc,
                           progress=progress)

  def encode_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 64,
                 pad_multiple: int = 16, sort_by_length: bool = True,
                 desc: str = "encode", progress: bool = True) -> np.ndarray:
    """Embeds already tokenized texts; see `encode`."""
    n = len(ids)
    emb_nd, pending = None, None
    start_time = time.perf_counter()
    bar = tqdm.tqdm(total=n, desc=desc, unit="text", disable=not progress,
                    mininterval=1.0)

    def finish(rows, emb_bd):
      nonlocal emb_nd
      emb_bd = np.asarray(emb_bd)  # Waits for this batch only.
      if emb_nd is None:
        emb_nd = np.zeros((n, emb_bd.shape[-1]), np.float32)
      emb_nd[rows] = emb_bd[:len(rows)]
      bar.update(len(rows))

    for rows, batch in padded_batches(
        ids, batch_size=batch_size, pad_multiple=pad_multiple,
        max_length=self.max_length, pad_id=self.tokenizer.pad_id,
        shards=sharding.data_size(self.mesh), sort_by_length=sort_by_length,
        desc=desc):
      # Dispatch is asynchronous: the devices run this batch while the host
      # collects the previous one and pads the next.
      emb_bd = self._step(self.state, batch)
      if pending is not None:
        finish(*pending)
      pending = (rows, emb_bd)
    if pending is not None:
      finish(*pending)
    bar.close()
    elapsed = time.perf_counter() - start_time
    logging.info("%s: %d texts in %.1f s (%.1f texts/s)", desc, n, elapsed,
                 n / max(elapsed, 1e-9))
    return emb_nd


def padded_batches(ids: Sequence[Sequence[int]], *, batch_size: int,
                   pad_multiple: int, max_length: int, pad_id: int,
                   shards: int = 1, sort_by_length: bool = True,
                   desc: str = "encode"):
  """Length-bucketed, padded batches of token ids, for any encoder step.

  Args:
    ids: N token-id lists.
    batch_size: rows per batch, rounded up to a multiple of `shards`.
    pad_multiple: padded widths are multiples of this (capped at
      max(max_length, the longest row)).
    max_length: the encoder's token budget.
    pad_id: the tokenizer's [PAD].
    shards: the mesh's data-axis size.
    sort_by_length: longest rows first (little padding per batch).
    desc: names the job in errors.

  Yields:
    (rows, batch): the input rows of this batch (int64 [<= batch_size]) and
    {"input_ids", "attention_mask", "token_type_ids"}: int32
    [batch_size, width]; the last batch is padded with empty rows so every
    step has the same batch size (one compile per padded width).
  """
  n = len(ids)
  if not n:
    raise ValueError(f"{desc}: nothing to encode (0 texts)")
  batch_size = -(-batch_size // shards) * shards
  lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
  # Longest first, so the largest shapes (and any memory error) come first;
  # a stable sort keeps equal-length texts in input order.
  order = (np.argsort(-lengths, kind="stable") if sort_by_length
           else np.arange(n))
  for start in range(0, n, batch_size):
    rows = order[start:start + batch_size]
    width = int(lengths[rows].max())
    width = min(-(-width // pad_multiple) * pad_multiple,
                max(max_length, width))
    input_ids = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for i, row in enumerate(rows):
      input_ids[i, :lengths[row]] = ids[row]
      mask[i, :lengths[row]] = 1
    yield rows, {"input_ids": input_ids, "attention_mask": mask,
                 "token_type_ids": np.zeros_like(input_ids)}


def make_apply_step(graphdef: nnx.GraphDef, mesh: Mesh):
  """Jits `model(ids, mask, types)` for `mesh`: params replicated, batch
  split on the data axes (models whose output is not a pooled vector)."""

  def apply(state, batch):
    model = nnx.merge(graphdef, state)
    return model(batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], deterministic=True)

  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = sharding.named_sharding(mesh, (sharding.BATCH, None))
  return jax.jit(apply, in_shardings=(replicated, batch_sharding),
                 out_shardings=batch_sharding)


@dataclasses.dataclass
class SparseEncoder:
  """A learned sparse encoder (`models.splade.Splade`) over texts.

  Attributes:
    graphdef, state: the model, its params replicated on `mesh`.
    tokenizer: the model's WordPiece tokenizer.
    max_length: tokens per text, [CLS] and [SEP] included.
    mesh: devices the batch is split over.
    top_terms: keep each text's t largest weights (0 = all non-zero).
  """
  graphdef: nnx.GraphDef
  state: nnx.State
  tokenizer: tokenizers.WordPieceTokenizer
  max_length: int
  mesh: Mesh
  top_terms: int = 0

  def __post_init__(self):
    self._step = make_apply_step(self.graphdef, self.mesh)

  @classmethod
  def from_model(cls, model, tokenizer, mesh: Mesh, *, max_length: int,
                 top_terms: int = 0) -> "SparseEncoder":
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return cls(graphdef, state, tokenizer, max_length, mesh, top_terms)

  def encode(self, texts: Sequence[str], *, batch_size: int = 32,
             pad_multiple: int = 16, desc: str = "encode",
             progress: bool = True):
    """Term weights of `texts` as a scipy CSR [N, V] float32 matrix.

    Only non-zero weights leave the device batch by batch, so the dense
    [N, V] matrix never exists.
    """
    import scipy.sparse  # pylint: disable=g-import-not-at-top
    from retrieval_jax.search import sparse_index  # pylint: disable=g-import-not-at-top
    ids = [self.tokenizer.encode(t, self.max_length) for t in texts]
    parts, order = [], []
    bar = tqdm.tqdm(total=len(ids), desc=desc, unit="text",
                    disable=not progress, mininterval=1.0)
    for rows, batch in padded_batches(
        ids, batch_size=batch_size, pad_multiple=pad_multiple,
        max_length=self.max_length, pad_id=self.tokenizer.pad_id,
        shards=sharding.data_size(self.mesh), desc=desc):
      w_bv = np.asarray(self._step(self.state, batch))[:len(rows)]
      if self.top_terms:
        index = sparse_index.from_dense_batches(
            [w_bv], vocab_size=w_bv.shape[1], top_terms=self.top_terms)
        parts.append(index.docs_nv.tocsr())
      else:
        parts.append(sparse_index.to_sparse_rows(w_bv))
      order.append(rows)
      bar.update(len(rows))
    bar.close()
    # Rows come back longest first; put them in input order.
    stacked = scipy.sparse.vstack(parts, format="csr")
    inverse = np.empty(len(ids), np.int64)
    inverse[np.concatenate(order)] = np.arange(len(ids))
    return stacked[inverse]
