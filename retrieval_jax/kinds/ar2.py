"""AR2: a retriever and a ranker trained against each other (Zhang et al. 2022).

One run holds two models in one `AR2Model` (one params tree): the retriever
G, a bi-encoder on `model.pretrained`, and the ranker D, a cross-encoder
(head `model.head`) on its own copy of that encoder. Each query's group is
its positive and G's current top-n (`data.negatives = "dense"`, re-mined
by G every `data.refresh_steps`; exactly the top-n when `negative_depth =
group_size - 1`). Steps alternate by `config.ar2` (`Phases`): D's steps
minimise `ranker_loss`, G's `retriever_loss`; the idle model runs without
dropout or gradient. The optimizer (`alternating_optimizer`) keeps an
AdamW per model, each on its own schedule over its own steps, and moves
only the phase's model: a zero gradient would still move the other one
through Adam's moments and weight decay. Warm starts: `ar2.retriever_init`
/ `ranker_init` (`Kind.initial_params`); evaluation: G as a dense
retriever, D re-ranking G's top `evals.<name>.rerank_depth`.
"""

import copy
import dataclasses
import functools
import pathlib
from typing import NamedTuple

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from retrieval_jax import checkpointing
from retrieval_jax import encoding
from retrieval_jax import errors
from retrieval_jax import losses
from retrieval_jax import metric_logging
from retrieval_jax import optimizers
from retrieval_jax import train_state
from retrieval_jax.errors import ConfigError
from retrieval_jax.evaluation import evaluators
from retrieval_jax.kinds import base
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import cross_encoder
from retrieval_jax.models import cross_encoder as cross_encoder_model

RETRIEVER, RANKER = "retriever", "ranker"
# Pair keys of the cross-encoder's featurizer, beside `base.STEP_KEYS`.
PAIR_KEYS = ("pair_ids", "pair_mask", "pair_types", "pair_markers")
# config.ar2 weights: each >= 0.
WEIGHTS = (
    "ranker_kl_weight",
    "retriever_kl_weight",
    "infonce_weight",
    "adv_weight",
)


class AR2Model(nnx.Module):
  """The retriever (an encoder) and the ranker (`models.CrossEncoder`)."""

  def __init__(self, retriever: nnx.Module, ranker: nnx.Module):
    self.retriever = retriever
    self.ranker = ranker


@dataclasses.dataclass(frozen=True)
class Phases:
  """Which model a step trains: cycles of `ranker_steps` ranker steps and
  `retriever_steps` retriever steps, `first` ("ranker" | "retriever") first.

  Methods take a python int or a traced int32 step.
  """

  ranker_steps: int
  retriever_steps: int
  first: str = RANKER

  def _first_len(self) -> int:
    return self.ranker_steps if self.first == RANKER else self.retriever_steps

  def is_retriever(self, step):
    """bool: `step` trains the retriever."""
    in_first = step % (self.ranker_steps + self.retriever_steps) < (
        self._first_len()
    )
    return in_first if self.first == RETRIEVER else ~jnp.asarray(in_first)

  def counts(self, step):
    """(ranker steps, retriever steps) among steps 0 .. step - 1."""
    cycle = self.ranker_steps + self.retriever_steps
    first = (step // cycle) * self._first_len() + jnp.minimum(
        step % cycle, self._first_len()
    )
    if self.first == RANKER:
      return first, step - first
    return step - first, first

  @classmethod
  def from_config(cls, config) -> "Phases":
    ar2 = config.ar2
    return cls(int(ar2.ranker_steps), int(ar2.retriever_steps), ar2.first_phase)


