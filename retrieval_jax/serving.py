"""Loads exported query/passage towers and embeds text, without training code.

An `export.export_towers` directory holds manifest.json, one serialized
`jax.export.Exported` per tower (fn(flat_params, ids_bl, mask_bl) -> emb_bd),
safetensors weights and tokenizer/. Imports no Flax, Optax, Orbax or TF.

  model = ServingModel.load("/path/to/export")
  scores_nm = model.encode_queries(queries) @ model.encode_passages(docs).T

A dense index directory is what `--mode=encode` writes, corpus_embeddings.npy
(float32 [N, D], row i is document i) and corpus_ids.json ([N] str), plus an
optional index.json (metric, sizes, where the rows came from) that
`write_index` / `build_index` add; `load_index` reads either. `serve.py`
serves an export and an index over HTTP.
"""

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from retrieval_jax import io
from retrieval_jax.data import tokenizers
from retrieval_jax.search import exact_topk

FORMAT = "retrieval_jax.serving_towers"
# Bump when an old reader could misread a new directory (2: tokenizer files).
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
TOWERS = ("query", "passage")
TOWER_FILES = {
    "query": "query_tower.jax_exported",
    "passage": "passage_tower.jax_exported",
}
PARAMS_FILE = "params.safetensors"
QUERY_PARAMS_FILE = "query_params.safetensors"
TOKENIZER_DIR = "tokenizer"
# What a tower's texts are called in errors ("queries[3] is int, ...").
TEXT_NAMES = {"query": "queries", "passage": "passages"}
# Index directory files; the first two are `--mode=encode`'s output.
INDEX_EMBEDDINGS_FILE = "corpus_embeddings.npy"
INDEX_IDS_FILE = "corpus_ids.json"
INDEX_INFO_FILE = "index.json"
INDEX_FORMAT = "retrieval_jax.dense_index"
INDEX_FORMAT_VERSION = 1
# Length of a tower's inputs: "symbolic" towers take any length up to their
# max_length; "fixed" towers take exactly max_length (the loader pads to it).
LENGTH_MODES = ("symbolic", "fixed")


