r"""Serving export of a trained run: jax.export or Hugging Face.

`config.export.format="jax"` (default) writes one serialized
`jax.export.Exported` per tower of the run's kind (`Kind.serving_towers`),
`fn(flat_params, *int32 inputs) -> outputs`, B symbolic and L symbolic up
to max_length (else fixed, `length_mode: "fixed"`), lowered for
`config.export.platforms`; weights are safetensors arguments, not
constants; manifest.json lists towers, inputs, outputs and token layouts
(per kind: the README's export table). `serving.py` reads the dense-shaped
ones. `format="hf"` writes a bi-encoder as a sentence-transformers
directory (`export_hf`).

  python -m retrieval_jax.export --model=all-MiniLM-L6-v2 \
      --out_dir=/tmp/minilm_export --query_max_length=64
"""

from collections.abc import Mapping, Sequence
import datetime
import json
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from retrieval_jax import errors
from retrieval_jax import pretrained
from retrieval_jax import serving
from retrieval_jax import sharding
from retrieval_jax.data import tokenizers
from retrieval_jax.models import transformer_encoder

# `config.export.format` values.
FORMATS = ("jax", "hf")
# jax.export lowering platforms (jax names: "cuda"/"rocm", not "gpu").
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Tower inputs that are not [B, L]: name -> fixed width.
FIXED_WIDTH_INPUTS = {"markers": 2}
# Poolings sentence-transformers' Pooling module computes as the project.
HF_POOLING = ("mean", "cls")

# Strings through every tokenizer branch (case, accents, punctuation, CJK,
# unknown words, raw special tokens); the rebuilt tokenizer must match on them.
_TOKENIZER_PROBES = (
    "Hello, World! Naïve café — 東京 [SEP] x[MASK]y",
    "ÀÉÎÕÜ ß ΣΑΣ \u200b tab\tnew\nline",
    "supercalifragilisticexpialidocious 12345.678",
)


def resolve_platforms(
    platforms: Sequence[str] = (), key: str = "config.export.platforms"
) -> tuple[str, ...]:
  """Lowering platforms, deduplicated; () = this host's backend, then "cpu".

  A GPU host's default (cuda, cpu) serves on its GPU and on CPU hosts.
  Unknown names raise a ConfigError naming `key`.
  """
  if isinstance(platforms, str):
    platforms = (platforms,)
  names = tuple(platforms) or (jax.export.default_export_platform(), "cpu")
  bad = [p for p in names if p not in PLATFORMS]
  if bad:
    raise errors.ConfigError(
        f"{key}={list(platforms)}: unknown platform(s) {bad}; expected "
        f"names from {PLATFORMS} (empty: this host's backend, then cpu)"
    )
  return tuple(dict.fromkeys(names))


def split_params(
    graphdef: nnx.GraphDef, params: nnx.State | Sequence[nnx.State]
):
  """(graphdef, param_state, rest_state) as `nnx.split(model, nnx.Param, ...)`.

  params: the state(s) `nnx.merge(graphdef, ...)` takes. The rest holds the
  dropout RNG streams, unused in deterministic mode.
  """
  states = (params,) if isinstance(params, nnx.State) else tuple(params)
  return nnx.split(nnx.merge(graphdef, *states), nnx.Param, ...)


def flatten_params(param_state: nnx.State):
  """(keys, arrays, treedef) of a Param state; NumPy arrays, jax.tree order.

  Keys are path strings such as "layers.0.attention.query_dnh".
  """
  leaves, treedef = jax.tree.flatten(param_state)
  flat = list(nnx.to_flat_state(param_state))
  # Names from NNX's flat view, order from jax.tree: they must agree.
  if len(flat) != len(leaves) or any(
      leaf is not variable.get_value()
      for leaf, (_, variable) in zip(leaves, flat)
  ):
    raise RuntimeError(
        "jax.tree and nnx.to_flat_state order the parameters differently"
    )
  keys = [".".join(map(str, path)) for path, _ in flat]
  return keys, [np.asarray(leaf) for leaf in leaves], treedef


def _position_rows(param_state: nnx.State) -> int:
  """Position-table rows (the longest input); sys.maxsize without a table."""
  for path, variable in nnx.to_flat_state(param_state):
    if path[-1] == "position_pd":
      return int(variable.shape[0])
  return sys.maxsize


