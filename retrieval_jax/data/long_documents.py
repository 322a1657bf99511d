"""Long-document retrieval collections packed from real passages (LoCo-style).

Long-context encoders (M2-BERT at 2k-32k tokens) need documents far longer
than BERT's 512 tokens. `build_long_documents` shuffles a BEIR corpus's
passages (seeded) and packs them, blank-line joined, into documents of
log-uniform target length in [min_tokens, max_tokens]; a query's relevant
documents are those holding a judged passage (best grade wins). The output
is a BEIR directory (`beir.load_beir`) plus manifest.json recording each
judged passage's token offset; `ensure_long_documents` rebuilds only when the
settings change. Packing rules: experiments/m2_long_docs/README.md. Source
licenses carry over (SciFact is CC BY-NC): never build into the repository.
"""

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
import functools
import json
import math
import os
import shutil
import tempfile
import time

from absl import logging
import numpy as np

from retrieval_jax import io
from retrieval_jax.data import beir

MANIFEST_FILE = "manifest.json"
# Bump when packing or format change: old builds are then not reused.
FORMAT_VERSION = 1
DEFAULT_TOKENIZER = "all-MiniLM-L6-v2"
# Ends every word, so WordPiece lengths add up across passages.
SEPARATOR = "\n\n"
# A 512-position encoder cannot see a passage starting at this offset or later.
TRUNCATION_PROBE = 512
# Later passages an underfull document tries; bounds packing at O(N * 64).
_MAX_LOOKAHEAD = 64
_TOKENIZER_FILES = (  # what `WordPieceTokenizer.from_pretrained_dir` reads
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def write_beir(
    out_dir: str,
    doc_ids: Sequence[str],
    titles: Sequence[str],
    texts: Sequence[str],
    query_ids: Sequence[str],
    queries: Sequence[str],
    qrels: Mapping[str, Mapping[str, Mapping[str, int]]],
) -> None:
  """Writes a BEIR collection directory (not atomic; see `atomic_output`).

  qrels: split -> query id -> doc id -> int score; rows in mapping order.
  """
  _write_jsonl(
      os.path.join(out_dir, beir.CORPUS_FILE),
      (
          {"_id": d, "title": t, "text": x}
          for d, t, x in zip(doc_ids, titles, texts, strict=True)
      ),
  )
  _write_jsonl(
      os.path.join(out_dir, beir.QUERIES_FILE),
      ({"_id": q, "text": x} for q, x in zip(query_ids, queries, strict=True)),
  )
  qrels_dir = os.path.join(out_dir, beir.QRELS_DIR)
  os.makedirs(qrels_dir, exist_ok=True)
  for split, judgments in qrels.items():
    path = os.path.join(qrels_dir, split + beir.QRELS_SUFFIX)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      f.write("query-id\tcorpus-id\tscore\n")
      for query_id, docs in judgments.items():
        for doc_id, score in docs.items():
          f.write(f"{query_id}\t{doc_id}\t{int(score)}\n")


def _write_jsonl(path: str, rows: Iterable[dict]) -> None:
  """Writes one compact JSON object per line, UTF-8, "\\n" line ends."""
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for row in rows:
      # beir.py splits on b"\n" only, so unescaped U+2028 is safe.
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


class atomic_output:  # pylint: disable=invalid-name
  """`with atomic_output(out_dir) as tmp_dir:` builds a sibling, then swaps.

  On an exception tmp_dir is removed; concurrent builders are not coordinated.
  """

  def __init__(self, out_dir: str | os.PathLike):
    self.out_dir = os.path.abspath(os.fspath(out_dir))
    self.tmp_dir = None

  def __enter__(self) -> str:
    parent = os.path.dirname(self.out_dir)
    os.makedirs(parent, exist_ok=True)
    # Same parent: os.rename is atomic only within a file system.
    self.tmp_dir = tempfile.mkdtemp(
        prefix=f".{os.path.basename(self.out_dir)}.tmp-", dir=parent
    )
    return self.tmp_dir

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      shutil.rmtree(self.tmp_dir, ignore_errors=True)
      return
    # mkdtemp creates 0700 directories; give the result the usual mode.
    os.chmod(self.tmp_dir, 0o755)
    old = None
    if os.path.lexists(self.out_dir):  # moved aside, deleted after the swap
      old = tempfile.mkdtemp(
          prefix=f".{os.path.basename(self.out_dir)}.old-",
          dir=os.path.dirname(self.out_dir),
      )
      os.rename(self.out_dir, os.path.join(old, "collection"))
    os.rename(self.tmp_dir, self.out_dir)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _default_tokenizer_dir() -> str:
  """The directory holding the all-MiniLM-L6-v2 tokenizer files."""
  # Lazy: pretrained.py pulls in JAX and the model code.
  from retrieval_jax import pretrained  # pylint: disable=g-import-not-at-top

  return str(pretrained.resolve_model_dir(DEFAULT_TOKENIZER))


@functools.cache
def _default_tokenizer():
  """The all-MiniLM-L6-v2 WordPiece tokenizer (loaded once per process)."""
  from retrieval_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  return tokenizers.WordPieceTokenizer.from_pretrained_dir(
      _default_tokenizer_dir()
  )


def default_count_tokens(text: str) -> int:
  """WordPiece tokens of `text` under all-MiniLM-L6-v2, without specials.

  Cached word ids: SciFact's 5,183 abstracts (1.7M tokens) take ~3 s/core.
  """
  return len(_default_tokenizer().tokenize_to_ids(text))


def _tokenizer_name(count_tokens: Callable[[str], int] | None) -> str:
  """Identifies a token counter in the manifest's settings."""
  if count_tokens is None or count_tokens is default_count_tokens:
    # Hashed files: another vocabulary must not reuse old lengths.
    model_dir = _default_tokenizer_dir()
    files = [
        (name, io.file_sha256(os.path.join(model_dir, name)))
        for name in _TOKENIZER_FILES
        if os.path.isfile(os.path.join(model_dir, name))
    ]
    return f"wordpiece:{DEFAULT_TOKENIZER}:{io.fingerprint(files)[:16]}"
  # Known by name only: changing its behaviour needs a manual delete.
  module = getattr(count_tokens, "__module__", None) or "?"
  name = getattr(count_tokens, "__qualname__", None) or repr(count_tokens)
  return f"callable:{module}.{name}"


def _draw_target(
    rng: np.random.Generator, min_tokens: int, max_tokens: int
) -> int:
  """A log-uniform integer in [min_tokens, max_tokens]."""
  log_length = rng.uniform(math.log(min_tokens), math.log(max_tokens))
  # Rounding can step just outside the range at either end.
  return int(min(max(round(math.exp(log_length)), min_tokens), max_tokens))


def pack_passages(
    lengths: Sequence[int],
    *,
    min_tokens: int,
    max_tokens: int,
    seed: int,
) -> list[list[int]]:
  """Packs shuffled passages into documents of log-uniform target lengths.

  lengths: int [N] token counts. Returns lists of passage indices, each index
  once; over max_tokens only as one long passage, under min_tokens only when
  none of the next `_MAX_LOOKAHEAD` passages fits.
  """
  _check_lengths(min_tokens, max_tokens)
  rng = np.random.default_rng(seed)
  queue = collections.deque(int(i) for i in rng.permutation(len(lengths)))
  documents = []
  while queue:
    target = _draw_target(rng, min_tokens, max_tokens)
    document, tokens, deferred = [], 0, []
    while queue:
      index = queue.popleft()
      n = lengths[index]
      if document and tokens + n > max_tokens:
        if tokens >= min_tokens or len(deferred) >= _MAX_LOOKAHEAD:
          queue.appendleft(index)
          break
        deferred.append(index)  # for the next document; try a shorter one
        continue
      document.append(index)
      tokens += n
      if tokens >= target:
        break
    queue.extendleft(reversed(deferred))
    documents.append(document)
  # Fold a short leftover last document into the one before when it fits.
  if len(documents) >= 2:
    last = sum(lengths[i] for i in documents[-1])
    before = sum(lengths[i] for i in documents[-2])
    if last < min_tokens and before + last <= max_tokens:
      documents[-2].extend(documents.pop())
  return documents


def _check_lengths(min_tokens, max_tokens) -> None:
  """Raises ValueError naming the argument for invalid length bounds."""
  for name, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{name} must be an integer, got {value!r}")
  if min_tokens < 1:
    raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
  if max_tokens < min_tokens:
    raise ValueError(
        f"max_tokens must be >= min_tokens ({min_tokens}), got {max_tokens}"
    )


def _normalize_splits(splits) -> list[str]:
  """Sorted, de-duplicated split names; a lone string is one split."""
  if isinstance(splits, str):
    splits = (splits,)
  splits = sorted(set(splits))
  if not splits:
    raise ValueError("splits must name at least one qrels split")
  return splits


def _source_files(source_dir: str, splits: Sequence[str]) -> dict[str, str]:
  """Relative name -> path of the files a build reads; raises if missing."""
  beir.check_directory(source_dir)
  # Qrels first: a wrong split is the likeliest mistake (lists real ones).
  files = {}
  for split in splits:
    path = beir.qrels_path(source_dir, split)
    files[os.path.relpath(path, source_dir)] = path
  files[beir.CORPUS_FILE] = beir.corpus_path(source_dir)
  files[beir.QUERIES_FILE] = beir.queries_path(source_dir)
  return dict(sorted(files.items()))


def _settings(splits, min_tokens, max_tokens, seed, count_tokens) -> dict:
  """The manifest's settings block; equal blocks mean equal builds."""
  _check_lengths(min_tokens, max_tokens)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  return {
      "format_version": FORMAT_VERSION,
      "splits": _normalize_splits(splits),
      "min_tokens": int(min_tokens),
      "max_tokens": int(max_tokens),
      "seed": int(seed),
      "tokenizer": _tokenizer_name(count_tokens),
      "separator": SEPARATOR,
      "max_lookahead": _MAX_LOOKAHEAD,
  }


def _length_stats(values: Sequence[int]) -> dict:
  """min / median / mean / max of a non-empty list of ints."""
  values = np.asarray(values, np.float64)
  return {
      "min": int(values.min()),
      "median": float(np.median(values)),
      "mean": round(float(values.mean()), 3),
      "max": int(values.max()),
  }


def build_long_documents(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "test"),
    min_tokens: int = 2048,
    max_tokens: int = 8192,
    seed: int = 0,
    count_tokens: Callable[[str], int] | None = None,
) -> dict:
  """Builds a long-document collection from a BEIR one (see module doc).

  out_dir is replaced atomically and must differ from source_dir; splits
  must exist there. count_tokens None: `default_count_tokens`. Returns the
  manifest's "summary": counts, token length stats, and per split the
  judged passages' token offsets (median, fraction at or beyond 512).
  """
  source_dir = os.path.abspath(os.fspath(source_dir))
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.realpath(out_dir) == os.path.realpath(source_dir):
    raise ValueError(f"out_dir must differ from source_dir ({source_dir})")
  settings = _settings(splits, min_tokens, max_tokens, seed, count_tokens)
  splits = settings["splits"]
  files = _source_files(source_dir, splits)
  count_tokens = count_tokens or default_count_tokens
  start = time.perf_counter()

  logging.info("Long documents: reading %s (splits %s)", source_dir, splits)
  sources = {name: io.file_sha256(path) for name, path in files.items()}
  passage_ids, titles, texts = beir.read_corpus(files[beir.CORPUS_FILE])
  query_ids, queries = beir.read_queries(files[beir.QUERIES_FILE])
  qrels = {
      split: beir.read_qrels(
          beir.qrels_path(source_dir, split), query_ids, passage_ids
      )
      for split in splits
  }

  passages = [beir.doc_text(t, x) for t, x in zip(titles, texts)]
  logging.info("Long documents: counting tokens of %d passages", len(passages))
  lengths = []
  for passage in passages:
    n = count_tokens(passage)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"count_tokens must return an int >= 0, got {n!r}")
    lengths.append(int(n))
  logging.info(
      "Long documents: %d tokens in %.1f s; packing into %d-%d token documents",
      sum(lengths),
      time.perf_counter() - start,
      min_tokens,
      max_tokens,
  )
  packed = pack_passages(
      lengths, min_tokens=min_tokens, max_tokens=max_tokens, seed=seed
  )

  width = max(5, len(str(len(packed) - 1)))
  doc_ids, doc_texts, records = [], [], []
  # passage index -> (document index, token offset inside the document).
  placement = {}
  for d, members in enumerate(packed):
    doc_id = f"doc-{d:0{width}d}"
    offsets, offset = [], 0
    for p in members:
      placement[p] = (d, offset)
      offsets.append(offset)
      offset += lengths[p]
    doc_ids.append(doc_id)
    # Empty passages (no title, no text) add nothing but blank lines.
    doc_texts.append(
        SEPARATOR.join(passages[p] for p in members if passages[p])
    )
    records.append({
        "_id": doc_id,
        "tokens": offset,
        "passages": [passage_ids[p] for p in members],
        "offsets": offsets,
    })

  passage_index = {pid: i for i, pid in enumerate(passage_ids)}
  long_qrels, split_stats = {}, {}
  for split in splits:
    judgments = {}
    judged_offsets = []
    for query_id, docs in qrels[split].items():
      row = {}
      for passage_id, score in docs.items():
        d, offset = placement[passage_index[passage_id]]
        doc_id = doc_ids[d]
        # Several judged passages can share a document; the best one
        # decides its grade.
        row[doc_id] = max(row.get(doc_id, score), score)
        if score > 0:
          judged_offsets.append(offset)
      judgments[query_id] = row
    long_qrels[split] = judgments
    offsets = np.asarray(judged_offsets, np.float64)
    split_stats[split] = {
        "queries": len(judgments),
        "judgments": sum(len(row) for row in judgments.values()),
        "judged_passages": len(judged_offsets),
        "offset_median": float(np.median(offsets)) if offsets.size else None,
        f"beyond_{TRUNCATION_PROBE}": (
            round(float(np.mean(offsets >= TRUNCATION_PROBE)), 6)
            if offsets.size
            else None
        ),
    }

  judged = set().union(*(long_qrels[s].keys() for s in splits))
  out_queries = [(q, x) for q, x in zip(query_ids, queries) if q in judged]
  tokens = [r["tokens"] for r in records]
  summary = {
      "documents": len(records),
      "passages": len(passages),
      "tokens": _length_stats(tokens),
      "below_min_tokens": sum(n < min_tokens for n in tokens),
      "above_max_tokens": sum(n > max_tokens for n in tokens),
      "splits": split_stats,
  }
  manifest = {
      "settings": settings,
      "source_dir": source_dir,
      "sources": sources,
      "summary": summary,
      "documents": records,
  }

  logging.info(
      "Long documents: writing %d documents to %s", len(records), out_dir
  )
  with atomic_output(out_dir) as tmp_dir:
    write_beir(
        tmp_dir,
        doc_ids,
        [""] * len(doc_ids),
        doc_texts,
        [q for q, _ in out_queries],
        [x for _, x in out_queries],
        long_qrels,
    )
    # Written last: a directory with a manifest is a complete collection.
    with open(
        os.path.join(tmp_dir, MANIFEST_FILE),
        "w",
        encoding="utf-8",
        newline="\n",
    ) as f:
      json.dump(manifest, f, ensure_ascii=False, indent=1)
      f.write("\n")
  logging.info(
      "Long documents: built in %.1f s: %s",
      time.perf_counter() - start,
      json.dumps(summary),
  )
  return summary


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
  """The manifest of a built collection, or None if absent or unreadable."""
  path = os.path.join(os.fspath(out_dir), MANIFEST_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) else None


