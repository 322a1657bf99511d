"""TFDS builder preparing one table of a local BEIR directory as ArrayRecord.

Tables corpus and queries (split "full") and qrels (a split per qrels file),
parsed by beir.py in file order, for tfds.data_source / Grain. The library
reads with `beir.load_beir`: no TF import (~4 s; SciFact 0.05 s vs 0.3 s
here), and the run path must work without TF. Config names
`<collection>_<table>_<hash>` hash the sources, so caches never go stale.
"""

import dataclasses
import os
import re
import time

from absl import logging
import numpy as np

# TF must be imported with accelerators hidden before tfds imports it.
from retrieval_jax.data import tf_setup  # noqa: F401  # pylint: disable=unused-import
import tensorflow_datasets as tfds

from retrieval_jax import io
from retrieval_jax.data import beir

TABLES = ("corpus", "queries", "qrels")
FULL_SPLIT = "full"
DEFAULT_DATA_DIR = os.path.join(
    os.path.expanduser("~"), ".cache", "retrieval_jax", "tfds"
)
# Split names TFDS can put into file names and split specs.
_SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
# 64 bits of SHA-256: collisions are negligible and config names stay short.
_HASH_CHARS = 16
_READ_BATCH = 8192


@dataclasses.dataclass(eq=False)
class BeirLocalConfig(tfds.core.BuilderConfig):
  """A BeirLocal's table (one of TABLES) and source_dir; see `make_config`."""

  table: str = "corpus"
  source_dir: str = ""


def _source_files(directory: str, table: str) -> list[str]:
  """Returns the files a table is built from, raising if one is missing."""
  if table == "corpus":
    return [beir.corpus_path(directory)]
  if table == "queries":
    return [beir.queries_path(directory)]
  if table != "qrels":
    raise ValueError(f"table must be one of {TABLES}, got {table!r}")
  splits = beir.available_splits(directory)
  if not splits:
    raise beir.BeirFormatError(
        os.path.join(directory, beir.QRELS_DIR),
        None,
        f"no qrels files; expected <split>{beir.QRELS_SUFFIX} files",
    )
  return [beir.qrels_path(directory, split) for split in splits]


def fingerprint(directory: str, table: str) -> str:
  """_HASH_CHARS hex digits of SHA-256 over a table's source names and bytes.

  Names are relative, so a copied collection reuses the cache.
  """
  # Relative names matter for qrels: renaming test.tsv renames a split.
  files = [
      (os.path.relpath(path, directory), io.file_sha256(path))
      for path in _source_files(directory, table)
  ]
  return io.fingerprint(files)[:_HASH_CHARS]


def make_config(directory: str, table: str) -> BeirLocalConfig:
  """The BeirLocalConfig of one table of a BEIR directory."""
  beir.check_directory(directory)
  directory = os.path.abspath(directory)
  # The directory name keeps data_dir readable; the hash decides freshness.
  stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(directory).lower())
  stem = stem.strip("_") or "beir"
  return BeirLocalConfig(
      name=f"{stem}_{table}_{fingerprint(directory, table)}",
      description=f"{table} of the BEIR collection in {directory}",
      table=table,
      source_dir=directory,
  )


