"""MoCo pieces against hand computations.

Oracles: the EMA of a two-leaf pytree worked out by hand; the queue's
contents and pointer after enqueues that wrap around, slot by slot; the loss
equal to InfoNCE over [in-batch keys ‖ queue] written out in float64 NumPy
with logsumexp, with and without in-batch negatives, empty slots and keys of
the row's own document left out.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.losses import contrastive
from retrieval_jax.losses import moco
from test_util import FP32_LONG_ATOL, FP32_LONG_RTOL


def _logsumexp(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


class EmaTest(absltest.TestCase):

  def test_by_hand(self):
    target = {"w": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    online = {"w": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
    got = moco.ema_update(target, online, 0.75)
    # 0.75 * t + 0.25 * o: dyadic values, exact in float32.
    np.testing.assert_array_equal(got["w"], [1.5, 1.0])
    np.testing.assert_array_equal(got["b"]["c"], 3.0)
    same = moco.ema_update(target, online, 1.0)
    np.testing.assert_array_equal(same["w"], target["w"])

  def test_no_gradient_into_online(self):
    grad = jax.grad(lambda o: moco.ema_update(jnp.ones(()), o, 0.5) * 2.0)(
        jnp.array(3.0)
    )
    self.assertEqual(float(grad), 0.0)


class QueueTest(absltest.TestCase):

  def test_enqueue_order_with_wrap_around(self):
    queue = moco.init_queue(5, 2)
    np.testing.assert_array_equal(queue["queue_doc_k"], [-1] * 5)
    want_doc = [-1] * 5
    want_kd = np.zeros((5, 2), np.float32)
    ptr = 0
    for step in range(4):
      doc_b = np.array([10 * step, 10 * step + 1], np.int32)
      keys_bd = np.stack([doc_b, -doc_b], axis=1).astype(np.float32)
      queue = moco.enqueue(queue, jnp.asarray(keys_bd), jnp.asarray(doc_b))
      for i in range(2):  # FIFO: the oldest slot is overwritten next
        want_doc[(ptr + i) % 5] = doc_b[i]
        want_kd[(ptr + i) % 5] = keys_bd[i]
      ptr = (ptr + 2) % 5
      np.testing.assert_array_equal(queue["queue_doc_k"], want_doc)
      np.testing.assert_array_equal(queue["queue_kd"], want_kd)
      self.assertEqual(int(queue["ptr"]), ptr)
    # 8 keys through 5 slots: the 5 newest remain, the oldest (11) at ptr 3.
    np.testing.assert_array_equal(queue["queue_doc_k"], [21, 30, 31, 11, 20])

  def test_too_many_keys(self):
    with self.assertRaisesRegex(ValueError, "do not fit"):
      moco.enqueue(moco.init_queue(2, 4), jnp.zeros((3, 4)), jnp.zeros(3))


class LossTest(parameterized.TestCase):

  def _data(self):
    rng = np.random.default_rng(0)
    b, k, d = 4, 6, 8
    q_bd = rng.normal(size=(b, d)).astype(np.float32)
    k_bd = rng.normal(size=(b, d)).astype(np.float32)
    queue = moco.init_queue(k, d)
    # 5 keys in: slot 5 stays empty; slot 1 holds a key of doc 2.
    queue = moco.enqueue(
        queue,
        jnp.asarray(rng.normal(size=(5, d)), jnp.float32),
        jnp.array([7, 2, 8, 9, 11], jnp.int32),
    )
    doc_b = np.array([0, 1, 2, 1], np.int32)  # rows 1 and 3: one document
    return q_bd, k_bd, queue, doc_b

  @parameterized.parameters(True, False)
  def test_equals_numpy_infonce(self, in_batch):
    q_bd, k_bd, queue, doc_b = self._data()
    tau = 0.07
    loss, aux = moco.moco_loss(
        jnp.asarray(q_bd),
        jnp.asarray(k_bd),
        queue,
        temperature=tau,
        doc_b=jnp.asarray(doc_b),
        in_batch=in_batch,
    )
    queue_kd = np.asarray(queue["queue_kd"], np.float64)
    queue_doc = np.asarray(queue["queue_doc_k"])
    rows, negatives = [], []
    for i in range(len(q_bd)):
      q = q_bd[i].astype(np.float64)
      logits = [q @ k_bd[i] / tau]  # the positive first
      for j in range(len(k_bd)):
        if in_batch and j != i and doc_b[j] != doc_b[i]:
          logits.append(q @ k_bd[j] / tau)
      for s in range(len(queue_kd)):
        if queue_doc[s] != -1 and queue_doc[s] != doc_b[i]:
          logits.append(q @ queue_kd[s] / tau)
      logits = np.array(logits)
      rows.append(_logsumexp(logits) - logits[0])
      negatives.append(len(logits) - 1)
    np.testing.assert_allclose(
        loss, np.mean(rows), rtol=FP32_LONG_RTOL, atol=FP32_LONG_ATOL
    )
    np.testing.assert_allclose(aux["num_negatives"], np.mean(negatives))
    # Row 2 (doc 2) lost queue slot 1; the empty slot is nobody's negative.
    self.assertEqual(negatives[2], negatives[0] - 1)

  def test_gradient_flows_only_into_queries(self):
    q_bd, k_bd, queue, doc_b = self._data()

    def f(q, k):
      return moco.moco_loss(q, k, queue, temperature=0.1, doc_b=doc_b)[0]

    dq, dk = jax.grad(f, argnums=(0, 1))(jnp.asarray(q_bd), jnp.asarray(k_bd))
    self.assertGreater(float(jnp.abs(dq).max()), 0.0)
    np.testing.assert_array_equal(dk, 0.0)

  def test_masks_layout(self):
    q_bd, k_bd, queue, doc_b = self._data()
    _, positive, valid = moco.queue_scores_and_masks(
        jnp.asarray(q_bd),
        jnp.asarray(k_bd),
        queue["queue_kd"],
        temperature=1.0,
        doc_b=jnp.asarray(doc_b),
        queue_doc_k=queue["queue_doc_k"],
    )
    np.testing.assert_array_equal(positive[:, :4], np.eye(4, dtype=bool))
    self.assertFalse(bool(positive[:, 4:].any()))
    self.assertFalse(bool(valid[1, 3]) or bool(valid[3, 1]))
    self.assertFalse(bool(valid[:, 4 + 5].any()))  # the empty slot
    # The default loss is the registry's InfoNCE on these masks.
    self.assertIs(
        moco.moco_loss.__kwdefaults__["loss_fn"], contrastive.info_nce
    )


if __name__ == "__main__":
  absltest.main()
