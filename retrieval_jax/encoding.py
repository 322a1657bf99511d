"""Host-side encoding on a mesh: tokenize, bucket by length, run a jitted step.

One loop (`_run`) serves every kind: rows are sorted by length and cut into
fixed-size batches whose width is rounded up to `pad_multiple` (little
padding, few distinct shapes, one compile each); dispatch is asynchronous,
so the devices run a batch while the host collects the previous one.
Parameters are replicated over the mesh and the batch split on its data
axes; on a mesh spanning processes every process feeds the same batch and
gets every row back. The encoders differ only in what one batch returns:

  TextEncoder         pooled vectors [N, D] (bi-encoders)
  SparseEncoder       term weights, a scipy CSR [N, V] (SPLADE)
  MultiVectorEncoder  token vectors [N, L, d] with score masks (ColBERT)
  PairScorer          (query, item) pair scores (cross-encoders, CUR)
"""

from collections.abc import Callable, Sequence
import copy
import functools
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import numpy as np
import tqdm

from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax import train_state
from retrieval_jax.data import features
from retrieval_jax.data import tokenizers


def padded_batches(
    ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_multiple: int,
    max_length: int,
    pad_id: int,
    shards: int = 1,
    sort_by_length: bool = True,
    desc: str = "encode",
    pad_fn=None,
):
  """Length-bucketed, padded batches of token ids.

  Args:
    ids: N token-id lists.
    batch_size: rows per batch, rounded up to a multiple of `shards`.
    pad_multiple: widths are multiples of this (capped at max(max_length,
      the longest row)).
    max_length: the encoder's token budget.
    pad_id: the tokenizer's [PAD].
    shards: the mesh's data-axis size.
    sort_by_length: longest rows first (little padding per batch).
    desc: names the job in errors.
    pad_fn: `(rows, width) -> batch dict` replacing the plain layout.

  Yields:
    (rows, batch): the input rows of this batch (int64 [<= batch_size]) and
    by default {"input_ids", "attention_mask", "token_type_ids"}: int32
    [batch_size, width]; the last batch is filled with empty rows, so every
    step has the same batch size.
  """
  n = len(ids)
  if not n:
    raise ValueError(f"{desc}: nothing to encode (0 texts)")
  batch_size = -(-batch_size // shards) * shards
  lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
  # Longest first, so the largest shapes (and any memory error) come first;
  # a stable sort keeps equal-length texts in input order.
  order = (
      np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(n)
  )
  for start in range(0, n, batch_size):
    rows = order[start : start + batch_size]
    width = int(lengths[rows].max())
    width = min(
        -(-width // pad_multiple) * pad_multiple, max(max_length, width)
    )
    batch_rows = [ids[r] for r in rows] + [[]] * (batch_size - len(rows))
    if pad_fn is not None:
      yield rows, pad_fn(batch_rows, width)
      continue
    input_ids = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for i, row in enumerate(batch_rows):
      input_ids[i, : len(row)] = row
      mask[i, : len(row)] = 1
    yield rows, {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(input_ids),
    }


def _place(tree, target):
  """`jax.device_put(tree, target)`, also where the mesh spans processes.

  device_put refuses a host or single-device value for a sharding with
  other processes' devices; every process holds the same value (the same
  weights, the same global batch), so each device takes its block of the
  local copy, as `steps.put_batch` does.
  """
  shardings = jax.tree.leaves(target)
  if all(s.is_fully_addressable for s in shardings):
    return jax.device_put(tree, target)

  def one(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, s)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # dropout keys
      data = one(jax.random.key_data(x), s)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda i: host[i])

  # `target` is a prefix of `tree` (a sharding per NNX Variable, or one).
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda x: one(x, s), sub), target, tree
  )


def _on_host(pending):
  """(rows, batch, out) with `out` as numpy, gathered from every process.

  `np.asarray` cannot fetch rows held by other processes' devices;
  `process_allgather` assembles the global value on every process (the
  callers then agree on every row, as in one process).
  """
  rows, batch, out = pending

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return rows, batch, jax.tree.map(fetch, out)


