"""Class-incremental learning with a discrete key-value bottleneck.

The protocol of "Discrete Key-Value Bottleneck" (Träuble et al., ICML
2023; README.md beside this file): classes arrive in disjoint stages,
every learner ("dkvb", "linear", "mlp") trains on the current stage's rows
only, by plain SGD with the same steps, batches and seed, no replay and no
task boundary; after each stage it is tested on the classes seen so far
and on all classes. Plain SGD is deliberate: a value row that no batch
fetched gets a zero gradient and so a zero update.

Data sets: `gaussian_toy` (8 Gaussian classes in 2-D, 4 stages) and
`digits_stages` (scikit-learn's 8x8 digits, 5 stages; scikit-learn is
imported only there). `run` returns per-stage accuracies, `format_table`
renders them, `run_experiment` is the config-driven job.
"""

import dataclasses
import functools
import pathlib
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import plotting
from retrieval_jax import io
from retrieval_jax.models import key_value_memory as kvm

LEARNERS = ("dkvb", "linear", "mlp")


@dataclasses.dataclass(frozen=True)
class Stages:
  """A class-incremental data set.

  Attributes:
    x_train: [N, e] float32 inputs.
    y_train: [N] int32 labels in [0, num_classes).
    x_test: [T, e] float32 held-out inputs.
    y_test: [T] int32 labels.
    stages: the classes of each stage, disjoint, in presentation order.
    num_classes: total number of classes.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  stages: tuple[tuple[int, ...], ...]
  num_classes: int


def _pairs(num_classes: int, per_stage: int) -> tuple[tuple[int, ...], ...]:
  return tuple(
      tuple(range(s, min(s + per_stage, num_classes)))
      for s in range(0, num_classes, per_stage)
  )


def gaussian_toy(
    seed: int = 0,
    *,
    num_classes: int = 8,
    radius: float = 4.0,
    sigma: float = 0.6,
    train_per_class: int = 100,
    test_per_class: int = 100,
    classes_per_stage: int = 2,
) -> Stages:
  """Isotropic Gaussian classes centred on a circle in 2-D.

  Class j has mean radius (cos 2 pi j / K, sin 2 pi j / K) and standard
  deviation `sigma` per coordinate; stages take neighbouring classes
  (0-1, 2-3, ...). Train and test rows are independent draws.

  Args:
    seed: numpy seed of every draw.
    num_classes: K.
    radius: distance of the means from the origin.
    sigma: per-coordinate standard deviation.
    train_per_class, test_per_class: rows per class.
    classes_per_stage: classes per stage.

  Returns:
    Stages with float32 [K * n, 2] inputs, rows grouped by class.
  """
  rng = np.random.default_rng(seed)
  angle = 2 * np.pi * np.arange(num_classes) / num_classes
  mean_kd = radius * np.stack([np.cos(angle), np.sin(angle)], 1)

  def draw(per_class):
    x = mean_kd[:, None] + sigma * rng.normal(size=(num_classes, per_class, 2))
    y = np.repeat(np.arange(num_classes), per_class)
    return x.reshape(-1, 2).astype(np.float32), y.astype(np.int32)

  x_train, y_train = draw(train_per_class)
  x_test, y_test = draw(test_per_class)
  return Stages(
      x_train,
      y_train,
      x_test,
      y_test,
      _pairs(num_classes, classes_per_stage),
      num_classes,
  )


def digits_stages(
    seed: int = 0, *, test_fraction: float = 0.3, classes_per_stage: int = 2
) -> Stages:
  """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

  A stratified split (`train_test_split(stratify=y)` seeded by `seed`);
  pixels standardised with the training rows' mean and standard deviation
  (constant pixels, e.g. the always-blank corners, are only centred).
  Stages 0-1, 2-3, ..., 8-9.

  Returns:
    Stages with float32 [N, 64] inputs.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction={test_fraction}: expected in (0, 1)")
  try:
    # pylint: disable=g-import-not-at-top
    from sklearn import datasets
    from sklearn import model_selection
    # pylint: enable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the digits experiment needs scikit-learn (its bundled 8x8 digits): "
        "pip install -e '.[experiments]'"
    ) from e
  x, y = datasets.load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=test_fraction, stratify=y, random_state=seed
  )
  mean, std = x_train.mean(0), x_train.std(0)
  std = np.where(std > 0, std, 1.0)
  return Stages(
      ((x_train - mean) / std).astype(np.float32),
      y_train.astype(np.int32),
      ((x_test - mean) / std).astype(np.float32),
      y_test.astype(np.int32),
      _pairs(10, classes_per_stage),
      10,
  )


