"""Tests for retrieval_jax.losses.contrastive: oracles, gradients, masking."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.losses import contrastive as cl
import test_util

# Every case is embedded in one fixed frame of masked rows and columns, so
# each loss compiles once (eager dispatch or one compile per shape would
# cost more than the tests). Losses ignore masked candidates and rows
# without a valid positive, which the tests below check on their own.
_FRAME = (8, 24)


def _pad(s, pos, valid):
  s = np.asarray(s)
  b, c = s.shape
  fs = np.zeros(_FRAME, s.dtype)
  fp, fv = np.zeros(_FRAME, bool), np.zeros(_FRAME, bool)
  fs[:b, :c], fp[:b, :c], fv[:b, :c] = s, pos, valid
  return fs, fp, fv


class _Framed:
  """A loss jitted for the frame; value_and_grad returns the case's slice."""

  def __init__(self, fn, *static):
    self.fn = fn
    self._loss = jax.jit(fn, static_argnames=static)
    self._grad = jax.jit(
        jax.value_and_grad(fn, has_aux=True), static_argnames=static
    )

  def __call__(self, s, pos, valid, **kw):
    return self._loss(*_pad(s, pos, valid), **kw)

  def value_and_grad(self, s, pos, valid, **kw):
    value, g = self._grad(*_pad(s, pos, valid), **kw)
    b, c = np.shape(s)
    return value, np.asarray(g)[:b, :c]


info_nce = _Framed(cl.info_nce)
joint_lh = _Framed(cl.joint_lh, "normalize_by_positives")
sum_marg_lh = _Framed(cl.sum_marg_lh)
lse_pair = _Framed(cl.lse_pair, "normalize_by_positives")
symmetric_info_nce = _Framed(cl.symmetric_info_nce)
group_masks = jax.jit(
    cl.group_masks, static_argnames=("group_size", "share_hard_negatives")
)
rows_with_positive = jax.jit(
    cl.rows_with_positive, static_argnames="group_size"
)
scores_and_masks = jax.jit(
    cl.scores_and_masks, static_argnames="share_hard_negatives"
)

_MULTI = {
    "joint_lh": joint_lh,
    "sum_marg_lh": sum_marg_lh,
    "lse_pair": lse_pair,
}
_ALL = dict(_MULTI, info_nce=info_nce)


def _np_masks(counts, group_size, doc=None, rel=None, share=True):
  """Loop-by-loop reading of the `group_masks` contract."""
  b = len(counts)
  c = b * group_size
  pos = np.zeros((b, c), bool)
  valid = np.ones((b, c), bool)
  for i in range(b):
    own_docs = set()
    if doc is not None:
      own_docs = {doc[i * group_size + g] for g in range(counts[i])}
      if rel is not None:
        own_docs |= set(rel[i])
      own_docs.discard(-1)
    for j in range(c):
      owner, slot = divmod(j, group_size)
      pos[i, j] = owner == i and slot < counts[i]
      if not share and owner != i and slot >= counts[owner]:
        valid[i, j] = False
      if doc is not None:
        if doc[j] < 0:
          valid[i, j] = False
        elif doc[j] in own_docs and not pos[i, j]:
          valid[i, j] = False
  return pos, valid


def _np_rows(name, s, pos, valid):
  """float64 per-row losses straight from the definitions (O(|P||N|))."""
  out = []
  for srow, prow, vrow in zip(s, pos & valid, valid):
    if not prow.any():
      out.append(np.nan)
      continue
    lse_c = np.log(np.exp(srow[vrow]).sum())
    sp, sn = srow[prow], srow[vrow & ~prow]
    if name in ("info_nce", "joint_lh"):
      out.append(np.sum(lse_c - sp))
    elif name == "sum_marg_lh":
      out.append(lse_c - np.log(np.exp(sp).sum()))
    else:
      out.append(np.log1p(sum(np.exp(n - p) for p in sp for n in sn)))
  return np.array(out)


