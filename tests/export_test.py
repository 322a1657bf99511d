"""Tests for the serving export (`retrieval_jax.export`, `.serving`).

all-MiniLM-L6-v2 is exported and loaded in a separate process that must not
import Flax, Optax, Orbax or TensorFlow; its embeddings must match the
training-time `TextEncoder` at each tower's own max length. A tiny random
encoder covers untied towers, the fixed-length fallback, lowering
platforms (cpu + cuda from a CPU host), overwrite refusal and the loader's
checks, and a tiny BPE tokenizer the HF fallback.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np
import safetensors.numpy
import tokenizers as hf_tokenizers
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from configs import train as train_config
from retrieval_jax import encoding
from retrieval_jax import errors
from retrieval_jax import export
from retrieval_jax import pretrained
from retrieval_jax import serving
from retrieval_jax import sharding
from retrieval_jax import steps
from retrieval_jax.data import tokenizers
from retrieval_jax.models import transformer_encoder as te

_REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_ABS_DIFF = 1e-5
QUERY_MAX_LENGTH = 16
PASSAGE_MAX_LENGTH = 128

_LONG_TEXT = " ".join(
    f"Sentence {i} says that retrieval models embed queries and passages "
    "into one vector space."
    for i in range(40)
)
TEXTS = [
    "what is the capital of france?",
    "how do vaccines train the immune system",
    "Paris is the capital and most populous city of France.",
    "Vaccines expose the immune system to a harmless antigen.",
    "BM25 ranks documents by term frequency and inverse document frequency.",
    "Naïve café owners in Zürich serve crème brûlée.",
    "東京は日本の首都です。",
    "",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Dense retrieval encodes queries and passages with two towers.",
    "Mean pooling averages the token states of real tokens only.",
    "HELLO World!!! [SEP] inside a text",
    "tab\tseparated\nand new lines",
    "numbers 3.14159 and 2,718 and 1e-5",
    "The mitochondria is the powerhouse of the cell.",
    "Why is the sky blue?",
    "Rayleigh scattering makes short wavelengths scatter more.",
    _LONG_TEXT,
]
_LONG = TEXTS.index(_LONG_TEXT)

# Loads the export with the serving module alone and embeds TEXTS with both
# towers; run in a fresh interpreter so its imports are its own.
_SERVING_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from retrieval_jax import serving

    export_dir, texts_path, out_path = sys.argv[1:]
    texts = json.loads(open(texts_path).read())
    model = serving.ServingModel.load(export_dir)
    query_nd = model.encode_queries(texts)
    passage_nd = model.encode_passages(texts)
    training_code = sorted(
        m for m in sys.modules
        if m.split(".")[0] in ("flax", "optax", "orbax", "tensorflow"))
    assert not training_code, training_code
    np.savez(out_path, query=query_nd, passage=passage_nd,
             query_lengths=[len(x) for x in model.tokenize("query", texts)],
             passage_lengths=[len(x) for x in model.tokenize("passage", texts)])
    print("no training code")
""")


