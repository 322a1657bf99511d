r"""Self-supervised pretraining of a small retriever: ICT, crop + MoCo, Revela.

`run(config, workdir)` (config.py; protocol in README.md) prepares
<workdir>/union (the union corpus) and <workdir>/small_random (the random
small model), then runs every step as a printed `retrieval_jax.main`
command: trainings in <workdir>/train/<run>, evaluations (the evaluate mode,
`--config.run=<train workdir>` for trained rows) in
<workdir>/eval/<row>/<set>. A step whose workdir is finished (results.json,
config.json) is skipped, so an interrupted runner resumes; the CPU seconds
of each step's commands (all attempts) accumulate in cpu_seconds.json.
Writes results.json and table.md.

  python -m experiments.pretraining.run \
      --config experiments/pretraining/config.py --workdir /tmp/rj_pretraining
"""

import dataclasses
import json
import pathlib
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from flax import nnx
import ml_collections
import numpy as np
import safetensors.numpy

from experiments import entry
from retrieval_jax import errors
from retrieval_jax import export
from retrieval_jax import io
from retrieval_jax import pretrained
from retrieval_jax.data import beir
from retrieval_jax.data import tokenizers
from retrieval_jax.models import transformer_encoder

REPO = pathlib.Path(__file__).resolve().parents[2]
_MAIN = (sys.executable, "-m", "retrieval_jax.main")
# configs/train.py variant of each objective.
_VARIANTS = {
    "ict": "pretrain_ict",
    "crop": "pretrain_crop",
    "revela": "pretrain_revela",
}
_NAMES = {"ict": "ICT", "crop": "crop + MoCo", "revela": "Revela"}

# ---------------------------------------------------------------------------
# Inputs written once.


def write_union(sources, out_dir: pathlib.Path) -> pathlib.Path:
  """<out_dir>/corpus.jsonl: every source corpus, ids "<dir name>/<id>"."""
  path = out_dir / "corpus.jsonl"
  if path.is_file():
    return out_dir
  lines = []
  for source in sources:
    name = pathlib.Path(source).name
    ids, titles, texts = beir.read_corpus(beir.corpus_path(str(source)))
    lines += [
        json.dumps({"_id": f"{name}/{i}", "title": t, "text": x})
        for i, t, x in zip(ids, titles, texts)
    ]
  out_dir.mkdir(parents=True, exist_ok=True)
  io.write_text_atomic(path, "\n".join(lines) + "\n")
  print(f"wrote {len(lines)} documents to {path}")
  return out_dir


def _bert_shapes(c: transformer_encoder.EncoderConfig) -> dict:
  """{HF BertModel tensor name: shape} of an encoder config."""
  d, f = c.hidden_size, c.intermediate_size
  shapes = {
      "embeddings.word_embeddings.weight": (c.vocab_size, d),
      "embeddings.position_embeddings.weight": (c.max_position_embeddings, d),
      "embeddings.token_type_embeddings.weight": (c.type_vocab_size, d),
      "embeddings.LayerNorm.weight": (d,),
      "embeddings.LayerNorm.bias": (d,),
  }
  for i in range(c.num_layers):
    layer = f"encoder.layer.{i}."
    for dense, rows, cols in (
        ("attention.self.query", d, d),
        ("attention.self.key", d, d),
        ("attention.self.value", d, d),
        ("attention.output.dense", d, d),
        ("intermediate.dense", f, d),
        ("output.dense", d, f),
    ):
      shapes[f"{layer}{dense}.weight"] = (rows, cols)
      shapes[f"{layer}{dense}.bias"] = (rows,)
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[f"{layer}{norm}.weight"] = (d,)
      shapes[f"{layer}{norm}.bias"] = (d,)
  return shapes