class _MeshEncoder:
  """An NNX module's graph and its state on the mesh (params laid out by the
  current logical-axis rules, as in training), plus jitted steps."""

  def __init__(self, module: nnx.Module, tokenizer, mesh: Mesh | None):
    self.mesh = sharding.make_mesh() if mesh is None else mesh
    self.tokenizer = tokenizer
    self.graphdef, self.state = None, None
    self.set_module(module)

  def set_module(self, module: nnx.Module) -> None:
    """Swaps in new weights (same graph: no recompile)."""
    graphdef, state = nnx.split(module)
    self.graphdef = self.graphdef or graphdef
    self.state_shardings = train_state.variable_shardings(state, self.mesh)
    self.state = _place(state, self.state_shardings)

  def _jit(self, fn: Callable, out_axes: int):
    """`fn(module, batch) -> [B, ...]` jitted: batch and output on data."""
    graphdef = self.graphdef

    def step(state, batch):
      return fn(nnx.merge(graphdef, state), batch)

    rows = sharding.named_sharding(self.mesh, (sharding.BATCH, None))
    out = sharding.named_sharding(
        self.mesh, (sharding.BATCH,) + (None,) * out_axes
    )
    return jax.jit(
        step, in_shardings=(self.state_shardings, rows), out_shardings=out
    )

  def _run(
      self, step, batches, finish, *, total: int, desc: str, progress: bool
  ) -> None:
    """Runs `step` over `batches`, calling `finish(rows, batch, out)`."""
    bar = tqdm.tqdm(
        total=total,
        desc=desc,
        unit="text",
        disable=not progress,
        mininterval=1.0,
    )
    start, pending = time.perf_counter(), None
    rows_sharding = sharding.named_sharding(self.mesh, (sharding.BATCH, None))
    for rows, batch in batches:
      # With several processes jit refuses sharded numpy inputs, even on
      # a mesh of local devices; `finish` reads the host batch.
      out = step(
          self.state,
          batch if jax.process_count() == 1 else _place(batch, rows_sharding),
      )
      if pending is not None:
        finish(*_on_host(pending))
        bar.update(len(pending[0]))
      pending = (rows, batch, out)
    if pending is not None:
      finish(*_on_host(pending))
      bar.update(len(pending[0]))
    bar.close()
    elapsed = time.perf_counter() - start
    logging.info(
        "%s: %d texts in %.1f s (%.1f texts/s)",
        desc,
        total,
        elapsed,
        total / max(elapsed, 1e-9),
    )

  def _batches(
      self,
      ids,
      *,
      batch_size,
      pad_multiple,
      max_length,
      sort_by_length=True,
      desc="encode",
      pad_fn=None,
  ):
    return padded_batches(
        ids,
        batch_size=batch_size,
        pad_multiple=pad_multiple,
        max_length=max_length,
        pad_id=self.tokenizer.pad_id,
        shards=sharding.data_size(self.mesh),
        sort_by_length=sort_by_length,
        desc=desc,
        pad_fn=pad_fn,
    )