class ExportPretrainedTest(absltest.TestCase):
  """all-MiniLM-L6-v2: exported towers against the TextEncoder."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))
    cls.tmp = pathlib.Path(absltest.get_default_test_tmpdir()) / "minilm"
    shutil.rmtree(cls.tmp, ignore_errors=True)
    cls.export_dir = cls.tmp / "export"
    cls.model = pretrained.load_pretrained(pretrained.DEFAULT_MODEL)
    cls.manifest = export.export_pretrained(
        cls.model,
        cls.export_dir,
        query_max_length=QUERY_MAX_LENGTH,
        passage_max_length=PASSAGE_MAX_LENGTH,
    )
    texts_path = cls.tmp / "texts.json"
    texts_path.write_text(json.dumps(TEXTS))
    out_path = cls.tmp / "serving.npz"
    env = dict(os.environ, PYTHONPATH=str(_REPO))
    # The serving process runs while this one computes the reference.
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SERVING_SCRIPT,
            str(cls.export_dir),
            str(texts_path),
            str(out_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
      encoder = encoding.TextEncoder.from_model(
          cls.model,
          sharding.make_mesh(devices=jax.devices()[:1]),
          max_length=PASSAGE_MAX_LENGTH,
      )
      # Each tower's texts truncated as TextEncoder(max_length=...) does,
      # then all padded to one width: one compile serves both towers.
      cls.reference = {
          tower: encoder.encode_ids(
              [encoder.tokenizer.encode(t, max_length) for t in TEXTS],
              pad_multiple=PASSAGE_MAX_LENGTH,
              progress=False,
          )
          for tower, max_length in (
              ("query", QUERY_MAX_LENGTH),
              ("passage", PASSAGE_MAX_LENGTH),
          )
      }
      cls.stdout, cls.stderr = process.communicate(timeout=300)
    finally:
      if process.poll() is None:
        process.kill()
    cls.returncode = process.returncode
    cls.served = dict(np.load(out_path)) if cls.returncode == 0 else None

  def setUp(self):
    super().setUp()
    self.assertEqual(self.returncode, 0, msg=self.stderr[-3000:])

  def test_serving_process_loads_no_training_code(self):
    self.assertIn("no training code", self.stdout)

  def test_embeddings_match_text_encoder(self):
    for tower in ("query", "passage"):
      served, reference = self.served[tower], self.reference[tower]
      self.assertEqual(served.shape, (len(TEXTS), 384))
      self.assertEqual(served.dtype, np.float32)
      diff = float(np.abs(served - reference).max())
      print(f"{tower} tower: max |exported - TextEncoder| = {diff:.2e}")
      self.assertLess(diff, MAX_ABS_DIFF, msg=tower)
      np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)

  def test_towers_truncate_at_their_stored_lengths(self):
    self.assertEqual(self.served["query_lengths"][_LONG], QUERY_MAX_LENGTH)
    self.assertEqual(self.served["passage_lengths"][_LONG], PASSAGE_MAX_LENGTH)
    self.assertLessEqual(self.served["query_lengths"].max(), QUERY_MAX_LENGTH)
    short = self.served["passage_lengths"] <= QUERY_MAX_LENGTH
    self.assertGreater(short.sum(), 10)
    # Tied towers: texts that fit both budgets embed alike, the long one
    # not, because the query tower saw only its first 16 tokens.
    np.testing.assert_allclose(
        self.served["query"][short], self.served["passage"][short], atol=1e-5
    )
    self.assertGreater(
        np.abs(
            self.served["query"][_LONG] - self.served["passage"][_LONG]
        ).max(),
        1e-2,
    )

  def test_manifest(self):
    written = json.loads((self.export_dir / "manifest.json").read_text())
    self.assertEqual(written, self.manifest)
    self.assertEqual(written["format"], serving.FORMAT)
    self.assertEqual(written["format_version"], serving.FORMAT_VERSION)
    self.assertEqual(written["jax_version"], jax.__version__)
    self.assertEqual(written["platforms"], ["cpu"])
    self.assertIn("created", written)
    self.assertEqual(
        written["metadata"],
        {
            "source": str(self.model.model_dir),
            "model_dir": str(self.model.model_dir),
            "compute_dtype": "float32",
        },
    )
    for tower, max_length in (
        ("query", QUERY_MAX_LENGTH),
        ("passage", PASSAGE_MAX_LENGTH),
    ):
      spec = written["towers"][tower]
      self.assertEqual(spec["file"], f"{tower}_tower.jax_exported")
      self.assertEqual(spec["params_file"], "params.safetensors")
      self.assertEqual(spec["max_length"], max_length)
      self.assertEqual(spec["length_mode"], "symbolic")
      self.assertEqual(spec["input_shape"], ["b", "l"])
      self.assertEqual((spec["pooling"], spec["normalize"]), ("mean", True))
      self.assertEqual((spec["embedding_dim"], spec["dtype"]), (384, "float32"))
    recipe = written["tokenizer"]
    self.assertEqual(
        recipe["max_lengths"],
        {"query": QUERY_MAX_LENGTH, "passage": PASSAGE_MAX_LENGTH},
    )
    self.assertEqual(
        recipe["special_token_ids"],
        {"cls": 101, "sep": 102, "pad": 0, "unk": 100, "mask": 103},
    )
    self.assertEqual(recipe["vocab_size"], 30522)
    files = [
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    self.assertEqual(recipe["files"], files)
    for name in files:
      self.assertEqual(
          (self.export_dir / "tokenizer" / name).read_bytes(),
          (self.model.model_dir / name).read_bytes(),
      )
    self.assertEqual(
        sorted(written["sha256"]),
        sorted(
            [
                "params.safetensors",
                "passage_tower.jax_exported",
                "query_tower.jax_exported",
            ]
            + [f"tokenizer/{n}" for n in files]
        ),
    )

  def test_weight_file_holds_the_checkpoint(self):
    keys = self.manifest["param_files"]["params.safetensors"]
    stored = safetensors.numpy.load_file(
        str(self.export_dir / "params.safetensors")
    )
    expected = {
        ".".join(map(str, path)): np.asarray(v[...])
        for path, v in nnx.to_flat_state(nnx.state(self.model.model, nnx.Param))
    }
    self.assertEqual(sorted(stored), sorted(expected))
    self.assertEqual(sorted(keys), sorted(expected))
    for key in keys:
      np.testing.assert_array_equal(stored[key], expected[key], err_msg=key)
    # Weights are arguments: the programs hold no copy of them.
    for tower in ("query", "passage"):
      size = (self.export_dir / f"{tower}_tower.jax_exported").stat().st_size
      self.assertLess(size, 1 << 20)


# A vocabulary small enough to write by hand; the towers below see only it.
_TINY_VOCAB = [
    "[PAD]",
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
    "red",
    "big",
]
_TINY_CONFIG = te.EncoderConfig(
    vocab_size=len(_TINY_VOCAB),
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=24,
)
_TINY_TEXTS = [
    "the cat sat on the mat.",
    "a dog",
    "Big red dogs ran far away",
    "the cat " * 20,
    "zebra",
    "mat",
]


def _tiny_model(seed: int) -> te.TransformerEncoder:
  """An encoder with random weights (LayerNorm gains near 1)."""
  abstract = nnx.eval_shape(
      lambda: te.TransformerEncoder(_TINY_CONFIG, rngs=nnx.Rngs(0))
  )
  rng = np.random.default_rng(seed)
  params = {}
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    scale = 0.2 if path[-1] == "scale_d" else 0.3
    params[path] = (path[-1] == "scale_d") + scale * rng.standard_normal(
        variable.shape
    )
  # "rbg" keys: threefry dropout streams take far longer to compile on CPU.
  return te.build_with_params(
      _TINY_CONFIG, params, seed=jax.random.key(seed, impl="rbg")
  )


class ExportTowersTest(absltest.TestCase):
  """export_towers on a tiny encoder with a hand-made tokenizer."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tokenizer_dir = pathlib.Path(absltest.get_default_test_tmpdir()) / (
        "tiny_tokenizer"
    )
    cls.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (cls.tokenizer_dir / "vocab.txt").write_text("\n".join(_TINY_VOCAB))
    cls.tokenizer = tokenizers.from_pretrained_dir(cls.tokenizer_dir)
    passage_model = _tiny_model(0)
    query_model = _tiny_model(1)
    cls.graphdef, cls.passage_state = nnx.split(passage_model)
    _, cls.query_state = nnx.split(query_model)
    # [CLS]-pooled, unnormalised states of the training-time step, for the
    # towers' max lengths (query 8, passage 24); one padded width, so one
    # compile.
    step = jax.jit(
        functools.partial(
            steps.encode_step, cls.graphdef, pooling="cls", normalize=False
        )
    )
    cls.query_reference = np.asarray(
        step(cls.query_state, cls.tokenizer(_TINY_TEXTS, 8, pad_to=24))
    )
    cls.passage_reference = np.asarray(
        step(cls.passage_state, cls.tokenizer(_TINY_TEXTS, 24, pad_to=24))
    )

  def _export(self, out_dir, **kwargs):
    args = dict(
        graphdef=self.graphdef,
        params=self.passage_state,
        tokenizer_dir=self.tokenizer_dir,
        pooling="cls",
        normalize=False,
        query_max_length=8,
        passage_max_length=24,
    )
    args.update(kwargs)
    return export.export_towers(out_dir, **args)

  def test_untied_towers_match_their_encoders(self):
    out_dir = pathlib.Path(self.create_tempdir().full_path) / "untied"
    manifest = self._export(out_dir, query_params=self.query_state)
    self.assertEqual(
        manifest["towers"]["query"]["params_file"], "query_params.safetensors"
    )
    self.assertEqual(
        manifest["towers"]["passage"]["params_file"], "params.safetensors"
    )
    self.assertEqual(
        sorted(manifest["param_files"]),
        ["params.safetensors", "query_params.safetensors"],
    )
    model = serving.ServingModel.load(out_dir)
    # Two batches of 3 rows, both 8 wide (one compile); results come back
    # in input order.
    query_nd = model.encode_queries(_TINY_TEXTS, batch_size=3)
    passage_nd = model.encode_passages(_TINY_TEXTS)
    np.testing.assert_allclose(
        query_nd, self.query_reference, atol=MAX_ABS_DIFF, rtol=0
    )
    np.testing.assert_allclose(
        passage_nd, self.passage_reference, atol=MAX_ABS_DIFF, rtol=0
    )
    self.assertGreater(np.abs(query_nd - passage_nd).min(), 0)
    self.assertEqual(model.encode_queries([]).shape, (0, 32))

  def test_hf_fallback_tokenizer_round_trip(self):
    # A hand-made BPE with RoBERTa's template, within the encoder's 20 ids.
    vocab = [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        "<mask>",
        "t",
        "h",
        "e",
        "c",
        "a",
        "s",
        "o",
        "n",
        "m",
        ".",
        "th",
        "the",
        "at",
        "on",
    ]
    bpe = hf_tokenizers.Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(vocab)},
            [("t", "h"), ("th", "e"), ("a", "t"), ("o", "n")],
            unk_token="<unk>",
        )
    )
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer_dir = pathlib.Path(self.create_tempdir().full_path)
    bpe.save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {"pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
        )
    )
    tokenizer = tokenizers.from_pretrained_dir(tokenizer_dir)
    self.assertIsInstance(tokenizer, tokenizers.HFTokenizer)
    out_dir = pathlib.Path(self.create_tempdir().full_path) / "bpe"
    self._export(out_dir, tokenizer_dir=tokenizer_dir)
    model = serving.ServingModel.load(out_dir)
    self.assertEqual(
        model.tokenize("passage", _TINY_TEXTS),
        [tokenizer.encode(t, 24) for t in _TINY_TEXTS],
    )
    self.assertEqual(
        model.tokenize("passage", ["the cat"])[0], [0, 16, 8, 17, 2]
    )
    step = jax.jit(
        functools.partial(
            steps.encode_step, self.graphdef, pooling="cls", normalize=False
        )
    )
    reference = np.asarray(
        step(self.passage_state, tokenizer(_TINY_TEXTS, 24, pad_to=24))
    )
    np.testing.assert_allclose(
        model.encode_passages(_TINY_TEXTS), reference, atol=MAX_ABS_DIFF, rtol=0
    )

  def test_fixed_length_export_pads_to_max_length(self):
    out_dir = pathlib.Path(self.create_tempdir().full_path) / "fixed"
    manifest = self._export(out_dir, symbolic_length=False)
    for tower, max_length in (("query", 8), ("passage", 24)):
      self.assertEqual(manifest["towers"][tower]["length_mode"], "fixed")
      self.assertEqual(
          manifest["towers"][tower]["input_shape"], ["b", max_length]
      )
    model = serving.ServingModel.load(out_dir)
    np.testing.assert_allclose(
        model.encode_passages(_TINY_TEXTS),
        self.passage_reference,
        atol=MAX_ABS_DIFF,
        rtol=0,
    )

  def test_inputs_longer_than_the_tower_are_refused(self):
    out_dir = pathlib.Path(self.create_tempdir().full_path) / "export"
    self._export(out_dir)
    model = serving.ServingModel.load(out_dir)
    with self.assertRaisesRegex(ValueError, "1 to 8 ids"):
      model.encode_ids("query", [[2] + [5] * 8 + [3]])
    # The program itself carries the bound l <= 8.
    exported = jax.export.deserialize(
        bytearray((out_dir / "query_tower.jax_exported").read_bytes())
    )
    manifest = json.loads((out_dir / "manifest.json").read_text())
    weights = safetensors.numpy.load_file(out_dir / "params.safetensors")
    params = [weights[k] for k in manifest["param_files"]["params.safetensors"]]
    ids_bl = np.full((1, 9), 5, np.int32)
    with self.assertRaises(ValueError):
      exported.call(params, ids_bl, np.ones_like(ids_bl))

  def test_refuses_to_overwrite_unless_asked(self):
    parent = pathlib.Path(self.create_tempdir().full_path)
    out_dir = parent / "export"
    first = self._export(out_dir)
    with self.assertRaises(FileExistsError):
      self._export(out_dir)
    self.assertEqual(json.loads((out_dir / "manifest.json").read_text()), first)
    other = parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with self.assertRaises(FileExistsError):
      self._export(other)
    self.assertEqual(sorted(p.name for p in other.iterdir()), ["notes.txt"])
    # An empty directory is fine; overwrite=True replaces an old export.
    empty = parent / "empty"
    empty.mkdir()
    self._export(empty)
    second = self._export(out_dir, overwrite=True, query_max_length=12)
    self.assertEqual(second["towers"]["query"]["max_length"], 12)
    self.assertEqual(
        json.loads((out_dir / "manifest.json").read_text()), second
    )
    # A failed export leaves neither a directory nor temporary files.
    with self.assertRaisesRegex(ValueError, "outside 2..24"):
      self._export(parent / "too_long", passage_max_length=25)
    self.assertEqual(
        sorted(p.name for p in parent.iterdir()), ["empty", "export", "other"]
    )

  def test_platforms_default_to_the_host_backend_then_cpu(self):
    self.assertEqual(train_config.get_config().export.platforms, ())
    host = jax.export.default_export_platform()
    self.assertEqual(
        export.resolve_platforms(), tuple(dict.fromkeys((host, "cpu")))
    )
    if host == "cpu":
      self.assertEqual(export.resolve_platforms(()), ("cpu",))
    self.assertEqual(
        export.resolve_platforms(["cuda", "cpu", "cuda"]), ("cuda", "cpu")
    )
    for bad in (["gpu"], ["cpu", "CUDA"], ["metal"]):
      with self.assertRaisesRegex(
          errors.ConfigError, r"config.export.platforms=.*unknown platform"
      ):
        export.resolve_platforms(bad)

  def test_cpu_and_cuda_export_serializes_and_serves_on_cpu(self):
    # jax.export lowers for CUDA on a CPU-only host (no GPU needed).
    out_dir = pathlib.Path(self.create_tempdir().full_path) / "multi"
    manifest = self._export(out_dir, platforms=("cpu", "cuda"))
    self.assertEqual(manifest["platforms"], ["cpu", "cuda"])
    for tower in ("query", "passage"):
      exported = jax.export.deserialize(
          bytearray((out_dir / f"{tower}_tower.jax_exported").read_bytes())
      )
      self.assertEqual(exported.platforms, ("cpu", "cuda"))
    model = serving.ServingModel.load(out_dir)
    self.assertEqual(model.device.platform, "cpu")
    np.testing.assert_allclose(
        model.encode_passages(_TINY_TEXTS),
        self.passage_reference,
        atol=MAX_ABS_DIFF,
        rtol=0,
    )

  def test_loader_rejects_modified_files(self):
    out_dir = pathlib.Path(self.create_tempdir().full_path) / "export"
    self._export(out_dir)
    with open(out_dir / "tokenizer" / "vocab.txt", "a") as f:
      f.write("\nextra")
    with self.assertRaisesRegex(ValueError, "SHA-256"):
      serving.ServingModel.load(out_dir)
    # Without checksums, the recipe check still sees the bigger vocabulary.
    with self.assertRaisesRegex(ValueError, "does not match its recipe"):
      serving.ServingModel.load(out_dir, verify_checksums=False)


if __name__ == "__main__":
  absltest.main()
