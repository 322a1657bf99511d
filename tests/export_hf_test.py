"""The Hugging Face / sentence-transformers export (`export.export_hf`).

all-MiniLM-L6-v2 with every weight perturbed (a stand-in for fine-tuning:
the original weights would pass by accident) is written as a
sentence-transformers directory, loaded by `SentenceTransformer`, and its
embeddings compared with the project's `TextEncoder` on the same weights.
Re-importing the directory with `pretrained.load_pretrained` gives the
weights back bitwise.
"""

import json
import pathlib

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np

from configs import train as train_config
from retrieval_jax import encoding
from retrieval_jax import errors
from retrieval_jax import export
from retrieval_jax import kinds
from retrieval_jax import pretrained
from retrieval_jax import sharding
from retrieval_jax.data import tokenizers
from retrieval_jax.models import transformer_encoder as te

MIN_COSINE = 0.99999
MAX_LENGTH = 64
TEXTS = [
    "what is the capital of france?",
    "Paris is the capital and most populous city of France.",
    "how do vaccines train the immune system",
    "Vaccines expose the immune system to a harmless antigen.",
    "Naïve café owners in Zürich serve crème brûlée.",
    "東京は日本の首都です。",
    "a",
    "HELLO World!!! [SEP] inside a text",
    "Why is the sky blue?",
    # Longer than MAX_LENGTH: both sides keep the head.
    " ".join(f"Sentence {i} is about dense retrieval." for i in range(30)),
]