def write_random_model(small, out_dir: pathlib.Path) -> pathlib.Path:
  """The small model at random init as a sentence-transformers directory.

  `small`: config.small. The template's config.json with the small sizes;
  its tokenizer; weights from `TransformerEncoder`'s own init, written by
  the export mode's HF writer (mean pooling, L2-normalised, 256 tokens).
  """
  if (out_dir / "model.safetensors").is_file():
    return out_dir
  template = pretrained.resolve_model_dir(small.template)
  hf_config = json.loads((template / "config.json").read_text())
  hf_config.update(
      num_hidden_layers=small.num_layers,
      hidden_size=small.hidden_size,
      num_attention_heads=small.num_heads,
      intermediate_size=small.intermediate_size,
  )
  try:
    config = transformer_encoder.EncoderConfig.from_hf_config(hf_config)
  except ValueError as e:
    raise errors.ConfigError(f"config.small: {e}") from e
  model = transformer_encoder.TransformerEncoder(
      config, rngs=nnx.Rngs(small.seed)
  )
  with tempfile.TemporaryDirectory() as tmp:
    # A template of the small shape: its config, tokenizer and (zero)
    # tensors tell the HF writer each weight's layout.
    tmp = pathlib.Path(tmp)
    (tmp / "config.json").write_text(json.dumps(hf_config))
    for name in tokenizers.FILES:
      if (template / name).is_file():
        shutil.copyfile(template / name, tmp / name)
    safetensors.numpy.save_file(
        {k: np.zeros(s, np.float32) for k, s in _bert_shapes(config).items()},
        tmp / "model.safetensors",
    )
    export.export_hf(
        out_dir,
        model=model,
        template_dir=tmp,
        pooling="mean",
        normalize=True,
        max_length=256,
    )
  print(f"wrote the random small model to {out_dir}")
  return out_dir


# ---------------------------------------------------------------------------
# Steps.


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class Runner:
  """Runs commands once each, accumulating their CPU and wall seconds.

  A finished step's arguments (the workdir written as `<workdir>`) are kept
  in commands.json; a rerun with other arguments for a finished step (say
  another `scratch.num_steps`) is an error instead of a stale row.
  """

  workdir: pathlib.Path
  main: tuple[str, ...] = _MAIN

  @property
  def times_path(self) -> pathlib.Path:
    return self.workdir / "cpu_seconds.json"

  @property
  def commands_path(self) -> pathlib.Path:
    return self.workdir / "commands.json"

  def times(self) -> dict:
    if self.times_path.is_file():
      return json.loads(self.times_path.read_text())
    return {}

  def _commands(self) -> dict:
    if self.commands_path.is_file():
      return json.loads(self.commands_path.read_text())
    return {}

  def step(self, name: str, args: list[str], done: pathlib.Path) -> None:
    """Runs `retrieval_jax.main args` unless `done` exists."""
    recorded = [a.replace(str(self.workdir), "<workdir>") for a in args]
    if done.is_file():
      before = self._commands().get(name)
      if before is not None and before != recorded:
        changed = sorted(set(recorded) ^ set(before))
        raise errors.ConfigError(
            f"step {name} finished in {done.parent} with other arguments "
            f"(differing: {changed}); use another --workdir or delete "
            f"{done.parent}"
        )
      print(f"= {name}: done ({done.parent})", flush=True)
      return
    cmd = [*self.main, *args]
    print(f"+ [{name}] {shlex.join(cmd)}", flush=True)
    cpu, wall = _children_cpu_s(), time.perf_counter()
    try:
      subprocess.run(cmd, cwd=REPO, check=True)
    except subprocess.CalledProcessError as e:
      raise errors.ConfigError(
          f"step {name} failed (exit {e.returncode}); fix it and rerun the "
          "runner to resume"
      ) from None
    finally:
      times = self.times()
      total = times.setdefault(name, {"cpu_s": 0.0, "wall_s": 0.0})
      total["cpu_s"] += _children_cpu_s() - cpu
      total["wall_s"] += time.perf_counter() - wall
      io.write_json_atomic(self.times_path, times)
    io.write_json_atomic(
        self.commands_path, {**self._commands(), name: recorded}
    )


def _flags(**values) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


def _train_args(variant, workdir, shared, **values) -> list[str]:
  return [
      f"--config=configs/train.py:{variant},shared={shared}",
      f"--workdir={workdir}",
      # Evaluated by the evaluate mode below, not during training.
      *_flags(
          **{"train.eval_before": False, "train.eval_after": False}, **values
      ),
  ]


