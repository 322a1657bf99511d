"""Published ColBERT, cross-encoder and SPLADE checkpoints load with heads.

Each checkpoint is written the way its ecosystem writes it, from the
all-MiniLM-L6-v2 encoder plus a random head (torch / transformers), and the
project's outputs must equal torch's on the same inputs:

  ColBERT        colbert-ir's layout: "bert." BertModel + `linear.weight`
                 [dim, hidden]; token vectors = normalize(H W^T)
  cross-encoder  BertForSequenceClassification (HF / sentence-transformers
                 CrossEncoder): tanh pooler + classifier; scores = logits
  SPLADE         BertForMaskedLM: max_l log(1 + ReLU(MLM logits)),
                 evaluated zero-shot on tests/fixtures/tiny_beir
"""

import json
import pathlib
import shutil
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import safetensors.numpy
import scipy.sparse

from configs import evaluate as evaluate_config
from retrieval_jax import encoding
from retrieval_jax import errors
from retrieval_jax import evaluate
from retrieval_jax import kinds
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.data import features
from retrieval_jax.evaluation import trec_run
from retrieval_jax.search import sparse_index

_REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_BEIR = _REPO / "tests" / "fixtures" / "tiny_beir"
ATOL = 1e-5
_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _setup(test_class):
  """(MiniLM dir, torch, transformers, temp dir) or SkipTest."""
  try:
    source = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except (FileNotFoundError, ImportError) as e:
    raise absltest.SkipTest(str(e))
  del test_class
  torch.manual_seed(0)
  return source, torch, transformers, pathlib.Path(tempfile.mkdtemp())


def _copy_tokenizer(source: pathlib.Path, target: pathlib.Path) -> None:
  for name in _TOKENIZER_FILES:
    if (source / name).is_file():
      shutil.copy(source / name, target / name)


def _collection():
  collection = beir.load_beir(TINY_BEIR, split="test")
  judged = [q for q in collection.query_ids if q in collection.qrels]
  text_of = dict(zip(collection.query_ids, collection.queries))
  return collection, judged, [text_of[q] for q in judged]


def _config(**overrides):
  config = evaluate_config.get_config()
  with config.unlocked():
    config.data.path = str(TINY_BEIR)
    config.model.max_length = 64
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


def _mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


