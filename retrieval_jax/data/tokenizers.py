"""Tokenizers of checkpoint directories: a fast WordPiece, else HF's own.

`from_pretrained_dir(path)` gives a pure-Python `WordPieceTokenizer` for
BERT-style WordPiece checkpoints and an `HFTokenizer` (HF `tokenizers` on
tokenizer.json) for the rest (BPE, Unigram); both give the reference's ids
behind one interface. The hand-written path stays for speed (2026-12-05,
SciFact's 5,183 docs at 512 tokens, 2-core CPU, tokenizers 0.23.3, slow test
`tokenizers_test.py -k Speed`): 0.7-0.9 CPU-s against 2.3-2.5 for HF, ~3x.
"""

from collections.abc import Mapping, Sequence
import functools
import itertools
import json
import os
import re
import sys
import unicodedata

import numpy as np
import tokenizers as hf_tokenizers

# The reference's `is_other`: C* of Unicode 8.0 (later assignments survive),
# less \t \n \r (whitespace there); surrogates (impossible in UTF-8) as C*.
_OTHER_RANGES = """
0-8 B-C E-1F 7F-9F AD 600-605 61C 6DD 70F 180E 200B-200F 202A-202E 2060-2064
2066-206F D800-F8FF FEFF FFF9-FFFB 110BD 1BCA0-1BCA3 1D173-1D17A E0001
E0020-E007F F0000-FFFFD 100000-10FFFD
"""

# Isolated by the pre-tokeniser: ASCII punctuation/symbols, P* of Unicode 8.0.
_PUNCTUATION_RANGES = """
21-2F 3A-40 5B-60 7B-7E A1 A7 AB B6-B7 BB BF 37E 387 55A-55F 589-58A 5BE 5C0
5C3 5C6 5F3-5F4 609-60A 60C-60D 61B 61E-61F 66A-66D 6D4 700-70D 7F7-7F9
830-83E 85E 964-965 970 AF0 DF4 E4F E5A-E5B F04-F12 F14 F3A-F3D F85 FD0-FD4
FD9-FDA 104A-104F 10FB 1360-1368 1400 166D-166E 169B-169C 16EB-16ED 1735-1736
17D4-17D6 17D8-17DA 1800-180A 1944-1945 1A1E-1A1F 1AA0-1AA6 1AA8-1AAD
1B5A-1B60 1BFC-1BFF 1C3B-1C3F 1C7E-1C7F 1CC0-1CC7 1CD3 2010-2027 2030-2043
2045-2051 2053-205E 207D-207E 208D-208E 2308-230B 2329-232A 2768-2775
27C5-27C6 27E6-27EF 2983-2998 29D8-29DB 29FC-29FD 2CF9-2CFC 2CFE-2CFF 2D70
2E00-2E2E 2E30-2E42 3001-3003 3008-3011 3014-301F 3030 303D 30A0 30FB
A4FE-A4FF A60D-A60F A673 A67E A6F2-A6F7 A874-A877 A8CE-A8CF A8F8-A8FA A8FC
A92E-A92F A95F A9C1-A9CD A9DE-A9DF AA5C-AA5F AADE-AADF AAF0-AAF1 ABEB
FD3E-FD3F FE10-FE19 FE30-FE52 FE54-FE61 FE63 FE68 FE6A-FE6B FF01-FF03
FF05-FF0A FF0C-FF0F FF1A-FF1B FF1F-FF20 FF3B-FF3D FF3F FF5B FF5D FF5F-FF65
10100-10102 1039F 103D0 1056F 10857 1091F 1093F 10A50-10A58 10A7F 10AF0-10AF6
10B39-10B3F 10B99-10B9C 11047-1104D 110BB-110BC 110BE-110C1 11140-11143
11174-11175 111C5-111C9 111CD 111DB 111DD-111DF 11238-1123D 112A9 114C6
115C1-115D7 11641-11643 1173C-1173E 12470-12474 16A6E-16A6F 16AF5 16B37-16B3B
16B44 1BC9F 1DA87-1DA8B
"""