def sha256_file(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def build_tokenizer(
    tokenizer_dir: str | os.PathLike, recipe: Mapping[str, Any]
) -> tokenizers.Tokenizer:
  """Loads an export's tokenizer; ValueError if it differs from `recipe`."""
  tokenizer = tokenizers.from_pretrained_dir(tokenizer_dir)
  # A swapped same-family vocabulary would otherwise load silently.
  found = special_token_ids(tokenizer)
  if (
      found != dict(recipe["special_token_ids"])
      or tokenizer.vocab_size != recipe["vocab_size"]
  ):
    raise ValueError(
        f"tokenizer in {tokenizer_dir} does not match its recipe: special "
        f"ids {found} vs {recipe['special_token_ids']}, vocabulary size "
        f"{tokenizer.vocab_size} vs {recipe['vocab_size']}"
    )
  return tokenizer


def check_texts(texts: Iterable[str], name: str = "texts") -> list[str]:
  """`texts` as a list; TypeError naming the first item that is not a str.

  The tokenizers' own errors ("expected string or bytes-like object") name
  neither the item nor its position: "queries[1] is int, expected str".
  """
  if isinstance(texts, (str, bytes)):  # would embed its characters
    raise TypeError(
        f"{name} is one {type(texts).__name__}, expected a sequence of str"
    )
  try:
    texts = list(texts)
  except TypeError:
    raise TypeError(
        f"{name} is {type(texts).__name__}, expected a sequence of str"
    ) from None
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")
  return texts


def special_token_ids(tokenizer: tokenizers.Tokenizer) -> dict:
  """{"cls": id, "sep": id, "pad": id, "unk": id, "mask": id} (None: none)."""
  return {
      "cls": tokenizer.cls_id,
      "sep": tokenizer.sep_id,
      "pad": tokenizer.pad_id,
      "unk": tokenizer.unk_id,
      "mask": tokenizer.mask_id,
  }


def pick_device(platforms: Sequence[str]) -> jax.Device:
  """The default backend if the towers were exported for it, else the CPU."""
  default = jax.export.default_export_platform()  # "cuda", not "gpu"
  if default in platforms:
    return jax.devices()[0]
  if "cpu" in platforms:
    return jax.devices("cpu")[0]
  raise ValueError(
      f"towers were exported for {list(platforms)}, but this "
      f"host runs {default!r} and the export has no 'cpu'"
  )


@dataclasses.dataclass(frozen=True)
class _Tower:
  """One loaded tower: its program, weights and input length rule."""

  name: str
  exported: jax.export.Exported
  call: Any  # jitted exported.call(flat_params, ids_bl, mask_bl) -> emb_bd
  params: list[jax.Array]
  max_length: int
  length_mode: str
  embedding_dim: int


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class ServingModel:
  """Exported towers plus their tokenizer, ready to embed text.

  Length-sorted batches padded to few shapes bound the number of compiles.
  """

  def __init__(
      self,
      export_dir: pathlib.Path,
      manifest: dict,
      tokenizer: tokenizers.Tokenizer,
      towers: Mapping[str, _Tower],
      device: jax.Device,
  ):
    """Use `ServingModel.load`; this only stores what it builds."""
    self.export_dir = export_dir
    self._manifest = manifest
    self.tokenizer = tokenizer
    self._towers = dict(towers)
    self.device = device

  @property
  def manifest(self) -> dict:
    """The parsed manifest.json (a deep copy)."""
    return json.loads(json.dumps(self._manifest))

  @property
  def embedding_dim(self) -> int:
    """D, the width of every embedding."""
    return self._towers["passage"].embedding_dim

  def max_length(self, tower: str) -> int:
    """Most tokens, [CLS]/[SEP] included, that `tower` reads per text."""
    return self._tower(tower).max_length

  @classmethod
  def load(
      cls,
      export_dir: str | os.PathLike,
      *,
      device: jax.Device | None = None,
      verify_checksums: bool = True,
  ) -> "ServingModel":
    """Loads an export directory; ValueError on any mismatch with its manifest.

    device: the default backend if exported for it, else the CPU.
    verify_checksums catches truncated or partial copies via SHA-256.
    """
    export_dir = pathlib.Path(export_dir)
    manifest_path = export_dir / MANIFEST_FILE
    if not manifest_path.is_file():
      raise FileNotFoundError(f"{export_dir} holds no {MANIFEST_FILE}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
      raise ValueError(
          f"{manifest_path}: format {manifest.get('format')!r} "
          f"is not {FORMAT!r}"
      )
    if manifest.get("format_version") != FORMAT_VERSION:
      raise ValueError(
          f"{manifest_path}: format version "
          f"{manifest.get('format_version')} is not supported "
          f"(this reader knows version {FORMAT_VERSION})"
      )
    kind = manifest.get("kind", "bi_encoder")
    for name in TOWERS:
      spec = manifest["towers"].get(name)
      if spec is None or "embedding_dim" not in spec:
        raise ValueError(
            f"{manifest_path}: a {kind} export has no dense {name} tower"
            f" (towers: {sorted(manifest['towers'])}); ServingModel serves"
            " [B, D] query/passage towers; call the others' programs with"
            " jax.export.deserialize (the manifest lists their inputs)"
        )
    if verify_checksums:
      for name, expected in manifest["sha256"].items():
        found = sha256_file(export_dir / name)
        if found != expected:
          raise ValueError(
              f"{export_dir / name}: SHA-256 {found} differs "
              f"from the manifest's {expected}"
          )
    device = device or pick_device(manifest["platforms"])
    recipe = manifest["tokenizer"]
    tokenizer = build_tokenizer(export_dir / recipe["dir"], recipe)

    # Tied towers name the same weight file: read and place it once.
    weights = {}
    for filename, keys in manifest["param_files"].items():
      arrays = safetensors.numpy.load_file(export_dir / filename)
      if sorted(arrays) != sorted(keys):
        raise ValueError(
            f"{export_dir / filename} holds other tensors than "
            "the manifest lists"
        )
      weights[filename] = [jax.device_put(arrays[k], device) for k in keys]

    towers = {}
    for name in TOWERS:
      spec = manifest["towers"][name]
      if spec["max_length"] != recipe["max_lengths"][name]:
        raise ValueError(
            f"{manifest_path}: tower {name} has max_length "
            f"{spec['max_length']}, the tokenizer recipe "
            f"{recipe['max_lengths'][name]}"
        )
      if spec["length_mode"] not in LENGTH_MODES:
        raise ValueError(
            f"{manifest_path}: unknown length_mode {spec['length_mode']!r}"
        )
      # Checks the serialization versions: a much newer JAX fails clearly.
      exported = jax.export.deserialize(
          bytearray((export_dir / spec["file"]).read_bytes())
      )
      params = weights[spec["params_file"]]
      _check_signature(name, exported, params)
      towers[name] = _Tower(
          # Jitted: skips `Exported.call`'s per-call tracing (~10x overhead).
          name=name,
          exported=exported,
          call=jax.jit(exported.call),
          params=params,
          max_length=int(spec["max_length"]),
          length_mode=spec["length_mode"],
          embedding_dim=int(spec["embedding_dim"]),
      )
    return cls(export_dir, manifest, tokenizer, towers, device)

  def _tower(self, tower: str) -> _Tower:
    if tower not in self._towers:
      raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    return self._towers[tower]

  def tokenize(self, tower: str, texts: Sequence[str]) -> list[list[int]]:
    """Ids per text, [CLS] head [SEP], at most `max_length(tower)` each.

    TypeError for one string or a non-str item, naming it (`check_texts`).
    """
    max_length = self._tower(tower).max_length
    texts = check_texts(texts, TEXT_NAMES[tower])
    return [self.tokenizer.encode(t, max_length) for t in texts]

  def encode_queries(
      self, texts: Sequence[str], batch_size: int = 64, pad_multiple: int = 16
  ) -> np.ndarray:
    """Embeds queries with the query tower: float32 [N, D], input order."""
    return self.encode(
        "query", texts, batch_size=batch_size, pad_multiple=pad_multiple
    )

  def encode_passages(
      self, texts: Sequence[str], batch_size: int = 64, pad_multiple: int = 16
  ) -> np.ndarray:
    """Embeds passages with the passage tower: float32 [N, D], input order."""
    return self.encode(
        "passage", texts, batch_size=batch_size, pad_multiple=pad_multiple
    )

  def encode(
      self,
      tower: str,
      texts: Sequence[str],
      *,
      batch_size: int = 64,
      pad_multiple: int = 16,
  ) -> np.ndarray:
    """Tokenizes and embeds `texts` with `tower`; see `encode_ids`."""
    return self.encode_ids(
        tower,
        self.tokenize(tower, texts),
        batch_size=batch_size,
        pad_multiple=pad_multiple,
    )

  def encode_ids(
      self,
      tower: str,
      ids: Sequence[Sequence[int]],
      *,
      batch_size: int = 64,
      pad_multiple: int = 16,
  ) -> np.ndarray:
    """Embeds N id lists ([CLS] ... [SEP], 1..max_length): float32 [N, D].

    Rows keep the order of ids. Symbolic-length towers pad to multiples of
    pad_multiple, capped at max_length.
    """
    spec = self._tower(tower)
    n = len(ids)
    emb_nd = np.zeros((n, spec.embedding_dim), np.float32)
    if not n:
      return emb_nd
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
    # The program's own error would name neither tower nor limit.
    if lengths.min() < 1 or lengths.max() > spec.max_length:
      raise ValueError(
          f"{tower} tower takes 1 to {spec.max_length} ids per "
          f"text; got lengths {lengths.min()}..{lengths.max()}"
      )
    # Longest first (largest shapes first); stable, so ties keep input order.
    order = np.argsort(-lengths, kind="stable")
    pending = None
    for start in range(0, n, batch_size):
      rows = order[start : start + batch_size]
      if spec.length_mode == "fixed":
        width = spec.max_length
      else:
        width = int(lengths[rows].max())
        width = min(-(-width // pad_multiple) * pad_multiple, spec.max_length)
      # Partial batches: a power of two, so one query pays for few rows.
      num_rows = (
          batch_size
          if len(rows) == batch_size
          else min(batch_size, _next_power_of_two(len(rows)))
      )
      input_ids_bl = np.full((num_rows, width), self.tokenizer.pad_id, np.int32)
      mask_bl = np.zeros((num_rows, width), np.int32)
      for i, row in enumerate(rows):
        input_ids_bl[i, : lengths[row]] = ids[row]
        mask_bl[i, : lengths[row]] = 1
      # Asynchronous: results are collected one batch behind.
      emb_bd = spec.call(
          spec.params,
          jax.device_put(input_ids_bl, self.device),
          jax.device_put(mask_bl, self.device),
      )
      if pending is not None:
        emb_nd[pending[0]] = np.asarray(pending[1])[: len(pending[0])]
      pending = (rows, emb_bd)
    emb_nd[pending[0]] = np.asarray(pending[1])[: len(pending[0])]
    return emb_nd


def _check_signature(
    name: str, exported: jax.export.Exported, params: Sequence[jax.Array]
) -> None:
  """Checks that weights fit a tower's (flat params, ids, mask) signature."""
  # in_avals is flat: the weights in file order, then ids and mask.
  avals = exported.in_avals
  if len(avals) != len(params) + 2:
    raise ValueError(
        f"{name} tower takes {len(avals) - 2} weight arrays, "
        f"its weight file holds {len(params)}"
    )
  for i, (aval, array) in enumerate(zip(avals, params)):
    if tuple(aval.shape) != array.shape or aval.dtype != array.dtype:
      raise ValueError(
          f"{name} tower argument {i} is {aval}, the weight "
          f"file holds {array.dtype}{list(array.shape)}"
      )


@dataclasses.dataclass(frozen=True)
class DenseIndex:
  """Documents and their embeddings: row i of embeddings_nd is doc_ids[i].

  embeddings_nd: float32 [N, D]; metric: "dot" or "cosine" (see
  `exact_topk.METRICS`); info: index.json's content ({} without one).
  """

  directory: pathlib.Path
  doc_ids: list[str]
  embeddings_nd: np.ndarray
  metric: str
  info: dict

  @property
  def num_docs(self) -> int:
    """N, the number of documents."""
    return len(self.doc_ids)

  @property
  def embedding_dim(self) -> int:
    """D, the width of each row."""
    return int(self.embeddings_nd.shape[1])


def _check_index(doc_ids, embeddings_nd, metric: str, where: str) -> None:
  """ValueError naming `where` unless ids and rows make a searchable index."""
  if metric not in exact_topk.METRICS:
    raise ValueError(
        f"{where}: metric {metric!r} is not one of {exact_topk.METRICS}"
    )
  if embeddings_nd.ndim != 2 or not embeddings_nd.shape[0]:
    raise ValueError(
        f"{where}: embeddings must be a non-empty [N, D] array, got shape "
        f"{embeddings_nd.shape}"
    )
  if len(doc_ids) != embeddings_nd.shape[0]:
    raise ValueError(
        f"{where}: {len(doc_ids)} ids for {embeddings_nd.shape[0]} rows"
    )
  bad = next((i for i, d in enumerate(doc_ids) if not isinstance(d, str)), -1)
  if bad >= 0:
    raise ValueError(
        f"{where}: doc_ids[{bad}] is {type(doc_ids[bad]).__name__}, "
        "expected str"
    )
  if len(set(doc_ids)) != len(doc_ids):
    raise ValueError(f"{where}: duplicate document ids")
  # exact_topk needs finite scores (a NaN row could rank padding).
  if not np.isfinite(embeddings_nd).all():
    raise ValueError(f"{where}: embeddings hold NaN or inf")


def write_index(
    out_dir: str | os.PathLike,
    doc_ids: Sequence[str],
    embeddings_nd: np.ndarray,
    *,
    metric: str = "dot",
    metadata: Mapping[str, Any] | None = None,
) -> dict:
  """Writes an index directory (module docstring); returns index.json's dict.

  embeddings_nd: [N, D], stored as float32; doc_ids: N unique str. Files
  are replaced atomically, one by one; metadata: JSON facts kept in
  index.json.
  """
  out_dir = pathlib.Path(out_dir)
  doc_ids = list(doc_ids)
  embeddings_nd = np.asarray(embeddings_nd, np.float32)
  _check_index(doc_ids, embeddings_nd, metric, str(out_dir))
  info = {
      "format": INDEX_FORMAT,
      "format_version": INDEX_FORMAT_VERSION,
      "created": (
          datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"
          )
      ),
      "num_docs": len(doc_ids),
      "embedding_dim": int(embeddings_nd.shape[1]),
      "metric": metric,
      "metadata": dict(metadata or {}),
  }
  io.save_npy_atomic(out_dir / INDEX_EMBEDDINGS_FILE, embeddings_nd)
  io.write_json_atomic(out_dir / INDEX_IDS_FILE, doc_ids)
  # Last: a directory with index.json holds the files it describes.
  io.write_json_atomic(out_dir / INDEX_INFO_FILE, info)
  return info


def load_index(index_dir: str | os.PathLike) -> DenseIndex:
  """Reads an index directory; ValueError if its files disagree.

  Without index.json (a `--mode=encode` workdir) the metric is "dot".
  """
  index_dir = pathlib.Path(index_dir)
  for name in (INDEX_EMBEDDINGS_FILE, INDEX_IDS_FILE):
    if not (index_dir / name).is_file():
      raise FileNotFoundError(
          f"{index_dir} holds no {name}; write an index with "
          "serving.write_index / build_index or --mode=encode"
      )
  embeddings_nd = np.load(index_dir / INDEX_EMBEDDINGS_FILE, allow_pickle=False)
  doc_ids = json.loads((index_dir / INDEX_IDS_FILE).read_text("utf-8"))
  info = {}
  if (index_dir / INDEX_INFO_FILE).is_file():
    info = json.loads((index_dir / INDEX_INFO_FILE).read_text("utf-8"))
    if info.get("format") != INDEX_FORMAT:
      raise ValueError(
          f"{index_dir / INDEX_INFO_FILE}: format {info.get('format')!r} "
          f"is not {INDEX_FORMAT!r}"
      )
  if not isinstance(doc_ids, list):
    raise ValueError(f"{index_dir / INDEX_IDS_FILE} is not a JSON list")
  if embeddings_nd.dtype != np.float32:
    raise ValueError(
        f"{index_dir / INDEX_EMBEDDINGS_FILE} is {embeddings_nd.dtype}, "
        "expected float32"
    )
  metric = info.get("metric", "dot")
  _check_index(doc_ids, embeddings_nd, metric, str(index_dir))
  # A copy with stale index.json sizes would otherwise serve silently.
  if info and (info["num_docs"], info["embedding_dim"]) != embeddings_nd.shape:
    raise ValueError(
        f"{index_dir / INDEX_INFO_FILE} describes "
        f"[{info['num_docs']}, {info['embedding_dim']}] rows, "
        f"{INDEX_EMBEDDINGS_FILE} holds {list(embeddings_nd.shape)}"
    )
  return DenseIndex(index_dir, doc_ids, embeddings_nd, metric, info)


def build_index(
    model: ServingModel,
    out_dir: str | os.PathLike,
    doc_ids: Sequence[str],
    passages: Sequence[str],
    *,
    metric: str = "dot",
    batch_size: int = 64,
) -> DenseIndex:
  """Embeds `passages` with the export's passage tower and writes an index.

  index.json records the export and its passage weights' SHA-256, so a
  server can tell an index of another export.
  """
  passages = check_texts(passages, "passages")
  if len(passages) != len(doc_ids):
    raise ValueError(f"{len(doc_ids)} ids for {len(passages)} passages")
  manifest = model.manifest
  params_file = manifest["towers"]["passage"]["params_file"]
  write_index(
      out_dir,
      doc_ids,
      model.encode_passages(passages, batch_size=batch_size),
      metric=metric,
      metadata={
          "export_dir": str(model.export_dir),
          "passage_params_sha256": manifest["sha256"][params_file],
          "passage_max_length": model.max_length("passage"),
      },
  )
  return load_index(out_dir)