def adversarial_loss(retriever_bg, ranker_bg, positive_bg, valid_bg):
  """AR2's reward-weighted term: mean over queries of Σ_j r_j log p_G(j).

  r_j = log σ(D⁺ − D_j), constant (the log-probability that the ranker
  prefers the positive, slot 0, over candidate j, as the authors' code
  computes it); p_G: softmax of the retriever's [B, G] scores over valid
  slots. Minimising it moves G's mass to the candidates D confuses with
  the positive. The authors' code sums over queries; here it is a mean.
  """
  reward_bg = jax.lax.stop_gradient(
      jax.nn.log_sigmoid(ranker_bg[:, :1] - ranker_bg)
  )
  log_p_bg = (
      retriever_bg
      - losses.contrastive.masked_logsumexp(retriever_bg, valid_bg)[:, None]
  )
  row_b = jnp.sum(jnp.where(valid_bg, reward_bg * log_p_bg, 0.0), axis=-1)
  has_b = jnp.any(positive_bg & valid_bg, axis=-1)
  return jnp.sum(jnp.where(has_b, row_b, 0.0)) / jnp.maximum(jnp.sum(has_b), 1)


def loss_terms(
    scores_qc,
    ranker_bg,
    batch,
    *,
    loss_fn,
    ranker_temperature,
    share_hard_negatives,
    weights,
):
  """Both models' losses and their terms from the two score sets.

  Args:
    scores_qc: float32 [B, B*G] retriever scores q . p / temperature, or
      None (not computed: the retriever terms are 0).
    ranker_bg: float32 [B, G] ranker scores of each query's group.
    batch: "positive_counts", "passage_doc", "relevant_doc".
    loss_fn: the InfoNCE of both (`losses.LOSSES`, one positive).
    ranker_temperature: p_D = softmax(ranker_bg / it).
    weights: {name: float} of `WEIGHTS`.

  Returns:
    {name: float32 scalar}: "ranker_loss" = InfoNCE_D + ranker_kl_weight
    · KL(p_G ‖ p_D), "retriever_loss" = retriever_kl_weight · KL(p_D ‖ p_G)
    + infonce_weight · InfoNCE_G (in-batch and hard negatives) + adv_weight
    · `adversarial_loss`, each term, and both accuracies.
  """
  positive_bg, valid_bg = base.group_labels(
      batch["positive_counts"], batch["passage_doc"]
  )
  ranker_nce, ranker_aux = loss_fn(ranker_bg, positive_bg, valid_bg)
  zero = jnp.zeros((), jnp.float32)
  terms = {
      "ranker_infonce": ranker_nce,
      "ranker_accuracy": ranker_aux["accuracy"],
      "ranker_kl": zero,
      "retriever_infonce": zero,
      "retriever_kl": zero,
      "retriever_adv": zero,
      "accuracy": zero,
  }
  if scores_qc is not None:
    b = scores_qc.shape[0]
    rows_b = jnp.arange(b)
    retriever_bg = scores_qc.reshape(b, b, -1)[rows_b, rows_b]
    kl = losses.listwise.kl_distillation
    terms["retriever_infonce"], aux = base.in_batch_loss(
        scores_qc,
        batch,
        loss_fn=loss_fn,
        share_hard_negatives=share_hard_negatives,
    )
    terms["accuracy"] = aux["accuracy"]
    terms["retriever_kl"] = kl(
        retriever_bg,
        ranker_bg,
        valid_bg,
        teacher_temperature=ranker_temperature,
    )[0]
    terms["ranker_kl"] = kl(
        ranker_bg,
        retriever_bg,
        valid_bg,
        student_temperature=ranker_temperature,
    )[0]
    terms["retriever_adv"] = adversarial_loss(
        retriever_bg, ranker_bg, positive_bg, valid_bg
    )
  terms["ranker_loss"] = (
      terms["ranker_infonce"] + weights["ranker_kl_weight"] * terms["ranker_kl"]
  )
  terms["retriever_loss"] = (
      weights["retriever_kl_weight"] * terms["retriever_kl"]
      + weights["infonce_weight"] * terms["retriever_infonce"]
      + weights["adv_weight"] * terms["retriever_adv"]
  )
  return {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}


