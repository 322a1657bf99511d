r"""Export of the query and passage towers for serving (STYLE.md, 15).

Each tower is a serialized `jax.export.Exported`
`fn(flat_params, input_ids_bl, attention_mask_bl) -> emb_bd` running
`steps.encode_step`: int32 [B, L] in, float32 [B, D] out, B symbolic and L
symbolic up to max_length (else fixed at it, `length_mode: "fixed"`).
Weights are safetensors arguments, not constants; `serving.py` reads them.

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
from retrieval_jax import steps
from retrieval_jax.data import tokenizers

# Strings through every tokenizer branch (case, accents, punctuation, CJK,
# unknown words, raw special tokens); the rebuilt tokenizer must match on them.
_TOKENIZER_PROBES = (
    "Hello, World! Naïve café — 東京 [SEP] x[MASK]y",
    "ÀÉÎÕÜ ß ΣΑΣ \u200b tab\tnew\nline",
    "supercalifragilisticexpialidocious 12345.678",
)


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


def make_tower_fn(
    graphdef: nnx.GraphDef,
    treedef,
    rest_state: nnx.State,
    *,
    pooling: str,
    normalize: bool,
):
  """fn(flat_params, input_ids_bl, attention_mask_bl) -> emb_bd of a tower.

  flat_params in `treedef` order; int32 [B, L] ids and mask; float32 [B, D]
  out. rest_state is closed over but unread in deterministic mode, so it
  adds no constants to the program.
  """

  def tower_fn(flat_params, input_ids_bl, attention_mask_bl):
    param_state = jax.tree.unflatten(treedef, flat_params)
    model = nnx.merge(graphdef, param_state, rest_state)
    # The evaluator's step: exported embeddings match by construction.
    model_graphdef, state = nnx.split(model)
    batch = {"input_ids": input_ids_bl, "attention_mask": attention_mask_bl}
    return steps.encode_step(
        model_graphdef, state, batch, pooling=pooling, normalize=normalize
    )

  return tower_fn


def export_tower(
    tower_fn,
    arrays: Sequence[np.ndarray],
    max_length: int,
    *,
    platforms: Sequence[str],
    symbolic_length: bool = True,
):
  """Exports one tower: (exported, length_mode "symbolic" or "fixed").

  The batch is symbolic; so is the length (l <= max_length) unless that
  fails or symbolic_length is False. Only the arrays' shapes/dtypes are used.
  """
  weight_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  jitted = jax.jit(tower_fn)

  def export(shape):
    # ids and mask share one spec, so the program knows their shapes agree.
    ids_spec = jax.ShapeDtypeStruct(shape, jnp.int32)
    return jax.export.export(jitted, platforms=tuple(platforms))(
        weight_specs, ids_spec, ids_spec
    )

  if symbolic_length:
    # The bound resolves length checks at export time.
    shape = jax.export.symbolic_shape(
        "b, l", constraints=(f"l <= {max_length}",)
    )
    try:
      return export(shape), "symbolic"
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
  return export((batch, max_length)), "fixed"


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
      "max_lengths": {name: int(max_lengths[name]) for name in serving.TOWERS},
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
  """Writes both towers, weights and tokenizer atomically to `out_dir`.

  params are the passage tower's state(s) (see `split_params`), and the query
  tower's unless `query_params` unties it; tokenizer_dir holds the files
  `tokenizers.from_pretrained_dir` reads. Max lengths count [CLS]/[SEP] and
  must lie in 2..max_position_embeddings; a non-empty `out_dir` needs
  `overwrite`. metadata: JSON facts for the manifest, which is returned.
  """
  out_dir = pathlib.Path(out_dir).absolute()
  max_lengths = {
      "query": int(query_max_length),
      "passage": int(passage_max_length),
  }
  tower_params = {
      "passage": params,
      "query": params if query_params is None else query_params,
  }
  param_files = {
      "passage": serving.PARAMS_FILE,
      "query": (
          serving.PARAMS_FILE
          if query_params is None
          else serving.QUERY_PARAMS_FILE
      ),
  }
  tmp_dir = _prepare_out_dir(out_dir, overwrite)
  try:
    manifest = {
        "format": serving.FORMAT,
        "format_version": serving.FORMAT_VERSION,
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
            tokenizer_dir, tmp_dir / serving.TOKENIZER_DIR, max_lengths
        ),
        "metadata": dict(metadata or {}),
    }
    for name in serving.TOWERS:
      param_graphdef, param_state, rest_state = split_params(
          graphdef, tower_params[name]
      )
      keys, arrays, treedef = flatten_params(param_state)
      position_rows = _position_rows(param_state)
      if not 2 <= max_lengths[name] <= position_rows:
        raise ValueError(
            f"{name}_max_length {max_lengths[name]} is outside "
            f"2..{position_rows} (the position table)"
        )
      filename = param_files[name]
      # Tied towers reach here twice with the same file: write it once.
      if filename not in manifest["param_files"]:
        safetensors.numpy.save_file(
            dict(zip(keys, arrays, strict=True)), tmp_dir / filename
        )
        manifest["param_files"][filename] = keys
      tower_fn = make_tower_fn(
          param_graphdef,
          treedef,
          rest_state,
          pooling=pooling,
          normalize=normalize,
      )
      exported, length_mode = export_tower(
          tower_fn,
          arrays,
          max_lengths[name],
          platforms=platforms,
          symbolic_length=symbolic_length,
      )
      (out_aval,) = exported.out_avals
      (tmp_dir / serving.TOWER_FILES[name]).write_bytes(exported.serialize())
      manifest["towers"][name] = {
          "file": serving.TOWER_FILES[name],
          "params_file": filename,
          "max_length": max_lengths[name],
          "length_mode": length_mode,
          # ["b", "l"] for symbolic lengths, ["b", max_length] for fixed.
          "input_shape": [
              d if isinstance(d, int) else str(d)
              for d in exported.in_avals[-1].shape
          ],
          "input_dtype": "int32",
          "pooling": pooling,
          "normalize": bool(normalize),
          "embedding_dim": int(out_aval.shape[-1]),
          "dtype": str(out_aval.dtype),
      }
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
      "Exported query/passage towers (%s) to %s",
      ", ".join(
          f"{n}: {m['length_mode']} length <= {m['max_length']}"
          for n, m in manifest["towers"].items()
      ),
      out_dir,
  )
  return manifest


def _position_rows(param_state: nnx.State) -> int:
  """Position-table rows (the longest input); sys.maxsize without a table."""
  for path, variable in nnx.to_flat_state(param_state):
    if path[-1] == "position_pd":
      return int(variable.shape[0])
  return sys.maxsize


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


@sharding.uses_config_rules
def export_from_workdir(
    config,
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict:
  """The export mode: towers of a training run's checkpoint; the manifest.

  Restores only params, rebuilt from the run's saved config, and uses
  `config.export`'s token budgets; out_dir defaults to <workdir>/export.
  Only dense kinds (with a text encoder) can be exported.
  """
  from retrieval_jax import kinds  # pylint: disable=g-import-not-at-top

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
  if kind.retriever != "dense":
    raise errors.ConfigError(
        f"{workdir}: a {kind.name!r} run has no text encoder to export "
        "(config.model.kind); export serves dense towers"
    )
  encoder = kind.text_encoder(
      model,
      tokenizer,
      run_cfg,
      device,
      max_length=config.export.passage_max_length,
  )
  out_dir = pathlib.Path(out_dir or workdir / "export")
  manifest = export_towers(
      out_dir,
      graphdef=encoder.graphdef,
      params=encoder.state,
      tokenizer_dir=pretrained.resolve_model_dir(
          run_cfg["model"]["pretrained"]
      ),
      pooling=encoder.pooling,
      normalize=encoder.normalize,
      query_max_length=config.export.query_max_length,
      passage_max_length=config.export.passage_max_length,
      overwrite=True,
      metadata={
          "checkpoint": str(ckpt_dir / str(restored_step)),
          "step": int(restored_step),
          "pretrained": str(run_cfg["model"]["pretrained"]),
      },
  )
  print(f"exported the towers of {ckpt_dir}/{restored_step} to {out_dir}")
  return manifest


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
  flags.DEFINE_list("platforms", ["cpu"], "Lowering platforms.")
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
      platforms=FLAGS.platforms,
      overwrite=FLAGS.overwrite,
  )
  print(json.dumps(manifest["towers"], indent=2))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  FLAGS = _define_flags()
  app.run(_main)