def ensure_long_documents(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "test"),
    min_tokens: int = 2048,
    max_tokens: int = 8192,
    seed: int = 0,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[str, dict]:
  """(abs path, summary) of a long-document collection, built only if needed.

  Reused when the manifest has the same settings and source SHA-256s and the
  files are present; else rebuilt with `build_long_documents` (same args).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  settings = _settings(splits, min_tokens, max_tokens, seed, count_tokens)
  manifest = read_manifest(out_dir)
  if manifest is not None:
    files = _source_files(os.fspath(source_dir), settings["splits"])
    expected = [beir.CORPUS_FILE, beir.QUERIES_FILE] + [
        os.path.join(beir.QRELS_DIR, s + beir.QRELS_SUFFIX)
        for s in settings["splits"]
    ]
    if (
        manifest.get("settings") == settings
        and manifest.get("sources")
        == {name: io.file_sha256(path) for name, path in files.items()}
        and all(os.path.isfile(os.path.join(out_dir, f)) for f in expected)
    ):
      logging.info("Long documents: reusing %s", out_dir)
      return out_dir, manifest["summary"]
    logging.info("Long documents: %s is stale; rebuilding", out_dir)
  summary = build_long_documents(
      source_dir,
      out_dir,
      splits=splits,
      min_tokens=min_tokens,
      max_tokens=max_tokens,
      seed=seed,
      count_tokens=count_tokens,
  )
  return out_dir, summary