class TextEncoder(_MeshEncoder):
  """A bi-encoder embedding texts into pooled vectors on a mesh.

  Attributes:
    pooling: "cls", "mean" (or the M2 encoder's own poolers).
    normalize: whether embeddings are L2-normalised.
    max_length: tokens per text, [CLS] and [SEP] included.
    query_prompt, doc_prompt: prepended by `encode_queries` /
      `encode_documents` (sentence-transformers' `encode_query` /
      `encode_document`); a checkpoint's own prompts by default.
  """

  query_prompt: str = ""
  doc_prompt: str = ""

  def __init__(
      self,
      module,
      tokenizer,
      mesh,
      *,
      pooling: str,
      normalize: bool,
      max_length: int,
  ):
    super().__init__(module, tokenizer, mesh)
    self.pooling, self.normalize = pooling, normalize
    self.max_length = max_length
    self._step = steps.make_encode_step(
        self.graphdef,
        self.mesh,
        pooling=pooling,
        normalize=normalize,
        state_shardings=self.state_shardings,
    )

  @classmethod
  def from_pretrained(
      cls,
      name_or_path: str,
      mesh: Mesh,
      *,
      pooling: str = "",
      normalize: bool | None = None,
      max_length: int | None = None,
      dtype: str = "float32",
  ) -> "TextEncoder":
    """Weights and tokenizer from local files; empty arguments keep the
    checkpoint's own pipeline settings."""
    loaded = pretrained.load_pretrained(name_or_path, dtype=jnp.dtype(dtype))
    return cls.from_model(
        loaded,
        mesh,
        pooling=pooling,
        normalize=normalize,
        max_length=max_length,
    )

  @classmethod
  def from_model(
      cls,
      loaded: pretrained.PretrainedModel,
      mesh: Mesh,
      *,
      pooling: str = "",
      normalize: bool | None = None,
      max_length: int | None = None,
  ) -> "TextEncoder":
    """Wraps an imported model; empty/None arguments keep its pipeline's."""
    encoder = cls(
        loaded.model,
        tokenizers.WordPieceTokenizer.from_pretrained_dir(loaded.model_dir),
        mesh,
        pooling=pooling or loaded.pooling,
        normalize=loaded.normalize if normalize is None else normalize,
        max_length=max_length or loaded.max_length,
    )
    return encoder.with_prompts(loaded.prompts.query, loaded.prompts.document)

  def with_prompts(
      self, query_prompt: str | None, doc_prompt: str | None
  ) -> "TextEncoder":
    """A copy sharing the weights and program; None keeps a prompt."""
    encoder = copy.copy(self)
    if query_prompt is not None:
      encoder.query_prompt = query_prompt
    if doc_prompt is not None:
      encoder.doc_prompt = doc_prompt
    return encoder

  def encode_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
    """`encode` of `query_prompt + text` for each text."""
    return self.encode([self.query_prompt + t for t in texts], **kwargs)

  def encode_documents(self, texts: Sequence[str], **kwargs) -> np.ndarray:
    """`encode` of `doc_prompt + text` for each text."""
    return self.encode([self.doc_prompt + t for t in texts], **kwargs)

  def tokenize(
      self, texts: Sequence[str], *, desc: str = "tokenize", progress=False
  ) -> list[list[int]]:
    """Token ids per text, [CLS] ... [SEP], truncated to `max_length`."""
    # A bar only where tokenising takes seconds (about 20k texts/s).
    texts = tqdm.tqdm(
        texts,
        desc=desc,
        unit="text",
        disable=not progress or len(texts) < 10_000,
        mininterval=1.0,
    )
    return [self.tokenizer.encode(t, self.max_length) for t in texts]

  def encode(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 64,
      pad_multiple: int = 16,
      sort_by_length: bool = True,
      desc: str = "encode",
      progress: bool = True,
  ) -> np.ndarray:
    """float32 [N, D] embeddings of `texts`, in input order."""
    return self.encode_ids(
        self.tokenize(texts, desc=f"{desc}: tokenize", progress=progress),
        batch_size=batch_size,
        pad_multiple=pad_multiple,
        sort_by_length=sort_by_length,
        desc=desc,
        progress=progress,
    )

  def encode_ids(
      self,
      ids: Sequence[Sequence[int]],
      *,
      batch_size: int = 64,
      pad_multiple: int = 16,
      sort_by_length: bool = True,
      desc: str = "encode",
      progress: bool = True,
  ) -> np.ndarray:
    """Embeds already tokenized texts; see `encode`."""
    out = []

    def finish(rows, batch, emb_bd):
      del batch
      out.append((rows, np.asarray(emb_bd)[: len(rows)]))

    self._run(
        self._step,
        self._batches(
            ids,
            batch_size=batch_size,
            pad_multiple=pad_multiple,
            max_length=self.max_length,
            sort_by_length=sort_by_length,
            desc=desc,
        ),
        finish,
        total=len(ids),
        desc=desc,
        progress=progress,
    )
    emb_nd = np.zeros((len(ids), out[0][1].shape[-1]), np.float32)
    for rows, emb_bd in out:
      emb_nd[rows] = emb_bd
    return emb_nd


class SparseEncoder(_MeshEncoder):
  """A learned sparse encoder (`models.splade.Splade`) over texts.

  Only non-zero weights leave each device batch, so the dense [N, V]
  matrix never exists; `top_terms` keeps each text's t largest weights
  (0 = all non-zero).
  """

  def __init__(
      self, module, tokenizer, mesh, *, max_length: int, top_terms: int = 0
  ):
    super().__init__(module, tokenizer, mesh)
    self.max_length, self.top_terms = max_length, top_terms
    self._step = self._jit(
        lambda model, b: model(
            b["input_ids"], b["attention_mask"], b["token_type_ids"]
        ),
        1,
    )

  @classmethod
  def from_model(
      cls, model, tokenizer, mesh: Mesh, *, max_length: int, top_terms: int = 0
  ) -> "SparseEncoder":
    return cls(
        model, tokenizer, mesh, max_length=max_length, top_terms=top_terms
    )

  def encode(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 32,
      pad_multiple: int = 16,
      desc: str = "encode",
      progress: bool = True,
  ):
    """Term weights of `texts`: a scipy CSR [N, V] float32 matrix."""
    import scipy.sparse  # pylint: disable=g-import-not-at-top
    from retrieval_jax.search import sparse_index  # pylint: disable=g-import-not-at-top

    ids = [self.tokenizer.encode(t, self.max_length) for t in texts]
    parts, order = [], []

    def finish(rows, batch, w_bv):
      del batch
      w_bv = np.asarray(w_bv)[: len(rows)]
      if self.top_terms:
        parts.append(
            sparse_index.from_dense_batches(
                [w_bv], vocab_size=w_bv.shape[1], top_terms=self.top_terms
            ).docs_nv.tocsr()
        )
      else:
        parts.append(sparse_index.to_sparse_rows(w_bv))
      order.append(rows)

    self._run(
        self._step,
        self._batches(
            ids,
            batch_size=batch_size,
            pad_multiple=pad_multiple,
            max_length=self.max_length,
            desc=desc,
        ),
        finish,
        total=len(ids),
        desc=desc,
        progress=progress,
    )
    # Rows come back longest first; put them in input order.
    stacked = scipy.sparse.vstack(parts, format="csr")
    inverse = np.empty(len(ids), np.int64)
    inverse[np.concatenate(order)] = np.arange(len(ids))
    return stacked[inverse]