def loss(
    model,
    batch,
    rng,
    step,
    *,
    phases: Phases,
    loss_fn,
    temperature: float,
    ranker_temperature: float,
    pooling: str,
    normalize: bool,
    share_hard_negatives: bool,
    weights,
):
  """The phase's loss of one batch (see `base.TrainSpec`).

  Batch: the bi-encoder's (`base.STEP_KEYS`) and the cross-encoder's
  pairs of the same groups (`PAIR_KEYS`, [B*G, L]). Retriever steps run
  both models and differentiate the retriever's loss; ranker steps run
  the ranker, and the retriever only when ranker_kl_weight > 0. Aux:
  `loss_terms` and "retriever_phase" (1 or 0).
  """
  model_def, params = train_state.split_model(model)
  q_rng, p_rng, d_rng = base.split_rng(rng, 3)
  b = batch["positive_counts"].shape[0]

  def retriever_scores(m, train):
    enc = functools.partial(
        bi_encoder.encode, m.retriever, pooling=pooling, normalize=normalize
    )
    q_bd = enc(
        batch["query_ids"], batch["query_mask"], q_rng if train else None
    )
    p_cd = enc(
        batch["passage_ids"], batch["passage_mask"], p_rng if train else None
    )
    # float32 scores whatever the encoder's dtype (softmax over many columns).
    return (
        jnp.einsum("bd,cd->bc", q_bd, p_cd, preferred_element_type=jnp.float32)
        / temperature
    )

  def ranker_scores(m, train):
    key = d_rng if train else None
    scores_p = m.ranker(
        batch["pair_ids"],
        batch["pair_mask"],
        batch["pair_types"],
        batch["pair_markers"],
        deterministic=key is None,
        dropout_rng=key,
    )
    return scores_p.reshape(b, -1)

  terms = functools.partial(
      loss_terms,
      batch=batch,
      loss_fn=loss_fn,
      ranker_temperature=ranker_temperature,
      share_hard_negatives=share_hard_negatives,
      weights=weights,
  )

  def retriever_step(prm):
    m = model_def.merge(prm)
    ranker_bg = jax.lax.stop_gradient(ranker_scores(m, False))
    out = terms(retriever_scores(m, True), ranker_bg)
    return out["retriever_loss"], dict(out, retriever_phase=jnp.float32(1))

  def ranker_step(prm):
    m = model_def.merge(prm)
    scores_qc = None
    if weights["ranker_kl_weight"]:
      scores_qc = jax.lax.stop_gradient(retriever_scores(m, False))
    out = terms(scores_qc, ranker_scores(m, True))
    return out["ranker_loss"], dict(out, retriever_phase=jnp.float32(0))

  # One branch runs: the idle model gets no backward pass at all.
  return jax.lax.cond(
      phases.is_retriever(step), retriever_step, ranker_step, params
  )


class AlternatingState(NamedTuple):
  """`alternating_optimizer`'s state: its step count, each model's state."""

  count: jax.Array
  retriever: optax.OptState
  ranker: optax.OptState


def alternating_optimizer(
    retriever_tx: optax.GradientTransformation,
    ranker_tx: optax.GradientTransformation,
    phases: Phases,
) -> optax.GradientTransformation:
  """Updates only the phase's model of {"retriever", "ranker"} params.

  Step t (the state's count, = the train step) runs the phase's
  transformation and keeps its new state; the other model's update is 0
  and its state is left as it was, so its params, moments and schedule
  stand still. Each transformation's state spans the whole params tree
  (its other half idles): `optax.tree_map_params`, which lays out the
  state's shardings, needs param-shaped subtrees; that costs a second set
  of moments.
  """

  def init(params):
    return AlternatingState(
        jnp.zeros((), jnp.int32),
        retriever_tx.init(params),
        ranker_tx.init(params),
    )

  def update(updates, state, params=None):
    def run(tx, inner, own):
      new, inner = tx.update(updates, inner, params)
      new = {
          k: u if k == own else jax.tree.map(jnp.zeros_like, u)
          for k, u in new.items()
      }
      return new, inner

    def retriever_phase(_):
      new, inner = run(retriever_tx, state.retriever, RETRIEVER)
      return new, inner, state.ranker

    def ranker_phase(_):
      new, inner = run(ranker_tx, state.ranker, RANKER)
      return new, state.retriever, inner

    new, retriever, ranker = jax.lax.cond(
        phases.is_retriever(state.count), retriever_phase, ranker_phase, None
    )
    return new, AlternatingState(state.count + 1, retriever, ranker)

  return optax.GradientTransformation(init, update)


