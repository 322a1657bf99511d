"""Featurisers: texts -> the token-id layouts the models read.

Cross-encoder pair rows and ColBERT query / document rows. Markers are BERT's
reserved "[unused0]" / "[unused1]", so bert-base-uncased needs no new rows.
"""

import string
from collections.abc import Iterable, Sequence

import numpy as np

# Cross-encoder heads and their pair layouts (models/cross_encoder.py).
PAIR_HEADS = ("cls", "emb")
PAIR_QUERY_MARKER = "[unused0]"
PAIR_ITEM_MARKER = "[unused1]"
QUERY_MARKER = "[unused0]"
DOC_MARKER = "[unused1]"


def encode_pairs(
    tokenizer,
    queries,
    items,
    max_length: int,
    head: str,
    pad_to_multiple_of: int | None = 16,
) -> dict[str, np.ndarray]:
  """Tokenises (query, item) pairs for head "cls" or "emb": int32 [B, L] dict.

  input_ids, attention_mask, token_type_ids of [CLS] query [SEP] item [SEP],
  longest-first truncated to max_length. "emb" also puts a marker before
  each segment (never truncated, counted in max_length) and adds "markers"
  [B, 2], their positions.
  """
  if head not in PAIR_HEADS:
    raise ValueError(f"head={head!r}: expected one of {PAIR_HEADS}")
  if head == "cls":
    return tokenizer(
        list(queries),
        max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        text_pairs=list(items),
    )
  ids = [
      tokenizer.token_to_id(t) for t in (PAIR_QUERY_MARKER, PAIR_ITEM_MARKER)
  ]
  if None in ids:
    raise ValueError(
        f"the vocabulary lacks {PAIR_QUERY_MARKER} / {PAIR_ITEM_MARKER}"
    )
  rows, types, markers = [], [], []
  for query, item in zip(queries, items, strict=True):
    # Two ids fewer for the markers: [CLS] [Q] a [SEP] [I] b [SEP].
    row, type_ids = tokenizer.encode_pair(query, item, max_length - 2)
    sep = row.index(tokenizer.sep_id)
    rows.append([row[0], ids[0], *row[1 : sep + 1], ids[1], *row[sep + 1 :]])
    types.append([0] * (sep + 2) + [1] * (len(row) - sep))
    markers.append((1, sep + 2))
  width = max(map(len, rows))
  if pad_to_multiple_of:
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
  out = {
      name: np.zeros((len(rows), width), np.int32)
      for name in ("input_ids", "attention_mask", "token_type_ids")
  }
  out["input_ids"][:] = tokenizer.pad_id
  for b, (row, type_ids) in enumerate(zip(rows, types)):
    out["input_ids"][b, : len(row)] = row
    out["attention_mask"][b, : len(row)] = 1
    out["token_type_ids"][b, : len(row)] = type_ids
  out["markers"] = np.asarray(markers, np.int32).reshape(-1, 2)
  return out


def _marker_id(tokenizer, marker: str) -> int:
  marker_id = tokenizer.token_to_id(marker)
  if marker_id is None:
    raise ValueError(f"the vocabulary lacks the marker token {marker!r}")
  return marker_id


def punctuation_ids(tokenizer) -> np.ndarray:
  """Sorted int32 ids of punctuation tokens (BERT splits each char off)."""
  ids = {tokenizer.token_to_id(c) for c in string.punctuation}
  ids.discard(None)
  return np.asarray(sorted(ids), np.int32)


def _with_marker(
    tokenizer, text: str, marker_id: int, max_length: int
) -> list[int]:
  """[CLS] marker content [SEP], at most `max_length` ids."""
  ids = tokenizer.encode(text, max_length - 1)
  return [ids[0], marker_id, *ids[1:]]


