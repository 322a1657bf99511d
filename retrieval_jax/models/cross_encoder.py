r"""Cross-encoders: one BERT-family pass over a (query, item) pair -> a score.

Two heads on the same encoder:

* "cls": score = w · h[CLS] + b, the usual re-ranker (rows are
  [CLS] query [SEP] item [SEP]);
* "emb": the [EMB]-style head of "Efficient Nearest Neighbor Search for
  Cross-Encoder Models using Matrix Factorization" (Yadav et al., 2022):
  marker tokens sit in front of the query and of the item,

    [CLS] [Q] query [SEP] [I] item [SEP],

  and the score is the dot product of the two markers' contextualised
  states. It has no parameters beyond the encoder's, and its score matrix
  over queries × items has a lower effective rank than the [CLS] head's,
  which is what CUR approximation (`search/cur_knn.py`) relies on.

The markers are two of BERT's reserved vocabulary entries ("[unused0]",
"[unused1]" by default), so checkpoints with the bert-base-uncased
vocabulary (all-MiniLM-L6-v2) need no new embedding rows; fine-tuning
teaches the model what they mean.
"""

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import tqdm

from retrieval_jax import sharding
from retrieval_jax.layers import core
from retrieval_jax.models import transformer_encoder

HEADS = ("cls", "emb")
QUERY_MARKER = "[unused0]"
ITEM_MARKER = "[unused1]"