class ColbertCheckpointTest(absltest.TestCase):
  """colbert-ir's HF_ColBERT layout: BertModel + linear.weight [dim, hidden]."""

  DIM = 32

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    source, torch, transformers, cls.tmp = _setup(cls)
    cls.torch = torch
    cls.bert = transformers.BertModel.from_pretrained(source).eval()
    rng = np.random.default_rng(0)
    cls.w_dh = rng.normal(0, 0.05, (cls.DIM, 384)).astype(np.float32)
    cls.dir = cls.tmp / "colbert"
    cls.dir.mkdir()
    state = {
        "bert." + k: np.ascontiguousarray(v)
        for k, v in safetensors.numpy.load_file(
            source / "model.safetensors"
        ).items()
    }
    state["linear.weight"] = cls.w_dh
    safetensors.numpy.save_file(state, cls.dir / "model.safetensors")
    hf_config = json.loads((source / "config.json").read_text())
    hf_config["architectures"] = ["HF_ColBERT"]
    (cls.dir / "config.json").write_text(json.dumps(hf_config))
    (cls.dir / "artifact.metadata").write_text(
        json.dumps({"query_maxlen": 24, "doc_maxlen": 180, "dim": cls.DIM})
    )
    _copy_tokenizer(source, cls.dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _reference(self, ids_bl, mask_bl):
    """normalize(BERT last hidden state @ W^T), torch float32 [B, L, dim]."""
    torch = self.torch
    with torch.no_grad():
      h_blh = self.bert(
          input_ids=torch.from_numpy(np.asarray(ids_bl)).long(),
          attention_mask=torch.from_numpy(np.asarray(mask_bl)).long(),
          token_type_ids=torch.zeros(np.shape(ids_bl), dtype=torch.long),
      ).last_hidden_state.numpy()
    e_bld = h_blh @ self.w_dh.T
    return e_bld / np.linalg.norm(e_bld, axis=-1, keepdims=True)

  def test_token_vectors_match_torch(self):
    model, tokenizer, run_cfg, step = kinds.load_run(
        self.dir, _mesh(), kinds=("colbert",)
    )
    self.assertEqual(step, 0)
    self.assertEqual(run_cfg["model"]["colbert_dim"], self.DIM)
    self.assertEqual(run_cfg["data"]["query_max_length"], 24)
    np.testing.assert_array_equal(np.asarray(model.linear_hd[...]), self.w_dh.T)
    collection, _, queries = _collection()
    docs = collection.doc_texts()
    encoder = encoding.MultiVectorEncoder.from_model(
        model, tokenizer, _mesh(), query_maxlen=24, doc_maxlen=64
    )
    docs_nld, masks_nl = encoder.embed_docs(
        docs, dtype=np.float32, progress=False
    )
    ids, attention, score = features.pad_docs(
        tokenizer,
        features.doc_rows(tokenizer, docs, 64),
        width=docs_nld.shape[1],
        mask_punctuation=True,
    )
    np.testing.assert_array_equal(score, masks_nl)
    expected = self._reference(ids, attention)
    scored = masks_nl.astype(bool)
    diff_d = np.abs(docs_nld[scored] - expected[scored]).max()
    # Queries: [Q] marker, [MASK] augmentation (scored, not attended).
    q_qld, q_mask_ql = encoder.embed_queries(queries, dtype=np.float32)
    ids, attention, score = features.pad_queries(
        tokenizer, features.query_rows(tokenizer, queries, 24), 24, True
    )
    expected = self._reference(ids, attention)
    scored = q_mask_ql.astype(bool)
    self.assertGreater(int((scored & (attention == 0)).sum()), 0)
    diff_q = np.abs(q_qld[scored] - expected[scored]).max()
    print(f"ColBERT parity: max |diff| docs {diff_d:.2e}, queries {diff_q:.2e}")
    self.assertLessEqual(diff_d, ATOL)
    self.assertLessEqual(diff_q, ATOL)

  def test_colbert_dim_mismatch_is_an_error(self):
    loaded = pretrained.load_pretrained(self.dir)
    model_cfg = {"colbert_dim": 128}
    import ml_collections  # pylint: disable=g-import-not-at-top

    with self.assertRaisesRegex(ValueError, "projects to 32"):
      kinds.KINDS["colbert"].build(
          ml_collections.ConfigDict(model_cfg), loaded, None
      )

  def test_evaluate_reranks_with_the_checkpoint(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    config = _config()
    with config.unlocked():
      config.retriever.kind = "colbert"
      config.retriever.colbert_workdir = str(self.dir)
      config.retriever.rerank_depth = 8
    metrics = evaluate.evaluate(config, workdir)
    stats = json.loads((workdir / "stats.json").read_text())
    self.assertEqual(stats["checkpoint_step"], 0)
    self.assertIn("ndcg@10", metrics)


class CrossEncoderCheckpointTest(absltest.TestCase):
  """BertForSequenceClassification: pooler + classifier are kept."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    source, torch, transformers, cls.tmp = _setup(cls)
    cls.torch, cls.transformers = torch, transformers
    encoder_state = transformers.BertModel.from_pretrained(source).state_dict()
    cls.models, cls.dirs = {}, {}
    for num_labels in (1, 2):
      hf_config = transformers.BertConfig.from_pretrained(source)
      hf_config.num_labels = num_labels
      model = transformers.BertForSequenceClassification(hf_config)
      model.bert.load_state_dict(encoder_state)
      with torch.no_grad():
        # Random pooler and classifier far from identity / zero, so a
        # dropped or transposed one shows; logits of a few units, as a
        # re-ranker's (float32 agreement is relative: ~3e-6 of the logit).
        model.bert.pooler.dense.weight.normal_(0, 0.1)
        model.bert.pooler.dense.bias.normal_(0, 0.1)
        model.classifier.weight.normal_(0, 0.1)
        model.classifier.bias.normal_(0, 0.5)
      model.eval()
      path = cls.tmp / f"ce{num_labels}"
      model.save_pretrained(path)
      _copy_tokenizer(source, path)
      cls.models[num_labels], cls.dirs[num_labels] = model, path
    _, _, cls.queries = _collection()
    cls.docs = beir.load_beir(TINY_BEIR, split="test").doc_texts()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _torch_logits(self, num_labels, queries, docs):
    tokenizer = self.transformers.AutoTokenizer.from_pretrained(
        self.dirs[num_labels]
    )
    batch = tokenizer(
        queries, docs, padding=True, truncation=True, return_tensors="pt"
    )
    with self.torch.no_grad():
      return self.models[num_labels](**batch).logits.numpy()

  def _ours(self, num_labels):
    model, tokenizer, run_cfg, step = kinds.load_run(
        self.dirs[num_labels], _mesh(), kinds=("cross_encoder",)
    )
    self.assertEqual(step, 0)
    self.assertTrue(model.pooler)
    scorer = encoding.PairScorer(
        model,
        tokenizer,
        self.queries,
        self.docs,
        max_length=run_cfg["data"]["pair_max_length"],
        batch_size=8,
        mesh=_mesh(),
    )
    q, n = len(self.queries), len(self.docs)
    return scorer(np.arange(q), np.tile(np.arange(n), (q, 1))).reshape(-1)

  def _pairs(self):
    return (
        [q for q in self.queries for _ in self.docs],
        [d for _ in self.queries for d in self.docs],
    )

  def test_scores_equal_torch_logits(self):
    ours = self._ours(1)
    logits = self._torch_logits(1, *self._pairs())[:, 0]
    diff = np.abs(ours - logits).max()
    print(
        f"cross-encoder parity (1 label): max |diff| {diff:.2e} over "
        f"{len(ours)} pairs, logits in [{logits.min():.2f}, {logits.max():.2f}]"
    )
    self.assertLessEqual(diff, ATOL)

  def test_two_labels_score_the_log_odds(self):
    ours = self._ours(2)
    logits = self._torch_logits(2, *self._pairs())
    diff = np.abs(ours - (logits[:, 1] - logits[:, 0])).max()
    print(f"cross-encoder parity (2 labels, logit1 - logit0): {diff:.2e}")
    self.assertLessEqual(diff, ATOL)

  def test_sentence_transformers_cross_encoder_agrees(self):
    try:
      from sentence_transformers import CrossEncoder  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      self.skipTest(str(e))
    st = CrossEncoder(str(self.dirs[1]), device="cpu")
    pairs = list(zip(*self._pairs()))
    theirs = st.predict(pairs, activation_fn=self.torch.nn.Identity())
    np.testing.assert_allclose(self._ours(1), theirs, atol=ATOL, rtol=0)

  def test_evaluate_reranks_with_the_checkpoint(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    config = _config()
    with config.unlocked():
      config.retriever.kind = "rerank"
      config.retriever.rerank_workdir = str(self.dirs[1])
      # all-MiniLM-L6-v2's ranking: every document is a candidate.
      config.retriever.first_stage = "dense"
    evaluate.evaluate(config, workdir)
    run = trec_run.read_run(workdir / "run.trec")
    collection, judged, queries = _collection()
    doc_text = dict(zip(collection.doc_ids, collection.doc_texts()))
    pairs = [(q, d) for q in judged for d in run[q]]
    logits = self._torch_logits(
        1,
        [queries[judged.index(q)] for q, _ in pairs],
        [doc_text[d] for _, d in pairs],
    )[:, 0]
    ours = np.asarray([run[q][d] for q, d in pairs])
    self.assertLen(pairs, len(judged) * len(collection.doc_ids))
    np.testing.assert_allclose(ours, logits, atol=ATOL, rtol=0)


class SpladeCheckpointTest(absltest.TestCase):
  """A BertForMaskedLM directory evaluated zero-shot as SPLADE."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    source, torch, transformers, cls.tmp = _setup(cls)
    cls.torch, cls.transformers = torch, transformers
    hf_config = transformers.BertConfig.from_pretrained(source)
    model = transformers.BertForMaskedLM(hf_config)
    encoder_state = transformers.BertModel.from_pretrained(source).state_dict()
    missing, unexpected = model.bert.load_state_dict(
        encoder_state, strict=False
    )
    assert not missing and all(k.startswith("pooler.") for k in unexpected)
    head = model.cls.predictions
    with torch.no_grad():
      # A random but valid MLM head; bias -4 keeps ~1e2-1e3 active terms.
      head.transform.dense.weight.normal_(0, 0.05)
      head.transform.dense.bias.normal_(0, 0.1)
      head.transform.LayerNorm.weight.normal_(1, 0.1)
      head.transform.LayerNorm.bias.normal_(0, 0.1)
      head.bias.normal_(-4, 0.5)
      # Active special-token columns ([PAD], [CLS], [SEP]): a trained run
      # zeroes them, a published checkpoint must not.
      head.bias[[0, 101, 102]] = 4.0
    model.eval()
    # The decoder stays tied to the word table, as in BERT.
    assert head.decoder.weight.data_ptr() == (
        model.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    cls.model = model
    cls.dir = cls.tmp / "splade"
    model.save_pretrained(cls.dir)
    _copy_tokenizer(source, cls.dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _reference(self, texts, max_length):
    """max_l log(1 + ReLU(logits)) over real tokens: float32 [B, V]."""
    tokenizer = self.transformers.AutoTokenizer.from_pretrained(self.dir)
    batch = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    torch = self.torch
    with torch.no_grad():
      logits_blv = self.model(**batch).logits
      w_blv = torch.log1p(torch.relu(logits_blv))
      w_blv = w_blv * batch["attention_mask"].unsqueeze(-1)
      return w_blv.max(dim=1).values.numpy()

  def test_zero_shot_evaluate_matches_torch(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    config = _config(**{"model.pretrained": str(self.dir)})
    with config.unlocked():
      config.retriever.kind = "splade"
    metrics = evaluate.evaluate(config, workdir)
    self.assertIn("ndcg@10", metrics)
    collection, _, queries = _collection()
    docs = collection.doc_texts()
    ours_q = (
        scipy.sparse.load_npz(workdir / "queries_sparse.npz")
        .toarray()
        .astype(np.float32)
    )
    index = sparse_index.load(
        (workdir / "sparse_index_path.txt").read_text().strip()
    )
    ours_d = index.docs_nv.toarray()
    expected_q = self._reference(queries, 64)
    expected_d = self._reference(docs, 64)
    diff_q = np.abs(ours_q - expected_q).max()
    diff_d = np.abs(ours_d - expected_d).max()
    terms = (expected_d > 0).sum(1)
    print(
        f"SPLADE parity: max |diff| queries {diff_q:.2e}, docs {diff_d:.2e};"
        f" {terms.min()}-{terms.max()} terms per doc"
    )
    self.assertLessEqual(diff_q, ATOL)
    self.assertLessEqual(diff_d, ATOL)
    # Every column compared, the special tokens' too (active here).
    self.assertGreater(float(expected_d[:, [0, 101, 102]].min()), 0.1)
    self.assertGreater(terms.min(), 10)
    stats = json.loads((workdir / "stats.json").read_text())
    self.assertEqual(stats["checkpoint_step"], 0)

  def test_checkpoint_in_the_run_key_and_a_headless_model(self):
    # The run key takes the checkpoint too; the cache is keyed by it.
    loaded = kinds.load_run(self.dir, _mesh(), kinds=("splade",))
    self.assertEqual(loaded[2]["model"]["splade_zero_special_ids"], False)
    # all-MiniLM-L6-v2 has no MLM head: no zero-shot SPLADE from it.
    config = _config()
    with config.unlocked():
      config.retriever.kind = "splade"
    with self.assertRaisesRegex(errors.ConfigError, "no MLM head"):
      evaluate.evaluate(config, self.create_tempdir().full_path)
    with self.assertRaisesRegex(ValueError, "no MLM head"):
      kinds.load_checkpoint(pretrained.DEFAULT_MODEL, "splade")


if __name__ == "__main__":
  absltest.main()
