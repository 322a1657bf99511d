"""Deterministic probe texts for the embedding-parity experiment.

Three groups:
  handmade  short texts aimed at tokenizer and encoder corner cases
            (punctuation, accents, scripts, emoji, control and zero-width
            characters, URLs, numbers, code, long words, special-token text,
            near-empty strings, exact truncation boundaries);
  limit     LIMIT-small queries and documents (Weller et al. 2025, CC BY 4.0;
            see data/limit-small/README.md);
  long      texts of more than 256 word pieces, so truncation is exercised.

The list depends only on this file and the LIMIT-small files, so every run
gives the same texts in the same order.
"""

import json
import os
import pathlib

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SHARED_DATA = pathlib.Path(
    os.environ.get(
        "RETRIEVAL_JAX_SHARED_DATA", _REPO_ROOT.parent / "shared" / "data"
    )
)
# The repository's shipped copy first, then the shared data directory.
LIMIT_DIRS = (_REPO_ROOT / "data" / "limit-small", _SHARED_DATA / "limit-small")

# Every 12th LIMIT query: 84 of 1,000, spread over the file.
_QUERY_STRIDE = 12

_HANDMADE = [
    # Plain English of different lengths and registers.
    "The quick brown fox jumps over the lazy dog.",
    "what is the capital of france",
    "How do vaccines train the immune system?",
    "Retrieval models map queries and documents into one vector space.",
    "I can't believe it's not butter!",
    "She said, \"It's fine,\" but it wasn't.",
    "Rain again. Of course.",
    "The committee postponed the vote until next Thursday afternoon.",
    "ALL CAPS SENTENCE WITH SHOUTING",
    "MiXeD cAsE wOrDs ArE fUn",
    # Punctuation and quotes.
    "Wait... what?!?",
    "!!!!!!!!!!!!!!!!!!!!",
    "...",
    "“Smart quotes” and ‘single ones’ — em dash – en dash",
    "«Guillemets» and „German quotes“ and 「corner brackets」",
    "(parentheses) [brackets] {braces} <angles>",
    "semi;colon:colon,comma/slash\\backslash|pipe",
    "#hashtag @mention $dollar %percent ^caret &amp *star",
    "it's, they're, o'clock, rock 'n' roll",
    "hyphen-ated well-known state-of-the-art",
    # Accents and compatibility forms.
    "Café naïve résumé coöperate façade jalapeño",
    "Ångström Øresund Æsir straße Łódź Šiauliai",
    "ÉCOLE ÉLÉMENTAIRE DE MONTRÉAL",
    "decomposed e\u0301 versus composed \u00e9",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ligatures ﬁ ﬂ ﬀ and roman numeral Ⅻ",
    "superscripts x² y³ and fractions ½ ¾",
    # Other scripts.
    "日本語のテキストです。",
    "中文句子，包含标点符号。",
    "한국어 문장입니다.",
    "BERT 模型 works with mixed 文字 input",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم، هذه جملة عربية.",
    "שלום עולם",
    "नमस्ते दुनिया, यह हिंदी है।",
    "สวัสดีชาวโลก",
    "Tiếng Việt có dấu: Xin chào thế giới",
    "ἀρχὴ σοφίας φόβος",
    # Emoji, including sequences joined by zero-width joiners.
    "I love pizza 🍕🍕!",
    "👩‍👩‍👧‍👦 family emoji",
    "flags 🇫🇷 🇯🇵 and a thumbs up 👍🏽",
    "🙂",
    "emoji🎉glued🎉to🎉words",
    # Control, zero-width and unusual whitespace characters.
    "tab\tseparated\tvalues",
    "line one\nline two\r\nline three",
    "null\x00byte in the middle",
    "bell\x07and\x08backspace",
    "\x1b[31mANSI red text\x1b[0m",
    "zero\u200bwidth\u200bspace",
    "zero\u200cwidth\u200dnon-joiner and joiner",
    "soft\u00adhyphen",
    "byte\ufefforder mark inside",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "right-to-left \u202eoverride\u202c mark",
    "replacement \ufffd character",
    "private use \ue000 character",
    "\u2028line separator\u2029paragraph separator",
    # Near-empty strings.
    "",
    " ",
    "\t\n",
    "a",
    ".",
    "\u200b",
    # Literal special-token text.
    "[SEP]",
    "[MASK] is a special token",
    "[CLS] [SEP] [PAD] [UNK] [MASK]",
    "the [mask] token in lower case",
    "hello [MASK] world [SEP] second segment",
    # URLs, e-mail, paths.
    "https://example.com/path/to/page?query=1&x=y#fragment",
    "email me at someone.name+tag@example.org",
    "/usr/local/bin/python3 --version",
    "C:\\Users\\Public\\Documents\\report.docx",
    # Numbers, dates, currency.
    "3.14159 2,718 1e-10 -42 +7 0x1F 1/2 50%",
    "$1,000.00 €20 £5 ¥300 ₹99",
    "Room 101, 221B Baker Street, London NW1 6XE",
    "2025-01-31T12:34:56Z",
    "call 555-0100 or +1 (555) 010-0199",
    "1234567890123456789012345678901234567890",
    # Code and markup.
    "def f(x): return x ** 2 + 1",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "SELECT * FROM users WHERE id = 42;",
    '<div class="note">Hello <b>world</b></div>',
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "git commit -m 'fix: handle empty input'",
    "λx. x + 1 ↦ ∀ε>0 ∃δ>0",
    "∑_{i=1}^n i = n(n+1)/2 and α β γ ∞ ≤ ≥ ≠ √",
    # Long words: BERT's WordPiece maps words over 100 characters to [UNK].
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "Donaudampfschifffahrtsgesellschaftskapitän",
    "supercalifragilisticexpialidocious" * 3,
    "x" * 99,
    "x" * 100,
    "x" * 101,
    "prefix " + "ab" * 150 + " suffix",
    "word" + "-" * 40 + "dash",
    # Whitespace variants.
    "  leading and trailing spaces  ",
    "multiple     inner     spaces",
]