class CrossEncoder(nnx.Module):
  """A pair scorer on a `TransformerEncoder`.

  Build with `CrossEncoder(encoder, head, rngs=nnx.Rngs(0))`; the encoder
  keeps its (pretrained) weights, the "cls" head starts at BERT's init
  (normal, std initializer_range) with a zero bias.
  """

  def __init__(self, encoder: transformer_encoder.TransformerEncoder,
               head: str = "cls", *, rngs: nnx.Rngs):
    if head not in HEADS:
      raise ValueError(f"head={head!r}: expected one of {HEADS}")
    config = encoder.config
    self.encoder = encoder
    self.head = head
    if head == "cls":
      self.score_d = core.param(
          nnx.initializers.normal(config.initializer_range), rngs,
          (config.hidden_size,), config.param_dtype, (sharding.EMBED,))
      self.bias = core.param(nnx.initializers.zeros, rngs, (),
                             config.param_dtype, ())

  def __call__(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array,
               token_type_ids_bl: jax.Array,
               markers_b2: jax.Array | None = None, *,
               deterministic: bool = True,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Scores a batch of encoded pairs.

    Args:
      input_ids_bl, attention_mask_bl, token_type_ids_bl: [B, L] int, from
        `encode_pairs`.
      markers_b2: [B, 2] int positions of the query and item markers (the
        "emb" head only).
      deterministic: False turns dropout on.
      dropout_rng: PRNG key for dropout.

    Returns:
      [B] float32 scores.
    """
    h_bld = self.encoder(input_ids_bl, attention_mask_bl, token_type_ids_bl,
                         deterministic=deterministic, dropout_rng=dropout_rng)
    h_bld = h_bld.astype(jnp.float32)
    if self.head == "cls":
      return h_bld[:, 0] @ self.score_d[...].astype(jnp.float32) + \
          self.bias[...].astype(jnp.float32)
    if markers_b2 is None:
      raise ValueError("the emb head needs the marker positions markers_b2")
    picked_b2d = jnp.take_along_axis(h_bld, markers_b2[:, :, None], axis=1)
    return jnp.einsum("bd,bd->b", picked_b2d[:, 0], picked_b2d[:, 1])


def encode_pairs(tokenizer, queries, items, max_length: int, head: str,
                 pad_to_multiple_of: int | None = 16) -> dict[str, np.ndarray]:
  """Tokenises (query, item) pairs for a head.

  "cls": [CLS] query [SEP] item [SEP] with the tokenizer's longest-first
  truncation. "emb": the same with a query marker prepended to the query
  and an item marker to the item (both count against `max_length` and are
  never truncated), plus "markers" [B, 2], their positions.

  Args:
    tokenizer: a `data.tokenizers.WordPieceTokenizer`.
    queries, items: B texts each.
    max_length: most ids per row, specials and markers included.
    head: "cls" or "emb".
    pad_to_multiple_of: round the padded width up to this.

  Returns:
    int32 arrays [B, L]: input_ids, attention_mask, token_type_ids (and
    markers [B, 2] for "emb").
  """
  if head not in HEADS:
    raise ValueError(f"head={head!r}: expected one of {HEADS}")
  if head == "cls":
    return tokenizer(list(queries), max_length,
                     pad_to_multiple_of=pad_to_multiple_of,
                     text_pairs=list(items))
  ids = [tokenizer.token_to_id(t) for t in (QUERY_MARKER, ITEM_MARKER)]
  if None in ids:
    raise ValueError(f"the vocabulary lacks {QUERY_MARKER} / {ITEM_MARKER}")
  rows, types, markers = [], [], []
  for query, item in zip(queries, items, strict=True):
    # Two ids fewer for the content, then the markers go in front of each
    # segment: [CLS] [Q] a [SEP] [I] b [SEP].
    row, type_ids = tokenizer.encode_pair(query, item, max_length - 2)
    sep = row.index(tokenizer.sep_id)
    rows.append([row[0], ids[0], *row[1:sep + 1], ids[1], *row[sep + 1:]])
    types.append([0] * (sep + 2) + [1] * (len(row) - sep))
    markers.append((1, sep + 2))
  width = max(map(len, rows))
  if pad_to_multiple_of:
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
  out = {name: np.zeros((len(rows), width), np.int32)
         for name in ("input_ids", "attention_mask", "token_type_ids")}
  out["input_ids"][:] = tokenizer.pad_id
  for b, (row, type_ids) in enumerate(zip(rows, types)):
    out["input_ids"][b, :len(row)] = row
    out["attention_mask"][b, :len(row)] = 1
    out["token_type_ids"][b, :len(row)] = type_ids
  out["markers"] = np.asarray(markers, np.int32).reshape(-1, 2)
  return out


class PairScorer:
  """A cross-encoder as a black-box `score(query_ids, item_ids)` function.

  The signature `search/cur_knn.py` expects: query_ids [b] index `queries`,
  item_ids [b, c] index `items`, and the result is the [b, c] score matrix.
  Pairs are scored in fixed-size batches split over the mesh's batch axes
  (one jitted call per padded width, widths rounded up to
  `pad_to_multiple_of`); the last batch is filled by repeating its last
  pair, and those scores are dropped. `desc` turns on a progress bar.
  """

  def __init__(self, model: CrossEncoder, tokenizer, queries, items, *,
               max_length: int = 256, batch_size: int = 64,
               pad_to_multiple_of: int = 32, mesh=None,
               desc: str | None = None):
    self._queries, self._items = list(queries), list(items)
    # Progress bar label for long calls (None = no bar).
    self._desc = desc
    self._tokenizer, self._head = tokenizer, model.head
    self._max_length, self._multiple = max_length, pad_to_multiple_of
    mesh = sharding.make_mesh() if mesh is None else mesh
    shards = sharding.data_size(mesh)
    # Every batch splits evenly over the data shards.
    self._batch = -(-batch_size // shards) * shards
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    self._rows = sharding.named_sharding(mesh, (sharding.BATCH, None))

    def score(state, *arrays):
      return nnx.merge(graphdef, state)(*arrays)

    self._score = jax.jit(score, out_shardings=sharding.named_sharding(
        mesh, (sharding.BATCH,)))

  def __call__(self, query_ids_b, item_ids_bc) -> np.ndarray:
    query_ids_b = np.asarray(query_ids_b)
    item_ids_bc = np.asarray(item_ids_bc)
    b, c = item_ids_bc.shape
    pairs_q = np.repeat(query_ids_b, c)
    pairs_i = item_ids_bc.reshape(-1)
    out = np.zeros(b * c, np.float32)
    bar = tqdm.tqdm(total=b * c, desc=self._desc, unit="pair",
                    disable=self._desc is None, mininterval=5.0)
    for lo in range(0, b * c, self._batch):
      idx = np.arange(lo, min(lo + self._batch, b * c))
      padded = np.concatenate([idx, np.full(self._batch - len(idx), idx[-1])])
      batch = encode_pairs(self._tokenizer,
                           [self._queries[q] for q in pairs_q[padded]],
                           [self._items[i] for i in pairs_i[padded]],
                           self._max_length, self._head,
                           pad_to_multiple_of=self._multiple)
      arrays = [jax.device_put(batch[k], self._rows) for k in
                ("input_ids", "attention_mask", "token_type_ids", "markers")
                if k in batch]
      out[idx] = np.asarray(self._score(self._state, *arrays))[:len(idx)]
      bar.update(len(idx))
    bar.close()
    return out.reshape(b, c)