def check_maxlen(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 3:
    raise ValueError(
        f"{name}={value!r}: need an int >= 3 ([CLS], the marker and [SEP])"
    )


def query_rows(
    tokenizer, texts: Sequence[str], query_maxlen: int
) -> list[list[int]]:
  """Unpadded query ids, [CLS] [Q] tokens [SEP], <= query_maxlen each."""
  check_maxlen("query_maxlen", query_maxlen)
  marker = _marker_id(tokenizer, QUERY_MARKER)
  return [_with_marker(tokenizer, t, marker, query_maxlen) for t in texts]


def doc_rows(
    tokenizer, texts: Sequence[str], doc_maxlen: int
) -> list[list[int]]:
  """Unpadded document ids, [CLS] [D] tokens [SEP], <= doc_maxlen each."""
  check_maxlen("doc_maxlen", doc_maxlen)
  marker = _marker_id(tokenizer, DOC_MARKER)
  return [_with_marker(tokenizer, t, marker, doc_maxlen) for t in texts]


def pad_queries(
    tokenizer, rows: Sequence[Sequence[int]], query_maxlen: int, augment: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads query rows to `query_maxlen`; see `encode_queries`."""
  fill = tokenizer.mask_id if augment else tokenizer.pad_id
  ids_bl = np.full((len(rows), query_maxlen), fill, np.int32)
  attention_bl = np.zeros((len(rows), query_maxlen), np.int32)
  for b, row in enumerate(rows):
    ids_bl[b, : len(row)] = row
    attention_bl[b, : len(row)] = 1
  # With augmentation every position is scored, the [MASK] fill included.
  score_bl = np.ones_like(attention_bl) if augment else attention_bl.copy()
  return ids_bl, attention_bl, score_bl


def pad_docs(
    tokenizer,
    rows: Sequence[Sequence[int]],
    *,
    mask_punctuation: bool,
    width: int | None = None,
    pad_multiple: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads document rows; see `encode_docs`. `width` fixes L (>= longest)."""
  longest = max((len(r) for r in rows), default=0)
  width = longest if width is None else width
  if width < longest:
    raise ValueError(f"width={width} < longest document ({longest} ids)")
  if pad_multiple:
    width = -(-width // pad_multiple) * pad_multiple
  ids_bl = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  attention_bl = np.zeros((len(rows), width), np.int32)
  for b, row in enumerate(rows):
    ids_bl[b, : len(row)] = row
    attention_bl[b, : len(row)] = 1
  score_bl = attention_bl.copy()
  if mask_punctuation:
    # Attended (shapes neighbours) but unscored: it would match every "?".
    score_bl[np.isin(ids_bl, punctuation_ids(tokenizer))] = 0
  return ids_bl, attention_bl, score_bl


def encode_queries(
    tokenizer,
    texts: Sequence[str],
    *,
    query_maxlen: int = 32,
    augment: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenises queries as [CLS] [Q] tokens [SEP], width query_maxlen >= 3.

  Returns int32 [B, query_maxlen] ids_bl, attention_mask_bl, score_mask_bl.
  augment fills with [MASK] (attention 0, score 1); False pads with [PAD]
  and scores only the real tokens.
  """
  return pad_queries(
      tokenizer,
      query_rows(tokenizer, texts, query_maxlen),
      query_maxlen,
      augment,
  )


def encode_docs(
    tokenizer,
    texts: Sequence[str],
    *,
    doc_maxlen: int = 220,
    mask_punctuation: bool = True,
    pad_multiple: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenises docs as [CLS] [D] tokens [SEP] (<= doc_maxlen), [PAD]ded.

  Returns int32 [B, L] ids_bl, attention_mask_bl, score_mask_bl (minus
  punctuation if mask_punctuation); L is the longest row, rounded up to
  pad_multiple.
  """
  return pad_docs(
      tokenizer,
      doc_rows(tokenizer, texts, doc_maxlen),
      mask_punctuation=mask_punctuation,
      pad_multiple=pad_multiple,
  )


def inference_free_query(
    ids_list: Iterable[Sequence[int]],
    *,
    vocab_size: int,
    idf_v: np.ndarray | None = None,
    special_ids: Sequence[int] = (),
) -> np.ndarray:
  """Inference-free sparse query vectors: dense float32 [Q, V].

  q_j = 1[j in tokens(q)] * ReLU(idf_j) (IDF 1 if idf_v is None): the ReLU
  keeps a learned IDF gone negative from penalising a match. special_ids
  columns are 0. Dense is cheap: 122 KB per query at V = 30,522.
  """
  rows = [np.unique(np.asarray(list(ids), np.int64)) for ids in ids_list]
  for q, row in enumerate(rows):
    if row.size and (row[0] < 0 or row[-1] >= vocab_size):
      raise ValueError(
          f"ids_list[{q}] has ids outside [0, {vocab_size}): "
          f"{row[(row < 0) | (row >= vocab_size)].tolist()}"
      )
  if idf_v is None:
    weight_v = np.ones(vocab_size, np.float32)
  else:
    idf_v = np.asarray(idf_v, np.float32)
    if idf_v.shape != (vocab_size,):
      raise ValueError(
          f"idf_v has shape {idf_v.shape}, expected ({vocab_size},)"
      )
    weight_v = np.maximum(idf_v, 0.0)
  q_qv = np.zeros((len(rows), vocab_size), np.float32)
  for q, row in enumerate(rows):
    q_qv[q, row] = weight_v[row]
  special = np.asarray(list(special_ids), np.int64)
  if special.size:
    q_qv[:, special] = 0.0
  return q_qv


def idf_from_corpus(
    token_id_lists: Iterable[Sequence[int]], vocab_size: int
) -> np.ndarray:
  """BM25 (Lucene) IDF float32 [V] over N tokenised documents.

  log(1 + (N − df + 0.5) / (df + 0.5)) is positive for every df <= N,
  unlike Robertson–Spärck Jones' IDF.
  """
  df_v = np.zeros(vocab_size, np.int64)
  n = 0
  for d, ids in enumerate(token_id_lists):
    row = np.unique(np.asarray(list(ids), np.int64))
    if row.size and (row[0] < 0 or row[-1] >= vocab_size):
      raise ValueError(f"token_id_lists[{d}] has ids outside [0, {vocab_size})")
    df_v[row] += 1
    n += 1
  idf_v = np.log1p((n - df_v + 0.5) / (df_v + 0.5))  # float64 for large N
  return idf_v.astype(np.float32)