# Original prose used to build long texts.
_PARAGRAPHS = [
    (
        "Dense retrieval encodes every document of a collection once, ahead of"
        " time, and answers a query with a nearest-neighbour search over those"
        " vectors. The quality of the system therefore rests on two things: how"
        " well the encoder places related texts near each other, and how"
        " exactly the search finds the nearest vectors. Exact search over a few"
        " million vectors is cheap on an accelerator, so the encoder usually"
        " dominates."
    ),
    (
        "When a model is ported from one framework to another, the numbers must"
        " agree before any experiment means anything. Small differences hide in"
        " the layer normalisation epsilon, in the approximation used for the"
        " activation function, in the handling of padding, and in the order in"
        " which floating-point sums are taken. Each of these can move an"
        " embedding by more than the tolerance one would like to claim."
    ),
    (
        "Tokenisers split text into pieces the model knows. A WordPiece "
        "vocabulary keeps frequent words whole and breaks rare ones into "
        "fragments marked with two hashes; accents may be stripped, Chinese "
        "characters are separated, and punctuation becomes its own token. "
        "Inputs longer than the model's limit are cut, which is why long "
        "documents are sometimes split into passages before they are encoded."
    ),
    (
        "Evaluation on a held-out set of queries, with relevance judgments made"
        " by people, tells whether a change helped. Metrics such as nDCG at ten"
        " reward putting the relevant documents near the top, while recall at a"
        " hundred asks whether they were found at all. Both depend on the"
        " judgments, which are never complete, so unjudged documents are a"
        " constant source of doubt."
    ),
    (
        "Über die Brücke gingen wir langsam, während die Möwen über dem Fluss "
        "kreisten. Après la pluie, le café était plein de gens qui parlaient "
        "de tout et de rien. El tren llegó tarde, pero nadie se quejó, porque "
        "la tarde era tranquila y el cielo estaba despejado."
    ),
]


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def limit_dir() -> pathlib.Path:
  """The first LIMIT-small directory that exists (repository copy first)."""
  for path in LIMIT_DIRS:
    if (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file():
      return path
  raise FileNotFoundError(
      f"LIMIT-small not found in {[str(p) for p in LIMIT_DIRS]}"
  )


def build_sentences() -> list[tuple[str, str]]:
  """Returns [(group, text)] in a fixed order; see the module docstring."""
  data_dir = limit_dir()
  queries = [q["text"] for q in _read_jsonl(data_dir / "queries.jsonl")]
  docs = [
      (d.get("title", "") + " " + d["text"]).strip()
      for d in _read_jsonl(data_dir / "corpus.jsonl")
  ]
  items = [("handmade", text) for text in _HANDMADE]
  items += [("limit", q) for q in queries[::_QUERY_STRIDE]]
  items += [("limit", d) for d in docs]

  long_texts = []
  # Four consecutive LIMIT documents (about 400 word pieces), 16 windows.
  for i in range(16):
    long_texts.append(" ".join(docs[(3 * i + j) % len(docs)] for j in range(4)))
  # Handmade paragraphs, all of them and in rotated orders.
  for i in range(len(_PARAGRAPHS)):
    rotated = _PARAGRAPHS[i:] + _PARAGRAPHS[:i]
    long_texts.append("\n\n".join(rotated))
  # Mixed prose, LIMIT text, scripts and emoji in one long input.
  long_texts.append(
      " ".join([
          _PARAGRAPHS[0],
          docs[0],
          "日本語のテキストです。",
          "🍕" * 20,
          _PARAGRAPHS[2],
          docs[1],
      ])
  )
  # "the" is one word piece, so these are exactly 255, 256, 257 and 300
  # tokens with [CLS] and [SEP]: just below, at and above the 256 limit.
  long_texts += ["the " * n for n in (253, 254, 255, 298)]
  items += [("long", text) for text in long_texts]
  return items


def sentences() -> list[str]:
  """The probe texts alone, in the order of `build_sentences`."""
  return [text for _, text in build_sentences()]


if __name__ == "__main__":
  counts = {}
  for group, _ in build_sentences():
    counts[group] = counts.get(group, 0) + 1
  print(counts, sum(counts.values()))
