"""The evaluate and encode modes refuse bad config values before any work.

Each case must raise ConfigError naming the key, with the model never loaded
(`make_encoder` patched to fail) and the workdir never created.
"""

import pathlib
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from configs import evaluate as evaluate_config
from retrieval_jax import errors
from retrieval_jax import evaluate

CASES = (
    ("search.top_k", 0, "evaluate"),
    ("search.metric", "l2", "evaluate"),
    ("search.chunk_size", -1, "evaluate"),
    ("encode.batch_size", 0, "encode"),
    ("encode.batch_size", 0, "evaluate"),
    ("encode.pad_multiple", 0, "evaluate"),
    ("model.max_length", 0, "encode"),
    ("data.on_unknown", "shout", "evaluate"),
    ("data.max_queries", -1, "evaluate"),
    ("eval.measures", ("ndcg@10", "nope"), "evaluate"),
    ("eval.measures", (), "evaluate"),
    ("mesh.shape", (3, 1, 1), "evaluate"),
    ("mesh.shape", (1, 1), "encode"),
    ("model.architecture", "nope", "evaluate"),
    ("model.architecture", "m2", "encode"),
    ("model.dtype", "float16", "evaluate"),
    ("model.pooling", "max", "encode"),
)


class ConfigValidationTest(parameterized.TestCase):

  @parameterized.parameters(*CASES)
  def test_bad_value_names_the_key_before_any_work(self, key, value, mode):
    config = evaluate_config.get_config("smoke")
    section, name = key.split(".")
    with config.unlocked():
      config[section][name] = value
    workdir = pathlib.Path(self.create_tempdir().full_path) / "never"
    run = evaluate.evaluate if mode == "evaluate" else evaluate.encode
    with mock.patch.object(
        evaluate, "make_encoder", side_effect=AssertionError("work started")
    ):
      with self.assertRaisesRegex(errors.ConfigError, f"^config.{key}="):
        run(config, workdir)
    self.assertFalse(workdir.exists())


if __name__ == "__main__":
  absltest.main()
