"""Tests for retrieval_jax.losses.listwise: hand cases, limits, references."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import scipy.linalg

from retrieval_jax.losses import listwise as lw
import test_util

# Jitted once per shape; eager dispatch would compile every primitive.
kl_distillation = jax.jit(
    lw.kl_distillation,
    static_argnames=("student_temperature", "teacher_temperature"),
)
listnet = jax.jit(lw.listnet)
listmle = jax.jit(lw.listmle)
approx_ndcg = jax.jit(lw.approx_ndcg, static_argnames="alpha")
wasserstein_list = jax.jit(lw.wasserstein_list, static_argnames="temperature")
margin_mse = jax.jit(lw.margin_mse)


def _grad(fn, **kw):
  """Jitted d loss / d scores (first argument)."""
  return jax.jit(jax.grad(lambda *a: fn(*a, **kw)[0]))


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _random_lists(seed, b=4, n=6, pad=True):
  """Scores, graded labels 0..3 and a padding mask (≥ 2 items per row)."""
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(b, n)).astype(np.float32) * 2
  y = rng.integers(0, 4, size=(b, n)).astype(np.float32)
  valid = np.ones((b, n), bool)
  if pad:
    valid[:, 2:] = rng.random((b, n - 2)) > 0.3
  return s, y, valid


class KLDistillationTest(parameterized.TestCase):

  def test_hand_case(self):
    s = np.array([[1.0, 0.5, -1.0]], np.float32)
    t = np.array([[0.9, 0.1, 0.0]], np.float32)
    loss, aux = kl_distillation(
        s,
        t,
        np.ones((1, 3), bool),
        student_temperature=0.05,
        teacher_temperature=0.3,
    )
    self.assertAlmostEqual(float(loss), 1.98844, places=4)
    self.assertEqual(float(aux["num_valid_rows"]), 1.0)

  def test_gradient_closed_form(self):
    with jax.enable_x64(True):
      s, t, valid = (
          x.astype(np.float64) if x.dtype != bool else x
          for x in _random_lists(0)
      )
      ts, tt = 0.05, 0.3
      g = _grad(
          lw.kl_distillation, student_temperature=ts, teacher_temperature=tt
      )(s, t, valid)
      p_s = _softmax(np.where(valid, s / ts, -np.inf))
      p_t = _softmax(np.where(valid, t / tt, -np.inf))
      np.testing.assert_allclose(g, (p_s - p_t) / ts / s.shape[0], atol=1e-10)
      # The teacher is a constant.
      g_t = jax.jit(
          jax.grad(
              lambda s_, t_: lw.kl_distillation(s_, t_, valid)[0], argnums=1
          )
      )(s, t)
      np.testing.assert_array_equal(g_t, 0.0)

  def test_zero_iff_tempered_scores_match(self):
    s, t, valid = _random_lists(1)
    ts, tt = 0.5, 2.0
    shift = np.arange(4, dtype=np.float32)[:, None]
    matched = (t / tt + shift) * ts  # s/τs = t/τt + c per row
    kw = dict(student_temperature=ts, teacher_temperature=tt)
    self.assertAlmostEqual(
        float(kl_distillation(matched, t, valid, **kw)[0]), 0.0, places=5
    )
    self.assertGreater(float(kl_distillation(s, t, valid, **kw)[0]), 0.01)

  def test_padding_and_empty_rows(self):
    s, t, valid = _random_lists(2)
    want = float(kl_distillation(s, t, valid)[0])
    # Padding may hold anything; an all-padding row is dropped.
    s2, t2 = np.where(valid, s, 1e4), np.where(valid, t, -1e4)
    s2 = np.concatenate([s2, np.full((1, 6), 3.0, np.float32)])
    t2 = np.concatenate([t2, np.zeros((1, 6), np.float32)])
    v2 = np.concatenate([valid, np.zeros((1, 6), bool)])
    loss, aux = kl_distillation(s2, t2, v2)
    self.assertAlmostEqual(float(loss), want, places=5)
    self.assertEqual(float(aux["num_valid_rows"]), 4.0)
    g = _grad(lw.kl_distillation)(s2, t2, v2)
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(g[~v2], 0.0)


class ListNetTest(parameterized.TestCase):

  def test_reference_and_entropy_bound(self):
    s, y, valid = _random_lists(3)
    loss = float(listnet(s, y, valid)[0])
    rows = []
    for srow, yrow, vrow in zip(s, y, valid):
      p_y = _softmax(yrow[vrow].astype(np.float64))
      log_s = np.log(_softmax(srow[vrow].astype(np.float64)))
      rows.append((-(p_y * log_s).sum(), -(p_y * np.log(p_y)).sum()))
    ce, entropy = np.array(rows).T
    self.assertAlmostEqual(loss, ce.mean(), places=5)
    # ListNet − H(softmax y) is a KL divergence: ≥ 0, = 0 at s = y + c.
    self.assertGreater(loss, entropy.mean())
    at_labels = float(listnet(y + 1.5, y, valid)[0])
    self.assertAlmostEqual(at_labels, entropy.mean(), places=5)

  def test_gradient(self):
    s, y, valid = _random_lists(4)
    g = _grad(lw.listnet)(s, y, valid)
    p_s = _softmax(np.where(valid, s, -np.inf))
    p_y = _softmax(np.where(valid, y, -np.inf))
    np.testing.assert_allclose(g, (p_s - p_y) / 4, atol=1e-6)


class ListMLETest(parameterized.TestCase):

  def test_hand_case(self):
    v = np.ones((1, 3), bool)
    s = np.array([[2.0, 1.0, 0.0]], np.float32)
    want = math.log(math.e**2 + math.e + 1) - 2 + math.log(math.e + 1) - 1
    self.assertAlmostEqual(want, 0.720868, places=6)
    self.assertAlmostEqual(float(listmle(s, s, v)[0]), 0.720868, places=5)
    # Only the label order matters, not where the items sit.
    perm = [2, 0, 1]
    self.assertAlmostEqual(
        float(listmle(s[:, perm], s[:, perm], v)[0]), 0.720868, places=5
    )

  def test_single_item_and_padding(self):
    s = np.array([[5.0, 1e4, -1e4]], np.float32)
    y = np.array([[1.0, 3.0, 2.0]], np.float32)
    self.assertEqual(
        float(listmle(s, y, np.array([[True, False, False]]))[0]), 0.0
    )
    # Padded items (huge scores, high labels) never enter a suffix.
    s = np.array([[1.0, 1e4, 0.0]], np.float32)
    y = np.array([[1.0, 3.0, 0.0]], np.float32)
    self.assertAlmostEqual(
        float(listmle(s, y, np.array([[True, False, True]]))[0]),
        math.log1p(math.exp(-1.0)),
        delta=test_util.FP32_RTOL,  # float32 log-sum-exp of O(1) values
    )

  def test_ties_broken_by_position(self):
    # Labels [1, 1, 0]: item 0 ranks before item 1.
    s = np.array([[0.3, 1.2, -0.4]], np.float32)
    y = np.array([[1.0, 1.0, 0.0]], np.float32)
    v = np.ones((1, 3), bool)
    order = s[0, [0, 1, 2]].astype(np.float64)
    want = sum(np.log(np.exp(order[k:]).sum()) - order[k] for k in range(3))
    self.assertAlmostEqual(float(listmle(s, y, v)[0]), want, places=5)

  def test_reference_and_stability(self):
    s, y, valid = _random_lists(5)
    # Distinct labels within a row make the order unique.
    y = y + np.arange(6, dtype=np.float32)[::-1] * 0.01
    want = []
    for srow, yrow, vrow in zip(s, y, valid):
      order = srow[vrow][np.argsort(-yrow[vrow])].astype(np.float64)
      want.append(
          sum(
              np.log(np.exp(order[k:]).sum()) - order[k]
              for k in range(len(order))
          )
      )
    self.assertAlmostEqual(
        float(listmle(s, y, valid)[0]), np.mean(want), places=4
    )
    # Scores far beyond exp's float32 range: finite loss and gradients.
    big = s * 1e4
    loss = float(listmle(big, y, valid)[0])
    g = _grad(lw.listmle)(big, y, valid)
    self.assertTrue(np.isfinite(loss))
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5)


def _exact_ndcg(s, y):
  """NDCG with exponential gains of the order predicted by s."""
  gains = 2.0**y - 1
  disc = 1 / np.log2(np.arange(2, len(s) + 2))
  return (gains[np.argsort(-s)] * disc).sum() / (
      np.sort(gains)[::-1] * disc
  ).sum()


class ApproxNDCGTest(parameterized.TestCase):

  def test_large_alpha_is_exact_ndcg(self):
    s, y, valid = _random_lists(6, pad=False)
    want = np.mean([_exact_ndcg(a, b) for a, b in zip(s, y) if (b > 0).any()])
    loss, aux = approx_ndcg(s, y, valid, alpha=1e4)
    self.assertAlmostEqual(float(loss), -want, places=5)
    self.assertAlmostEqual(float(aux["approx_ndcg"]), want, places=5)
    # Scores in label order (strictly decreasing) reach NDCG 1; at α = 1
    # the smooth ranks blur it below 1.
    ideal = np.sort(y, axis=1)[:, ::-1]
    ordered = (ideal * 100 - np.arange(6)).astype(np.float32)
    self.assertAlmostEqual(
        float(approx_ndcg(ordered, ideal, valid, alpha=1e4)[0]), -1.0, places=5
    )
    self.assertGreater(
        float(approx_ndcg(ordered / 100, ideal, valid)[0]), -0.99
    )

  def test_equal_scores(self):
    y = np.array([[2.0, 1.0, 0.0, 1.0]], np.float32)
    v = np.ones((1, 4), bool)
    # π̂ = 1 + (n − 1)/2 = 2.5 for every item.
    gains = 2.0 ** y[0] - 1
    ideal = (np.sort(gains)[::-1] / np.log2(np.arange(2, 6))).sum()
    want = gains.sum() / np.log2(1 + 2.5) / ideal
    loss, _ = approx_ndcg(np.zeros((1, 4), np.float32), y, v)
    self.assertAlmostEqual(float(loss), -want, places=5)

  def test_padding_and_rows_without_gain(self):
    s, y, valid = _random_lists(7)
    want = float(approx_ndcg(s, y, valid)[0])
    y2 = np.concatenate([np.where(valid, y, 3.0), np.zeros((1, 6))])
    s2 = np.concatenate([np.where(valid, s, 50.0), np.ones((1, 6))])
    v2 = np.concatenate([valid, np.ones((1, 6), bool)])
    loss, aux = approx_ndcg(s2.astype(np.float32), y2.astype(np.float32), v2)
    self.assertAlmostEqual(float(loss), want, places=5)
    self.assertEqual(float(aux["num_valid_rows"]), 4.0)
    self.assertTrue(-1.0 <= want <= 0.0)


def _frechet_reference(x, y):
  """SyCL's formula with scipy's matrix square root, float64."""
  b = x.shape[0]
  mu = ((x.mean(0) - y.mean(0)) ** 2).sum()
  if b < 2:
    return mu
  cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  root = scipy.linalg.sqrtm(cx @ cy)
  return mu + np.trace(cx) + np.trace(cy) - 2 * np.trace(root).real


class WassersteinListTest(parameterized.TestCase):

  def _case(self, seed, b=5, c=10):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, c)).astype(np.float32) * 2
    labels = np.zeros((b, c), np.float32)
    # SyCL layout: each query's graded labels 3/2/1 on its own group of 2.
    g = c // b
    for i in range(b):
      labels[i, i * g : (i + 1) * g] = rng.integers(1, 4, size=g)
    return s, labels, np.ones((b, c), bool)

  @parameterized.parameters(0.5, 1.0)
  def test_matches_sqrtm_reference(self, tau):
    s, labels, valid = self._case(0)
    want = _frechet_reference(
        _softmax(s.astype(np.float64) / tau),
        _softmax(labels.astype(np.float64)),
    )
    loss, aux = wasserstein_list(s, labels, valid, temperature=tau)
    self.assertGreater(want, 1e-3)
    self.assertAlmostEqual(float(loss), want, delta=1e-5 * max(1, want))
    self.assertEqual(float(aux["num_valid_rows"]), 5.0)

  def test_identical_distributions(self):
    s, _, valid = self._case(1)
    loss = float(wasserstein_list(s, s, valid)[0])
    # Zero up to float32 rounding of O(1) softmax terms (-6e-8 seen).
    self.assertAlmostEqual(loss, 0.0, delta=test_util.FP32_RTOL)
    g = _grad(lw.wasserstein_list)(s, s, valid)
    self.assertTrue(np.all(np.isfinite(g)))

  def test_single_row_is_squared_distance(self):
    s, labels, valid = self._case(2, b=1, c=6)
    x, y = _softmax(s.astype(np.float64)), _softmax(labels.astype(np.float64))
    loss = float(wasserstein_list(s, labels, valid)[0])
    # float32 against float64 on a loss of 0.64 (1.5e-7 apart).
    self.assertAlmostEqual(
        loss, ((x - y) ** 2).sum(), delta=test_util.FP32_RTOL
    )

  def test_row_permutation_and_dropped_rows(self):
    s, labels, valid = self._case(3)
    want = float(wasserstein_list(s, labels, valid)[0])
    perm = [3, 0, 4, 2, 1]
    self.assertAlmostEqual(
        float(wasserstein_list(s[perm], labels[perm], valid[perm])[0]),
        want,
        places=5,
    )
    # An all-masked row is left out of both Gaussian fits.
    s2 = np.concatenate([s, np.full((1, 10), 7.0, np.float32)])
    l2 = np.concatenate([labels, np.ones((1, 10), np.float32)])
    v2 = np.concatenate([valid, np.zeros((1, 10), bool)])
    loss, aux = wasserstein_list(s2, l2, v2)
    self.assertAlmostEqual(float(loss), want, places=5)
    self.assertEqual(float(aux["num_valid_rows"]), 5.0)
    g = _grad(lw.wasserstein_list)(s2, l2, v2)
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(g[5], 0.0)

  def test_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      s, labels, valid = self._case(4)
      s, labels = s.astype(np.float64), labels.astype(np.float64)
      g = np.asarray(_grad(lw.wasserstein_list)(s, labels, valid))
      direction = np.random.default_rng(0).normal(size=s.shape)
      eps = 1e-5
      fd = (
          float(wasserstein_list(s + eps * direction, labels, valid)[0])
          - float(wasserstein_list(s - eps * direction, labels, valid)[0])
      ) / (2 * eps)
      self.assertAlmostEqual(float((g * direction).sum()), fd, places=6)


class PointwiseBCETest(parameterized.TestCase):

  def test_matches_torch_bce_with_logits(self):
    torch = __import__("torch")
    rng = np.random.default_rng(0)
    s = (rng.normal(size=(4, 5)) * 20).astype(np.float32)  # Large logits.
    y = rng.uniform(size=(4, 5)).astype(np.float32)
    y[0] = y[0] > 0.5
    valid = rng.uniform(size=(4, 5)) > 0.3
    loss, aux = lw.pointwise_bce(s, y, valid)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(s[valid]), torch.tensor(y[valid])
    )
    self.assertAlmostEqual(float(loss), float(want), places=5)
    self.assertEqual(float(aux["num_pairs"]), valid.sum())
    hits = ((s > 0) == (y >= 0.5))[valid].mean()
    self.assertAlmostEqual(float(aux["accuracy"]), hits, places=6)

  def test_hand_case_gradient_and_empty(self):
    # s = 0: loss log 2 whatever the label; d/ds = sigmoid(s) - y over n.
    s = np.array([[0.0, 2.0, -1.0]], np.float32)
    y = np.array([[1.0, 0.0, 1.0]], np.float32)
    valid = np.array([[True, True, False]])
    loss, _ = lw.pointwise_bce(s[:, :1], y[:, :1], valid[:, :1])
    self.assertAlmostEqual(float(loss), np.log(2.0), places=6)
    g = jax.grad(lambda x: lw.pointwise_bce(x, y, valid)[0])(s)
    want = np.array([[0.5 - 1.0, 1 / (1 + np.exp(-2.0)), 0.0]]) / 2
    np.testing.assert_allclose(g, want, atol=1e-6)
    loss, aux = lw.pointwise_bce(s, y, np.zeros_like(valid))
    self.assertEqual((float(loss), float(aux["num_pairs"])), (0.0, 0.0))


class MarginMSETest(parameterized.TestCase):

  def test_hand_case(self):
    loss, aux = margin_mse(
        np.array([1.0]), np.array([[0.2]]), np.array([5.0]), np.array([[3.0]])
    )
    self.assertAlmostEqual(float(loss), 1.44, places=5)
    self.assertEqual(float(aux["num_pairs"]), 1.0)

  def test_shift_invariance_and_zero(self):
    rng = np.random.default_rng(0)
    sp, sn = rng.normal(size=4), rng.normal(size=(4, 3))
    tp, tn = rng.normal(size=4) * 5, rng.normal(size=(4, 3)) * 5
    args = [x.astype(np.float32) for x in (sp, sn, tp, tn)]
    want = float(margin_mse(*args)[0])
    c = rng.normal(size=4).astype(np.float32) * 10
    d = rng.normal(size=4).astype(np.float32) * 10
    shifted = (
        args[0] + c,
        args[1] + c[:, None],
        args[2] + d,
        args[3] + d[:, None],
    )
    self.assertAlmostEqual(float(margin_mse(*shifted)[0]), want, places=4)
    # Zero iff margins match: student = teacher + per-query shift.
    same = (args[2] + c, args[3] + c[:, None], args[2], args[3])
    self.assertAlmostEqual(float(margin_mse(*same)[0]), 0.0, places=5)
    # Padded negatives are left out of the mean.
    valid = np.ones((4, 3), bool)
    valid[:, 2] = False
    loss, aux = margin_mse(*args, valid)
    self.assertAlmostEqual(
        float(loss),
        float(margin_mse(*[a[:, :2] if a.ndim == 2 else a for a in args])[0]),
        places=5,
    )
    self.assertEqual(float(aux["num_pairs"]), 8.0)


if __name__ == "__main__":
  absltest.main()
