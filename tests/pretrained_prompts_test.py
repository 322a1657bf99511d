"""sentence-transformers prompts and similarity in the evaluate mode.

A copy of all-MiniLM-L6-v2 whose config_sentence_transformers.json carries
e5-style prompts and `similarity_fn_name` "dot" is evaluated on
tests/fixtures/tiny_beir; its cached query / document embeddings must equal
sentence-transformers' `encode(..., prompt_name=...)`.
"""

import json
import pathlib
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
import test_util

from configs import evaluate as evaluate_config
from retrieval_jax import api
from retrieval_jax import errors
from retrieval_jax import evaluate
from retrieval_jax import pretrained
from retrieval_jax.data import beir
from retrieval_jax.data import tokenizers

_REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_BEIR = _REPO / "tests" / "fixtures" / "tiny_beir"
MIN_COSINE = 0.99999
PROMPTS = {"query": "query: ", "passage": "passage: "}


def _cosines(a_nd, b_nd):
  a_nd = a_nd / np.linalg.norm(a_nd, axis=1, keepdims=True)
  b_nd = b_nd / np.linalg.norm(b_nd, axis=1, keepdims=True)
  return (a_nd * b_nd).sum(1)


def write_prompted_copy(source, target, st_config) -> pathlib.Path:
  """`source` linked file by file, with its own ST config."""
  target = pathlib.Path(target)
  for path in pathlib.Path(source).rglob("*"):
    if path.is_dir() or path.name == "config_sentence_transformers.json":
      continue
    link = target / path.relative_to(source)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(path)
  (target / "config_sentence_transformers.json").write_text(
      json.dumps(st_config)
  )
  return target


class PromptsTest(absltest.TestCase):
  """`pretrained.Prompts`: sentence-transformers' choice of prompt."""

  def test_query_and_document_prompts(self):
    p = pretrained.Prompts(
        {"query": "q: ", "passage": "p: ", "corpus": "c: "}, None, ""
    )
    self.assertEqual((p.query, p.document), ("q: ", "p: "))
    # document > passage > corpus, as encode_document checks them; empty
    # prompts count as absent.
    p = pretrained.Prompts({"corpus": "c: ", "document": "d: "})
    self.assertEqual((p.query, p.document), ("", "d: "))
    p = pretrained.Prompts({"document": "", "passage": "p: "})
    self.assertEqual(p.document, "p: ")
    # Without a named prompt, the default prompt applies to both.
    p = pretrained.Prompts({"retrieval": "r: ", "query": "q: "}, "retrieval")
    self.assertEqual((p.query, p.document), ("q: ", "r: "))
    self.assertEqual(
        (pretrained.Prompts().query, pretrained.Prompts().document), ("", "")
    )

  def test_metric_of_similarity(self):
    self.assertEqual(pretrained.Prompts().metric(False), "cosine")
    self.assertEqual(pretrained.Prompts(similarity="dot").metric(True), "dot")
    self.assertEqual(
        pretrained.Prompts(similarity="euclidean").metric(True), "cosine"
    )
    with self.assertRaisesRegex(ValueError, "euclidean"):
      pretrained.Prompts(similarity="euclidean").metric(False)
    with self.assertRaisesRegex(ValueError, "manhattan"):
      pretrained.Prompts(similarity="manhattan").metric(True)

  def test_read_prompts_validates(self):
    d = pathlib.Path(self.create_tempdir().full_path)
    self.assertEqual(pretrained.read_prompts(d), pretrained.Prompts())
    path = d / "config_sentence_transformers.json"
    path.write_text(
        json.dumps({"prompts": {"q": "x"}, "default_prompt_name": "y"})
    )
    with self.assertRaisesRegex(ValueError, "default_prompt_name 'y'"):
      pretrained.read_prompts(d)
    path.write_text(json.dumps({"similarity_fn_name": "jaccard"}))
    with self.assertRaisesRegex(ValueError, "jaccard"):
      pretrained.read_prompts(d)
    path.write_text(json.dumps({"prompts": {"query": "q: ", "document": None}}))
    self.assertEqual(
        pretrained.read_prompts(d).prompts, {"query": "q: ", "document": ""}
    )

  def test_include_prompt_false_is_refused(self):
    d = pathlib.Path(self.create_tempdir().full_path)
    (d / "modules.json").write_text(
        json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "x.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"},
        ])
    )
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode": "mean", "include_prompt": False})
    )
    config = pretrained.transformer_encoder.EncoderConfig(
        vocab_size=9,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
    )
    with self.assertRaisesRegex(ValueError, "include_prompt"):
      pretrained.read_pipeline_config(d, config)