class MultiVectorEncoder(_MeshEncoder):
  """A `ColBERT` model embedding queries and corpora token by token.

  Storage precision: corpora come back as float16 by default, half of
  float32's memory. Components of unit vectors are in [-1, 1], where
  float16's relative step is 2^-11: one similarity is off by at most
  ~2^-10 and a MaxSim sum of L_q rows by at most L_q × 2^-10 (~0.03 for 32
  rows; random-sign errors make the typical error far smaller).
  `search.late_interaction` casts to float32 before any product.

  Attributes:
    query_maxlen: query width (specials included).
    doc_maxlen: most ids per document (specials included).
    augment: pad queries with [MASK] (scored, not attended).
    mask_punctuation: leave punctuation out of document scoring.
  """

  def __init__(
      self,
      module,
      tokenizer,
      mesh=None,
      *,
      query_maxlen: int = 32,
      doc_maxlen: int = 220,
      augment: bool = True,
      mask_punctuation: bool = True,
  ):
    features.check_maxlen("query_maxlen", query_maxlen)
    features.check_maxlen("doc_maxlen", doc_maxlen)
    super().__init__(module, tokenizer, mesh)
    self.query_maxlen, self.doc_maxlen = query_maxlen, doc_maxlen
    self.augment, self.mask_punctuation = augment, mask_punctuation

    def embed(model, b, dtype):
      # Rows outside the score mask are zeroed: stored arrays do not depend
      # on the batch's padded width.
      e_bld = model(
          b["input_ids"], b["attention_mask"], jnp.zeros_like(b["input_ids"])
      )
      return (e_bld * b["score_mask"][:, :, None].astype(e_bld.dtype)).astype(
          dtype
      )

    self._steps = {
        np.dtype(d): self._jit(functools.partial(embed, dtype=d), 2)
        for d in (np.float16, np.float32)
    }

  @property
  def dim(self) -> int:
    """Width of the token vectors."""
    return int(self.state["linear_hd"].shape[-1])

  @classmethod
  def from_model(
      cls, model, tokenizer, mesh: Mesh | None = None, **options
  ) -> "MultiVectorEncoder":
    """Wraps a model; `options` are the keyword arguments of `__init__`."""
    return cls(model, tokenizer, mesh, **options)

  def _embed(
      self,
      rows,
      pad_fn,
      *,
      width_cap,
      batch_size,
      pad_multiple,
      dtype,
      desc,
      progress,
  ) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.dtype(dtype)
    if dtype not in self._steps:
      raise ValueError(f"dtype={dtype}: expected float16 or float32")
    if not rows:
      raise ValueError(f"{desc}: nothing to encode (0 texts)")
    width_n = max(map(len, rows)) if width_cap is None else width_cap
    emb_nld = np.zeros((len(rows), width_n, self.dim), dtype)
    mask_nl = np.zeros((len(rows), width_n), np.int32)

    def finish(idx, batch, out_bld):
      out_bld = np.asarray(out_bld)
      w = min(out_bld.shape[1], width_n)
      emb_nld[idx, :w] = out_bld[: len(idx), :w]
      mask_nl[idx, :w] = batch["score_mask"][: len(idx), :w]

    self._run(
        self._steps[dtype],
        self._batches(
            rows,
            batch_size=batch_size,
            pad_multiple=pad_multiple,
            max_length=width_cap or self.doc_maxlen,
            desc=desc,
            pad_fn=pad_fn,
        ),
        finish,
        total=len(rows),
        desc=desc,
        progress=progress,
    )
    return emb_nld, mask_nl

  def embed_docs(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 32,
      pad_multiple: int = 16,
      dtype=np.float16,
      desc: str = "colbert docs",
      progress: bool = True,
  ) -> tuple[np.ndarray, np.ndarray]:
    """[N, Lmax, dim] token vectors (Lmax: the longest document) and int32
    [N, Lmax] score masks, in input order; unscored rows are 0."""

    def pad(batch_rows, width):
      ids, attention, score = features.pad_docs(
          self.tokenizer,
          batch_rows,
          width=width,
          mask_punctuation=self.mask_punctuation,
      )
      return {
          "input_ids": ids,
          "attention_mask": attention,
          "score_mask": score,
      }

    return self._embed(
        features.doc_rows(self.tokenizer, texts, self.doc_maxlen),
        pad,
        width_cap=None,
        batch_size=batch_size,
        pad_multiple=pad_multiple,
        dtype=dtype,
        desc=desc,
        progress=progress,
    )

  def embed_queries(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 64,
      dtype=np.float32,
      desc: str = "colbert queries",
      progress: bool = False,
  ) -> tuple[np.ndarray, np.ndarray]:
    """[Q, query_maxlen, dim] token vectors ([MASK] rows included when
    `augment`) and int32 [Q, query_maxlen] score masks."""

    def pad(batch_rows, width):
      del width  # Queries always have the width query_maxlen.
      ids, attention, score = features.pad_queries(
          self.tokenizer, batch_rows, self.query_maxlen, self.augment
      )
      return {
          "input_ids": ids,
          "attention_mask": attention,
          "score_mask": score,
      }

    return self._embed(
        features.query_rows(self.tokenizer, texts, self.query_maxlen),
        pad,
        width_cap=self.query_maxlen,
        batch_size=batch_size,
        pad_multiple=1,
        dtype=dtype,
        desc=desc,
        progress=progress,
    )