class BeirLocal(tfds.core.GeneratorBasedBuilder):
  """One table of a local BEIR directory (see the module docstring)."""

  # The source hash covers the data, not this code: bump the version when
  # the features or beir.py's parsing change, so older preparations go unread.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Corpus, queries and qrels tables."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS's checksums lookup imports the undeclared `importlib_resources`
    # (tensorflow/datasets#11212); nothing is downloaded, so skip it.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    table = self.builder_config.table
    text = tfds.features.Text
    # The file position; readers check it, so a reordered cache cannot pass.
    features = {"index": tfds.features.Scalar(dtype=np.int64)}
    if table == "corpus":
      features.update(_id=text(), title=text(), text=text())
    elif table == "queries":
      features.update(_id=text(), text=text())
    elif table == "qrels":
      features.update(
          query_id=text(),
          doc_id=text(),
          score=tfds.features.Scalar(dtype=np.int32),
          line=tfds.features.Scalar(dtype=np.int64),
      )
    else:
      raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict(features),
        # Keeps examples in key order, i.e. file order.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    directory = self.builder_config.source_dir
    table = self.builder_config.table
    if table != "qrels":
      return {FULL_SPLIT: self._generate_examples(table=table, path=None)}
    splits = {}
    for split in beir.available_splits(directory):
      if not _SPLIT_NAME_RE.fullmatch(split):
        raise beir.BeirFormatError(
            beir.qrels_path(directory, split),
            None,
            "qrels split names may use only letters, digits, '_' and '-'",
        )
      path = beir.qrels_path(directory, split)
      splits[split] = self._generate_examples(table=table, path=path)
    return splits

  def _generate_examples(self, table: str, path: str | None):
    directory = self.builder_config.source_dir
    if table == "corpus":
      ids, titles, texts = beir.read_corpus(beir.corpus_path(directory))
      for i, example in enumerate(zip(ids, titles, texts)):
        yield i, dict(zip(("_id", "title", "text"), example), index=i)
    elif table == "queries":
      ids, texts = beir.read_queries(beir.queries_path(directory))
      for i, (query_id, text) in enumerate(zip(ids, texts)):
        yield i, {"index": i, "_id": query_id, "text": text}
    else:
      for i, row in enumerate(beir.read_qrels_rows(path)):
        yield i, qrels_example(i, row)


def qrels_example(index: int, row) -> dict:
  """The qrels table's example for one `beir.QrelsRow`."""
  return {
      "index": index,
      "query_id": row.query_id,
      "doc_id": row.doc_id,
      "score": row.score,
      "line": row.line,
  }


def prepare(
    directory: str, table: str, data_dir: str | os.PathLike | None = None
) -> BeirLocal:
  """Prepares one table (if not already) and returns its ArrayRecord builder.

  Not coordinated across processes: on multi-host jobs prepare on one first.
  """
  return prepare_builder(BeirLocal, make_config(directory, table), data_dir)


def prepare_builder(builder_cls, config, data_dir=None):
  """Builds builder_cls(config) as ArrayRecord in data_dir, preparing once."""
  data_dir = os.fspath(data_dir) if data_dir else DEFAULT_DATA_DIR
  builder = builder_cls(
      config=config, data_dir=data_dir, file_format="array_record"
  )
  if not builder.is_prepared():
    name = builder.builder_config.name
    logging.info("Preparing %s in %s", name, data_dir)
    start = time.perf_counter()
    builder.download_and_prepare()  # TFDS's own progress bars
    counts = {k: v.num_examples for k, v in builder.info.splits.items()}
    logging.info(
        "Prepared %s in %.1f s: %s", name, time.perf_counter() - start, counts
    )
  return builder


def read_split(
    builder: BeirLocal, split: str, keys: tuple[str, ...]
) -> list[list]:
  """Reads a whole split; returns one list per key, in index order."""
  source = builder.as_data_source(split)
  columns = {k: [] for k in keys}
  for start in range(0, len(source), _READ_BATCH):
    stop = min(start + _READ_BATCH, len(source))
    # Batched reads: one ArrayRecord lookup per batch, not per example.
    examples = source.__getitems__(list(range(start, stop)))
    for position, example in enumerate(examples, start=start):
      if example["index"] != position:
        raise RuntimeError(
            f"{builder.data_dir}: example {position} of split {split!r} has"
            f" index {example['index']}; delete that directory to re-prepare"
        )
      for k in keys:
        value = example[k]
        # Text features come back as UTF-8 bytes, scalars as numpy scalars.
        columns[k].append(
            value.decode("utf-8") if isinstance(value, bytes) else int(value)
        )
  return [columns[k] for k in keys]