def make_optimizer(config, total_steps: int, phases: Phases):
  """(`alternating_optimizer`, learning rate at a step) from `config.optim`.

  Each model's AdamW (`optimizers.make_optimizer`) decays over its own
  steps of the run; the ranker's peak rate is `ar2.ranker_learning_rate`
  (0: `optim.learning_rate`). The returned schedule is the phase's rate.
  """
  ranker_total, retriever_total = (int(n) for n in phases.counts(total_steps))
  retriever_tx, retriever_lr = optimizers.make_optimizer(
      config.optim, max(retriever_total, 1)
  )
  ranker_optim = ml_collections.ConfigDict(config.optim.to_dict())
  ranker_optim.learning_rate = (
      config.ar2.ranker_learning_rate or config.optim.learning_rate
  )
  ranker_tx, ranker_lr = optimizers.make_optimizer(
      ranker_optim, max(ranker_total, 1)
  )

  def schedule(step):
    ranker_n, retriever_n = phases.counts(step)
    return jnp.where(
        phases.is_retriever(step),
        retriever_lr(retriever_n),
        ranker_lr(ranker_n),
    )

  return alternating_optimizer(retriever_tx, ranker_tx, phases), schedule


class _Part:
  """A `ModelDef` whose `merge` gives one submodule of the model."""

  def __init__(self, model_def, part: str):
    self.model_def, self.part = model_def, part

  def merge(self, params):
    return getattr(self.model_def.merge(params), self.part)


class Evaluator:
  """`config.evals` on the params being trained: the retriever's dense
  retrieval ("eval/<name>/..."), then with `evals.<name>.rerank_depth` > 0
  the ranker re-ranking its top rerank_depth ("eval/<name>_ranker/...").

  `encoder(params)`: the retriever's `TextEncoder` (dense mining uses it).
  """

  def __init__(self, config, model_def, tokenizer, mesh, workdir):
    self.dense = bi_encoder.DenseEvaluator(
        config, _Part(model_def, RETRIEVER), tokenizer, mesh, workdir
    )
    self.config, self.model_def = config, model_def
    self.tokenizer, self.mesh = tokenizer, mesh
    self.evals = self.dense.evals

  def encoder(self, params) -> encoding.TextEncoder:
    return self.dense.encoder(params)

  def run(self, params, out_dir=None) -> dict[str, float]:
    """{"eval/<tag>/<measure>": value}; with `out_dir`, each result's
    run.trec and per-query values go to <out_dir>/<tag>/."""
    if not self.evals:
      return {}
    encoder = self.encoder(params)
    ranker = self.model_def.merge(params).ranker
    out = {}
    with jax.default_matmul_precision(self.config.model.matmul_precision):
      for name, evaluator in self.evals.items():
        ev = self.config.evals[name]
        result = evaluator.run(
            encoder,
            batch_size=ev.batch_size,
            pad_multiple=16,
            sort_by_length=True,
            mesh=self.mesh,
        )
        results = {name: result}
        depth = ev.get("rerank_depth", 0)
        if depth:
          scorer = encoding.PairScorer(
              ranker,
              self.tokenizer,
              evaluator.query_texts,
              evaluator.collection.doc_texts(),
              max_length=self.config.data.pair_max_length,
              batch_size=ev.batch_size,
              mesh=self.mesh,
              desc=f"{name}: re-rank",
          )
          results[f"{name}_ranker"] = evaluator.score_ranking(
              *evaluators.rerank(scorer, result.indices_qk[:, :depth])
          )
        for tag, res in results.items():
          out.update(
              {f"eval/{tag}/{k}": float(v) for k, v in res.metrics.items()}
          )
          if out_dir is not None and jax.process_index() == 0:
            evaluators.write_result(res, pathlib.Path(out_dir) / tag, tag=tag)
    return out