def _random_batch(seed, b=6, g=3, *, max_pos=2, scale=2.0):
  """Random scores and masks with 0..max_pos positives per row."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(0, max_pos + 1, size=b)
  counts[0] = max_pos  # at least one valid row
  s = rng.normal(size=(b, b * g)) * scale
  pos, valid = _np_masks(counts, g)
  return s, pos, valid, counts


def _one_positive_batch(seed, b=5, g=3):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(b, b * g)) * 2
  pos, valid = _np_masks(np.ones(b, int), g)
  return s, pos, valid


class GroupMasksTest(parameterized.TestCase):

  def test_hand_case(self):
    # B=2, G=3; query 0 has 2 positives, query 1 one. Doc 5 (query 0's
    # positive) is also query 1's hard negative; doc 9 is a known positive
    # of query 0 sitting in query 1's block; slot 2 of query 1 is padding.
    doc = np.array([5, 6, 7, 8, 5, -1], np.int32)
    rel = np.array([[5, 6, 8], [8, -1, -1]], np.int32)
    pos, valid = group_masks(np.array([2, 1]), 3, doc, rel)
    np.testing.assert_array_equal(pos, [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(
        valid, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    )
    _, valid = group_masks(
        np.array([2, 1]), 3, doc, rel, share_hard_negatives=False
    )
    # Query 0 loses query 1's hard negatives; query 1 keeps query 0's
    # positives (in-batch negatives) but not its hard negative (slot 2).
    np.testing.assert_array_equal(
        valid, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 1, 0]]
    )

  @parameterized.product(share=[True, False], ids=["none", "doc", "rel"])
  def test_matches_loop_reference(self, share, ids):
    rng = np.random.default_rng(7)
    b, g = 5, 4
    counts = rng.integers(0, 4, size=b)
    # Few distinct ids: duplicates across and within groups are common.
    doc = rng.integers(-1, 8, size=b * g) if ids != "none" else None
    rel = rng.integers(-1, 8, size=(b, 3)) if ids == "rel" else None
    pos, valid = group_masks(
        counts,
        g,
        None if doc is None else doc.astype(np.int32),
        None if rel is None else rel.astype(np.int32),
        share,
    )
    want_pos, want_valid = _np_masks(counts, g, doc, rel, share)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(valid, want_valid)

  def test_rows_with_positive(self):
    counts = np.array([0, 1, 2, 1])
    doc = np.array([3, 4, -1, 5, -1, 6, -1, 7], np.int32)
    pos, valid = group_masks(counts, 2, doc)
    np.testing.assert_array_equal(
        rows_with_positive(counts, 2, doc), np.any(pos & valid, -1)
    )
    np.testing.assert_array_equal(
        rows_with_positive(counts, 2, doc), [False, False, True, False]
    )

  def test_scores_and_masks(self):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(3, 8)), jnp.bfloat16)
    p = jnp.asarray(rng.normal(size=(6, 8)), jnp.bfloat16)
    batch = {
        "positive_counts": np.array([1, 2, 1]),
        "passage_doc": np.array([0, 1, 2, 3, 0, 5], np.int32),
    }
    s, pos, valid = scores_and_masks(q, p, batch, 0.05)
    self.assertEqual(s.dtype, jnp.float32)
    want = (np.asarray(q, np.float64) @ np.asarray(p, np.float64).T) / 0.05
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-3)
    want_pos, want_valid = _np_masks([1, 2, 1], 2, [0, 1, 2, 3, 0, 5])
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(valid, want_valid)


class KnownValuesTest(parameterized.TestCase):

  def test_two_by_two_hand_case(self):
    s = np.array([[3.0, 1.0], [0.0, 2.0]])
    pos, valid = np.eye(2, dtype=bool), np.ones((2, 2), bool)
    loss, aux = info_nce(s, pos, valid)
    self.assertAlmostEqual(float(loss), 0.126928, places=5)
    self.assertEqual(float(aux["num_valid_rows"]), 2.0)
    self.assertEqual(float(aux["accuracy"]), 1.0)
    loss, aux = symmetric_info_nce(s, pos, valid)
    self.assertAlmostEqual(float(loss), 0.153926, places=5)
    self.assertAlmostEqual(float(aux["forward_loss"]), 0.126928, places=5)
    self.assertAlmostEqual(float(aux["reverse_loss"]), 0.180925, places=5)

  def test_multi_positive_hand_case(self):
    # s = [p1=2, p2=1, n1=0, n2=0].
    s = np.array([[2.0, 1.0, 0.0, 0.0]])
    pos = np.array([[True, True, False, False]])
    valid = np.ones((1, 4), bool)
    want = {
        (joint_lh, False): 1.987623,
        (joint_lh, True): 0.993812,
        (lse_pair, False): 0.696357,
        (lse_pair, True): 0.696357 / 2,
    }
    for (fn, norm), value in want.items():
      loss, _ = fn(s, pos, valid, normalize_by_positives=norm)
      self.assertAlmostEqual(float(loss), value, places=5, msg=(fn, norm))
    self.assertAlmostEqual(
        float(sum_marg_lh(s, pos, valid)[0]), 0.180550, places=5
    )
    # InfoNCE with several positive slots is JointLH (no ÷ m).
    self.assertAlmostEqual(
        float(info_nce(s, pos, valid)[0]), 1.987623, places=5
    )

  def test_rand1_and_naive_info_nce(self):
    s = np.array([[2.0, 1.0, 0.0, 0.0]])
    # Rand1LH: the other positive is removed from the group.
    for drawn, other, value in ((0, 1, 0.239545), (1, 0, 0.551445)):
      pos, valid = np.zeros((1, 4), bool), np.ones((1, 4), bool)
      pos[0, drawn], valid[0, other] = True, False
      self.assertAlmostEqual(float(info_nce(s, pos, valid)[0]), value, places=5)
    # Naive: p2 kept as a negative of p1.
    pos = np.arange(4)[None] == 0
    self.assertAlmostEqual(
        float(info_nce(s, pos, np.ones((1, 4), bool))[0]), 0.493812, places=5
    )

  def test_two_way_softmax_is_logistic(self):
    s = np.array([[1.0, 0.0]])
    loss, _ = info_nce(s, np.array([[True, False]]), np.ones((1, 2), bool))
    self.assertAlmostEqual(float(loss), 0.31326, places=5)
    # Two float32 formulas of 0.313: a few ulps apart (6e-8 seen).
    self.assertAlmostEqual(
        float(loss), float(jax.nn.softplus(-1.0)), delta=test_util.FP32_RTOL
    )

  def test_uniform_scores_info_nce(self):
    # B=4, G=2: every row sees 8 candidates.
    pos, valid = group_masks(np.ones(4, np.int32), 2)
    for fn in (info_nce, symmetric_info_nce):
      loss, _ = fn(np.full((4, 8), 0.7), pos, valid)
      want = (
          math.log(8) if fn is info_nce else (0.5 * (math.log(8) + math.log(4)))
      )
      self.assertAlmostEqual(float(loss), want, places=5)

  @parameterized.parameters((1, 4), (2, 3), (3, 5))
  def test_uniform_scores_multi_positive(self, m, n):
    c = m + n
    s = np.zeros((1, c))
    pos = np.arange(c)[None] < m
    valid = np.ones((1, c), bool)
    self.assertAlmostEqual(
        float(joint_lh(s, pos, valid)[0]), m * math.log(c), places=5
    )
    self.assertAlmostEqual(
        float(sum_marg_lh(s, pos, valid)[0]), math.log(c / m), places=5
    )
    self.assertAlmostEqual(
        float(lse_pair(s, pos, valid)[0]), math.log(1 + m * n), places=5
    )

  def test_limit_separated_scores(self):
    s = np.array([[50.0, 50.0, 50.0, -50.0, -50.0]])
    pos = np.arange(5)[None] < 3
    valid = np.ones((1, 5), bool)
    self.assertAlmostEqual(
        float(joint_lh(s, pos, valid)[0]), 3 * math.log(3), places=4
    )
    self.assertAlmostEqual(float(sum_marg_lh(s, pos, valid)[0]), 0.0, places=6)
    self.assertAlmostEqual(float(lse_pair(s, pos, valid)[0]), 0.0, places=6)

  def test_accuracy(self):
    s = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 9.0, 2.0]])
    pos = np.eye(3, dtype=bool)
    valid = np.ones((3, 3), bool)
    valid[2, 1] = False
    _, aux = info_nce(s, pos, valid)
    # Row 0 right, row 1 wrong (column 2), row 2 right once 9.0 is masked.
    self.assertAlmostEqual(float(aux["accuracy"]), 2 / 3, places=6)


class OrthogonalProjectionTest(absltest.TestCase):

  def test_hand_cases(self):
    # Row 0: one positive at 0.8, negatives 0.2 and -0.4 (mean -0.1):
    # (1 - 0.8) + |-0.1| = 0.3. Row 1: positives 0.5 and 0.9 (mean 0.7),
    # negative 0.6, the third column masked: 0.3 + 0.6 = 0.9.
    s = np.array([[0.8, 0.2, -0.4], [0.5, 0.9, 0.6]])
    pos = np.array([[True, False, False], [True, True, False]])
    valid = np.array([[True, True, True], [True, True, True]])
    loss, aux = cl.orthogonal_projection(s, pos, valid)
    self.assertAlmostEqual(float(loss), (0.3 + 0.9) / 2, places=6)
    self.assertAlmostEqual(float(aux["positive_cosine"]), 0.75, places=6)
    self.assertAlmostEqual(float(aux["negative_cosine"]), 0.25, places=6)
    loss, _ = cl.orthogonal_projection(s, pos, valid, gamma=0.5)
    self.assertAlmostEqual(float(loss), (0.25 + 0.6) / 2, places=6)
    # Perfect embeddings: positives at 1, negatives orthogonal.
    perfect = np.array([[1.0, 0.0, 0.0]])
    loss, _ = cl.orthogonal_projection(perfect, pos[:1], valid[:1])
    self.assertEqual(float(loss), 0.0)

  def test_gradient(self):
    # d/ds_p = -1/m, d/ds_n = sign(mean_N)/n, per row, / rows.
    s = np.array([[0.8, 0.2, -0.4, 0.1]], np.float32)
    pos = np.array([[True, False, False, False]])
    valid = np.array([[True, True, True, False]])
    g = jax.grad(lambda x: cl.orthogonal_projection(x, pos, valid)[0])(s)
    np.testing.assert_allclose(g, [[-1.0, -0.5, -0.5, 0.0]], atol=1e-7)


class PropertiesTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2)
  def test_matches_float64_reference(self, seed):
    s, pos, valid, _ = _random_batch(seed)
    rows = np.array([np.any(r) for r in pos & valid])
    for name, fn in _ALL.items():
      want = _np_rows(name, s, pos, valid)[rows].mean()
      loss, aux = fn(s.astype(np.float32), pos, valid)
      self.assertAlmostEqual(float(loss), want, places=4, msg=name)
      self.assertEqual(float(aux["num_valid_rows"]), rows.sum())

  @parameterized.parameters(0, 1)
  def test_one_positive_all_equal_info_nce(self, seed):
    s, pos, valid = _one_positive_batch(seed)
    want = float(info_nce(s, pos, valid)[0])
    for name, fn in _MULTI.items():
      self.assertAlmostEqual(
          float(fn(s, pos, valid)[0]), want, places=5, msg=name
      )
      for norm_fn in (joint_lh, lse_pair):
        self.assertAlmostEqual(
            float(norm_fn(s, pos, valid, normalize_by_positives=True)[0]),
            want,
            places=5,
        )

  @parameterized.parameters(0, 1, 2)
  def test_inequalities_per_row(self, seed):
    s, pos, valid, counts = _random_batch(seed, max_pos=3)
    s = s.astype(np.float32)
    for i in np.flatnonzero(counts):
      row = (s[i : i + 1], pos[i : i + 1], valid[i : i + 1])
      m = counts[i]
      joint = float(joint_lh(*row)[0])
      joint_norm = float(joint_lh(*row, normalize_by_positives=True)[0])
      marg = float(sum_marg_lh(*row)[0])
      pair = float(lse_pair(*row)[0])
      # JointLH ≥ m log m; JointLH/m ≥ SumMargLH; LSEPair ≥ SumMargLH.
      # With m = 1 the sides are equal, computed in two float32 orders:
      # allow rounding relative to the loss (~7).
      tol = test_util.FP32_RTOL * max(1.0, abs(marg))
      self.assertGreaterEqual(joint, m * math.log(m) - tol)
      self.assertGreaterEqual(joint_norm, marg - tol)
      self.assertGreaterEqual(pair, marg - tol)
      if m > 1:  # strict for m > 1 (AM-HM and the dropped cross terms)
        self.assertGreater(pair, marg + 1e-6)
        self.assertGreater(joint_norm, marg + 1e-6)

  def test_nonnegative(self):
    for seed in range(3):
      s, pos, valid, _ = _random_batch(seed, scale=10.0)
      for name, fn in _ALL.items():
        self.assertGreaterEqual(float(fn(s, pos, valid)[0]), 0.0, msg=name)

  @parameterized.named_parameters(
      *[(k, k) for k in _ALL] + [("symmetric", "symmetric")]
  )
  def test_masked_column_and_permutation(self, name):
    fn = _ALL.get(name, symmetric_info_nce)
    s, pos, valid, _ = _random_batch(3, max_pos=1 if name == "symmetric" else 2)
    loss = float(fn(s, pos, valid)[0])
    # A masked column with a huge score changes nothing.
    s2 = np.concatenate([s, np.full((s.shape[0], 1), 1e4)], axis=1)
    pos2 = np.concatenate([pos, np.zeros((s.shape[0], 1), bool)], axis=1)
    valid2 = np.concatenate([valid, np.zeros((s.shape[0], 1), bool)], axis=1)
    self.assertAlmostEqual(float(fn(s2, pos2, valid2)[0]), loss, places=5)
    # Permuting candidates (with their masks) changes nothing.
    perm = np.random.default_rng(0).permutation(s.shape[1])
    self.assertAlmostEqual(
        float(fn(s[:, perm], pos[:, perm], valid[:, perm])[0]), loss, places=5
    )
    # Permuting rows neither (the symmetric reverse term included).
    rows = np.random.default_rng(1).permutation(s.shape[0])
    self.assertAlmostEqual(
        float(fn(s[rows], pos[rows], valid[rows])[0]), loss, places=5
    )

  def test_symmetric_matrix_gives_equal_directions(self):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(4, 4))
    s = (a + a.T).astype(np.float32)
    pos, valid = np.eye(4, dtype=bool), np.ones((4, 4), bool)
    loss, aux = symmetric_info_nce(s, pos, valid)
    self.assertAlmostEqual(
        float(aux["forward_loss"]), float(aux["reverse_loss"]), places=5
    )
    self.assertAlmostEqual(float(loss), float(aux["forward_loss"]), places=5)
    one, aux = symmetric_info_nce(
        np.array([[1.5]]), np.ones((1, 1), bool), np.ones((1, 1), bool)
    )
    self.assertEqual(float(one), 0.0)

  def test_symmetric_matches_reverse_reference(self):
    # Groups of 2 (one hard negative); the reverse term only sees the
    # B×B block of positive columns.
    s, pos, valid = _one_positive_batch(5, b=4, g=2)
    block = s[:, ::2]  # block[i, k] = score of query i for k's positive
    rev = [np.log(np.exp(block[:, k]).sum()) - block[k, k] for k in range(4)]
    fwd = _np_rows("info_nce", s, pos, valid)
    loss, aux = symmetric_info_nce(s.astype(np.float32), pos, valid)
    self.assertAlmostEqual(float(aux["reverse_loss"]), np.mean(rev), places=5)
    self.assertAlmostEqual(
        float(loss), 0.5 * (fwd.mean() + np.mean(rev)), places=5
    )


class GradientTest(parameterized.TestCase):
  """Closed-form gradients (float64) and zero row sums."""

  def _grad(self, fn, s, pos, valid):
    return fn.value_and_grad(s, pos, valid)[1]

  def test_closed_forms(self):
    with jax.enable_x64(True):
      s_np, pos, valid, _ = _random_batch(11, max_pos=3)
      # Mask a fifth of the negatives too.
      drop = np.random.default_rng(0).random(valid.shape) < 0.2
      valid &= pos | ~drop
      s = s_np.astype(np.float64)
      p_pos, p_neg = np.asarray(pos & valid), np.asarray(valid & ~pos)
      rows = p_pos.any(-1)
      n = rows.sum()
      masked = np.where(valid, s_np, -np.inf)
      pi = np.exp(masked - masked.max(-1, keepdims=True))
      pi /= pi.sum(-1, keepdims=True)
      m = p_pos.sum(-1, keepdims=True)
      want = {
          "joint_lh": m * pi - p_pos,
          "sum_marg_lh": (
              pi
              - np.where(
                  p_pos,
                  pi / np.maximum((pi * p_pos).sum(-1, keepdims=True), 1e-300),
                  0.0,
              )
          ),
      }
      # LSEPair: w·softmax_N(s) on negatives, −w·softmax_P(−s) on positives.
      z = np.where(p_neg, np.exp(s_np), 0).sum(-1, keepdims=True) * np.where(
          p_pos, np.exp(-s_np), 0
      ).sum(-1, keepdims=True)
      w = z / (1 + z)
      soft_n = np.where(p_neg, np.exp(s_np), 0)
      soft_n /= np.maximum(soft_n.sum(-1, keepdims=True), 1e-300)
      soft_p = np.where(p_pos, np.exp(-s_np), 0)
      soft_p /= np.maximum(soft_p.sum(-1, keepdims=True), 1e-300)
      want["lse_pair"] = w * (soft_n - soft_p)
      for name, g_want in want.items():
        g_want = np.where(rows[:, None], g_want, 0.0) / n
        g = self._grad(_MULTI[name], s, pos, valid)
        np.testing.assert_allclose(g, g_want, atol=1e-12, err_msg=name)

  def test_info_nce_closed_form(self):
    with jax.enable_x64(True):
      s_np, pos, valid = _one_positive_batch(12)
      s = s_np.astype(np.float64)
      pi = np.exp(s_np) / np.exp(s_np).sum(-1, keepdims=True)
      g = self._grad(info_nce, s, pos, valid)
      np.testing.assert_allclose(g, (pi - pos) / s_np.shape[0], atol=1e-12)

  @parameterized.named_parameters(*[(k, k) for k in _ALL])
  def test_row_gradients_sum_to_zero(self, name):
    s, pos, valid, _ = _random_batch(13, max_pos=3)
    g = self._grad(_ALL[name], s.astype(np.float32), pos, valid)
    # float32 terms of ~1/B (B = 6) cancel to ~1e-7; a wrong normaliser
    # leaves ~0.1.
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=test_util.FP32_LONG_ATOL)
    # Masked candidates get no gradient at all.
    self.assertTrue(np.all(g[~valid] == 0.0))


class MaskingTest(parameterized.TestCase):

  def _dup_batch(self):
    # B=2, G=2. Query 0's positive (doc 7) also sits in query 1's group as
    # a hard negative with an identical score; everything else is −50.
    s = np.full((2, 4), -50.0, np.float32)
    s[0, 0] = s[0, 3] = s[1, 2] = 50.0
    counts = np.array([1, 1])
    doc = np.array([7, 1, 2, 7], np.int32)
    return s, counts, doc

  @parameterized.named_parameters(
      *[(k, k) for k in _ALL] + [("symmetric", "symmetric")]
  )
  def test_duplicate_positive(self, name):
    fn = _ALL.get(name, symmetric_info_nce)
    s, counts, doc = self._dup_batch()
    pos, valid = group_masks(counts, 2)
    if name != "symmetric":
      # Unmasked: the duplicate takes half of row 0's mass.
      loss, _ = fn(s[:1], pos[:1], valid[:1])
      self.assertAlmostEqual(float(loss), math.log(2), places=5)
    pos, valid = group_masks(counts, 2, doc)
    self.assertFalse(bool(valid[0, 3]))
    loss, _ = fn(s, pos, valid)
    self.assertAlmostEqual(float(loss), 0.0, places=5)

  def test_other_known_positive_is_not_a_negative(self):
    # Query 0 has a second relevant doc (9) that is query 1's positive.
    s = np.full((2, 4), -50.0, np.float32)
    s[0, 0] = s[0, 2] = s[1, 2] = 50.0
    doc = np.array([7, 1, 9, 2], np.int32)
    rel = np.array([[7, 9], [9, -1]], np.int32)
    pos, valid = group_masks(np.array([1, 1]), 2, doc)
    self.assertAlmostEqual(
        float(info_nce(s, pos, valid)[0]), 0.5 * math.log(2), places=5
    )
    pos, valid = group_masks(np.array([1, 1]), 2, doc, rel)
    self.assertAlmostEqual(float(info_nce(s, pos, valid)[0]), 0.0, places=5)

  @parameterized.named_parameters(
      *[(k, k) for k in _ALL] + [("symmetric", "symmetric")]
  )
  def test_dropped_rows_are_finite(self, name):
    fn = _ALL.get(name, symmetric_info_nce)
    s, pos, valid, counts = _random_batch(21, b=4, g=2, max_pos=1)
    # Row 1: no positive; row 2: everything masked; row 3: huge scores.
    counts[1], counts[2] = 0, 1
    pos, valid = _np_masks(counts, 2)
    valid[2] = False
    s[3] = 1e30
    s = s.astype(np.float32)
    (loss, aux), g = fn.value_and_grad(s, pos, valid)
    self.assertTrue(np.isfinite(float(loss)))
    self.assertTrue(np.all(np.isfinite(g)))
    self.assertEqual(float(aux["num_valid_rows"]), 2.0)
    # The dropped rows contribute nothing (they are not reverse candidates
    # of the symmetric loss either).
    rows = np.array([0, 3])
    keep = fn(s[rows], pos[rows], valid[rows])[0]
    self.assertAlmostEqual(float(loss), float(keep), places=5)
    np.testing.assert_array_equal(g[1:3], 0.0)

  @parameterized.named_parameters(
      *[(k, k) for k in _ALL] + [("symmetric", "symmetric")]
  )
  def test_no_valid_row(self, name):
    fn = _ALL.get(name, symmetric_info_nce)
    s = np.ones((2, 4))
    (loss, aux), g = fn.value_and_grad(
        s, np.zeros((2, 4), bool), np.ones((2, 4), bool)
    )
    self.assertEqual(float(loss), 0.0)
    self.assertEqual(float(aux["num_valid_rows"]), 0.0)
    np.testing.assert_array_equal(g, 0.0)

  def test_bfloat16_scores(self):
    s, pos, valid, _ = _random_batch(2)
    for name, fn in _ALL.items():
      full = float(fn(s.astype(np.float32), pos, valid)[0])
      half = float(fn(jnp.asarray(s, jnp.bfloat16), pos, valid)[0])
      self.assertAlmostEqual(half, full, delta=0.05 * full, msg=name)


class SentenceTransformersParityTest(absltest.TestCase):
  """InfoNCE against sentence-transformers' MultipleNegativesRankingLoss.

  The torch side repeats what MNRL's `compute_loss_from_embeddings` does:
  cos_sim of anchors against `cat([positives, negatives_1, ...])` (role-
  major columns), × scale, cross-entropy with target i; the symmetric loss
  adds its `doc_to_query` direction with `partition_mode="per_direction"`.
  """

  def test_mnrl_and_symmetric(self):
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(0)
    b, k, d, scale = 6, 2, 16, 20.0
    anchors = rng.normal(size=(b, d)).astype(np.float32)
    cands = [rng.normal(size=(b, d)).astype(np.float32) for _ in range(k + 1)]
    ta = F.normalize(torch.from_numpy(anchors), dim=-1)
    tc = [F.normalize(torch.from_numpy(c), dim=-1) for c in cands]
    st_scores = ta @ torch.cat(tc).T * scale
    labels = torch.arange(b)
    st_loss = F.cross_entropy(st_scores, labels)
    st_reverse = F.cross_entropy(st_scores[:, :b].T, labels)

    # Our layout: query-major groups [pos_i, neg1_i, neg2_i].
    g = k + 1
    p_cd = np.stack(cands, axis=1).reshape(b * g, d)
    q = jnp.asarray(anchors / np.linalg.norm(anchors, axis=1, keepdims=True))
    p = jnp.asarray(p_cd / np.linalg.norm(p_cd, axis=1, keepdims=True))
    s, pos, valid = scores_and_masks(
        q, p, {"positive_counts": np.ones(b, np.int32)}, 1 / scale
    )
    # Same matrix up to the column permutation role-major -> query-major.
    perm = np.arange(b * g).reshape(g, b).T.reshape(-1)
    np.testing.assert_allclose(s, st_scores.numpy()[:, perm], atol=1e-4)
    self.assertAlmostEqual(
        float(info_nce(s, pos, valid)[0]), float(st_loss), places=4
    )
    self.assertAlmostEqual(
        float(symmetric_info_nce(s, pos, valid)[0]),
        float(0.5 * (st_loss + st_reverse)),
        places=4,
    )


if __name__ == "__main__":
  absltest.main()