class PromptedEvaluateTest(absltest.TestCase):
  """The evaluate mode against sentence-transformers, prompts applied."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      source = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
      import sentence_transformers  # pylint: disable=g-import-not-at-top
    except (FileNotFoundError, ImportError) as e:
      raise absltest.SkipTest(str(e))
    cls.tmp = pathlib.Path(tempfile.mkdtemp())
    cls.model_dir = write_prompted_copy(
        source,
        cls.tmp / "model",
        {
            "prompts": PROMPTS,
            "default_prompt_name": None,
            "similarity_fn_name": "dot",
        },
    )
    collection = beir.load_beir(TINY_BEIR, split="test")
    cls.docs = collection.doc_texts()
    judged = [q for q in collection.query_ids if q in collection.qrels]
    text_of = dict(zip(collection.query_ids, collection.queries))
    cls.queries = [text_of[q] for q in judged]
    st = sentence_transformers.SentenceTransformer(
        str(cls.model_dir), device="cpu"
    )
    cls.st_queries = st.encode(cls.queries, prompt_name="query")
    # ST >= 5's encode_document picks its own (empty) "document" prompt
    # over the checkpoint's "passage"; the project takes the non-empty one.
    cls.st_docs = st.encode(cls.docs, prompt_name="passage")
    cls.st_queries_raw = st.encode(cls.queries, prompt="")
    cls.st_docs_custom = st.encode(cls.docs, prompt="search_document: ")

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _evaluate(self, workdir, **model):
    config = evaluate_config.get_config()
    with config.unlocked():
      config.data.path = str(TINY_BEIR)
      config.model.pretrained = str(self.model_dir)
      config.encode.cache_dir = str(self.tmp / "cache")
      for key, value in model.items():
        config.model[key] = value
    seen = []
    original = tokenizers.WordPieceTokenizer.encode

    def spy(tokenizer, text, *args, **kwargs):
      seen.append(text)
      return original(tokenizer, text, *args, **kwargs)

    cache_dir = self.tmp / "cache"
    before = set(cache_dir.glob("dense_*.npz"))
    with mock.patch.object(tokenizers.WordPieceTokenizer, "encode", spy):
      metrics = evaluate.evaluate(config, workdir)
    # A new cache entry: other prompts are other embeddings.
    (cache,) = set(cache_dir.glob("dense_*.npz")) - before
    with np.load(cache) as f:
      return metrics, f["queries_qd"], f["docs_nd"], seen

  def test_checkpoint_prompts_and_similarity(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    _, queries_qd, docs_nd, seen = self._evaluate(workdir)
    cos_q = _cosines(queries_qd, self.st_queries)
    cos_d = _cosines(docs_nd, self.st_docs)
    print(
        f"prompted parity: 1 - cos max query {1 - cos_q.min():.1e}, doc "
        f"{1 - cos_d.min():.1e}; max |diff| query "
        f"{np.abs(queries_qd - self.st_queries).max():.1e}, doc "
        f"{np.abs(docs_nd - self.st_docs).max():.1e}"
    )
    self.assertGreaterEqual(cos_q.min(), MIN_COSINE)
    self.assertGreaterEqual(cos_d.min(), MIN_COSINE)
    # The prompt changes the embedding (so the check above can fail).
    self.assertLess(_cosines(queries_qd, self.st_queries_raw).max(), 0.9999)
    # The texts the tokenizer saw carry the prefixes.
    self.assertContainsSubset(["query: " + q for q in self.queries], seen)
    self.assertContainsSubset(["passage: " + d for d in self.docs], seen)
    self.assertNotIn(self.queries[0], seen)
    saved = json.loads((workdir / "config.json").read_text())
    self.assertEqual(saved["search"]["metric"], "dot")

    # Config overrides win over the checkpoint's; "" turns a prompt off.
    # The shared cache must not serve the first run's embeddings.
    workdir = pathlib.Path(self.create_tempdir().full_path)
    _, queries_qd, docs_nd, seen = self._evaluate(
        workdir, query_prompt="", doc_prompt="search_document: "
    )
    self.assertGreaterEqual(
        _cosines(queries_qd, self.st_queries_raw).min(), MIN_COSINE
    )
    self.assertGreaterEqual(
        _cosines(docs_nd, self.st_docs_custom).min(), MIN_COSINE
    )
    self.assertContainsSubset(self.queries, seen)

  def test_api_encodes_and_searches_with_the_checkpoint_prompts(self):
    model = api.load(str(self.model_dir), max_length=256)
    self.assertGreaterEqual(
        _cosines(model.encode_queries(self.queries), self.st_queries).min(),
        MIN_COSINE,
    )
    self.assertGreaterEqual(
        _cosines(model.encode_documents(self.docs), self.st_docs).min(),
        MIN_COSINE,
    )
    # `encode` itself prepends nothing, as sentence-transformers' `encode`.
    self.assertGreaterEqual(
        _cosines(model.encode(self.queries), self.st_queries_raw).min(),
        MIN_COSINE,
    )
    # The index searches prompted documents with prompted queries.
    ids, _ = api.index(self.docs, model).search(self.queries, k=5)
    scores = self.st_queries.astype(np.float64) @ self.st_docs.T
    test_util.assert_same_topk(
        [[int(i) for i in row] for row in ids],
        np.argsort(-scores, axis=1, kind="stable")[:, :5],
        scores,
        atol=1e-5,
    )

  def test_unsupported_similarity_names_the_key(self):
    model_dir = write_prompted_copy(
        self.model_dir,
        pathlib.Path(self.create_tempdir().full_path) / "m",
        {"similarity_fn_name": "manhattan"},
    )
    config = evaluate_config.get_config()
    with config.unlocked():
      config.data.path = str(TINY_BEIR)
      config.model.pretrained = str(model_dir)
    with self.assertRaisesRegex(errors.ConfigError, r"config\.search\.metric"):
      evaluate.evaluate(config, self.create_tempdir().full_path)


if __name__ == "__main__":
  absltest.main()
