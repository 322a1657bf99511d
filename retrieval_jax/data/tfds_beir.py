"""TFDS builder for a BEIR collection in a local directory (optional).

`BeirLocal` prepares one table of a BEIR directory as ArrayRecord, for
`tfds.data_source` / Grain random access: corpus and queries (split "full";
index, _id, title/text) and qrels (one split per qrels/<split>.tsv; index,
query_id, doc_id, score, line). Parsing is `beir.py`'s, in file order.

The library itself reads collections with `beir.load_beir` (pure Python, no
TensorFlow): every consumer reads whole collections, where this path adds a
TF import (~4 s) and reads SciFact in 0.3 s against 0.05 s, and the run path
must work without TF (issue 17). Preparing needs TF; `tfds_loco` builds on it.
The config name `<collection>_<table>_<hash>` hashes the table's source
files, so a changed file is prepared again, never read stale.
"""

import dataclasses
import os
import re

from absl import logging
import numpy as np

# TF must be imported with accelerators hidden before tfds imports it.
from retrieval_jax.data import tf_setup  # noqa: F401  # pylint: disable=unused-import
import tensorflow_datasets as tfds

from retrieval_jax import io
from retrieval_jax.data import beir

TABLES = ("corpus", "queries", "qrels")
# The single split of the corpus and queries tables.
FULL_SPLIT = "full"
DEFAULT_DATA_DIR = os.path.join(
    os.path.expanduser("~"), ".cache", "retrieval_jax", "tfds"
)
# Split names TFDS can put into file names and split specs.
_SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
# 64 bits of SHA-256: a collision between two versions of one collection is
# negligible, and the config names stay short.
_HASH_CHARS = 16
# Examples per batched read when loading a whole split.
_READ_BATCH = 8192


@dataclasses.dataclass(eq=False)
class BeirLocalConfig(tfds.core.BuilderConfig):
  """Which table of which directory a `BeirLocal` builder prepares.

  Create it with `make_config`, which derives the name from the sources.

  Attributes:
    table: str, one of TABLES.
    source_dir: str, the BEIR collection directory.
  """

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
  """Hashes the names and bytes of a table's source files.

  Args:
    directory: str, a BEIR collection directory.
    table: str, one of TABLES.

  Returns:
    str, _HASH_CHARS hex digits of a SHA-256; equal contents in another
    directory give the same value, so a copied collection reuses the cache.
  """
  # The relative name matters for qrels: renaming test.tsv to dev.tsv
  # renames a split.
  files = [(os.path.relpath(path, directory), io.file_sha256(path))
           for path in _source_files(directory, table)]
  return io.fingerprint(files)[:_HASH_CHARS]


def make_config(directory: str, table: str) -> BeirLocalConfig:
  """Returns the BeirLocalConfig for one table of a BEIR directory.

  Args:
    directory: str, a BEIR collection directory.
    table: str, one of TABLES.

  Raises:
    BeirFormatError: the directory or a source file is missing.
  """
  beir.check_directory(directory)
  directory = os.path.abspath(directory)
  # The collection's directory name keeps the data_dir readable; the hash
  # alone decides whether a preparation is current.
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
  # the features or beir.py's parsing rules change, so that preparations
  # made by older code are not read.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Corpus, queries and qrels tables."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS looks for a checksums file next to the builder's code, and on
    # Python >= 3.9 that lookup imports `importlib_resources`, which TFDS
    # does not declare (tensorflow/datasets#11212). Nothing here is
    # downloaded, so there are no checksums to find.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    table = self.builder_config.table
    text = tfds.features.Text
    # `index` is the example's position in its file; readers check it
    # against the position they read, so a reordered cache cannot pass.
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
  return {"index": index, "query_id": row.query_id, "doc_id": row.doc_id,
          "score": row.score, "line": row.line}


def prepare(
    directory: str, table: str, data_dir: str | os.PathLike | None = None
) -> BeirLocal:
  """Prepares one table (if not already prepared) and returns its builder.

  Read it with `builder.as_data_source(split)` (random access) or
  `builder.as_dataset(split)`. Preparing the same config from several
  processes at once is not coordinated: on multi-host jobs prepare on one
  process first.

  Args:
    directory: str, a BEIR collection directory.
    table: str, one of TABLES.
    data_dir: str, where prepared datasets live; DEFAULT_DATA_DIR if None.

  Returns:
    BeirLocal, prepared, in ArrayRecord format.

  Raises:
    BeirFormatError: a missing or malformed source file.
  """
  return prepare_builder(BeirLocal, make_config(directory, table), data_dir)


def prepare_builder(builder_cls, config, data_dir=None):
  """Builds `builder_cls(config)` in ArrayRecord format, preparing it once.

  Args:
    builder_cls: a local-files builder class (BeirLocal or a subclass).
    config: its builder config (created at run time).
    data_dir: where prepared datasets live; DEFAULT_DATA_DIR if None.

  Returns:
    The prepared builder.
  """
  data_dir = os.fspath(data_dir) if data_dir else DEFAULT_DATA_DIR
  # A config created at run time: TFDS logs "Using custom data
  # configuration" for it, which is expected.
  builder = builder_cls(config=config, data_dir=data_dir,
                        file_format="array_record")
  if not builder.is_prepared():
    logging.info("Preparing %s in %s", builder.builder_config.name, data_dir)
    # Local collections prepare in seconds; TFDS's nested progress bars
    # would only clutter the output.
    tfds.display_progress_bar(False)
    builder.download_and_prepare()
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
