"""Tests for experiments/kv_memory/memory_adapter.py (synthetic embeddings).

Oracles: both adapters start as the identity (nDCG@10 equals the zero-shot
value); training on a second collection leaves the DKVB residual of every
first-collection query whose cells the second collection never fetches
exactly unchanged, while the linear adapter moves all of them; training
raises the trained collection's nDCG@10; the table's arithmetic.
"""

import types

from absl.testing import absltest
from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax

from experiments.kv_memory import memory_adapter as ma


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _collection(name, center, seed):
  """Docs around `center`; query i is doc i moved by a collection-wide
  shift plus noise, so the right residual (minus the shift) is learnable
  from the training queries and carries over to the held-out ones (fresh
  noisy queries for half of the same documents)."""
  rng = np.random.default_rng(seed)
  docs = _unit(center + 0.6 * rng.normal(size=(60, 16)))
  shift = 1.2 * _unit(rng.normal(size=16))

  def split(rows, tag):
    q = _unit(docs[rows] + shift + 0.15 * rng.normal(size=(len(rows), 16)))
    ids = [f"{name}-{tag}{i}" for i in rows]
    return ma.Split(
        ids, q, {qid: {f"{name}-d{i}": 1} for qid, i in zip(ids, rows)}
    )

  return ma.Collection(
      name,
      [f"{name}-d{i}" for i in range(60)],
      docs,
      split(np.arange(60), "q"),
      split(np.arange(0, 60, 3), "t"),
  )


_SETTINGS = types.SimpleNamespace(
    adapters=("dkvb", "linear"),
    num_heads=8,
    num_keys=16,
    key_dim=4,
    ema_steps=10,
    ema_decay=0.9,
    learning_rate=1e-2,
    steps=150,
    batch_size=16,
    temperature=0.05,
    seed=0,
)


class MemoryAdapterTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Two collections in opposite regions of the sphere.
    center = np.zeros(16)
    center[0] = 3.0
    cls.a = _collection("a", center, 0)
    cls.b = _collection("b", -center, 1)

  def test_identity_at_start_and_the_table(self):
    unlabelled = np.concatenate([self.a.docs_ne, self.b.docs_ne])
    for kind in ma.ADAPTERS:
      residual = ma.make_adapter(kind, 16, _SETTINGS, unlabelled, 0)
      self.assertEqual(
          ma.ndcg_at_10(residual, self.a), ma.ndcg_at_10(None, self.a)
      )
    results = {
        "zero_shot": {"a": 0.5, "b": 0.4},
        "dkvb": [
            {"after": "a", "ndcg@10": {"a": 0.7, "b": 0.4}},
            {"after": "b", "ndcg@10": {"a": 0.65, "b": 0.6}},
        ],
    }
    table = ma.format_table(results, ["a", "b"])
    self.assertIn("| dkvb | after b | 0.6500 | 0.6000 | 75% |", table)

  def test_second_collection_leaves_unfetched_cells_alone(self):
    results = ma.run_sequence([self.a, self.b], _SETTINGS)
    zero = results["zero_shot"]["a"]
    for kind in ma.ADAPTERS:
      # Training on A helps A's held-out queries.
      self.assertGreater(results[kind][0]["ndcg@10"]["a"], zero + 0.1, kind)

    def kept(kind):
      after_a, after_b = (s["ndcg@10"]["a"] for s in results[kind])
      return (after_b - zero) / (after_a - zero)

    # The memory keeps most of A's gain through training on B; the linear
    # adapter, whose bias B re-learns, keeps much less.
    self.assertGreater(kept("dkvb"), 0.8)
    self.assertGreater(kept("dkvb"), kept("linear") + 0.2)
    # Rerun DKVB stage by stage: the value rows B's batches never fetch
    # keep exactly their values after A (Adam starts fresh on B, so a row
    # without gradient gets no update), and the rows they fetch move.
    unlabelled = np.concatenate(
        [x for c in (self.a, self.b) for x in (c.docs_ne, c.train.queries_qe)]
    )
    residual = ma.make_adapter("dkvb", 16, _SETTINGS, unlabelled, 0)
    graphdef, params, rest = nnx.split(residual, nnx.Param, ...)
    tx = optax.adam(_SETTINGS.learning_rate)
    rng = np.random.default_rng(0)
    values, batches = [], []
    for c in (self.a, self.b):
      batches.append(rng.integers(0, 60, (50, 16)).astype(np.int32))
      params, _, _ = ma.train_on(
          graphdef,
          tx,
          params,
          rest,
          tx.init(params),
          jnp.asarray(c.train.queries_qe),
          jnp.asarray(c.docs_ne),
          jnp.asarray(ma.positives(c.train, c.doc_ids)),
          jnp.asarray(batches[-1]),
          _SETTINGS.temperature,
      )
      values.append(
          np.asarray(nnx.merge(graphdef, params, rest).values_cmv[...])
      )
    model = nnx.merge(graphdef, params, rest)
    used = np.unique(batches[1])
    fetched_cm = np.zeros(values[0].shape[:2], bool)
    idx_bc = np.asarray(
        model.select(jnp.asarray(self.b.train.queries_qe[used]))
    )[..., 0]
    for c in range(idx_bc.shape[1]):
      fetched_cm[c, idx_bc[:, c]] = True
    self.assertTrue(fetched_cm.any() and not fetched_cm.all())
    np.testing.assert_array_equal(
        values[1][~fetched_cm], values[0][~fetched_cm]
    )
    self.assertTrue(
        np.all(np.any(values[1][fetched_cm] != values[0][fetched_cm], axis=-1))
    )


if __name__ == "__main__":
  absltest.main()
