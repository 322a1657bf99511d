"""A frozen copy of the starting encoder as a margin-MSE teacher (GPL-style).

Domain adaptation of the learning-to-hash kinds (`bpr`, `jpq`), after Thakur
et al. 2022 ("Injecting Domain Adaptation with Learning-to-hash for Effective
and Efficient Zero-shot Dense Retrieval"): GPL's margin-MSE, with the dense
encoder the run starts from as teacher instead of GPL's cross-encoder. The
teacher's params are the step-0 params, kept in `state["extra"]` (saved with
the checkpoints, never updated); it embeds each batch's queries and passages
without dropout, and its scores ⟨t_q, t_p⟩ · scale are the targets of the
student's (positive − negative) margins, under stop_gradient
(`losses.listwise.margin_mse`). Groups follow the loader's layout: query i's
positive in slot i·G, its hard negatives in the G − 1 slots after it.
Settings (`config.loss`): ranking_weight, margin_mse_weight,
margin_mse_teacher_scale (`check_settings`).
"""

import functools

import jax
import jax.numpy as jnp

from retrieval_jax import losses
from retrieval_jax import sharding
from retrieval_jax import train_state
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import bi_encoder

TEACHER = "teacher_params"  # the key of the teacher's params in the extra


def check_settings(config, kind) -> tuple[float, float, float]:
  """(ranking_weight, margin_mse_weight, teacher_scale) of `config.loss`.

  Absent keys: 1, 0 (no teacher), 1. Raises ConfigError naming the key.
  """
  loss = config.loss
  values = {}
  for key, default in (
      ("ranking_weight", 1.0),
      ("margin_mse_weight", 0.0),
      ("margin_mse_teacher_scale", 1.0),
  ):
    value = loss.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config.loss.{key}={value!r}: expected a number")
    if value < 0:
      raise ConfigError(f"config.loss.{key}={value}: must be >= 0")
    values[key] = float(value)
  if values["margin_mse_weight"] > 0:
    if not config.data.path:
      raise ConfigError(
          "config.data.path is empty: domain adaptation trains on a "
          "pseudo-query pairs file of the target corpus; write one with "
          "`python -m experiments.lth.pseudo_queries --corpus DIR --out "
          "FILE` and pass configs/train.py:...,adapt,pseudo_queries=FILE"
      )
    if config.data.group_size < 2 or config.data.negatives == "none":
      # Margins need a hard negative in the query's own group.
      raise ConfigError(
          f"config.loss.margin_mse_weight={values['margin_mse_weight']}: "
          "margin-MSE compares each query's positive with its hard "
          "negatives; set config.data.group_size >= 2 (is "
          f"{config.data.group_size}) and config.data.negatives to 'bm25' "
          f"or 'dense' (is {config.data.negatives!r})"
      )
    if kind.loss_spec(config).positives != losses.ONE:
      raise ConfigError(
          f"config.loss.name={config.loss.name!r}: margin-MSE takes one "
          "positive per group (slot 0); use a one-positive loss (infonce)"
      )
  return (
      values["ranking_weight"],
      values["margin_mse_weight"],
      values["margin_mse_teacher_scale"],
  )


def init_extra(model_def, params) -> dict:
  """The teacher of a run: its step-0 params (`train_state.ExtraState`)."""
  del model_def
  return {TEACHER: params}


def extra_shardings(abstract_extra, param_shardings, mesh) -> dict:
  """The teacher's params are laid out as the params; the rest replicated.

  Other entries of the extra (JPQ's codes and centroids) are replicated.
  """
  out = {
      k: jax.tree.map(lambda _: sharding.replicated(mesh), v)
      for k, v in abstract_extra.items()
      if k != TEACHER
  }
  if TEACHER in abstract_extra:
    out[TEACHER] = param_shardings
  return out


def padding_attends_first(mask_cl: jax.Array, doc_c: jax.Array) -> jax.Array:
  """[C, L] mask with padding rows (doc < 0) attending to position 0.

  A row with no token pools to the zero vector, where L2 normalisation's
  gradient is NaN (sqrt at 0) even under a zero cotangent, and the NaN
  reaches every parameter; one attended pad token gives a finite vector.
  The rows stay masked out of every loss by their doc id.
  """
  pad_c1 = (doc_c < 0)[:, None]
  first_l = jnp.arange(mask_cl.shape[1]) == 0
  return jnp.where(pad_c1 & first_l[None, :], 1, mask_cl).astype(mask_cl.dtype)


def own_group_scores(q_bd: jax.Array, p_cd: jax.Array) -> jax.Array:
  """float32 [B, G] ⟨q_b, p_{b·G+g}⟩: each query against its own group."""
  b = q_bd.shape[0]
  p_bgd = p_cd.reshape(b, p_cd.shape[0] // b, p_cd.shape[-1])
  return jnp.einsum(
      "bd,bgd->bg", q_bd, p_bgd, preferred_element_type=jnp.float32
  )


def own_groups(scores_qc: jax.Array) -> jax.Array:
  """[B, B·G] in-batch scores -> [B, G]: each query's own group."""
  b = scores_qc.shape[0]
  rows_b = jnp.arange(b)
  return scores_qc.reshape(b, b, scores_qc.shape[1] // b)[rows_b, rows_b]


def teacher_scores(
    model, extra, batch, *, pooling: str, normalize: bool
) -> jax.Array:
  """float32 [B, G] teacher scores of each query's group, stop_gradient.

  model: the student (only its structure is used: the teacher is the same
  graph holding `extra[TEACHER]`).
  """
  model_def, _ = train_state.split_model(model)
  teacher = model_def.merge(extra[TEACHER])
  enc = functools.partial(
      bi_encoder.encode, teacher, rng=None, pooling=pooling, normalize=normalize
  )
  t_bd = enc(batch["query_ids"], batch["query_mask"])
  t_cd = enc(
      batch["passage_ids"],
      padding_attends_first(batch["passage_mask"], batch["passage_doc"]),
  )
  return jax.lax.stop_gradient(own_group_scores(t_bd, t_cd))


def margin_mse(
    student_bg: jax.Array,
    teacher_bg: jax.Array,
    passage_doc_c: jax.Array,
    *,
    teacher_scale: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`losses.listwise.margin_mse` over each group's (positive, negative).

  student_bg, teacher_bg: float32 [B, G], slot 0 the positive;
  passage_doc_c [B·G] int32 (< 0: padding, its pairs left out). The
  teacher's scores are multiplied by `teacher_scale` (its margins in the
  student's units).
  """
  doc_bg = passage_doc_c.reshape(student_bg.shape)
  valid_bn = (doc_bg[:, 1:] >= 0) & (doc_bg[:, :1] >= 0)
  return losses.listwise.margin_mse(
      student_bg[:, 0],
      student_bg[:, 1:],
      teacher_scale * teacher_bg[:, 0],
      teacher_scale * teacher_bg[:, 1:],
      valid_bn,
  )