@dataclasses.dataclass(frozen=True)
class Settings:
  """How every learner is trained and how the DKVB is built.

  Attributes:
    steps_per_stage: SGD steps on each stage.
    batch_size: rows per step, drawn uniformly with replacement from the
      current stage's training rows (the same draws for every learner).
    learning_rate: SGD learning rate (DKVB: times num_heads).
    seed: model initialisation, key initialisation and batch draws.
    learners: which of LEARNERS to run.
    num_heads, num_keys, key_dim: DKVB codebooks C, keys per codebook M,
      key width d_k.
    ema_steps, ema_decay: full-batch EMA k-means steps and decay g for the
      keys, on all training inputs without labels.
    hidden: MLP hidden width.
  """

  steps_per_stage: int = 1000
  batch_size: int = 32
  learning_rate: float = 0.1
  seed: int = 0
  learners: tuple[str, ...] = LEARNERS
  num_heads: int = 16
  num_keys: int = 64
  key_dim: int = 2
  ema_steps: int = 50
  ema_decay: float = 0.9
  hidden: int = 64


# The 2-D toy: C = 16 heads of 64 keys in 2-D, 1000 steps per stage.
TOY_SETTINGS = Settings()
# Digits: 128 random 8-d views of the 64 standardised pixels, 128 keys each
# (C M (d_k + d_v) = 295k numbers, ~10 training rows per key), 1000 steps
# of 32 rows per stage (~130 passes over a stage's ~250 rows). Seed 0 gives
# final all-class accuracy 0.948 (DKVB), 0.676 (linear), 0.285 (MLP).
DIGITS_SETTINGS = Settings(num_heads=128, num_keys=128, key_dim=8)