def tower_program(tower):
  """(keys, arrays, fn(flat_weights, *inputs), longest input) of a tower.

  tower: a `kinds.base.ServingTower`. A module's rest state (dropout RNG
  streams) is closed over but unread in deterministic mode, so it adds no
  constants to the program.
  """
  if isinstance(tower.weights, nnx.Module):
    graphdef, param_state, rest_state = nnx.split(tower.weights, nnx.Param, ...)
    keys, arrays, treedef = flatten_params(param_state)

    def module_fn(flat_weights, *inputs):
      model = nnx.merge(
          graphdef, jax.tree.unflatten(treedef, flat_weights), rest_state
      )
      return tower.fn(model, *inputs)

    return keys, arrays, module_fn, _position_rows(param_state)
  keys = list(tower.weights)
  arrays = [np.asarray(tower.weights[k]) for k in keys]

  def dict_fn(flat_weights, *inputs):
    return tower.fn(dict(zip(keys, flat_weights, strict=True)), *inputs)

  return keys, arrays, dict_fn, sys.maxsize


def export_tower(
    tower_fn,
    arrays: Sequence[np.ndarray],
    max_length: int,
    *,
    platforms: Sequence[str],
    symbolic_length: bool = True,
    inputs: Sequence[str] = ("input_ids", "attention_mask"),
):
  """Exports one tower: (exported, length_mode "symbolic" or "fixed").

  The batch is symbolic; so is the length (l <= max_length) unless that
  fails or symbolic_length is False. Only the arrays' shapes/dtypes are used.
  """
  weight_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  jitted = jax.jit(tower_fn)

  def export(batch, length):
    # [B, L] inputs share the dimension objects, so the program knows their
    # shapes agree.
    specs = [
        jax.ShapeDtypeStruct(
            (batch, FIXED_WIDTH_INPUTS.get(name, length)), jnp.int32
        )
        for name in inputs
    ]
    return jax.export.export(jitted, platforms=tuple(platforms))(
        weight_specs, *specs
    )

  if symbolic_length:
    # The bound resolves length checks at export time.
    batch, length = jax.export.symbolic_shape(
        "b, l", constraints=(f"l <= {max_length}",)
    )
    try:
      return export(batch, length), "symbolic"
    except Exception as e:  # pylint: disable=broad-except
      # E.g. FFT mixers; a genuine bug fails again below.
      logging.warning(
          "symbolic-length export failed (%s: %s); exporting at "
          "the fixed length %d",
          type(e).__name__,
          e,
          max_length,
      )
  (batch,) = jax.export.symbolic_shape("b")
  return export(batch, max_length), "fixed"


def _write_tokenizer(
    source_dir: str | os.PathLike,
    tokenizer_dir: pathlib.Path,
    max_lengths: Mapping[str, int],
) -> dict[str, Any]:
  """Copies a checkpoint's tokenizer files; returns the manifest's entry."""
  source_dir = pathlib.Path(source_dir)
  tokenizer = tokenizers.from_pretrained_dir(source_dir)
  files = [n for n in tokenizers.FILES if (source_dir / n).is_file()]
  tokenizer_dir.mkdir()
  for name in files:
    shutil.copyfile(source_dir / name, tokenizer_dir / name)
  recipe = {
      "dir": serving.TOKENIZER_DIR,
      "files": files,
      "vocab_size": tokenizer.vocab_size,
      "special_token_ids": serving.special_token_ids(tokenizer),
      "max_lengths": {name: int(n) for name, n in max_lengths.items()},
      "truncation": "the head of the text is kept",
      "padding": (
          "right, with the pad id; attention_mask is 1 on tokens and "
          "0 on padding; token_type_ids are all 0 and not an input"
      ),
  }
  # The loader must give the same ids from the copies, or the export fails.
  rebuilt = serving.build_tokenizer(tokenizer_dir, recipe)
  if any(
      rebuilt.encode(t, 512) != tokenizer.encode(t, 512)
      for t in _TOKENIZER_PROBES
  ):
    raise RuntimeError(
        f"the tokenizer copied from {source_dir} gives other "
        "ids than the original"
    )
  return recipe