# General_Category Mn (Unicode 8.0): what accent stripping removes after NFD.
_NONSPACING_MARK_RANGES = """
300-33F 342 345-36F 483-487 591-5BD 5BF 5C1-5C2 5C4-5C5 5C7 610-61A 64B-65F
670 6D6-6DC 6DF-6E4 6E7-6E8 6EA-6ED 711 730-74A 7A6-7B0 7EB-7F3 816-819
81B-823 825-827 829-82D 859-85B 8E3-902 93A 93C 941-948 94D 951-957 962-963
981 9BC 9C1-9C4 9CD 9E2-9E3 A01-A02 A3C A41-A42 A47-A48 A4B-A4D A51 A70-A71
A75 A81-A82 ABC AC1-AC5 AC7-AC8 ACD AE2-AE3 B01 B3C B3F B41-B44 B4D B56
B62-B63 B82 BC0 BCD C00 C3E-C40 C46-C47 C4A-C4D C55-C56 C62-C63 C81 CBC CBF
CC6 CCC-CCD CE2-CE3 D01 D41-D44 D4D D62-D63 DCA DD2-DD4 DD6 E31 E34-E3A
E47-E4E EB1 EB4-EB9 EBB-EBC EC8-ECD F18-F19 F35 F37 F39 F71-F72 F74 F77
F79-F7E F80 F82-F84 F86-F87 F8D-F92 F94-F97 F99-F9C F9E-FA1 FA3-FA6 FA8-FAB
FAD-FB8 FBA-FBC FC6 102D-1030 1032-1037 1039-103A 103D-103E 1058-1059
105E-1060 1071-1074 1082 1085-1086 108D 109D 135D-135F 1712-1714 1732-1734
1752-1753 1772-1773 17B4-17B5 17B7-17BD 17C6 17C9-17D3 17DD 180B-180D 18A9
1920-1922 1927-1928 1932 1939-193B 1A17-1A18 1A1B 1A56 1A58-1A5E 1A60 1A62
1A65-1A6C 1A73-1A7C 1A7F 1AB0-1ABD 1B00-1B03 1B34 1B36-1B3A 1B3C 1B42
1B6B-1B73 1B80-1B81 1BA2-1BA5 1BA8-1BA9 1BAB-1BAD 1BE6 1BE8-1BE9 1BED
1BEF-1BF1 1C2C-1C33 1C36-1C37 1CD0-1CD2 1CD4-1CE0 1CE2-1CE8 1CED 1CF4
1CF8-1CF9 1DC0-1DF5 1DFC-1DFF 20D0-20DC 20E1 20E5-20F0 2CEF-2CF1 2D7F
2DE0-2DFF 302A-302D 3099-309A A66F A674-A67D A69E-A69F A6F0-A6F1 A802 A806
A80B A825-A826 A8C4 A8E0-A8F1 A926-A92D A947-A951 A980-A982 A9B3 A9B6-A9B9
A9BC A9E5 AA29-AA2E AA31-AA32 AA35-AA36 AA43 AA4C AA7C AAB0 AAB2-AAB4
AAB7-AAB8 AABE-AABF AAC1 AAEC-AAED AAF6 ABE5 ABE8 ABED FB1E FE00-FE0F
FE20-FE2F 101FD 102E0 10376-1037A 10A01-10A03 10A05-10A06 10A0C-10A0F
10A38-10A3A 10A3F 10AE5-10AE6 11001 11038-11046 1107F-11081 110B3-110B6
110B9-110BA 11100-11102 11127-1112B 1112D 11130-11134 11173 11180-11181
111B6-111BE 111CA-111CC 1122F-11231 11234 11236-11237 112DF 112E3-112EA
11300-11301 1133C 11340 11366-1136C 11370-11374 114B3-114B8 114BA 114BF-114C0
114C2-114C3 115B2-115B5 115BC-115BD 115BF-115C0 115DC-115DD 11633-1163A 1163D
1163F-11640 116AB 116AD 116B0-116B5 116B7 1171D-1171F 11722-11725 11727-1172B
16AF0-16AF4 16B30-16B36 16F8F-16F92 1BC9D-1BC9E 1D167-1D169 1D17B-1D182
1D185-1D18B 1D1AA-1D1AD 1D242-1D244 1DA00-1DA36 1DA3B-1DA6C 1DA75 1DA84
1DA9B-1DA9F 1DAA1-1DAAF 1E8D0-1E8D6 E0100-E01EF
"""

# Rust's `char::is_whitespace`: normalised to " ", split on by pre-tokenising.
_WHITESPACE_RANGES = "9-D 20 85 A0 1680 2000-200A 2028-2029 202F 205F 3000"

