"""Listwise ranking and distillation losses over per-query candidate lists.

Inputs: [B, n] scores, labels (graded or teacher scores) and bool `valid_bn`.
As in `contrastive.py`, each returns `(loss, aux)`: a float32 mean over valid
rows and scalars with at least "num_valid_rows".
"""

import jax
from jax import lax
import jax.numpy as jnp

from retrieval_jax.losses.contrastive import NEG


def _float(x):
  return jnp.asarray(x).astype(
      jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)
  )


def _masked_log_softmax(x_bn, valid_bn):
  # Callers mask the result again with `where`: NEG never reaches a sum.
  x_bn = jnp.where(valid_bn, x_bn, NEG)
  return x_bn - jax.nn.logsumexp(x_bn, axis=-1, keepdims=True)


def _row_mean(loss_b, row_valid_b, **rows):
  n = jnp.sum(row_valid_b).astype(loss_b.dtype)
  denom = jnp.maximum(n, 1.0)  # no valid row: 0, not 0/0

  def mean(x_b):
    # `where`, not a product: dropped rows may hold huge finite values.
    return jnp.sum(jnp.where(row_valid_b, x_b, 0.0)) / denom

  aux = {"num_valid_rows": n}
  aux.update({k: mean(v) for k, v in rows.items()})
  return mean(loss_b), aux