def _prepare_out_dir(out_dir: pathlib.Path, overwrite: bool) -> pathlib.Path:
  """Checks `out_dir` may be written; returns a fresh sibling tmp dir."""
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"{out_dir} exists and is not a directory")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(
        f"{out_dir} is not empty; pass overwrite=True to replace it"
    )
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  # A sibling, so the final rename stays on one file system (atomic).
  tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
  tmp_dir.mkdir()
  return tmp_dir


def _commit(tmp_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
  """Moves the finished export into place; readers never see half of one."""
  old_dir = None
  if out_dir.exists():
    # Moved aside, not deleted: no window without an export.
    old_dir = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out_dir, old_dir)
  try:
    os.rename(tmp_dir, out_dir)
  except OSError:
    if old_dir is not None:
      os.rename(old_dir, out_dir)
    raise
  if old_dir is not None:
    shutil.rmtree(old_dir)


def _param_files(towers: Mapping[str, Any]) -> dict[str, str]:
  """{tower: weight file}: one file per distinct weights object.

  The first non-query tower's weights (shared or not) go to
  params.safetensors, others to <tower>_params.safetensors: the dense
  layout `serving.py` reads (query_params.safetensors when untied).
  """
  files, by_weights = {}, {}
  for name in sorted(towers, key=lambda n: n == "query"):
    weights = towers[name].weights
    if id(weights) not in by_weights:
      by_weights[id(weights)] = (
          serving.PARAMS_FILE
          if not by_weights
          else f"{name}_params.safetensors"
      )
    files[name] = by_weights[id(weights)]
  return {name: files[name] for name in towers}


def _shape_json(shape) -> list:
  """A shape for JSON: ints stay, symbolic dimensions become their names."""
  return [d if isinstance(d, int) else str(d) for d in shape]


def export_programs(
    out_dir: str | os.PathLike,
    towers: Mapping[str, Any],
    *,
    tokenizer_dir: str | os.PathLike,
    kind: str,
    platforms: Sequence[str] = ("cpu",),
    symbolic_length: bool = True,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> dict:
  """Writes `towers`, their weights and the tokenizer atomically to out_dir.

  towers: {name: `kinds.base.ServingTower`}; tokenizer_dir holds the files
  `tokenizers.from_pretrained_dir` reads; kind: the manifest's "kind". Max
  lengths must lie in 2..the position table; a non-empty `out_dir` needs
  `overwrite`. metadata: JSON facts for the manifest, which is returned.
  """
  platforms = resolve_platforms(platforms, key="platforms")
  out_dir = pathlib.Path(out_dir).absolute()
  param_files = _param_files(towers)
  tmp_dir = _prepare_out_dir(out_dir, overwrite)
  try:
    manifest = {
        "format": serving.FORMAT,
        "format_version": serving.FORMAT_VERSION,
        "kind": kind,
        "created": (
            datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            )
        ),
        "jax_version": jax.__version__,
        "platforms": list(platforms),
        "towers": {},
        "param_files": {},
        "tokenizer": _write_tokenizer(
            tokenizer_dir,
            tmp_dir / serving.TOKENIZER_DIR,
            {name: t.max_length for name, t in towers.items()},
        ),
        "metadata": dict(metadata or {}),
    }
    for name, tower in towers.items():
      keys, arrays, tower_fn, position_rows = tower_program(tower)
      if not 2 <= tower.max_length <= position_rows:
        raise ValueError(
            f"{name}_max_length {tower.max_length} is outside "
            f"2..{position_rows} (the position table)"
        )
      filename = param_files[name]
      # Shared weights reach here once per tower: write them once.
      if filename not in manifest["param_files"]:
        safetensors.numpy.save_file(
            dict(zip(keys, arrays, strict=True)), tmp_dir / filename
        )
        manifest["param_files"][filename] = keys
      exported, length_mode = export_tower(
          tower_fn,
          arrays,
          tower.max_length,
          platforms=platforms,
          symbolic_length=symbolic_length and not tower.fixed_length,
          inputs=tower.inputs,
      )
      file = serving.TOWER_FILES.get(name, f"{name}_tower.jax_exported")
      (tmp_dir / file).write_bytes(exported.serialize())
      outputs = [
          {"shape": _shape_json(a.shape), "dtype": str(a.dtype)}
          for a in exported.out_avals
      ]
      spec = {
          "file": file,
          "params_file": filename,
          "max_length": int(tower.max_length),
          "length_mode": length_mode,
          # ["b", "l"] for symbolic lengths, ["b", max_length] for fixed.
          "input_shape": _shape_json(exported.in_avals[len(arrays)].shape),
          "input_dtype": "int32",
          "inputs": list(tower.inputs),
          "outputs": outputs,
          **tower.info,
      }
      if len(outputs) == 1 and len(outputs[0]["shape"]) == 2:
        # One [B, D] output: the shape `serving.ServingModel` reads.
        spec["embedding_dim"] = int(outputs[0]["shape"][-1])
        spec["dtype"] = outputs[0]["dtype"]
      manifest["towers"][name] = spec
    manifest["sha256"] = {  # lets a loader spot truncated copies
        str(p.relative_to(tmp_dir)): serving.sha256_file(p)
        for p in sorted(tmp_dir.rglob("*"))
        if p.is_file()
    }
    (tmp_dir / serving.MANIFEST_FILE).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    _commit(tmp_dir, out_dir)
  except BaseException:  # KeyboardInterrupt too: no half-written export
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  logging.info(
      "Exported %s towers (%s) for %s to %s",
      kind,
      ", ".join(
          f"{n}: {m['length_mode']} length <= {m['max_length']}"
          for n, m in manifest["towers"].items()
      ),
      ", ".join(platforms),
      out_dir,
  )
  return manifest


