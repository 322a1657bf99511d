"""Serving exports of every retriever kind (`Kind.serving_towers`).

Each exported program is deserialized and called on featurised texts; its
outputs must equal the in-process encoders the evaluate mode uses
(`encoding.TextEncoder`, `SparseEncoder`, `MultiVectorEncoder`,
`PairScorer`, `features.inference_free_query`) within `TOLERANCE`. Tiny
random models cover every kind and option in seconds; the slow test trains
2-step smoke runs of every kind and exports them through `--mode=export`.
"""

import json
import pathlib
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from configs import train as train_config
from retrieval_jax import encoding
from retrieval_jax import export
from retrieval_jax import kinds
from retrieval_jax import serving
from retrieval_jax import sharding
from retrieval_jax.data import features
from retrieval_jax.data import tokenizers
from retrieval_jax.kinds import splade as splade_kind
from retrieval_jax.models import colbert as colbert_model
from retrieval_jax.models import cross_encoder as cross_encoder_model
from retrieval_jax.models import splade as splade_model
from retrieval_jax.models import transformer_encoder as te
import test_util

TOLERANCE = 1e-6

# Markers ([unused0/1]), [MASK] and punctuation: every kind's layout.
_VOCAB = [
    "[PAD]",
    "[unused0]",
    "[unused1]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "far",
    "away",
    "a",
    "##s",
    ".",
    ",",
    "?",
    "red",
    "big",
    "who",
]
_CONFIG = te.EncoderConfig(
    vocab_size=len(_VOCAB),
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=24,
)
_TEXTS = [
    "the cat sat on the mat.",
    "a dog?",
    "Big red dogs ran far away, the cat sat",
    "the cat " * 20,
    "zebra",
    "who ran?",
]
_CORPUS = ["the cat sat on the mat.", "a dog ran far away.", "the red dog"]


def _encoder(seed: int) -> te.TransformerEncoder:
  """A tiny encoder with random weights (LayerNorm gains near 1)."""
  abstract = nnx.eval_shape(
      lambda: te.TransformerEncoder(_CONFIG, rngs=nnx.Rngs(0))
  )
  rng = np.random.default_rng(seed)
  params = {}
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    scale = 0.2 if path[-1] == "scale_d" else 0.3
    params[path] = (path[-1] == "scale_d") + scale * rng.standard_normal(
        variable.shape
    )
  return te.build_with_params(
      _CONFIG, params, seed=jax.random.key(seed, impl="rbg")
  )


def load_programs(export_dir: pathlib.Path) -> dict:
  """{tower: fn(*inputs) -> outputs} of an export, read as a server would:
  the manifest, the programs and their weight files, nothing else."""
  manifest = json.loads((export_dir / serving.MANIFEST_FILE).read_text())
  programs = {}
  for name, spec in manifest["towers"].items():
    exported = jax.export.deserialize(
        bytearray((export_dir / spec["file"]).read_bytes())
    )
    weights = safetensors.numpy.load_file(export_dir / spec["params_file"])
    flat = [weights[k] for k in manifest["param_files"][spec["params_file"]]]
    programs[name] = lambda *a, e=exported, w=flat: e.call(w, *a)
  return programs


def _diff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise AssertionError(f"shapes {a.shape} vs {b.shape}")
  return float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0