# The reference's CJK: URO, extensions A-E and compatibility blocks (not F+).
_CJK_RANGES = "3400-4DBF 4E00-9FFF F900-FAFF 20000-2A6DF 2A700-2B81F " + (
    "2B920-2CEAF 2F800-2FA1F"
)

# Lowercase runs (first, last, offset) in Rust's Unicode 16, not Python 3.11's.
_EXTRA_LOWERCASE_RUNS = (
    (0x1C89, 0x1C89, 1),
    (0xA7CB, 0xA7CB, 0x0264 - 0xA7CB),
    (0xA7CC, 0xA7CC, 1),
    (0xA7CE, 0xA7CE, 1),
    (0xA7D2, 0xA7D2, 1),
    (0xA7D4, 0xA7D4, 1),
    (0xA7DA, 0xA7DA, 1),
    (0xA7DC, 0xA7DC, 0x019B - 0xA7DC),
    (0x10D50, 0x10D65, 0x20),
    (0x16EA0, 0x16EB8, 0x1B),
)

# DIVES AKURU VOWEL SIGN O decomposes since Unicode 13, not in the reference;
# a starter, so NFD of the pieces between its occurrences equals NFD overall.
_NFD_STABLE = "\U00011938"

_GREEK_CAPITAL_SIGMA = "\u03a3"
_GREEK_SMALL_SIGMA = "\u03c3"

FILES = (  # what `from_pretrained_dir` reads
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

_DEFAULT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
}


def _parse_ranges(ranges: str) -> list[tuple[int, int]]:
  """Turns "41-5A 5F" into [(0x41, 0x5A), (0x5F, 0x5F)]."""
  out = []
  for item in ranges.split():
    first, _, last = item.partition("-")
    out.append((int(first, 16), int(last or first, 16)))
  return out


def _class_body(pairs: list[tuple[int, int]]) -> str:
  """Regex character-class body (no brackets) for inclusive code point runs."""
  return "".join(
      f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in pairs
  )


_ASTRAL = "\\U00010000-\\U0010ffff"


def _split_class(ranges: str, negate: bool = False, runs: bool = False) -> str:
  """A regex matching one character of hex `ranges` (or, negated, not).

  Python's regex tests astral ranges one by one per character; behind a
  lookahead only astral characters consult them. `runs` matches a BMP or an
  astral run, keeping the engine's fast path for `[...]+`.
  """
  pairs = _parse_ranges(ranges)
  bmp = [(a, min(b, 0xFFFF)) for a, b in pairs if a <= 0xFFFF]
  astral = [(max(a, 0x10000), b) for a, b in pairs if b > 0xFFFF]
  if negate:
    bmp_part = f"[^{_class_body(bmp)}{_ASTRAL}]"
    astral_part = f"[^{_class_body(astral)}]" if astral else f"[{_ASTRAL}]"
  else:
    bmp_part = f"[{_class_body(bmp)}]"
    astral_part = f"[{_class_body(astral)}]" if astral else ""
  if not astral_part:
    return bmp_part + ("+" if runs else "")
  if runs:
    return f"{bmp_part}+|(?=[{_ASTRAL}]){astral_part}+"
  return f"(?:{bmp_part}|(?=[{_ASTRAL}]){astral_part})"


# U+FFFD is a symbol (So), but the reference drops it with the "other"s.
_DROP_RE = re.compile(_split_class(_OTHER_RANGES + " FFFD", runs=True))
# Whitespace cleaning maps to " " (" " itself left out: not rewritten).
_TO_SPACE_RE = re.compile(
    _split_class("9-D 85 A0 1680 2000-200A 2028-2029 202F 205F 3000")
)
_CJK_RE = re.compile(_split_class(_CJK_RANGES))
_NONSPACING_MARK_RE = re.compile(
    _split_class(_NONSPACING_MARK_RANGES, runs=True)
)
# One match per word: a punctuation character or a maximal run of others.
_WORD_RE = re.compile(
    _split_class(_PUNCTUATION_RANGES)
    + "|"
    + _split_class(_PUNCTUATION_RANGES + " " + _WHITESPACE_RANGES, negate=True)
    + "+"
)
# Non-whitespace runs (instead of `str.split` when text is not cleaned).
_NON_WHITESPACE_RE = re.compile(
    _split_class(_WHITESPACE_RANGES, negate=True) + "+"
)
_EXTRA_LOWERCASE = {
    chr(cp): chr(cp + offset)
    for first, last, offset in _EXTRA_LOWERCASE_RUNS
    for cp in range(first, last + 1)
}
_EXTRA_LOWERCASE_RE = re.compile(
    _split_class(" ".join(f"{a:X}-{b:X}" for a, b, _ in _EXTRA_LOWERCASE_RUNS))
)


