"""Tests for retrieval_jax.losses.sharded_contrastive on 8 fake CPU devices.

The sharded loss must equal the dense loss of `contrastive.py` on the whole
batch, in value and in gradients w.r.t. both towers' embeddings.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.losses import contrastive as cl
from retrieval_jax.losses import sharded_contrastive as sc

_B, _G, _D, _TAU = 16, 3, 8, 0.5

_LOSSES = {
    "info_nce": cl.info_nce,
    "joint_lh_norm": functools.partial(
        cl.joint_lh, normalize_by_positives=True
    ),
    "lse_pair": cl.lse_pair,
    "symmetric": cl.symmetric_info_nce,
    "orthogonal_projection": cl.orthogonal_projection,
}


def _batch(one_positive):
  """16 queries × 3 passages with cross-shard duplicates and dropped rows.

  Rows 2 and 3 (all of shard 1 on an 8-way mesh) have no positive, so one
  shard contributes no valid row. Query 0's positive doc also sits in query
  15's group (the last shard), query 5's positive in query 8's group, and
  query 9 lists query 1's positive as another relevant doc: each must be
  masked across shards.
  """
  rng = np.random.default_rng(0)
  q = rng.normal(size=(_B, _D)).astype(np.float32)
  p = rng.normal(size=(_B * _G, _D)).astype(np.float32)
  counts = (
      np.ones(_B, np.int32)
      if one_positive
      else rng.integers(1, _G + 1, size=_B).astype(np.int32)
  )
  counts[2:4] = 0
  doc = np.arange(_B * _G, dtype=np.int32) + 100
  doc[15 * _G + 2] = doc[0]
  doc[8 * _G + 2] = doc[5 * _G]
  doc[11 * _G + 1] = -1  # a padding slot
  # The duplicate shares its original's embedding, as encoders would.
  p[15 * _G + 2] = p[0]
  p[8 * _G + 2] = p[5 * _G]
  rel = np.full((_B, 2), -1, np.int32)
  rel[9] = [doc[1 * _G], doc[9 * _G]]
  return q, p, counts, doc, rel


def _grad(fn):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


@functools.cache
def _dense(name, share, ids):
  """Dense loss, aux and gradients on the whole batch (one compile each)."""
  fn = _LOSSES[name]
  q, p, counts, doc, rel = _batch(name in ("info_nce", "symmetric"))
  batch = {"positive_counts": counts}
  if ids:
    batch.update(passage_doc=doc, relevant_doc=rel)

  def dense(q_bd, p_cd):
    return fn(*cl.scores_and_masks(q_bd, p_cd, batch, _TAU, share))

  return _grad(dense)(q, p)


class ShardedContrastiveTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertLen(jax.devices(), 8)

  def _check(self, name, mesh_shape, *, share=True, ids=True):
    fn = _LOSSES[name]
    q, p, counts, doc, rel = _batch(name in ("info_nce", "symmetric"))
    doc, rel = (doc, rel) if ids else (None, None)
    mesh = sharding.make_mesh(mesh_shape)

    def sharded(q_bd, p_cd):
      return sc.sharded_contrastive_loss(
          fn,
          q_bd,
          p_cd,
          counts,
          doc,
          rel,
          temperature=_TAU,
          group_size=_G,
          mesh=mesh,
          share_hard_negatives=share,
      )

    (want, want_aux), want_g = _dense(name, share, ids)
    (got, got_aux), got_g = _grad(sharded)(q, p)
    self.assertGreater(float(want), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    self.assertEqual(set(got_aux), set(want_aux))
    for key in want_aux:
      np.testing.assert_allclose(
          got_aux[key], want_aux[key], atol=1e-5, err_msg=key
      )
    self.assertEqual(float(got_aux["num_valid_rows"]), _B - 2)
    for g_got, g_want, tower in zip(got_g, want_g, ("q", "p")):
      self.assertGreater(float(np.abs(g_want).max()), 1e-3)
      np.testing.assert_allclose(g_got, g_want, atol=1e-5, err_msg=tower)

  @parameterized.product(
      name=["info_nce", "joint_lh_norm"], mesh_shape=[(8, 1, 1), (2, 4, 1)]
  )
  def test_matches_dense(self, name, mesh_shape):
    self._check(name, mesh_shape)

  def test_symmetric(self):
    # Its reverse term needs every query: a separate path.
    self._check("symmetric", (2, 4, 1))

  def test_orthogonal_projection(self):
    # Row means of cosines, reduced shard by shard like the softmax losses.
    self._check("orthogonal_projection", (8, 1, 1))

  def test_unshared_hard_negatives(self):
    self._check("lse_pair", (8, 1, 1), share=False)

  def test_without_ids(self):
    # (2, 2, 2): the inputs are also replicated over the model axis.
    self._check("info_nce", (2, 2, 2), ids=False)
    # The duplicates across shards matter: masking them changes the loss.
    with_ids = float(_dense("info_nce", True, True)[0][0])
    without = float(_dense("info_nce", True, False)[0][0])
    self.assertGreater(without - with_ids, 1e-3)

  def test_score_matrix_stays_sharded(self):
    # The lowered program holds [B/W, C] score blocks, never [B, C].
    q, p, counts, doc, rel = _batch(True)
    mesh = sharding.make_mesh((8, 1, 1))
    text = (
        jax.jit(
            functools.partial(
                sc.sharded_contrastive_loss,
                cl.info_nce,
                temperature=_TAU,
                group_size=_G,
                mesh=mesh,
            )
        )
        .lower(q, p, counts, doc, rel)
        .as_text()
    )
    self.assertIn(f"tensor<{_B // 8}x{_B * _G}xf32>", text)
    self.assertNotIn(f"tensor<{_B}x{_B * _G}xf32>", text)

  def test_rejects_indivisible_batch(self):
    mesh = sharding.make_mesh((8, 1, 1))
    q = np.zeros((12, _D), np.float32)
    p = np.zeros((12 * _G, _D), np.float32)
    with self.assertRaisesRegex(ValueError, "not divisible"):
      sc.sharded_contrastive_loss(
          cl.info_nce,
          q,
          p,
          np.ones(12, np.int32),
          None,
          None,
          temperature=_TAU,
          group_size=_G,
          mesh=mesh,
      )


if __name__ == "__main__":
  absltest.main()
