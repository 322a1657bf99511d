"""Every error the library raises on purpose is a ConfigError or DataError."""

from absl.testing import absltest

from retrieval_jax import errors
from retrieval_jax import optimizers
from retrieval_jax.data import beir
from retrieval_jax.evaluation import retrievers


class ErrorsTest(absltest.TestCase):

  def test_project_errors_share_the_two_bases(self):
    self.assertTrue(
        issubclass(optimizers.OptimizerConfigError, errors.ConfigError)
    )
    self.assertTrue(issubclass(retrievers.RetrieverError, errors.ConfigError))
    self.assertTrue(issubclass(beir.BeirFormatError, errors.DataError))

  def test_data_error_names_file_and_line(self):
    e = beir.BeirFormatError("/d/corpus.jsonl", 7, 'missing "_id"')
    self.assertEqual(str(e), '/d/corpus.jsonl:7: missing "_id"')
    self.assertEqual((e.path, e.line), ("/d/corpus.jsonl", 7))
    whole = errors.DataError("/d/qrels/test.tsv", None, "does not exist")
    self.assertEqual(str(whole), "/d/qrels/test.tsv: does not exist")


if __name__ == "__main__":
  absltest.main()