class PairScorer(_MeshEncoder):
  """A cross-encoder as a black-box `score(query_ids, item_ids)` function.

  The signature `search/cur_knn.py` expects: query_ids [b] index `queries`,
  item_ids [b, c] index `items`, and the result is the [b, c] score matrix.
  Pairs are scored in input order in fixed-size batches (widths rounded up
  to `pad_to_multiple_of`); `desc` turns on a progress bar.
  """

  def __init__(
      self,
      model,
      tokenizer,
      queries,
      items,
      *,
      max_length: int = 256,
      batch_size: int = 64,
      pad_to_multiple_of: int = 32,
      mesh=None,
      desc: str | None = None,
  ):
    super().__init__(model, tokenizer, mesh)
    self._queries, self._items, self._desc = list(queries), list(items), desc
    self._head, self._max_length = model.head, max_length
    self._batch_size, self._multiple = batch_size, pad_to_multiple_of
    self._score = self._jit(
        lambda m, b: m(
            b["input_ids"],
            b["attention_mask"],
            b["token_type_ids"],
            b.get("markers"),
        ),
        0,
    )

  def __call__(self, query_ids_b, item_ids_bc) -> np.ndarray:
    item_ids_bc = np.asarray(item_ids_bc)
    b, c = item_ids_bc.shape
    pairs_q = np.repeat(np.asarray(query_ids_b), c)
    pairs_i = item_ids_bc.reshape(-1)
    out = np.zeros(b * c, np.float32)

    def pad(batch_rows, width):
      del width
      # Rows are pair indices; fill rows repeat the last real pair.
      idx = [r[0] for r in batch_rows if r] or [0]
      idx += [idx[-1]] * (len(batch_rows) - len(idx))
      pairs = features.encode_pairs(
          self.tokenizer,
          [self._queries[pairs_q[i]] for i in idx],
          [self._items[pairs_i[i]] for i in idx],
          self._max_length,
          self._head,
          pad_to_multiple_of=self._multiple,
      )
      return {k: v for k, v in pairs.items()}

    def finish(rows, batch, scores_b):
      del batch
      out[rows] = np.asarray(scores_b)[: len(rows)]

    self._run(
        self._score,
        self._batches(
            [[i] for i in range(b * c)],
            batch_size=self._batch_size,
            pad_multiple=1,
            max_length=1,
            sort_by_length=False,
            desc="pairs",
            pad_fn=pad,
        ),
        finish,
        total=b * c,
        desc=self._desc or "pairs",
        progress=self._desc is not None,
    )
    return out.reshape(b, c)