def _read_json(path: str) -> dict | None:
  """Returns the parsed JSON object at `path`, or None if there is no file."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_vocab_file(path: str | os.PathLike) -> list[str]:
  """Reads a one-token-per-line vocabulary; line i holds token id i."""
  with open(path, encoding="utf-8") as f:
    # Only the newline (as transformers): tokens may end in whitespace.
    return [line.rstrip("\n") for line in f]


def _special_tokens(path: str, defaults: Mapping[str, str | None]) -> dict:
  """Special tokens as transformers finds them: config, map, then defaults."""
  config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
  special_map = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
  tokens = {}
  for name, default in defaults.items():
    token = config.get(name) or special_map.get(name) or default
    tokens[name] = token["content"] if isinstance(token, dict) else token
  return tokens


def _longest_first(n_a: int, n_b: int, budget: int) -> tuple[int, int]:
  """Lengths HF's "longest_first" truncation keeps of a pair of segments.

  The shorter keeps all if it fits in half the budget, else the first gets
  floor(budget / 2), the second the rest; a tie counts the first as shorter.
  """
  if n_a + n_b <= budget:
    return n_a, n_b
  short, long_ = min(n_a, n_b), max(n_a, n_b)
  long_ = max(short, budget - short)
  if short + long_ > budget:
    short = budget // 2
    long_ = short + budget % 2
  return (long_, short) if n_a > n_b else (short, long_)


class _Batching:
  """Padded batches over a subclass's `encode`, `encode_pair` and `pad_id`."""

  def __call__(
      self,
      texts: Sequence[str],
      max_length: int,
      pad_to_multiple_of: int | None = None,
      pad_to: int | None = None,
      text_pairs: Sequence[str] | None = None,
  ) -> dict[str, np.ndarray]:
    """Encodes and right-pads a batch: dict of int32 [B, L].

    input_ids (pad_id padded), attention_mask, token_type_ids (1 on a second
    segment from text_pairs). L is the longest row, or pad_to (not shorter),
    rounded up to pad_to_multiple_of; max_length includes specials.
    """
    if text_pairs is None:
      rows = [self.encode(text, max_length) for text in texts]
      types = [None] * len(rows)
    else:
      if len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} pairs.")
      rows, types = [], []
      for a, b in zip(texts, text_pairs):
        ids, type_ids = self.encode_pair(a, b, max_length)
        rows.append(ids)
        types.append(type_ids)
    longest = max((len(r) for r in rows), default=0)
    length = longest
    if pad_to is not None:
      if pad_to < longest:
        raise ValueError(f"pad_to={pad_to} < longest encoding {longest}.")
      length = pad_to
    if pad_to_multiple_of:
      length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids_bl = np.full((len(rows), length), self.pad_id, np.int32)
    attention_mask_bl = np.zeros((len(rows), length), np.int32)
    token_type_ids_bl = np.zeros((len(rows), length), np.int32)
    for b, (ids, type_ids) in enumerate(zip(rows, types)):
      input_ids_bl[b, : len(ids)] = ids
      attention_mask_bl[b, : len(ids)] = 1
      if type_ids is not None:
        token_type_ids_bl[b, : len(ids)] = type_ids
    return {
        "input_ids": input_ids_bl,
        "attention_mask": attention_mask_bl,
        "token_type_ids": token_type_ids_bl,
    }