def check_parity(
    kind_name, model, tokenizer, run_cfg, export_cfg, out_dir, corpus
):
  """{output: max |exported - in-process|} over _TEXTS, and the manifest.

  The in-process side is the evaluate mode's encoder of the kind, on a
  one-device mesh; the exported side gets inputs from the featurisers.
  corpus: the texts of the inference-free idf.
  """
  manifest = json.loads((out_dir / serving.MANIFEST_FILE).read_text())
  programs = load_programs(out_dir)
  # Longest first and one batch: the encoders' own batches then hold the
  # rows in this order at this width, so both sides run the same shapes
  # (other shapes reorder float sums: ~1e-6 on values of ~5).
  texts = sorted(_TEXTS, key=lambda t: -len(tokenizer.tokenize_to_ids(t)))
  n = len(texts)
  towers = manifest["towers"]
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  diffs = {}
  if kind_name == "bi_encoder":
    encoder = encoding.TextEncoder(
        model,
        tokenizer,
        mesh,
        pooling=run_cfg["model"]["pooling"],
        normalize=run_cfg["model"]["normalize"],
        max_length=towers["passage"]["max_length"],
    )
    for name in ("query", "passage"):
      length = towers[name]["max_length"]
      ids = [tokenizer.encode(t, length) for t in texts]
      batch = tokenizer(texts, length)
      reference = encoder.encode_ids(
          ids, batch_size=n, pad_multiple=1, progress=False
      )
      served = programs[name](batch["input_ids"], batch["attention_mask"])
      diffs[name] = _diff(served, reference)
  elif kind_name in ("splade", "inference_free"):
    top_terms = int(export_cfg.get("top_terms", 0))
    for name in ("query", "passage"):
      length = towers[name]["max_length"]
      batch = tokenizer(texts, length)
      if kind_name == "inference_free" and name == "query":
        idf_v = features.idf_from_corpus(
            [tokenizer.tokenize_to_ids(t) for t in corpus],
            tokenizer.vocab_size,
        )
        reference = features.inference_free_query(
            [tokenizer.encode(t, length) for t in texts],
            vocab_size=tokenizer.vocab_size,
            idf_v=idf_v,
            special_ids=splade_kind.special_ids(tokenizer),
        )
      else:
        reference = (
            encoding.SparseEncoder.from_model(
                model, tokenizer, mesh, max_length=length
            )
            .encode(texts, batch_size=n, pad_multiple=1, progress=False)
            .toarray()
        )
      served = programs[name](batch["input_ids"], batch["attention_mask"])
      if not top_terms:
        diffs[name] = _diff(served, reference)
        continue
      ids_bk, weights_bk = map(np.asarray, served)
      rows = np.arange(n)[:, None]
      # The k largest weights, in order, at the ids that hold them.
      diffs[f"{name}/weights"] = _diff(
          weights_bk, -np.sort(-reference, axis=1)[:, :top_terms]
      )
      diffs[f"{name}/at_ids"] = _diff(weights_bk, reference[rows, ids_bk])
  elif kind_name == "colbert":
    encoder = encoding.MultiVectorEncoder.from_model(
        model,
        tokenizer,
        mesh,
        query_maxlen=run_cfg["data"]["query_max_length"],
        doc_maxlen=towers["passage"]["max_length"],
        augment=run_cfg["model"]["colbert_augment"],
    )
    q_emb, q_mask = encoder.embed_queries(texts, batch_size=n)
    ids, attention, _ = features.encode_queries(
        tokenizer,
        texts,
        query_maxlen=encoder.query_maxlen,
        augment=encoder.augment,
    )
    served = programs["query"](ids, attention)
    diffs["query"] = _diff(served[0], q_emb)
    diffs["query/mask"] = _diff(served[1], q_mask)
    d_emb, d_mask = encoder.embed_docs(
        texts, batch_size=n, dtype=np.float32, pad_multiple=1, progress=False
    )
    ids, attention, _ = features.encode_docs(
        tokenizer, texts, doc_maxlen=encoder.doc_maxlen
    )
    served = programs["passage"](ids, attention)
    diffs["passage"] = _diff(served[0], d_emb)
    diffs["passage/mask"] = _diff(served[1], d_mask)
  else:
    length = towers["pair"]["max_length"]
    queries, items = texts[:3], texts[3:]
    scorer = encoding.PairScorer(
        model,
        tokenizer,
        queries,
        items,
        max_length=length,
        batch_size=9,
        pad_to_multiple_of=1,
        mesh=mesh,
    )
    reference = scorer(np.arange(3), np.tile(np.arange(3), (3, 1)))
    pairs = features.encode_pairs(
        tokenizer,
        np.repeat(queries, 3).tolist(),
        items * 3,
        length,
        model.head,
        pad_to_multiple_of=None,
    )
    served = programs["pair"](*(pairs[k] for k in towers["pair"]["inputs"]))
    diffs["pair"] = _diff(served, reference.reshape(-1))
  return diffs, manifest