def export_towers(
    out_dir: str | os.PathLike,
    *,
    graphdef: nnx.GraphDef,
    params: nnx.State | Sequence[nnx.State],
    tokenizer_dir: str | os.PathLike,
    pooling: str,
    normalize: bool,
    query_max_length: int,
    passage_max_length: int,
    platforms: Sequence[str] = ("cpu",),
    query_params: nnx.State | Sequence[nnx.State] | None = None,
    symbolic_length: bool = True,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> dict:
  """Writes dense query/passage towers (`export_programs`) of an encoder.

  params are the passage tower's state(s) (see `split_params`), and the query
  tower's unless `query_params` unties it. Max lengths count [CLS]/[SEP].
  """
  from retrieval_jax.kinds import bi_encoder  # pylint: disable=g-import-not-at-top

  def module(states):
    states = (states,) if isinstance(states, nnx.State) else tuple(states)
    return nnx.merge(graphdef, *states)

  towers = bi_encoder.dense_towers(
      module(params),
      pooling=pooling,
      normalize=normalize,
      query_max_length=query_max_length,
      passage_max_length=passage_max_length,
      query_module=None if query_params is None else module(query_params),
  )
  return export_programs(
      out_dir,
      towers,
      tokenizer_dir=tokenizer_dir,
      kind=bi_encoder.KIND.name,
      platforms=platforms,
      symbolic_length=symbolic_length,
      overwrite=overwrite,
      metadata=metadata,
  )


def export_pretrained(
    name_or_path: str | os.PathLike | pretrained.PretrainedModel,
    out_dir: str | os.PathLike,
    *,
    query_max_length: int | None = None,
    passage_max_length: int | None = None,
    pooling: str = "",
    normalize: bool | None = None,
    dtype: str = "float32",
    platforms: Sequence[str] = ("cpu",),
    symbolic_length: bool = True,
    overwrite: bool = False,
) -> dict:
  """Exports a pretrained checkpoint as tied query/passage towers.

  name_or_path: see `pretrained.resolve_model_dir`, or a loaded
  PretrainedModel (then `dtype` is its own). None / "" settings take the
  checkpoint's; dtype is the compute dtype (weights stay float32).
  """
  if isinstance(name_or_path, pretrained.PretrainedModel):
    loaded, source = name_or_path, str(name_or_path.model_dir)
    dtype = jnp.dtype(loaded.config.dtype).name
  else:
    loaded = pretrained.load_pretrained(name_or_path, dtype=jnp.dtype(dtype))
    source = os.fspath(name_or_path)
  graphdef, state = nnx.split(loaded.model)
  return export_towers(
      out_dir,
      graphdef=graphdef,
      params=state,
      tokenizer_dir=loaded.model_dir,
      pooling=pooling or loaded.pooling,
      normalize=loaded.normalize if normalize is None else normalize,
      query_max_length=query_max_length or loaded.max_length,
      passage_max_length=passage_max_length or loaded.max_length,
      platforms=platforms,
      symbolic_length=symbolic_length,
      overwrite=overwrite,
      metadata={
          "source": source,
          "model_dir": str(loaded.model_dir),
          "compute_dtype": dtype,
      },
  )


# ---------------------------------------------------------------------------
# Hugging Face / sentence-transformers format.


def hf_state_dict(
    model: transformer_encoder.TransformerEncoder,
    template_dir: str | os.PathLike,
) -> dict[str, np.ndarray]:
  """{HF BertModel name: array} of `model`: `pretrained`'s import, inverted.

  template_dir: the checkpoint the model was imported from; it gives each
  tensor's HF shape, and its pooler (unused here) is copied unchanged.
  Arrays keep the parameters' dtype; re-importing gives them back bitwise.
  """
  names = pretrained.bert_name_map(model.config)
  template = pretrained.read_state_dict(template_dir)
  (word_key,) = [k for k in template if k.endswith(pretrained.WORD_EMBEDDINGS)]
  prefix = word_key[: -len(pretrained.WORD_EMBEDDINGS)]
  shapes = {
      pretrained.canonical_name(k[len(prefix) :]): v.shape
      for k, v in template.items()
      if k.startswith(prefix)
  }
  params = {
      path: np.asarray(variable.get_value())
      for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  unmapped = set(params) - {path for path, _ in names.values()}
  if unmapped:
    raise ValueError(f"parameters without a HF name: {sorted(unmapped)}")
  state = {}
  for name, (path, transform) in names.items():
    value = params[path]
    # The import transforms only move entries (transposes, reshapes): on
    # the entry numbers of the HF shape they say where each entry came from.
    source = transform(
        np.arange(value.size, dtype=np.int64).reshape(shapes[name])
    )
    flat = np.empty(value.size, value.dtype)
    flat[source.reshape(-1)] = value.reshape(-1)
    state[name] = flat.reshape(shapes[name])
    if not np.array_equal(transform(state[name]), value):
      raise RuntimeError(f"{name}: the import transform is not a permutation")
  for key, value in template.items():
    if key.startswith(prefix + "pooler."):
      state[key[len(prefix) :]] = np.asarray(value)
  return state


def export_hf(
    out_dir: str | os.PathLike,
    *,
    model: transformer_encoder.TransformerEncoder,
    template_dir: str | os.PathLike,
    pooling: str,
    normalize: bool,
    max_length: int,
    overwrite: bool = False,
) -> dict:
  """Writes a sentence-transformers model directory of a BERT bi-encoder.

  config.json (BertModel), model.safetensors (`hf_state_dict`), the
  template's tokenizer files, modules.json: Transformer, 1_Pooling (mean or
  cls), 2_Normalize if normalize; sentence_bert_config.json (max_seq_length
  = max_length) and config_sentence_transformers.json (similarity: cosine
  if normalize, else dot, as the run was evaluated). Returns a summary.
  """
  if not isinstance(model, transformer_encoder.TransformerEncoder):
    raise ValueError(
        f"a {type(model).__name__} has no Hugging Face (BertModel) form"
    )
  if pooling not in HF_POOLING:
    raise ValueError(f"pooling={pooling!r}: expected one of {HF_POOLING}")
  rows = model.config.max_position_embeddings
  if not 2 <= max_length <= rows:
    raise ValueError(
        f"max_length {max_length} is outside 2..{rows} (the position table)"
    )
  template_dir = pathlib.Path(template_dir)
  hf_config = json.loads((template_dir / "config.json").read_text())
  hf_config["architectures"] = ["BertModel"]
  # The weights' dtype: transformers >= 5 loads in the config's dtype.
  hf_config.pop("torch_dtype", None)
  hf_config["dtype"] = jnp.dtype(model.config.param_dtype).name
  read_back = transformer_encoder.EncoderConfig.from_hf_config(
      hf_config, dtype=model.config.dtype, param_dtype=model.config.param_dtype
  )
  if read_back != model.config:
    raise ValueError(
        f"{template_dir}/config.json describes {read_back}, not the model's "
        f"{model.config}"
    )
  state = hf_state_dict(model, template_dir)
  similarity = "cosine" if normalize else "dot"
  # The template's prompts are part of the pipeline the run used.
  st_path = template_dir / "config_sentence_transformers.json"
  st_config = json.loads(st_path.read_text()) if st_path.is_file() else {}
  modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
  if normalize:
    modules.append(("Normalize", "2_Normalize"))
  files = {
      "config.json": hf_config,
      "modules.json": [
          {
              "idx": i,
              "name": str(i),
              "path": path,
              "type": f"sentence_transformers.models.{name}",
          }
          for i, (name, path) in enumerate(modules)
      ],
      "sentence_bert_config.json": {
          "max_seq_length": int(max_length),
          "do_lower_case": False,
      },
      # The legacy flags: read by every sentence-transformers release.
      "1_Pooling/config.json": {
          "word_embedding_dimension": model.config.hidden_size,
          "pooling_mode_cls_token": pooling == "cls",
          "pooling_mode_mean_tokens": pooling == "mean",
          "pooling_mode_max_tokens": False,
          "pooling_mode_mean_sqrt_len_tokens": False,
      },
      "config_sentence_transformers.json": {
          "prompts": st_config.get("prompts") or {},
          "default_prompt_name": st_config.get("default_prompt_name"),
          "similarity_fn_name": similarity,
      },
  }
  out_dir = pathlib.Path(out_dir).absolute()
  tmp_dir = _prepare_out_dir(out_dir, overwrite)
  try:
    # transformers refuses safetensors without a "format" entry.
    safetensors.numpy.save_file(
        state, tmp_dir / "model.safetensors", metadata={"format": "pt"}
    )
    for name in tokenizers.FILES:
      if (template_dir / name).is_file():
        shutil.copyfile(template_dir / name, tmp_dir / name)
    for name, content in files.items():
      (tmp_dir / name).parent.mkdir(exist_ok=True)
      (tmp_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    if normalize:
      (tmp_dir / "2_Normalize").mkdir()  # Normalize has no files
    _commit(tmp_dir, out_dir)
  except BaseException:  # KeyboardInterrupt too: no half-written export
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return {
      "format": "hf",
      "dir": str(out_dir),
      "pooling": pooling,
      "normalize": bool(normalize),
      "similarity_fn_name": similarity,
      "max_seq_length": int(max_length),
      "tensors": len(state),
  }


# ---------------------------------------------------------------------------
# The export mode.


def check_hf_exportable(kind, model_cfg: Mapping[str, Any]) -> None:
  """ConfigError unless a run of `kind` (`config.model` model_cfg) has a
  sentence-transformers form: a dense BERT encoder with mean / cls pooling."""
  if kind.retriever != "dense":
    raise errors.ConfigError(
        "config.export.format='hf' writes a sentence-transformers "
        f"bi-encoder; a {kind.name!r} run (config.model.kind) has no such "
        "form: use config.export.format='jax'"
    )
  architecture = model_cfg.get("architecture", "bert")
  if architecture != "bert":
    raise errors.ConfigError(
        "config.export.format='hf' writes a BERT (BertModel) checkpoint; "
        f"config.model.architecture={architecture!r} has no Hugging Face "
        "equivalent: use config.export.format='jax'"
    )
  if model_cfg["pooling"] not in HF_POOLING:
    raise errors.ConfigError(
        "config.export.format='hf': config.model.pooling="
        f"{model_cfg['pooling']!r} has no sentence-transformers Pooling "
        f"mode here; expected one of {HF_POOLING}"
    )


def idf_corpus_texts(export_cfg, run_cfg: Mapping[str, Any]):
  """Texts whose idf inference-free queries get: `config.export.idf_corpus`
  (a BEIR directory) or, if empty, the run's training corpus (its idf)."""
  from retrieval_jax.data import beir  # pylint: disable=g-import-not-at-top
  from retrieval_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  path = export_cfg.get("idf_corpus", "")
  if path:
    if not (pathlib.Path(path) / "corpus.jsonl").is_file():
      raise errors.ConfigError(
          f"config.export.idf_corpus={path!r}: expected a BEIR directory "
          "holding corpus.jsonl"
      )
    return beir.load_beir(path, split=None, corpus_only=True).doc_texts()
  # As the trainer reads it (train.py), so the idf is the one it used.
  data = run_cfg["data"]
  if data["format"] == "beir":
    return pipeline.TrainingData.from_beir(
        data["path"],
        split=data["train_split"],
        corpus_dir=data["corpus_path"] or None,
    ).doc_texts
  return pipeline.TrainingData.from_pairs(
      data["path"], data["corpus_path"]
  ).doc_texts


@sharding.uses_config_rules
def export_from_workdir(
    config,
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict:
  """The export mode: a training run's checkpoint in `config.export.format`.

  Restores only params, rebuilt from the run's saved config. "jax": the
  kind's towers (`Kind.serving_towers`) for `config.export.platforms`,
  returns the manifest; "hf": `export_hf` of a bi-encoder, returns its
  summary. out_dir defaults to `config.export.out_dir`, else
  <workdir>/export (jax) or <workdir>/export_hf (hf).
  """
  from retrieval_jax import kinds  # pylint: disable=g-import-not-at-top

  export_cfg = config.export
  export_format = export_cfg.get("format", "jax")
  if export_format not in FORMATS:
    raise errors.ConfigError(
        f"config.export.format={export_format!r}: expected one of {FORMATS}"
    )
  platforms = resolve_platforms(export_cfg.get("platforms", ()))
  workdir = pathlib.Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  # Serving runs on one device: restore the params there.
  device = sharding.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])
  try:
    model, tokenizer, run_cfg, restored_step = kinds.load_run(
        workdir, device, step=step
    )
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{e}: no checkpoint to export; train first (--mode=train with the "
        "same --workdir)"
    ) from e
  kind = kinds.get(run_cfg["model"])
  template_dir = pretrained.resolve_model_dir(run_cfg["model"]["pretrained"])
  out_dir = pathlib.Path(
      out_dir
      or export_cfg.get("out_dir", "")
      or workdir / ("export" if export_format == "jax" else "export_hf")
  )
  if export_format == "hf":
    check_hf_exportable(kind, run_cfg["model"])
    result = export_hf(
        out_dir,
        model=model,
        template_dir=template_dir,
        pooling=run_cfg["model"]["pooling"],
        normalize=run_cfg["model"]["normalize"],
        max_length=export_cfg.passage_max_length,
        overwrite=True,
    )
  else:
    towers = kind.serving_towers(
        model,
        tokenizer,
        run_cfg,
        export_cfg,
        corpus_texts=lambda: idf_corpus_texts(export_cfg, run_cfg),
    )
    result = export_programs(
        out_dir,
        towers,
        tokenizer_dir=template_dir,
        kind=kind.name,
        platforms=platforms,
        overwrite=True,
        metadata={
            "checkpoint": str(ckpt_dir / str(restored_step)),
            "step": int(restored_step),
            "pretrained": str(run_cfg["model"]["pretrained"]),
        },
    )
  print(
      f"exported the {kind.name} run {ckpt_dir}/{restored_step} as "
      f"{export_format} to {out_dir}"
  )
  return result


def _define_flags():
  """Command-line flags; defined only when run as a script."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      "model",
      pretrained.DEFAULT_MODEL,
      "Packaged model name or checkpoint directory.",
  )
  flags.DEFINE_string("out_dir", None, "Export directory.", required=True)
  flags.DEFINE_integer(
      "query_max_length", None, "Query token budget; default: the checkpoint's."
  )
  flags.DEFINE_integer(
      "passage_max_length",
      None,
      "Passage token budget; default: the checkpoint's.",
  )
  flags.DEFINE_string("dtype", "float32", "Compute dtype.")
  flags.DEFINE_list(
      "platforms",
      [],
      f"Lowering platforms from {PLATFORMS}; empty: this host's, then cpu.",
  )
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty out_dir.")
  return flags.FLAGS


def _main(argv):
  del argv
  manifest = export_pretrained(
      FLAGS.model,
      FLAGS.out_dir,
      query_max_length=FLAGS.query_max_length,
      passage_max_length=FLAGS.passage_max_length,
      dtype=FLAGS.dtype,
      platforms=resolve_platforms(FLAGS.platforms, key="--platforms"),
      overwrite=FLAGS.overwrite,
  )
  print(json.dumps(manifest["towers"], indent=2))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  FLAGS = _define_flags()
  app.run(_main)
