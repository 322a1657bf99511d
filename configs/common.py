"""Pieces shared by the experiment configs: argument parsing and blocks."""

import pathlib

import ml_collections

# Repository root (configs/ lives directly under it). Shipped data paths are
# resolved against it so configs work from any current directory.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_arg(arg: str | None, lazy: bool = False, **spec):
  """Parses `configs/x.py:a=1,b,c=foo` style arguments into a ConfigDict.

  `spec` names every accepted key with its default; the default's type is the
  type the value is parsed to. A bare name (`smoke`) sets a bool to True.

  Args:
    arg: the string after the colon in `--config`, or None.
    lazy: if True, unknown keys are accepted as strings.
    **spec: accepted keys and their defaults.

  Returns:
    A ConfigDict with one entry per key in `spec` (plus unknown ones if lazy).
  """
  parsed = ml_collections.ConfigDict(spec)
  if not arg:
    return parsed
  for item in arg.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise ValueError(
            f"unknown config argument {key!r}; accepted: {sorted(spec)}"
        )
      parsed[key] = value
      continue
    default = spec[key]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      parsed[key] = type(default)(value)
  return parsed


def model_block() -> ml_collections.ConfigDict:
  """The pretrained encoder: which weights, how to pool, precision."""
  model = ml_collections.ConfigDict()
  # "bert": import the checkpoint `pretrained`; "m2": an M2-BERT encoder
  # built from `model.m2` (configs/m2_long_docs.py), tokenizer from
  # `pretrained`.
  model.architecture = "bert"
  # Packaged model name or a directory holding config.json + model.safetensors
  # (or pytorch_model.bin) + vocab.txt.
  model.pretrained = "all-MiniLM-L6-v2"
  # "cls" | "mean" | "" ("" = what the checkpoint's pooling config says).
  model.pooling = ""
  # L2-normalise embeddings; None = what the checkpoint's modules say.
  model.normalize = ml_collections.FieldReference(None, field_type=bool)
  # Compute dtype of the encoder: "float32" or "bfloat16" (params stay fp32).
  model.dtype = "float32"
  # Tokens per text including [CLS]/[SEP]; longer texts are truncated.
  model.max_length = 256
  # Matmul precision: "float32" keeps float32 results on GPU/TPU too (whose
  # default passes are TF32/bf16, off by ~2e-4); "default" is faster there.
  model.matmul_precision = "float32"
  return model


def mesh_block() -> ml_collections.ConfigDict:
  """The device mesh: one size per axis (data, fsdp, model), -1 = the rest."""
  mesh = ml_collections.ConfigDict()
  # Sizes of the (data, fsdp, model) axes; -1 takes all remaining devices.
  mesh.shape = (-1, 1, 1)
  # CPU hosts: XLA devices to split the host into (0 = one per core). XLA
  # runs each CPU matmul on one thread; per-core devices use every core.
  mesh.cpu_devices = 0
  # Logical axis -> mesh axes, e.g. (("batch", ("data", "fsdp")), ("embed",
  # "fsdp"), ...); () = retrieval_jax.sharding.DEFAULT_RULES. Training,
  # evaluation, encoding and export all lay arrays out by it.
  mesh.rules = ()
  return mesh


def m2_block(preset: str = "m2-bert-80m-2k") -> ml_collections.ConfigDict:
  """An M2-BERT encoder: a preset of `models.m2_encoder.M2_CONFIGS` plus
  overrides (0 keeps the preset's value)."""
  m2 = ml_collections.ConfigDict()
  # m2-bert-80m-{128,2k,8k,32k}: the 80M model at that maximum length.
  m2.preset = preset
  # Mixer + GLU blocks (0 = preset: 12).
  m2.num_layers = 0
  # Model width (0 = preset: 768).
  m2.hidden_size = 0
  # GLU width (0 = preset: 3072).
  m2.intermediate_size = 0
  # Longest input: position table and filter length (0 = preset's).
  m2.max_position_embeddings = 0
  # Width of the implicit filters' sine MLP (0 = preset: 128).
  m2.filter_order = 0
  # Zero padded positions before the long convolutions, so an embedding
  # does not depend on the pad length (False = the reference computation).
  m2.mask_padding = True
  # Start every mixer at the identity (long filters zero, residual skip 1,
  # output projection I) instead of the reference's random mixing.
  m2.identity_init = False
  # Copy word/type embeddings from `model.pretrained` (same width needed).
  m2.init_embeddings = False
  # Seed of the random initialisation.
  m2.seed = 0
  return m2