class ExportKindsTest(parameterized.TestCase):
  """Every kind's towers on tiny random models, exported and reloaded."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tokenizer_dir = pathlib.Path(absltest.get_default_test_tmpdir()) / (
        "kinds_tokenizer"
    )
    cls.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (cls.tokenizer_dir / "vocab.txt").write_text("\n".join(_VOCAB))
    cls.tokenizer = tokenizers.from_pretrained_dir(cls.tokenizer_dir)
    cls.exports = {}  # (kind, options) -> (diffs, manifest)

  def _model(self, kind_name, head="cls", pooler=False):
    rngs = nnx.Rngs(1)
    if kind_name == "bi_encoder":
      return _encoder(0)
    if kind_name in ("splade", "inference_free"):
      return splade_model.Splade(
          _encoder(0),
          special_ids=splade_kind.special_ids(self.tokenizer),
          rngs=rngs,
      )
    if kind_name == "colbert":
      return colbert_model.ColBERT(_encoder(0), 8, rngs=rngs)
    return cross_encoder_model.CrossEncoder(
        _encoder(0), head, rngs=rngs, pooler=pooler
    )

  def _exported(self, kind_name, head="cls", pooler=False, **options):
    """(diffs, manifest) of a tiny model of the kind, exported once."""
    key = (kind_name, head, pooler, tuple(sorted(options.items())))
    if key not in self.exports:
      model = self._model(kind_name, head, pooler)
      self.exports[key] = self._export(kind_name, model, **options)
    return self.exports[key]

  def _export(self, kind_name, model, *, augment=True, **export_options):
    run_cfg = {
        "model": {
            "pooling": "cls",
            "normalize": False,
            "colbert_augment": augment,
        },
        "data": {"query_max_length": 10, "pair_max_length": 20},
    }
    export_cfg = ml_collections.ConfigDict(
        dict(query_max_length=8, passage_max_length=16, top_terms=0)
    )
    export_cfg.update(export_options)
    towers = kinds.KINDS[kind_name].serving_towers(
        model,
        self.tokenizer,
        run_cfg,
        export_cfg,
        corpus_texts=lambda: _CORPUS,
    )
    out_dir = pathlib.Path(self.create_tempdir().full_path) / "export"
    export.export_programs(
        out_dir, towers, tokenizer_dir=self.tokenizer_dir, kind=kind_name
    )
    return check_parity(
        kind_name, model, self.tokenizer, run_cfg, export_cfg, out_dir, _CORPUS
    )

  @parameterized.named_parameters(
      ("bi_encoder", "bi_encoder", {}),
      ("splade", "splade", {}),
      ("splade_top_terms", "splade", {"top_terms": 5}),
      ("inference_free", "inference_free", {}),
      ("inference_free_top_terms", "inference_free", {"top_terms": 3}),
      ("colbert", "colbert", {}),
      ("colbert_no_augment", "colbert", {"augment": False}),
      ("cross_encoder_cls", "cross_encoder", {}),
      ("cross_encoder_pooler", "cross_encoder", {"pooler": True}),
      ("cross_encoder_emb", "cross_encoder", {"head": "emb"}),
  )
  def test_exported_programs_match_in_process_encoders(self, kind_name, opts):
    diffs, manifest = self._exported(kind_name, **opts)
    print(f"{kind_name} {opts}: max |exported - in-process| {diffs}")
    self.assertNotEmpty(diffs)
    for name, diff in diffs.items():
      self.assertLessEqual(diff, TOLERANCE, msg=name)
    self.assertEqual(manifest["kind"], kind_name)
    self.assertEqual(manifest["platforms"], ["cpu"])
    self.assertEqual(
        manifest["tokenizer"]["max_lengths"],
        {n: t["max_length"] for n, t in manifest["towers"].items()},
    )

  def test_layouts_in_the_manifest(self):
    _, manifest = self._exported("colbert")
    query, passage = manifest["towers"]["query"], manifest["towers"]["passage"]
    # Queries always fill to their width; passages are any length <= 16.
    self.assertEqual(
        (query["length_mode"], query["input_shape"]), ("fixed", ["b", 10])
    )
    self.assertEqual(passage["input_shape"], ["b", "l"])
    self.assertEqual(
        query["outputs"],
        [
            {"shape": ["b", 10, 8], "dtype": "float32"},
            {"shape": ["b", 10], "dtype": "int32"},
        ],
    )
    self.assertEqual(
        (query["marker_id"], query["fill_id"], passage["marker_id"]),
        (1, self.tokenizer.mask_id, 2),
    )
    self.assertEqual(
        sorted(passage["unscored_ids"]),
        [_VOCAB.index(c) for c in (".", ",", "?")],
    )
    # Inference-free: the query tower's one weight is the idf table.
    _, manifest = self._exported("inference_free")
    query = manifest["towers"]["query"]
    self.assertEqual(query["params_file"], "query_params.safetensors")
    self.assertEqual(
        manifest["param_files"]["query_params.safetensors"], ["idf_v"]
    )
    self.assertEqual(query["encoder"], "idf_bag")
    self.assertEqual(
        manifest["towers"]["passage"]["embedding_dim"], len(_VOCAB)
    )
    _, manifest = self._exported("cross_encoder", head="emb")
    pair = manifest["towers"]["pair"]
    self.assertEqual(
        pair["inputs"],
        ["input_ids", "attention_mask", "token_type_ids", "markers"],
    )
    self.assertEqual(pair["marker_ids"], [1, 2])
    self.assertEqual(pair["outputs"], [{"shape": ["b"], "dtype": "float32"}])

  def test_bad_top_terms_names_the_key(self):
    with self.assertRaisesRegex(ValueError, r"config.export.top_terms=-1"):
      self._export("splade", self._model("splade"), top_terms=-1)


def _train_command(kind_name: str, workdir: pathlib.Path) -> list[str]:
  variant = "smoke" if kind_name == "bi_encoder" else f"smoke,{kind_name}"
  return [
      sys.executable,
      "-m",
      "retrieval_jax.main",
      f"--config=configs/train.py:{variant}",
      f"--workdir={workdir}",
      "--config.train.num_steps=2",
      "--config.checkpoint.every_steps=2",
      "--config.train.eval_before=False",
      "--config.train.eval_after=False",
  ]


# The kinds whose exported towers `check_parity` compares with the evaluate
# mode's encoders.
PARITY_KINDS = (
    "bi_encoder",
    "cross_encoder",
    "splade",
    "inference_free",
    "colbert",
)


@pytest.mark.slow
class TrainedRunExportTest(absltest.TestCase):
  """2-step smoke runs of every kind, exported by the export mode (minutes)."""

  def test_export_mode_of_every_kind(self):
    root = pathlib.Path(self.create_tempdir().full_path)
    for kind_name in PARITY_KINDS:
      workdir = root / kind_name
      subprocess.run(
          _train_command(kind_name, workdir),
          cwd=test_util.REPO,
          env=test_util.subprocess_env(),
          check=True,
          capture_output=True,
          timeout=900,
      )
      config = train_config.get_config("smoke")
      with config.unlocked():
        config.export.passage_max_length = 48
      manifest = export.export_from_workdir(config, workdir)
      self.assertEqual(manifest["kind"], kind_name)
      self.assertEqual(manifest["metadata"]["step"], 2)
      # The default platforms on a CPU host.
      self.assertEqual(manifest["platforms"], ["cpu"])
      mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
      model, tokenizer, run_cfg, _ = kinds.load_run(workdir, mesh)
      diffs, _ = check_parity(
          kind_name,
          model,
          tokenizer,
          run_cfg,
          config.export,
          workdir / "export",
          export.idf_corpus_texts(config.export, run_cfg),
      )
      print(f"trained {kind_name}: max |exported - in-process| {diffs}")
      for name, diff in diffs.items():
        self.assertLessEqual(diff, TOLERANCE, msg=f"{kind_name} {name}")
      if kind_name == "bi_encoder":
        self._check_hf(config, workdir, model, tokenizer, run_cfg, mesh)

  def _check_hf(self, config, workdir, model, tokenizer, run_cfg, mesh):
    """The trained bi-encoder as a sentence-transformers directory."""
    import sentence_transformers  # pylint: disable=g-import-not-at-top

    with config.unlocked():
      config.export.format = "hf"
    summary = export.export_from_workdir(config, workdir)
    self.assertEqual(summary["dir"], str(workdir / "export_hf"))
    served = sentence_transformers.SentenceTransformer(
        summary["dir"], device="cpu"
    ).encode(_TEXTS, convert_to_numpy=True)
    ours = encoding.TextEncoder(
        model,
        tokenizer,
        mesh,
        pooling=run_cfg["model"]["pooling"],
        normalize=run_cfg["model"]["normalize"],
        max_length=summary["max_seq_length"],
    ).encode(_TEXTS, progress=False)
    cosine = np.sum(served * ours, 1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(ours, axis=1)
    )
    print(
        f"trained bi_encoder as hf: min cosine {cosine.min():.8f}, max "
        f"|diff| {np.abs(served - ours).max():.2e}"
    )
    self.assertGreaterEqual(cosine.min(), 0.99999)


if __name__ == "__main__":
  absltest.main()