def _evaluate(runner, config, row, *, retriever_args, workdir) -> dict:
  """Runs the evaluate mode on every `config.eval_sets`; their metrics."""
  out = {}
  for path in config.eval_sets:
    name = pathlib.Path(path).name
    eval_dir = workdir / "eval" / row / name
    runner.step(
        f"eval/{row}/{name}",
        [
            "--mode=evaluate",
            *retriever_args,
            f"--workdir={eval_dir}",
            *_flags(**{
                "data.path": path,
                "data.split": "test",
                "data.max_queries": config.evaluate.max_queries,
                "model.max_length": config.evaluate.max_length,
                "search.top_k": config.evaluate.top_k,
            }),
        ],
        eval_dir / "config.json",
    )
    out[name] = json.loads((eval_dir / "metrics.json").read_text())
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Every row of the comparison (module docstring); returns results.json."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  sets = [pathlib.Path(p).name for p in config.eval_sets]
  for path in config.eval_sets:
    if not pathlib.Path(path, "corpus.jsonl").is_file():
      raise errors.ConfigError(
          f"config.eval_sets: {path!r} has no corpus.jsonl"
      )
  shared = config.shared
  union = write_union(config.union, workdir / "union")
  small = write_random_model(config.small, workdir / "small_random")
  runner = Runner(workdir)
  evaluate = ["--config=configs/evaluate.py"]
  rows = []

  def add(objective, init, steps, row, retriever_args, train=None):
    metrics = _evaluate(
        runner, config, row, retriever_args=retriever_args, workdir=workdir
    )
    times = runner.times()
    rows.append({
        "objective": objective,
        "init": init,
        "steps": steps,
        "row": row,
        "train_cpu_s": times[train]["cpu_s"] if train else None,
        "train_wall_s": times[train]["wall_s"] if train else None,
        "eval_cpu_s": {
            n: times.get(f"eval/{row}/{n}", {}).get("cpu_s") for n in sets
        },
        "metrics": metrics,
    })

  # (a) Zero-shot baselines.
  add("BM25", "-", 0, "bm25", ["--config=configs/evaluate.py:retriever=bm25"])
  add(
      "none (untrained)",
      "random",
      0,
      "small_random",
      [*evaluate, f"--config.model.pretrained={small}"],
  )
  # (b) The small model pretrained from random init on the union.
  s = config.scratch
  for objective in s.objectives:
    if objective not in _VARIANTS:
      raise errors.ConfigError(
          f"config.scratch.objectives: {objective!r} is not one of "
          f"{tuple(_VARIANTS)}"
      )
    train_dir = workdir / "train" / f"scratch_{objective}"
    runner.step(
        f"train/scratch_{objective}",
        _train_args(
            _VARIANTS[objective],
            train_dir,
            shared,
            **{
                "data.path": union,
                "model.pretrained": small,
                "train.num_steps": s.num_steps,
                "optim.learning_rate": s.learning_rate,
                "checkpoint.every_steps": s.checkpoint_every,
            },
        )
        + [f"--config.{o}" for o in s.overrides.get(objective, ())],
        train_dir / "results.json",
    )
    add(
        _NAMES[objective],
        "random",
        s.num_steps,
        f"scratch_{objective}",
        [*evaluate, f"--config.run={train_dir}"],
        train=f"train/scratch_{objective}",
    )
  # (c) all-MiniLM-L6-v2, untouched and further pretrained on SciFact.
  c = config.continued
  if c.objective not in ("crop", "ict"):
    raise errors.ConfigError(
        f"config.continued.objective={c.objective!r}: expected 'crop' or 'ict'"
    )
  add(
      "none (untouched)",
      c.pretrained,
      0,
      "pretrained",
      [*evaluate, f"--config.model.pretrained={c.pretrained}"],
  )
  train_dir = workdir / "train" / f"continued_{c.objective}"
  runner.step(
      f"train/continued_{c.objective}",
      _train_args(
          _VARIANTS[c.objective],
          train_dir,
          shared,
          **{
              "data.path": c.corpus,
              "model.pretrained": c.pretrained,
              "train.num_steps": c.num_steps,
              "optim.learning_rate": c.learning_rate,
              "checkpoint.every_steps": c.checkpoint_every,
          },
      ),
      train_dir / "results.json",
  )
  add(
      _NAMES[c.objective],
      c.pretrained,
      c.num_steps,
      f"continued_{c.objective}",
      [*evaluate, f"--config.run={train_dir}"],
      train=f"train/continued_{c.objective}",
  )

  results = {"rows": rows, "config": json.loads(config.to_json_best_effort())}
  io.write_json_atomic(workdir / "results.json", results)
  table = format_table(rows, sets)
  io.write_text_atomic(workdir / "table.md", table)
  print(table)
  return results


def _duration(seconds) -> str:
  if seconds is None:
    return "-"
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 3600:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


def format_table(rows, sets) -> str:
  """objective | init | steps | CPU time (training) | nDCG@10 per set."""
  title = {"scifact": "SciFact", "cranfield": "Cranfield"}
  head = ["objective", "init", "steps", "CPU time"] + [
      f"{title.get(n, n)} nDCG@10" for n in sets
  ]
  lines = [
      "| " + " | ".join(head) + " |",
      "|---|---|---:|---:|" + "---:|" * len(sets),
  ]
  for r in rows:
    cells = [r["objective"], r["init"], str(r["steps"])]
    cells.append(_duration(r["train_cpu_s"]))
    cells += [f"{r['metrics'][n]['ndcg@10']:.4f}" for n in sets]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  entry.main(run)