class _LinearProbe(nnx.Module):

  def __init__(self, inputs: int, outputs: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(inputs, outputs, rngs=rngs)

  def __call__(self, x_be):
    return self.linear(x_be)


class _Mlp(nnx.Module):

  def __init__(self, inputs: int, hidden: int, outputs: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(inputs, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, outputs, rngs=rngs)

  def __call__(self, x_be):
    return self.out(jax.nn.relu(self.hidden(x_be)))


def make_learner(
    name: str, data: Stages, settings: Settings
) -> tuple[nnx.Module, float]:
  """A fresh learner and its SGD learning rate.

  "dkvb" gets its keys here: EMA k-means on `data.x_train` (no labels).
  """
  rngs = nnx.Rngs(settings.seed)
  inputs = data.x_train.shape[1]
  if name == "linear":
    return (
        _LinearProbe(inputs, data.num_classes, rngs=rngs),
        settings.learning_rate,
    )
  if name == "mlp":
    return (
        _Mlp(inputs, settings.hidden, data.num_classes, rngs=rngs),
        settings.learning_rate,
    )
  if name == "dkvb":
    model = kvm.KeyValueMemory(
        inputs,
        settings.num_heads,
        settings.num_keys,
        settings.key_dim,
        data.num_classes,
        rngs=rngs,
    )
    kvm.initialize_keys(
        model,
        data.x_train,
        settings.ema_steps,
        settings.ema_decay,
        settings.seed,
    )
    return model, settings.learning_rate * settings.num_heads
  raise ValueError(f"learner={name!r}: expected one of {LEARNERS}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_stage(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    params,
    rest,
    opt_state,
    x_ne: jax.Array,
    y_n: jax.Array,
    batches_tb: jax.Array,
):
  """One SGD step per row of `batches_tb`, in one compiled loop.

  The batches are row ids drawn on the host, so every stage (and every
  learner) reuses one draw schedule and the loop holds no PRNG kernels;
  with a fixed [T, B] shape each learner compiles once.

  Args:
    graphdef, tx: static; the learner's graph and the optimizer.
    params: the learner's `nnx.Param` state. rest: its other state.
    opt_state: `tx`'s state for `params`.
    x_ne: [N, e] float32 training inputs. y_n: [N] int32 labels.
    batches_tb: [T, B] int32 row ids of x_ne, one batch per step.

  Returns:
    (params, opt_state, mean training loss over the T steps).
  """

  def loss_fn(params, x_be, y_b):
    logits = nnx.merge(graphdef, params, rest)(x_be)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_b).mean()

  def body(t, carry):
    params, opt_state, total = carry
    pick_b = batches_tb[t]
    loss, grads = jax.value_and_grad(loss_fn)(params, x_ne[pick_b], y_n[pick_b])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, total + loss

  steps = batches_tb.shape[0]
  params, opt_state, total = jax.lax.fori_loop(
      0, steps, body, (params, opt_state, jnp.zeros((), jnp.float32))
  )
  return params, opt_state, total / steps


@functools.partial(jax.jit, static_argnums=0)
def predict(graphdef: nnx.GraphDef, params, rest, x_ne: jax.Array) -> jax.Array:
  """[N] int32 argmax of the learner's logits."""
  return jnp.argmax(nnx.merge(graphdef, params, rest)(x_ne), -1)


@dataclasses.dataclass(frozen=True)
class Results:
  """Accuracies after each stage.

  Attributes:
    stages: the classes of each stage.
    upper_bound: [S] share of test rows whose class was seen by stage s
      (the best all-class accuracy without seeing the other classes).
    seen: {learner: [S] accuracy on test rows of the classes seen so far}.
    all: {learner: [S] accuracy on all test rows}.
    seconds: {learner: wall seconds, key initialisation and compilation
      included}.
  """

  stages: tuple[tuple[int, ...], ...]
  upper_bound: tuple[float, ...]
  seen: dict[str, tuple[float, ...]]
  all: dict[str, tuple[float, ...]]
  seconds: dict[str, float]

  @property
  def final(self) -> dict[str, float]:
    """{learner: all-class accuracy after the last stage}."""
    return {name: acc[-1] for name, acc in self.all.items()}


def run(data: Stages, settings: Settings = TOY_SETTINGS) -> Results:
  """Trains each learner stage by stage and tests it after every stage.

  Args:
    data: the stages.
    settings: training and DKVB settings.

  Returns:
    Results for `settings.learners`.
  """
  for name in settings.learners:
    if name not in LEARNERS:
      raise ValueError(f"learner={name!r}: expected one of {LEARNERS}")
  x_ne, y_n = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test = jnp.asarray(data.x_test)
  seen_classes, upper, schedule = [], [], []
  for stage, classes in enumerate(data.stages):
    seen_classes.extend(classes)
    upper.append(float(np.isin(data.y_test, seen_classes).mean()))
    # Uniform draws with replacement from this stage's rows, shared by
    # every learner.
    rows = np.flatnonzero(np.isin(data.y_train, classes))
    rng = np.random.default_rng([settings.seed, stage])
    schedule.append(
        jnp.asarray(
            rows[
                rng.integers(
                    0,
                    len(rows),
                    (settings.steps_per_stage, settings.batch_size),
                )
            ],
            jnp.int32,
        )
    )
  seen, every, seconds = {}, {}, {}
  for name in settings.learners:
    start = time.perf_counter()
    model, learning_rate = make_learner(name, data, settings)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(learning_rate)
    opt_state = tx.init(params)
    seen[name], every[name] = [], []
    classes_so_far = []
    for stage, batches_tb in enumerate(schedule):
      params, opt_state, _ = train_stage(
          graphdef, tx, params, rest, opt_state, x_ne, y_n, batches_tb
      )
      correct = (
          np.asarray(predict(graphdef, params, rest, x_test)) == data.y_test
      )
      classes_so_far.extend(data.stages[stage])
      mask = np.isin(data.y_test, classes_so_far)
      seen[name].append(float(correct[mask].mean()))
      every[name].append(float(correct.mean()))
    seconds[name] = time.perf_counter() - start
  return Results(
      stages=data.stages,
      upper_bound=tuple(upper),
      seen={k: tuple(v) for k, v in seen.items()},
      all={k: tuple(v) for k, v in every.items()},
      seconds=seconds,
  )


def format_table(results: Results) -> str:
  """Markdown table: one row per learner, "seen / all" accuracy per stage.

  "seen" is the accuracy on the classes shown so far, "all" on all
  classes; the upper-bound row has 1 and the seen share. The last column
  is the final all-class accuracy.
  """
  head = (
      ["learner"]
      + [
          f"stage {s + 1} ({'-'.join(map(str, classes))})"
          for s, classes in enumerate(results.stages)
      ]
      + ["final (all)"]
  )
  lines = [
      "| " + " | ".join(head) + " |",
      "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
  ]
  bound = ["1.000 / %.3f" % u for u in results.upper_bound]
  lines.append(
      "| "
      + " | ".join(["upper bound", *bound, "%.3f" % results.upper_bound[-1]])
      + " |"
  )
  for name in results.all:
    cells = [
        "%.3f / %.3f" % pair
        for pair in zip(results.seen[name], results.all[name])
    ]
    lines.append(
        "| " + " | ".join([name, *cells, "%.3f" % results.final[name]]) + " |"
    )
  return "\n".join(lines)


def run_experiment(config, workdir) -> Results:
  """config.py's `digits` / `toy` experiments, end to end.

  Writes <workdir>/results.json (per-stage accuracies, settings, seconds),
  table.md and accuracy.png/.svg (all-class accuracy after each stage, with
  the upper bound), and prints the table.
  """
  kv = config.kv
  settings = Settings(
      steps_per_stage=kv.steps_per_stage,
      batch_size=kv.batch_size,
      learning_rate=kv.learning_rate,
      seed=kv.seed,
      learners=tuple(kv.learners),
      num_heads=kv.num_heads,
      num_keys=kv.num_keys,
      key_dim=kv.key_dim,
      ema_steps=kv.ema_steps,
      ema_decay=kv.ema_decay,
      hidden=kv.hidden,
  )
  data = (
      gaussian_toy(kv.seed)
      if config.experiment == "toy"
      else digits_stages(kv.seed)
  )
  results = run(data, settings)
  table = format_table(results)
  print(table, flush=True)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  io.write_text_atomic(workdir / "table.md", table + "\n")
  stages = list(range(1, len(results.stages) + 1))
  plotting.line_plot(
      workdir / "accuracy",
      [
          plotting.Series(
              "upper bound",
              stages,
              results.upper_bound,
              color="black",
              dashed=True,
          )
      ]
      + [
          plotting.Series(name, stages, acc, markers=True)
          for name, acc in results.all.items()
      ],
      title=f"class-incremental {config.experiment}: accuracy on all classes",
      xlabel="stage",
      ylabel="accuracy",
      y_range=(0.0, 1.0),
  )
  io.write_json_atomic(
      workdir / "results.json",
      {
          "experiment": config.experiment,
          "settings": dataclasses.asdict(settings),
          "results": dataclasses.asdict(results),
          "final": results.final,
      },
  )
  return results
