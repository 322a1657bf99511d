"""The heads-major SelfAttention gives the former [B, L, N, H] path's output.

`SelfAttention` computes its attention einsums in [B, N, L, H] layout (about
2x faster on XLA CPU at 256 tokens, experiments/benchmarks/
ab_attention_layout.py). The former layout is kept here verbatim as the
reference: forward outputs, whole-encoder states and gradients must agree to
float32 rounding.
"""

import math

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.layers import core
from retrieval_jax.models import transformer_encoder as te

CONFIG = te.EncoderConfig(
    vocab_size=60,
    hidden_size=48,
    num_layers=2,
    num_heads=4,
    intermediate_size=96,
    max_position_embeddings=40,
)


def blnh_call(self, x_bld, mask_bl, *, deterministic, rng):
  """SelfAttention.__call__ before the heads-major change, verbatim."""
  dt = self.dtype
  q_blnh = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.query_dnh[...].astype(dt)
  ) + self.query_bias_nh[...].astype(dt)
  k_blnh = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.key_dnh[...].astype(dt)
  ) + self.key_bias_nh[...].astype(dt)
  v_blnh = jnp.einsum(
      "bld,dnh->blnh", x_bld, self.value_dnh[...].astype(dt)
  ) + self.value_bias_nh[...].astype(dt)
  q_blnh = q_blnh * jnp.asarray(1.0 / math.sqrt(q_blnh.shape[-1]), dt)
  logits_bnqk = jnp.einsum("bqnh,bknh->bnqk", q_blnh, k_blnh)
  bias_bk = jnp.where(mask_bl.astype(bool), 0.0, te._MASK_BIAS)
  logits_bnqk = logits_bnqk.astype(jnp.float32) + bias_bk[
      :, None, None, :
  ].astype(jnp.float32)
  probs_bnqk = jax.nn.softmax(logits_bnqk, axis=-1).astype(dt)
  probs_bnqk = core.dropout(self.dropout, probs_bnqk, deterministic, rng)
  context_bqnh = jnp.einsum("bnqk,bknh->bqnh", probs_bnqk, v_blnh)
  return jnp.einsum(
      "bqnh,nhd->bqd", context_bqnh, self.out_nhd[...].astype(dt)
  ) + self.out_bias_d[...].astype(dt)


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, CONFIG.vocab_size, (3, 17)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0  # padding
  mask[2, :] = 0  # an all-padding row
  # Non-zero biases, so the bias broadcast in the new layout is exercised.
  return jnp.asarray(ids), jnp.asarray(mask)


def _with_random_biases(model):
  key = jax.random.key(1)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "bias" in str(path[-1]):
      key, sub = jax.random.split(key)
      var.set_value(0.1 * jax.random.normal(sub, var.shape, var.dtype))
  return model


class AttentionLayoutTest(absltest.TestCase):

  def _run_both(self, fn):
    model = _with_random_biases(te.TransformerEncoder(CONFIG, rngs=nnx.Rngs(0)))
    new = fn(model)
    orig = te.SelfAttention.__call__
    te.SelfAttention.__call__ = blnh_call
    try:
      old = fn(model)
    finally:
      te.SelfAttention.__call__ = orig
    return old, new

  def test_self_attention_output_unchanged(self):
    ids, mask = _inputs()

    def fn(model):
      x = jax.random.normal(jax.random.key(2), ids.shape + (48,))
      layer = model.layers[0].attention
      return np.asarray(
          jax.jit(lambda l, x, m: l(x, m, deterministic=True, rng=None))(
              layer, x, mask
          )
      )

    old, new = self._run_both(fn)
    np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)

  def test_encoder_states_unchanged(self):
    ids, mask = _inputs()
    old, new = self._run_both(
        lambda model: np.asarray(
            jax.jit(lambda m, i, k: m(i, k))(model, ids, mask)
        )
    )
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(new[real], old[real], rtol=1e-5, atol=2e-6)
    cos = (new * old).sum(-1) / (
        np.linalg.norm(new, axis=-1) * np.linalg.norm(old, axis=-1)
    )
    self.assertGreaterEqual(float(cos.min()), 0.99999)

  def test_gradients_unchanged(self):
    ids, mask = _inputs()

    def fn(model):
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss(p):
        m = nnx.merge(graphdef, p, rest)
        return jnp.sum(jnp.square(m(ids, mask)) * mask[..., None])

      grads = jax.jit(jax.grad(loss))(params)
      return jax.tree.leaves(jax.tree.map(np.asarray, grads))

    old, new = self._run_both(fn)
    for g_old, g_new in zip(old, new):
      np.testing.assert_allclose(g_new, g_old, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
