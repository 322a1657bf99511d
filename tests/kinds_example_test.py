"""The README's "Adding a kind" example, run as written.

Its code block is executed, the kind registered in `kinds.KINDS`, trained
two steps by the train mode and its run evaluated by the evaluate mode
(`--config.run`), both through `main.MODES`, the entry point's dispatch.
Oracle: the evaluate mode's nDCG@10 equals a NumPy re-implementation of
the kind (mean of the trained word embeddings over real tokens, cosine,
exact ranking) scored by `ir_metrics`.
"""

import json
import re
import types

from absl.testing import absltest
import numpy as np

from retrieval_jax import kinds
from retrieval_jax import main
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.data import tokenizers
from retrieval_jax.evaluation import ir_metrics
from retrieval_jax.evaluation import trec_run
import test_util


def _readme_kind():
  text = (test_util.REPO / "README.md").read_text()
  block = re.search(
      r"<!-- kind-example -->\n```python\n(.*?)```", text, re.S
  ).group(1)
  module = types.ModuleType("word_bag")
  exec(compile(block, "README.md:kind-example", "exec"), module.__dict__)  # pylint: disable=exec-used
  return block, module


class KindExampleTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.block, self.module = _readme_kind()
    kinds.KINDS["word_bag"] = self.module.WordBagKind()
    self.addCleanup(kinds.KINDS.pop, "word_bag")

  def test_train_two_steps_then_evaluate_the_run(self):
    from configs import evaluate as evaluate_config  # pylint: disable=g-import-not-at-top
    from configs import train as train_config  # pylint: disable=g-import-not-at-top
    # "A new kind in < 100 lines".
    self.assertLess(self.block.count("\n"), 100)
    root = self.create_tempdir().full_path
    config = train_config.get_config("smoke")
    with config.unlocked():
      config.model.kind = "word_bag"
      config.train.num_steps = 2
      config.evals = {}
      config.data.negatives = "none"
      config.data.group_size = 1
    train_dir = f"{root}/train"
    results = main.MODES["train"][2](config, train_dir)
    self.assertEqual(results["steps"], 2)
    self.assertTrue(np.isfinite(results["train"]["train/loss"]))

    config = evaluate_config.get_config("smoke")
    with config.unlocked():
      config.run = train_dir
      config.search.top_k = 10
    eval_dir = f"{root}/eval"
    got = main.MODES["evaluate"][2](config, eval_dir)

    # The oracle: the run's trained table, pooled in NumPy.
    model, tokenizer, run_cfg, step = kinds.load_run(
        train_dir, sharding.make_mesh()
    )
    self.assertEqual((run_cfg["model"]["kind"], step), ("word_bag", 2))
    table = np.asarray(model.word_vd[...], np.float64)
    initial = np.asarray(
        pretrained.load_pretrained("all-MiniLM-L6-v2").model.embeddings.word_vd[
            ...
        ]
    )
    self.assertGreater(np.abs(table - initial).max(), 1e-6)  # It trained.

    def embed(texts):
      rows = [
          table[tokenizer.encode(t, config.model.max_length)].mean(0)
          for t in texts
      ]
      emb = np.stack(rows)
      return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    collection = beir.load_beir(config.data.path, split=config.data.split)
    query_ids, query_texts = collection.judged_queries()
    query_ids, query_texts = (
        query_ids[: config.data.max_queries],
        query_texts[: config.data.max_queries],
    )
    scores = embed(query_texts) @ embed(collection.doc_texts()).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    run = trec_run.run_from_topk(
        query_ids, collection.doc_ids, np.take_along_axis(scores, top, 1), top
    )
    want, _ = ir_metrics.evaluate(
        {q: collection.qrels[q] for q in query_ids}, run, ("ndcg@10",)
    )
    self.assertAlmostEqual(got["ndcg@10"], want["ndcg@10"], places=5)
    with open(f"{eval_dir}/stats.json") as f:
      stats = json.load(f)
    self.assertEqual(stats["retriever"], "dense")
    self.assertIsInstance(tokenizer, tokenizers.WordPieceTokenizer)


if __name__ == "__main__":
  absltest.main()