class WordPieceTokenizer(_Batching):
  """BERT's tokenizer, with the ids of HF `tokenizers`' BERT pipeline.

  Added tokens match in raw text (leftmost-longest); the rest is normalised,
  split on whitespace and punctuation, and cut greedily into WordPiece ids.
  Character classes follow the reference's Rust crates (Unicode 8.0
  categories, Rust whitespace, Unicode 16 lowercase), not `unicodedata`; the
  tests check every code point. Recent chunks' and words' ids are cached.
  """

  def __init__(
      self,
      vocab: Sequence[str] | Mapping[str, int] | str | os.PathLike,
      *,
      do_lower_case: bool = True,
      strip_accents: bool | None = None,
      tokenize_chinese_chars: bool = True,
      clean_text: bool = True,
      unk_token: str = "[UNK]",
      cls_token: str = "[CLS]",
      sep_token: str = "[SEP]",
      pad_token: str = "[PAD]",
      mask_token: str = "[MASK]",
      added_tokens: Sequence[str] | None = None,
      max_input_chars_per_word: int = 100,
      continuing_subword_prefix: str = "##",
      cache_size: int = 1 << 18,
  ):
    """Creates a tokenizer from `vocab` (mapping, token list or vocab.txt path).

    Options mirror BertNormalizer / WordPiece; strip_accents None follows
    do_lower_case. added_tokens (default: the five specials) match verbatim
    in raw text. cache_size bounds the word and the chunk caches each.
    """
    if isinstance(vocab, (str, os.PathLike)):
      vocab = _read_vocab_file(vocab)
    if isinstance(vocab, Mapping):
      self._vocab = dict(vocab)
    else:
      # A repeated token keeps its last line, as in a dict built line by line.
      self._vocab = {token: i for i, token in enumerate(vocab)}
    self._id_to_token = {i: token for token, i in self._vocab.items()}
    self.do_lower_case = do_lower_case
    self.strip_accents = (
        do_lower_case if strip_accents is None else strip_accents
    )
    self.tokenize_chinese_chars = tokenize_chinese_chars
    self.clean_text = clean_text
    self.max_input_chars_per_word = max_input_chars_per_word
    self.continuing_subword_prefix = continuing_subword_prefix
    self.special_tokens = {
        "unk_token": unk_token,
        "cls_token": cls_token,
        "sep_token": sep_token,
        "pad_token": pad_token,
        "mask_token": mask_token,
    }
    for name, token in self.special_tokens.items():
      if token not in self._vocab:
        raise ValueError(f"{name} {token!r} is not in the vocabulary.")
    if added_tokens is None:
      added_tokens = list(self.special_tokens.values())
    missing = [t for t in added_tokens if t not in self._vocab]
    if missing:
      raise ValueError(f"Added tokens {missing} are not in the vocabulary.")
    self._added_ids = {token: self._vocab[token] for token in added_tokens}
    # Longest first: Python's first match is then the leftmost-longest one.
    self._added_re = (
        re.compile(
            "("
            + "|".join(
                re.escape(t)
                for t in sorted(added_tokens, key=len, reverse=True)
            )
            + ")"
        )
        if added_tokens
        else None
    )
    self._max_piece_chars = max(len(t) for t in self._vocab)
    self._cache_size = cache_size
    self._make_caches()

  def _make_caches(self) -> None:
    """(Re)creates the id caches, which are per instance and not pickled."""
    # Chunks repeat far more than they are new: most cost one lookup.
    self._word_ids = functools.lru_cache(maxsize=self._cache_size)(
        self._wordpiece
    )
    self._chunk_ids = functools.lru_cache(maxsize=self._cache_size)(
        self._chunk_ids_uncached
    )

  def __getstate__(self) -> dict:
    # Loader workers get it pickled; the caches (bound methods) do not pickle.
    state = self.__dict__.copy()
    del state["_word_ids"], state["_chunk_ids"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._make_caches()

  @classmethod
  def from_pretrained_dir(cls, path: str | os.PathLike, **overrides):
    """The module's `from_pretrained_dir`: an HFTokenizer for non-BERT files."""
    return from_pretrained_dir(path, **overrides)

  @classmethod
  def _from_dir(
      cls, path: str, tokenizer_json: dict, **overrides
  ) -> "WordPieceTokenizer":
    """Builds the tokenizer from a BERT-style checkpoint directory.

    Vocab: vocab.txt, else tokenizer.json; options: tokenizer_config.json,
    then tokenizer.json, then BERT's defaults.
    """
    config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
    model = tokenizer_json.get("model") or {}
    normalizer = tokenizer_json.get("normalizer") or {}
    vocab_txt = os.path.join(path, "vocab.txt")
    if os.path.exists(vocab_txt):
      vocab = _read_vocab_file(vocab_txt)
    elif model.get("vocab"):
      vocab = model["vocab"]
    else:
      raise FileNotFoundError(f"No vocab.txt or tokenizer.json in {path}.")
    kwargs = {
        "do_lower_case": config.get(
            "do_lower_case", normalizer.get("lowercase", True)
        ),
        # An explicit null in tokenizer_config.json means "follow lowercase".
        "strip_accents": config.get(
            "strip_accents", normalizer.get("strip_accents")
        ),
        "tokenize_chinese_chars": config.get(
            "tokenize_chinese_chars",
            normalizer.get("handle_chinese_chars", True),
        ),
        "clean_text": normalizer.get("clean_text", True),
        "max_input_chars_per_word": model.get("max_input_chars_per_word", 100),
        "continuing_subword_prefix": model.get(
            "continuing_subword_prefix", "##"
        ),
    }
    defaults = dict(_DEFAULT_SPECIAL_TOKENS)
    defaults["unk_token"] = model.get("unk_token") or defaults["unk_token"]
    kwargs.update(_special_tokens(path, defaults))
    if tokenizer_json.get("added_tokens"):
      kwargs["added_tokens"] = [
          t["content"] for t in tokenizer_json["added_tokens"]
      ]
    kwargs.update(overrides)
    return cls(vocab, **kwargs)

  @property
  def vocab_size(self) -> int:
    """Number of entries in the vocabulary."""
    return len(self._vocab)

  @property
  def pad_id(self) -> int:
    """Id of the padding token."""
    return self._vocab[self.special_tokens["pad_token"]]

  @property
  def cls_id(self) -> int:
    """Id of the token that starts every sequence."""
    return self._vocab[self.special_tokens["cls_token"]]

  @property
  def sep_id(self) -> int:
    """Id of the token that ends every segment."""
    return self._vocab[self.special_tokens["sep_token"]]

  @property
  def unk_id(self) -> int:
    """Id of the token for words that cannot be segmented."""
    return self._vocab[self.special_tokens["unk_token"]]

  @property
  def mask_id(self) -> int:
    """Id of the mask token."""
    return self._vocab[self.special_tokens["mask_token"]]

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry, or None."""
    return self._vocab.get(token)

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    """Vocabulary entries of `ids` (for inspection; there is no detokenizer)."""
    return [self._id_to_token[int(i)] for i in ids]

  def normalize(self, text: str) -> str:
    """Applies the BertNormalizer steps (no added-token handling) to `text`."""
    # All cleaning touches is non-printable (or U+FFFD): most texts skip it.
    if self.clean_text and (not text.isprintable() or "\ufffd" in text):
      text = _DROP_RE.sub("", text)
      text = _TO_SPACE_RE.sub(" ", text)
    if text.isascii():
      # No CJK, no accents, no sigma: only letter case can change.
      return text.lower() if self.do_lower_case else text
    if self.tokenize_chinese_chars:
      text = _CJK_RE.sub(r" \g<0> ", text)
    if self.strip_accents:
      text = _NFD_STABLE.join(
          unicodedata.normalize("NFD", part) for part in text.split(_NFD_STABLE)
      )
      text = _NONSPACING_MARK_RE.sub("", text)
    if self.do_lower_case:
      # `str.lower` lowercases by character except for a word-final capital
      # sigma, which it turns into "ς"; the reference always gives "σ".
      text = text.replace(_GREEK_CAPITAL_SIGMA, _GREEK_SMALL_SIGMA).lower()
      text = _EXTRA_LOWERCASE_RE.sub(
          lambda m: _EXTRA_LOWERCASE[m.group()], text
      )
    return text

  def pre_tokenize(self, normalized: str) -> list[str]:
    """Splits normalised text into words (BertPreTokenizer)."""
    return _WORD_RE.findall(normalized)

  def _wordpiece(self, word: str) -> tuple[int, ...]:
    """Greedy longest-match-first WordPiece ids of one word."""
    if len(word) > self.max_input_chars_per_word:
      return (self.unk_id,)
    vocab = self._vocab
    prefix = self.continuing_subword_prefix
    ids = []
    start, n = 0, len(word)
    while start < n:
      end = min(n, start + self._max_piece_chars)
      while end > start:
        piece = word[start:end]
        piece_id = vocab.get(prefix + piece if start else piece)
        if piece_id is not None:
          break
        end -= 1
      else:  # no piece matches here: the whole word is unknown
        return (self.unk_id,)
      ids.append(piece_id)
      start = end
    return tuple(ids)

  def tokenize_to_ids(self, text: str, limit: int | None = None) -> list[int]:
    """Content ids of `text`, no [CLS]/[SEP]; added tokens map to their ids.

    `limit` stops early: the result is the prefix of the untruncated ids.
    """
    limit = sys.maxsize if limit is None else limit
    if limit <= 0:
      return []
    if self._added_re is None:
      segments = [text]
    else:
      segments = self._added_re.split(text)  # added tokens at odd positions
    ids = []
    chunk_ids = self._chunk_ids
    for i, segment in enumerate(segments):
      if i % 2:
        ids.append(self._added_ids[segment])
      elif segment:
        normalized = self.normalize(segment)
        # Each chunk gives >= 1 id: chunks past the budget cannot count.
        budget = limit - len(ids)
        if self.clean_text:
          # Cleaned text has no \x1c-\x1f, on which `str.split` also splits.
          chunks = normalized.split(None, budget)
        else:
          chunks = _NON_WHITESPACE_RE.findall(normalized)
        del chunks[budget:]
        ids.extend(itertools.chain.from_iterable(map(chunk_ids, chunks)))
      if len(ids) >= limit:
        return ids[:limit]
    return ids

  def _chunk_ids_uncached(self, chunk: str) -> tuple[int, ...]:
    """WordPiece ids of a whitespace-free stretch of normalised text."""
    word_ids = self._word_ids
    return tuple(i for word in _WORD_RE.findall(chunk) for i in word_ids(word))

  def encode(self, text: str, max_length: int) -> list[int]:
    """[CLS] + the head of the content ids + [SEP]: 2..max_length ids."""
    if max_length < 2:
      raise ValueError(
          f"max_length={max_length} leaves no room for [CLS]/[SEP]."
      )
    content = self.tokenize_to_ids(text, limit=max_length - 2)
    return [self.cls_id, *content, self.sep_id]

  def encode_pair(
      self, text_a: str, text_b: str, max_length: int
  ) -> tuple[list[int], list[int]]:
    """([CLS] a [SEP] b [SEP], token types), cut as `_longest_first` says."""
    if max_length < 3:
      raise ValueError(f"max_length={max_length} leaves no room for specials.")
    budget = max_length - 3
    # budget + 1 ids tell "fits" from "must be cut" without full tokenizing.
    ids_a = self.tokenize_to_ids(text_a, limit=budget + 1)
    ids_b = self.tokenize_to_ids(text_b, limit=budget + 1)
    n_a, n_b = len(ids_a), len(ids_b)
    if n_a > budget and n_b > budget and budget % 2:
      # The longer one gets the odd id: full lengths decide.
      n_a = len(self.tokenize_to_ids(text_a))
      n_b = len(self.tokenize_to_ids(text_b))
    n_a, n_b = _longest_first(n_a, n_b, budget)
    ids_a, ids_b = ids_a[:n_a], ids_b[:n_b]
    input_ids = [self.cls_id, *ids_a, self.sep_id, *ids_b, self.sep_id]
    token_type_ids = [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    return input_ids, token_type_ids


class HFTokenizer(_Batching):
  """A checkpoint's tokenizer.json, run by the HF `tokenizers` library.

  For BPE, Unigram and other pipelines. cls_id / sep_id are the template's
  first / last id around a text (as in transformers), or None.
  """

  def __init__(
      self,
      tokenizer_file: str | os.PathLike,
      *,
      pad_token: str | None = None,
      unk_token: str | None = None,
      mask_token: str | None = None,
  ):
    """Loads a tokenizer.json; pad_token None uses the file's padding id."""
    self._tokenizer = hf_tokenizers.Tokenizer.from_file(
        os.fspath(tokenizer_file)
    )
    # Files may store padding / truncation (MiniLM's: 128); ours is per call.
    padding = self._tokenizer.padding
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self.pad_id = self.token_to_id(pad_token) if pad_token else None
    if self.pad_id is None and padding:
      self.pad_id = padding["pad_id"]
    if self.pad_id is None:
      raise ValueError(f"{tokenizer_file}: no pad token")
    self.unk_id = self.token_to_id(unk_token) if unk_token else None
    self.mask_id = self.token_to_id(mask_token) if mask_token else None
    # The template around one text: its ids before and after the content.
    probe = self._tokenizer.post_process(self._encode("a"))
    content = [i for i, s in enumerate(probe.sequence_ids) if s == 0]
    head, tail = probe.ids[: content[0]], probe.ids[content[-1] + 1 :]
    self.cls_id = head[0] if head else None
    self.sep_id = tail[-1] if tail else None

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry, or None."""
    return self._tokenizer.token_to_id(token)

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    """Vocabulary entries of `ids`."""
    return [self._tokenizer.id_to_token(int(i)) for i in ids]

  def _encode(self, text: str) -> hf_tokenizers.Encoding:
    return self._tokenizer.encode(text, add_special_tokens=False)

  def tokenize_to_ids(self, text: str, limit: int | None = None) -> list[int]:
    """Content ids of `text` (no special tokens), at most `limit` of them."""
    return self._encode(text).ids[:limit]

  def encode(self, text: str, max_length: int) -> list[int]:
    """The template around the head of the content: at most max_length ids."""
    budget = max_length - self._tokenizer.num_special_tokens_to_add(False)
    if budget < 0:
      raise ValueError(f"max_length={max_length} leaves no room for specials.")
    encoding = self._encode(text)
    encoding.truncate(budget)
    return self._tokenizer.post_process(encoding).ids

  def encode_pair(
      self, text_a: str, text_b: str, max_length: int
  ) -> tuple[list[int], list[int]]:
    """(ids, token types) of the pair template, cut by `_longest_first`."""
    budget = max_length - self._tokenizer.num_special_tokens_to_add(True)
    if budget < 0:
      raise ValueError(f"max_length={max_length} leaves no room for specials.")
    a, b = self._encode(text_a), self._encode(text_b)
    n_a, n_b = _longest_first(len(a), len(b), budget)
    a.truncate(n_a)
    b.truncate(n_b)
    pair = self._tokenizer.post_process(a, b)
    return pair.ids, pair.type_ids


Tokenizer = WordPieceTokenizer | HFTokenizer


def _bert_pipeline(tokenizer_json: Mapping) -> bool:
  """Whether `WordPieceTokenizer` implements this tokenizer.json exactly."""
  kind = lambda key: (tokenizer_json.get(key) or {}).get("type")
  processor = tokenizer_json.get("post_processor") or {}
  if kind("post_processor") == "TemplateProcessing":
    # [CLS] $A [SEP] and [CLS] $A [SEP] $B:1 [SEP]:1, whatever the names.
    layout = lambda items: [
        (k, v["id"] if k == "Sequence" else "", v["type_id"])
        for item in items
        for k, v in item.items()
    ]
    cls_sep = [("SpecialToken", "", 0), ("Sequence", "A", 0)]
    template_ok = layout(processor["single"]) == cls_sep + [
        ("SpecialToken", "", 0)
    ] and layout(processor["pair"]) == cls_sep + [
        ("SpecialToken", "", 0),
        ("Sequence", "B", 1),
        ("SpecialToken", "", 1),
    ]
  else:
    template_ok = kind("post_processor") in (None, "BertProcessing")
  # Only verbatim, raw-text matches of added tokens are implemented.
  plain_added = not any(
      t.get(flag)
      for t in tokenizer_json.get("added_tokens") or ()
      for flag in ("normalized", "lstrip", "rstrip", "single_word")
  )
  return (
      kind("model") == "WordPiece"
      and kind("normalizer") == "BertNormalizer"
      and kind("pre_tokenizer") == "BertPreTokenizer"
      and template_ok
      and plain_added
  )


def from_pretrained_dir(path: str | os.PathLike, **overrides) -> Tokenizer:
  """The tokenizer of a Hugging Face checkpoint directory (see `FILES`).

  A `WordPieceTokenizer` for a BERT pipeline (`_bert_pipeline`, or only
  vocab.txt), `overrides` its constructor arguments; else an `HFTokenizer`.
  """
  path = os.fspath(path)
  tokenizer_json = _read_json(os.path.join(path, "tokenizer.json"))
  if tokenizer_json is None or _bert_pipeline(tokenizer_json):
    return WordPieceTokenizer._from_dir(path, tokenizer_json or {}, **overrides)
  if overrides:
    raise ValueError(
        f"{path} holds a {tokenizer_json['model'].get('type')} tokenizer; "
        f"the options {sorted(overrides)} apply only to BERT WordPiece."
    )
  special = _special_tokens(
      path, dict.fromkeys(("pad_token", "unk_token", "mask_token"))
  )
  return HFTokenizer(os.path.join(path, "tokenizer.json"), **special)