def _as_kind(model, run_cfg: dict, part: str, kind: str):
  run_cfg = copy.deepcopy(run_cfg)
  run_cfg["model"]["kind"] = kind
  return getattr(model, part), run_cfg


# `kinds.VIEWS`: an AR2 run read as a bi-encoder or a cross-encoder run.
as_retriever = functools.partial(_as_kind, part=RETRIEVER, kind="bi_encoder")
as_ranker = functools.partial(_as_kind, part=RANKER, kind="cross_encoder")


def _independent_copy(module: nnx.Module) -> nnx.Module:
  """`module` with its own parameter buffers (none shared with the original,
  which donation of the train state would not allow)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return nnx.merge(graphdef, jax.tree.map(jnp.array, params), rest)


def _number(config, key: str, *, positive: bool = False) -> float:
  value = config.ar2[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"config.ar2.{key}={value!r}: expected a number")
  if value < 0 or (positive and value == 0):
    raise ConfigError(
        f"config.ar2.{key}={value}: must be {'>' if positive else '>='} 0"
    )
  return float(value)


class AR2(base.Kind):
  """See the module docstring."""

  name = "ar2"
  model_keys = ("head",)
  dense_negatives = True
  trains_with_evals = True

  def validate(self, config) -> None:
    super().validate(config)
    if config.model.head not in cross_encoder_model.HEADS:
      raise ConfigError(
          f"config.model.head={config.model.head!r}: expected one of "
          f"{cross_encoder_model.HEADS}"
      )
    if "ar2" not in config:
      raise ConfigError(
          "config.model.kind='ar2' needs the config.ar2 block (see "
          "configs/train.py:ar2)"
      )
    ar2 = config.ar2
    steps = {}
    for key in ("ranker_steps", "retriever_steps"):
      steps[key] = ar2[key]
      if isinstance(steps[key], bool) or not isinstance(steps[key], int):
        raise ConfigError(f"config.ar2.{key}={steps[key]!r}: expected an int")
      if steps[key] < 0:
        raise ConfigError(f"config.ar2.{key}={steps[key]}: must be >= 0")
    if not sum(steps.values()):
      raise ConfigError(
          "config.ar2.ranker_steps and retriever_steps are both 0: one "
          "model must train"
      )
    if ar2.first_phase not in (RANKER, RETRIEVER):
      raise ConfigError(
          f"config.ar2.first_phase={ar2.first_phase!r}: expected "
          f"{RANKER!r} or {RETRIEVER!r}"
      )
    for key in WEIGHTS + ("ranker_learning_rate",):
      _number(config, key)
    _number(config, "ranker_temperature", positive=True)
    if config.data.negatives != "dense":
      raise ConfigError(
          "config.data.negatives must be 'dense' for an ar2 run (the "
          "ranker's negatives are the retriever's top-n), not "
          f"{config.data.negatives!r}"
      )
    if config.data.group_size < 2:
      raise ConfigError(
          f"config.data.group_size={config.data.group_size}: an ar2 group "
          "needs the positive and at least one retrieved negative"
      )
    if self.loss_spec(config).positives != losses.ONE:
      raise ConfigError(
          f"config.loss.name={config.loss.name!r}: the ranker's reward "
          "reads one positive per group (slot 0); use a one-positive loss "
          "(infonce)"
      )
    if "pair_max_length" not in config.data:
      raise ConfigError(
          "config.model.kind='ar2' needs config.data.pair_max_length (the "
          "ranker's (query, passage) width)"
      )
    for name, ev in config.evals.items():
      depth = ev.get("rerank_depth", 0)
      if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ConfigError(
            f"config.evals.{name}.rerank_depth={depth!r}: expected an int "
            ">= 0 (0: evaluate the retriever only)"
        )
    if not (
        config.data.get("refresh_steps", 0)
        or config.data.get("refresh_epochs", 0.0)
    ):
      logging.warning(
          "ar2: config.data.refresh_steps is 0: the groups keep the "
          "starting retriever's top-n for the whole run"
      )

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0):
    ranker = cross_encoder.KIND.build(
        model_cfg,
        dataclasses.replace(loaded, model=_independent_copy(loaded.model)),
        tokenizer,
        seed=seed,
    )
    return AR2Model(loaded.model, ranker)

  def initial_params(self, config, model_def, params, mesh):
    """`params` with `ar2.retriever_init` (a bi-encoder run) and
    `ar2.ranker_init` (a cross-encoder run) read in, when set: the step the
    run's model selection picked, else its latest."""
    shardings = train_state.param_shardings(model_def, params, mesh)
    params = dict(params)
    for part, kind in ((RETRIEVER, "bi_encoder"), (RANKER, "cross_encoder")):
      key = f"{part}_init"
      workdir = config.ar2.get(key, "")
      if not workdir:
        continue
      fields = ("pretrained", "architecture")
      fields += ("head",) if kind == "cross_encoder" else ()

      def abstract(metadata, part=part, kind=kind, key=key, fields=fields):
        saved = metadata.get("config", {}).get("model", {})
        if saved.get("kind", "bi_encoder") != kind:
          raise ConfigError(
              f"config.ar2.{key}={config.ar2[key]!r}: that run trained a "
              f"{saved.get('kind')!r} model; expected a {kind!r} run"
          )
        for field in fields:
          if saved.get(field, "bert") != config.model.get(field, "bert"):
            raise ConfigError(
                f"config.ar2.{key}={config.ar2[key]!r}: that run has "
                f"model.{field}={saved.get(field)!r}, this one "
                f"{config.model.get(field)!r}"
            )
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            params[part],
            shardings[part],
        )

      try:
        step, _, params[part] = checkpointing.read_run_checkpoint(
            pathlib.Path(workdir) / "checkpoints",
            abstract,
            metric_logging.selected_step(workdir),
        )
      except (FileNotFoundError, errors.CheckpointError) as e:
        raise ConfigError(f"config.ar2.{key}={workdir!r}: {e}") from e
      logging.info("ar2: the %s from %s (step %d)", part, workdir, step)
    return params

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    phases = Phases.from_config(config)
    pairs = cross_encoder.KIND.train_spec(
        config,
        loader=loader,
        tokenizer=tokenizer,
        loss_spec=loss_spec,
        mesh=mesh,
    ).featurize
    # The loader's texts_at reads the data order and corpus texts, which a
    # refreshed loader (new negatives) shares, so the first loader serves.

    def featurize(step, host_batch):
      batch = {k: host_batch[k] for k in base.STEP_KEYS}
      pair_batch = pairs(step, host_batch)
      batch.update({k: pair_batch[k] for k in PAIR_KEYS})
      return batch

    return base.TrainSpec(
        featurize=featurize,
        loss=functools.partial(
            loss,
            phases=phases,
            loss_fn=loss_spec.fn,
            temperature=config.loss.temperature,
            ranker_temperature=float(config.ar2.ranker_temperature),
            pooling=config.model.pooling,
            normalize=config.model.normalize,
            share_hard_negatives=config.loss.share_hard_negatives,
            weights={k: float(config.ar2[k]) for k in WEIGHTS},
        ),
        optimizer=functools.partial(make_optimizer, config, phases=phases),
    )

  def train_evaluator(self, config, model_def, tokenizer, mesh, workdir):
    return Evaluator(config, model_def, tokenizer, mesh, workdir)

  def text_encoder(self, model, tokenizer, run_cfg, mesh, *, max_length):
    return bi_encoder.KIND.text_encoder(
        model.retriever, tokenizer, run_cfg, mesh, max_length=max_length
    )

  def serving_towers(
      self, model, tokenizer, run_cfg, export_cfg, *, corpus_texts
  ):
    towers = bi_encoder.KIND.serving_towers(
        model.retriever,
        tokenizer,
        run_cfg,
        export_cfg,
        corpus_texts=corpus_texts,
    )
    towers.update(
        cross_encoder.KIND.serving_towers(
            model.ranker,
            tokenizer,
            run_cfg,
            export_cfg,
            corpus_texts=corpus_texts,
        )
    )
    return towers


KIND = AR2()
