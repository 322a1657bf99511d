"""Revela's in-batch causal LM (`models/revela.py`) against NumPy by hand.

Oracles: a 1-block LM on 3 chunks of different lengths, written out in
float64 NumPy loop by loop (each chunk's causal self-attention, then for
every other chunk j the softmax over j's real tokens, vnorm, times the
given p(j | i)); p(j | i) itself by hand; no weights = each chunk run
alone; in a 2-block LM, changing chunk i's token t leaves chunk i's
logits before t bitwise unchanged (no target leaks through the other
chunks) while other chunks' logits move.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models import revela
from retrieval_jax.models import transformer_encoder
import test_util

VOCAB, L = 50, 6


def _lm(num_layers=1, v_norm=True, seed=0):
  config = transformer_encoder.EncoderConfig(
      vocab_size=VOCAB,
      hidden_size=8,
      num_layers=num_layers,
      num_heads=2,
      intermediate_size=16,
      max_position_embeddings=L,
      initializer_range=0.5,  # large weights: attention far from uniform
  )
  return revela.InBatchLM(config, v_norm=v_norm, rngs=nnx.Rngs(seed))


def _jitted(lm):
  """`lm(ids, mask, weights=None)`, compiled once per signature."""
  graphdef, state = nnx.split(lm)
  fn = jax.jit(lambda st, *args: nnx.merge(graphdef, st)(*args))
  return lambda *args: np.asarray(fn(state, *map(jnp.asarray, args)))


def _chunks():
  lengths = np.array([6, 4, 5])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids = np.random.default_rng(0).integers(1, VOCAB, (3, L)) * mask
  return ids.astype(np.int32), mask


def _params(lm):
  return {
      ".".join(map(str, k)): np.asarray(v.get_value(), np.float64)
      for k, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))
  }


def _layer_norm(x, p, name):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  eps = 1e-12
  return (x - mu) / np.sqrt(var + eps) * p[f"{name}.scale_d"] + p[
      f"{name}.bias_d"
  ]


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _numpy_lm(p, ids, mask, weights, v_norm):
  """The 1-block LM's logits [B, L, V], one chunk / head / token at a time."""
  b_size, n_heads = ids.shape[0], 2
  x0 = p["word_vd"][ids] + p["position_pd"][None, :L]
  pre = "blocks.0."
  at = pre + "attention."

  def qkv(x):
    h = _layer_norm(x, p, pre + "attention_norm")
    proj = (
        lambda w: np.einsum("ld,dnh->nlh", h, p[at + w + "_dnh"])
        + p[at + w + "_bias_nh"][:, None]
    )
    return proj("query") / np.sqrt(4.0), proj("key"), proj("value")

  def block(x, i, cross):
    q, k, v = qkv(x)
    context = np.zeros((n_heads, L, 4))
    for n in range(n_heads):
      for t in range(L):
        # Own chunk: keys 0..t that are real tokens.
        s = [
            q[n, t] @ k[n, u] if u <= t and mask[i, u] else -np.inf
            for u in range(L)
        ]
        context[n, t] = _softmax(np.array(s)) @ v[n]
        if cross is None:
          continue
        for j in range(b_size):
          if j == i:
            continue
          _, kj, vj = cross[j]
          s = [q[n, t] @ kj[n, u] if mask[j, u] else -np.inf for u in range(L)]
          a = _softmax(np.array(s))
          out = a @ vj[n]
          if v_norm:
            out = out / (a @ np.linalg.norm(vj[n], axis=-1) + 1e-6)
          context[n, t] += weights[i, j] * out
    y = (
        np.einsum("nlh,nhd->ld", context, p[at + "out_nhd"])
        + p[at + "out_bias_d"]
    )
    x = x + y
    h = _layer_norm(x, p, pre + "mlp_norm")
    ff = h @ p[pre + "mlp.wi_df"] + p[pre + "mlp.bi_f"]
    gelu = np.array(jax.nn.gelu(ff, approximate=False), np.float64)
    return x + gelu @ p[pre + "mlp.wo_fd"] + p[pre + "mlp.bo_d"]

  # The chunks' own passes give the keys / values chunk i reads.
  alone = [qkv(x0[j]) for j in range(b_size)]
  logits = []
  for i in range(b_size):
    x = block(x0[i], i, alone)
    logits.append(_layer_norm(x, p, "final_norm") @ p["word_vd"].T)
  return np.stack(logits)


class InBatchLMTest(parameterized.TestCase):

  def test_neighbour_weights_by_hand(self):
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    got = np.asarray(revela.neighbour_weights(jnp.asarray(emb), 0.5))
    want = np.zeros((3, 3))
    for i in range(3):
      s = np.array([emb[i] @ emb[j] / 0.5 for j in range(3) if j != i])
      want[i, [j for j in range(3) if j != i]] = np.exp(s) / np.exp(s).sum()
    np.testing.assert_allclose(got, want, rtol=test_util.FP32_RTOL)
    np.testing.assert_array_equal(np.diag(got), 0.0)

  @parameterized.parameters(True, False)
  def test_one_block_equals_numpy(self, v_norm):
    lm = _lm(v_norm=v_norm)
    ids, mask = _chunks()
    weights = np.array(
        [[0.0, 0.7, 0.3], [0.9, 0.0, 0.1], [0.2, 0.8, 0.0]], np.float32
    )
    got = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask), weights))
    want = _numpy_lm(_params(lm), ids, mask, weights, v_norm)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        got[real], want[real], rtol=test_util.FP32_LONG_RTOL, atol=1e-4
    )
    # The cross term matters: other weights give other logits.
    swapped = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask), weights.T))
    self.assertGreater(np.abs(swapped - got)[real].max(), 1e-2)

  def test_without_weights_each_chunk_runs_alone(self):
    lm = _jitted(_lm(num_layers=2))
    ids, mask = _chunks()
    together = lm(ids, mask)
    for i in range(3):
      alone = lm(ids[i : i + 1], mask[i : i + 1])
      real = mask[i].astype(bool)
      np.testing.assert_allclose(
          together[i][real],
          alone[0][real],
          rtol=test_util.FP32_RTOL,
          atol=test_util.FP32_ATOL,
      )

  def test_no_future_token_leaks_through_other_chunks(self):
    lm = _jitted(_lm(num_layers=2))
    ids, mask = _chunks()
    weights = 0.5 * (1 - np.eye(3, dtype=np.float32))
    before = lm(ids, mask, weights)
    changed = ids.copy()
    changed[0, 3] = (changed[0, 3] + 7) % VOCAB
    after = lm(changed, mask, weights)
    np.testing.assert_array_equal(after[0, :3], before[0, :3])
    self.assertGreater(np.abs(after[0, 3:] - before[0, 3:]).max(), 1e-3)
    # Chunks 1 and 2 read all of chunk 0, so theirs move at every position.
    self.assertGreater(np.abs(after[1:, 0] - before[1:, 0]).min(), 0.0)


if __name__ == "__main__":
  absltest.main()