def kl_distillation(
    scores_bn: jax.Array,
    teacher_bn: jax.Array,
    valid_bn: jax.Array,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`KL(softmax(t/τ_t) ‖ softmax(s/τ_s))` per row; the teacher is constant.

  aux "teacher_entropy" (nats, mean over rows) checks the teacher temperature.
  """
  scores_bn, teacher_bn = _float(scores_bn), _float(teacher_bn)
  teacher_bn = lax.stop_gradient(teacher_bn)
  log_s_bn = _masked_log_softmax(scores_bn / student_temperature, valid_bn)
  log_t_bn = _masked_log_softmax(teacher_bn / teacher_temperature, valid_bn)
  p_t_bn = jnp.where(valid_bn, jnp.exp(log_t_bn), 0.0)
  kl_b = jnp.sum(
      jnp.where(valid_bn, p_t_bn * (log_t_bn - log_s_bn), 0.0), axis=-1
  )
  entropy_b = -jnp.sum(jnp.where(valid_bn, p_t_bn * log_t_bn, 0.0), axis=-1)
  return _row_mean(kl_b, jnp.any(valid_bn, axis=-1), teacher_entropy=entropy_b)


def pointwise_bce(
    scores_bn: jax.Array, labels_bn: jax.Array, valid_bn: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BCE on logits, `softplus(s) − y·s` (y in [0, 1]), mean over valid items.

  aux: "num_pairs", "accuracy" (sign of s agrees with y ≥ 0.5).
  """
  scores_bn, labels_bn = _float(scores_bn), _float(labels_bn)
  loss_bn = jax.nn.softplus(scores_bn) - labels_bn * scores_bn
  num_pairs = jnp.sum(valid_bn).astype(scores_bn.dtype)
  denom = jnp.maximum(num_pairs, 1.0)
  loss = jnp.sum(jnp.where(valid_bn, loss_bn, 0.0)) / denom
  correct_bn = (scores_bn > 0) == (labels_bn >= 0.5)
  accuracy = jnp.sum(jnp.where(valid_bn, correct_bn, False)) / denom
  num_rows = jnp.sum(jnp.any(valid_bn, axis=-1)).astype(scores_bn.dtype)
  return loss, {
      "num_valid_rows": num_rows,
      "num_pairs": num_pairs,
      "accuracy": accuracy.astype(scores_bn.dtype),
  }


def listnet(
    scores_bn: jax.Array, labels_bn: jax.Array, valid_bn: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ListNet: −Σ_j softmax(y)_j log softmax(s)_j per row, labels as logits."""
  scores_bn, labels_bn = _float(scores_bn), _float(labels_bn)
  log_s_bn = _masked_log_softmax(scores_bn, valid_bn)
  p_y_bn = jnp.where(
      valid_bn, jnp.exp(_masked_log_softmax(labels_bn, valid_bn)), 0.0
  )
  ce_b = -jnp.sum(jnp.where(valid_bn, p_y_bn * log_s_bn, 0.0), axis=-1)
  return _row_mean(ce_b, jnp.any(valid_bn, axis=-1))


def listmle(
    scores_bn: jax.Array, labels_bn: jax.Array, valid_bn: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ListMLE: `Σ_k (LSE_{j≥k} s_π(j) − s_π(k))`, π sorting labels down.

  Plackett–Luce NLL; label ties keep position (allRank shuffles instead).
  """
  scores_bn, labels_bn = _float(scores_bn), _float(labels_bn)
  # Valid items first, by label descending; stable sort = position on ties.
  key_bn = jnp.where(valid_bn, -labels_bn, jnp.inf)
  order_bn = jnp.argsort(key_bn, axis=-1, stable=True)
  s_bn = jnp.take_along_axis(scores_bn, order_bn, axis=-1)
  v_bn = jnp.take_along_axis(valid_bn, order_bn, axis=-1)
  s_bn = jnp.where(v_bn, s_bn, NEG)  # padding last: out of every suffix
  suffix_bn = lax.cumlogsumexp(s_bn, axis=s_bn.ndim - 1, reverse=True)
  nll_b = jnp.sum(jnp.where(v_bn, suffix_bn - s_bn, 0.0), axis=-1)
  return _row_mean(nll_b, jnp.any(valid_bn, axis=-1))


def _ideal_dcg(gains_bn, valid_bn):
  gains_bn = jnp.where(valid_bn, gains_bn, 0.0)
  sorted_bn = -jnp.sort(-gains_bn, axis=-1)
  ranks_n = jnp.arange(1, gains_bn.shape[-1] + 1, dtype=gains_bn.dtype)
  return jnp.sum(sorted_bn / jnp.log2(1.0 + ranks_n), axis=-1)


def approx_ndcg(
    scores_bn: jax.Array,
    labels_bn: jax.Array,
    valid_bn: jax.Array,
    *,
    alpha: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ApproxNDCG (Qin et al. 2010): loss = −mean approxNDCG, no rank cutoff.

  `π̂_i = 1 + Σ_{j≠i} σ(α(s_j − s_i))`; approxNDCG = Σ_i (2^{y_i} − 1) /
  log2(1 + π̂_i) / maxDCG. Rows with maxDCG = 0 are dropped (allRank: 0).
  """
  scores_bn, labels_bn = _float(scores_bn), _float(labels_bn)
  gains_bn = jnp.where(valid_bn, jnp.exp2(labels_bn) - 1.0, 0.0)
  diff_bij = scores_bn[:, None, :] - scores_bn[:, :, None]  # s_j − s_i
  pair_bij = valid_bn[:, None, :] & valid_bn[:, :, None]
  off_diag_ij = ~jnp.eye(scores_bn.shape[-1], dtype=bool)
  sig_bij = jnp.where(
      pair_bij & off_diag_ij, jax.nn.sigmoid(alpha * diff_bij), 0.0
  )
  rank_bi = 1.0 + jnp.sum(sig_bij, axis=-1)
  dcg_b = jnp.sum(gains_bn / jnp.log2(1.0 + rank_bi), axis=-1)
  max_dcg_b = _ideal_dcg(gains_bn, valid_bn)
  row_valid_b = max_dcg_b > 0
  # Double `where`: no 0/0 even in the backward pass of dropped rows.
  ndcg_b = dcg_b / jnp.where(row_valid_b, max_dcg_b, 1.0)
  loss, aux = _row_mean(-ndcg_b, row_valid_b)
  aux["approx_ndcg"] = -loss
  return loss, aux


def wasserstein_list(
    scores_qc: jax.Array,
    labels_qc: jax.Array,
    valid_qc: jax.Array,
    *,
    temperature: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SyCL "WS2": Fréchet distance between Gaussians fitted to batch rows.

  X = softmax(S/τ), Y = softmax(labels), B samples of C-dim vectors:
  L = ‖μ_X − μ_Y‖² + tr Σ_X + tr Σ_Y − 2 tr (Σ_X Σ_Y)^{1/2}; the trace is a
  nuclear norm by SVD (non-symmetric eigvals: no TPU kernel, weak autodiff).
  """
  scores_qc, labels_qc = _float(scores_qc), _float(labels_qc)
  row_valid_q = jnp.any(valid_qc, axis=-1)
  w_q = row_valid_q.astype(scores_qc.dtype)
  n = jnp.sum(w_q)

  def probs(logits_qc):
    p_qc = jnp.exp(_masked_log_softmax(logits_qc, valid_qc))
    return jnp.where(valid_qc & row_valid_q[:, None], p_qc, 0.0)

  x_qc, y_qc = probs(scores_qc / temperature), probs(labels_qc)
  mu_x_c = jnp.sum(x_qc, axis=0) / jnp.maximum(n, 1.0)
  mu_y_c = jnp.sum(y_qc, axis=0) / jnp.maximum(n, 1.0)
  scale = 1.0 / jnp.sqrt(jnp.maximum(n - 1.0, 1.0))  # SyCL: 1 below 2 rows
  cx_qc = (x_qc - mu_x_c) * (w_q * scale)[:, None]  # Σ = cxᵀ cx
  cy_qc = (y_qc - mu_y_c) * (w_q * scale)[:, None]
  # tr (Σ_X Σ_Y)^{1/2} = ‖cx cyᵀ‖_*. Centring keeps the zero singular values
  # fixed for every input, so the gradient Σ u_i v_iᵀ is exact.
  cross_qq = jnp.einsum("qc,rc->qr", cx_qc, cy_qc)
  nuclear = jnp.sum(jnp.linalg.svd(cross_qq, compute_uv=False))
  mean_term = jnp.sum((mu_x_c - mu_y_c) ** 2)
  # May be a few ulps below 0 at X ≈ Y; clamping would kill the gradient.
  loss = mean_term + jnp.sum(cx_qc**2) + jnp.sum(cy_qc**2) - 2.0 * nuclear
  return loss, {"num_valid_rows": n, "mean_term": mean_term}


def margin_mse(
    student_pos_b: jax.Array,
    student_neg_bn: jax.Array,
    teacher_pos_b: jax.Array,
    teacher_neg_bn: jax.Array,
    valid_bn: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Margin-MSE (Hofstätter et al.): `((s+ − s−) − (t+ − t−))²` pair mean."""
  s_pos_b, s_neg_bn = _float(student_pos_b), _float(student_neg_bn)
  t_pos_b = lax.stop_gradient(_float(teacher_pos_b))
  t_neg_bn = lax.stop_gradient(_float(teacher_neg_bn))
  if valid_bn is None:
    valid_bn = jnp.ones(s_neg_bn.shape, bool)
  diff_bn = (s_pos_b[:, None] - s_neg_bn) - (t_pos_b[:, None] - t_neg_bn)
  num_pairs = jnp.sum(valid_bn).astype(diff_bn.dtype)
  loss = jnp.sum(jnp.where(valid_bn, diff_bn**2, 0.0)) / jnp.maximum(
      num_pairs, 1.0
  )
  num_rows = jnp.sum(jnp.any(valid_bn, axis=-1)).astype(diff_bn.dtype)
  return loss, {"num_valid_rows": num_rows, "num_pairs": num_pairs}