def _params(model) -> dict:
  return {
      path: np.asarray(variable.get_value())
      for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


class ExportHfTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      import sentence_transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise absltest.SkipTest(f"needs sentence-transformers: {e}")
    try:
      cls.loaded = pretrained.load_pretrained(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))
    cls.st = sentence_transformers
    cls.original = _params(cls.loaded.model)
    rng = np.random.default_rng(0)
    # Relative noise of 2%: every tensor changes, the model stays sane.
    cls.tuned = {
        path: (
            (
                value + 0.02 * value.std() * rng.standard_normal(value.shape)
            ).astype(value.dtype)
        )
        for path, value in cls.original.items()
    }
    cls.model = te.build_with_params(cls.loaded.config, cls.tuned)
    cls.tokenizer = tokenizers.from_pretrained_dir(cls.loaded.model_dir)
    cls.mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cls.root = pathlib.Path(absltest.get_default_test_tmpdir()) / "hf"

  def _export(self, name, **kwargs):
    out_dir = self.root / name
    summary = export.export_hf(
        out_dir,
        model=self.model,
        template_dir=self.loaded.model_dir,
        max_length=MAX_LENGTH,
        overwrite=True,
        **kwargs,
    )
    return out_dir, summary

  def _project_embeddings(self, pooling, normalize):
    """TextEncoder embeddings of TEXTS: (fine-tuned, original weights)."""
    encoder = encoding.TextEncoder(
        self.model,
        self.tokenizer,
        self.mesh,
        pooling=pooling,
        normalize=normalize,
        max_length=MAX_LENGTH,
    )
    tuned = encoder.encode(TEXTS, progress=False)
    encoder.set_module(self.loaded.model)  # same graph: no recompile
    return tuned, encoder.encode(TEXTS, progress=False)

  def _check_sentence_transformers(self, out_dir, pooling, normalize):
    st_model = self.st.SentenceTransformer(str(out_dir), device="cpu")
    self.assertEqual(st_model.max_seq_length, MAX_LENGTH)
    self.assertEqual(
        st_model.similarity_fn_name, "cosine" if normalize else "dot"
    )
    served = st_model.encode(TEXTS, convert_to_numpy=True, batch_size=16)
    ours, original = self._project_embeddings(pooling, normalize)
    cosine = np.sum(served * ours, 1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(ours, axis=1)
    )
    diff = float(np.abs(served - ours).max())
    print(
        f"{pooling}/normalize={normalize}: sentence-transformers vs "
        f"TextEncoder: min cosine {cosine.min():.8f}, max |diff| {diff:.2e}"
    )
    self.assertGreaterEqual(cosine.min(), MIN_COSINE)
    # The fine-tuned weights were written, not the checkpoint's.
    self.assertGreater(float(np.abs(served - original).max()), 1e-3)
    return diff

  def test_mean_normalized_loads_in_sentence_transformers(self):
    out_dir, summary = self._export("mean", pooling="mean", normalize=True)
    self.assertEqual(summary["similarity_fn_name"], "cosine")
    modules = json.loads((out_dir / "modules.json").read_text())
    self.assertEqual(
        [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in modules],
        [
            ("", "Transformer"),
            ("1_Pooling", "Pooling"),
            ("2_Normalize", "Normalize"),
        ],
    )
    self.assertTrue((out_dir / "2_Normalize").is_dir())
    hf_config = json.loads((out_dir / "config.json").read_text())
    self.assertEqual(hf_config["architectures"], ["BertModel"])
    self.assertEqual(hf_config["dtype"], "float32")
    for name in tokenizers.FILES:
      self.assertEqual(
          (out_dir / name).read_bytes(),
          (self.loaded.model_dir / name).read_bytes(),
      )
    self._check_sentence_transformers(out_dir, "mean", True)

  def test_cls_unnormalized_is_a_dot_product_model(self):
    out_dir, summary = self._export("cls", pooling="cls", normalize=False)
    self.assertEqual(summary["similarity_fn_name"], "dot")
    pooling = json.loads((out_dir / "1_Pooling/config.json").read_text())
    self.assertTrue(pooling["pooling_mode_cls_token"])
    self.assertFalse(pooling["pooling_mode_mean_tokens"])
    modules = json.loads((out_dir / "modules.json").read_text())
    self.assertLen(modules, 2)
    self.assertFalse((out_dir / "2_Normalize").exists())
    self._check_sentence_transformers(out_dir, "cls", False)

  def test_round_trip_through_the_pretrained_loader_is_bitwise(self):
    out_dir, _ = self._export("round_trip", pooling="mean", normalize=True)
    back = pretrained.load_pretrained(out_dir)
    params = _params(back.model)
    self.assertEqual(sorted(params), sorted(self.tuned))
    for path, value in self.tuned.items():
      self.assertEqual(params[path].dtype, value.dtype, msg=path)
      np.testing.assert_array_equal(params[path], value, err_msg=str(path))
    self.assertEqual(back.config, self.loaded.config)
    self.assertEqual(
        (back.pooling, back.normalize, back.max_length),
        ("mean", True, MAX_LENGTH),
    )
    self.assertEqual(back.prompts.similarity, "cosine")
    # The unused pooler is the checkpoint's, so transformers loads a full
    # BertModel.
    state = pretrained.read_state_dict(out_dir)
    template = pretrained.read_state_dict(self.loaded.model_dir)
    np.testing.assert_array_equal(
        state["pooler.dense.weight"], template["pooler.dense.weight"]
    )
    self.assertNotIn("embeddings.position_ids", state)

  def test_refusals_name_the_config_key(self):
    bert = {"architecture": "bert", "pooling": "mean"}
    export.check_hf_exportable(kinds.KINDS["bi_encoder"], bert)
    cases = {
        (
            "splade",
            "bert",
            "mean",
        ): r"config.export.format='hf'.*'splade' run \(config.model.kind\)",
        (
            "bi_encoder",
            "m2",
            "mean",
        ): r"config.model.architecture='m2' has no Hugging Face",
        ("bi_encoder", "bert", "pooler"): r"config.model.pooling='pooler'",
    }
    for (kind, architecture, pooling), message in cases.items():
      with self.assertRaisesRegex(errors.ConfigError, message):
        export.check_hf_exportable(
            kinds.KINDS[kind],
            {"architecture": architecture, "pooling": pooling},
        )
    config = train_config.get_config("smoke")
    with config.unlocked():
      config.export.format = "onnx"
    with self.assertRaisesRegex(
        errors.ConfigError, r"config.export.format='onnx'"
    ):
      export.export_from_workdir(config, self.root / "no_run")
    with self.assertRaisesRegex(ValueError, "no Hugging Face"):
      export.export_hf(
          self.root / "m2",
          model=object(),
          template_dir=self.loaded.model_dir,
          pooling="mean",
          normalize=True,
          max_length=MAX_LENGTH,
      )


if __name__ == "__main__":
  absltest.main()
