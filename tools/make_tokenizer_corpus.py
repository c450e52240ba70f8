"""Record the official SAM 3 tokenizer's ids for a corpus of hard captions, for `tests/test_tokenizer_parity.py`.

Run with the reference environment (`tools/official_sam3.py`), from the repository root:

    .refenv/bin/python tools/make_tokenizer_corpus.py

It tokenizes every caption below with Meta's `SimpleTokenizer` (sam3 0.1.4, `tokenizer_ve.py`), loaded with the
vocabulary packaged in `sam3core/assets`, at context length 32, and writes `tests/data/tokenizer_corpus.json`
(ASCII-escaped JSON, so invisible and odd characters survive editors and diffs). The captions target each
step of the official pipeline: ftfy repair (mojibake, curly quotes, ligatures, terminal escapes),
double HTML unescaping, whitespace collapsing (tabs, newlines, no-break and other Unicode spaces), lower
casing (including letters whose lower case changes length), the word regex (contractions, letters, single
digits, punctuation runs, its special-token alternatives), byte-level BPE of non-Latin scripts and emoji, and
truncation at the context length (the end token must stay last).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.official_sam3 import load_official_modules, official_package_version  # noqa: E402

BPE_PATH = REPO_ROOT / "sam3core" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
OUTPUT = REPO_ROOT / "tests" / "data" / "tokenizer_corpus.json"
CONTEXT_LENGTH = 32

PLAIN = [
    "a red bicycle leaning against a brick wall",
    "two dogs playing in the snow",
    "the person on the left",
    "a bowl of ramen with a soft boiled egg",
    "yellow taxi",
    "car",
    "a",
    "A",
    ".",
    "people sitting at a table outdoors near the water",
    "white cat sleeping on a laptop keyboard",
]
CASE = [
    "A RED BICYCLE",
    "MiXeD CaSe CaPtIoN",
    "iPhone and eBay and McDonald's",
    "NASA ESA JAXA",
    "Title Case Caption For A Photo",
]
PUNCTUATION = [
    "wow!!!",
    "what?!?!",
    "wait...",
    "a---b",
    "(((nested)))",
    "[brackets] {braces} <angles>",
    "@#$%^&*",
    "~`|\\",
    "comma,separated,words,without,spaces",
    "dog.cat.bird",
    "!!!???...,,,;;;:::",
    "semi; colon: dash - en – em — ellipsis …",
    "quotes \"double\" and 'single'",
    "“curly double” and ‘curly single’",
    "«guillemets» and „low quotes“",
]
NUMBERS = [
    "3.14159",
    "1,000,000 people",
    "2nd place",
    "10x zoom",
    "-42 degrees",
    "1e-5",
    "0.5kg of flour",
    "$19.99",
    "50% off",
    "1/2 cup",
    "12:30pm",
    "2024-01-15",
    "version v1.2.3",
    "007",
    "9876543210",
    "+1 (555) 123-4567",
    "4K 60fps HDR10+",
    "room 101b",
]
CONTRACTIONS = [
    "don't",
    "it's",
    "they're",
    "we've",
    "I'm",
    "you'll",
    "he'd",
    "DON'T STOP",
    "rock 'n' roll",
    "'quoted'",
    "o'clock",
    "can't won't shouldn't've",
    "the dogs' toys",
    "it`s a backtick",
    "it’s a curly apostrophe",
    "I'M HE'LL THEY'VE",
    "'s 't 're",
    "y'all",
]
ACCENTS = [
    "café",
    "naïve",
    "résumé",
    "Ångström",
    "São Paulo",
    "Zürich",
    "façade",
    "piñata",
    "Øresund bridge",
    "Łódź",
    "İstanbul",
    "Straße ß",
    "ﬁsh and ﬂowers",
    "Ærø and œuvre",
    "Dvořák",
    "Nguyễn Tiếng Việt",
]
COMBINING = [
    "cafe\u0301",
    "n\u0303o",
    "a\u0308\u0304",
    "e\u0301\u0301\u0301",
    "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0316\u032d\u0308\u0307l\u036e\u0312\u036bg\u030c\u0317\u035ao\u0319\u0314",
    "A\u030a",
    "o\u0328\u0304",
    "\u0301leading combining mark",
    "क\u094d\u0937",
    "ก\u0e34\u0e4a",
]
CJK = [
    "猫が寝ている",
    "一只红色的自行车",
    "한국어 캡션",
    "日本語とEnglish混在",
    "東京タワー",
    "ＡＢＣ１２３",
    "中文，标点。",
    "ｶﾀｶﾅ",
    "ひらがな カタカナ 漢字",
    "𠀀𠀁 rare ideographs",
    "「かぎ括弧」と『二重』",
    "ㄅㄆㄇ bopomofo",
]
RTL = [
    "قطة على السجادة",
    "שלום עולם",
    "cat قطة",
    "\u200fright-to-left mark",
    "\u202eoverride\u202c",
    "مرحبا 123",
    "עברית ו-English",
    "السلام عليكم",
]
SCRIPTS = [
    "красная машина",
    "καλημέρα κόσμε",
    "नमस्ते दुनिया",
    "แมวสีดำ",
    "გამარჯობა",
    "Բարեւ",
    "வணக்கம்",
    "ᚠᚢᚦᚨᚱᚲ",
    "ΣΊΣΥΦΟΣ",
    "Ελληνικά ς σ",
    "ǅ Dž titlecase",
    "𓀀 hieroglyph",
]
EMOJI = [
    "🐶",
    "dog 🐶 park",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "🏳️\u200d🌈",
    "👍🏽",
    "❤️",
    "🇺🇸🇯🇵",
    "😀😃😄😁",
    "1️⃣ keycap",
    "☕ coffee",
    "🍕🍔🍟 fast food",
    "a🐱b",
]
HTML = [
    "&amp;",
    "Tom &amp; Jerry",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&quot;quoted&quot;",
    "&#39;apostrophe&#39;",
    "&#x1F600;",
    "&nbsp;spaces&nbsp;",
    "&copy; 2024",
    "&amp;amp;",
    "&amp;lt;tag&amp;gt;",
    "&amp;amp;amp;",
    "&unknownentity;",
    "AT&T",
    "fish & chips",
    "&#128512; grin",
    "&eacute;t&eacute;",
    "&amp;quot;double escaped quote&amp;quot;",
    "<b>real tag</b> &amp; entity",
    "&#x27;hex apostrophe&#x27;",
    "&hellip;&mdash;&ndash;",
]
MOJIBAKE = [
    "cafÃ©",
    "Ã¼ber",
    "donâ€™t",
    "â€œquotedâ€\u009d",
    "The Mona Lisa doesnâ€™t have eyebrows.",
    "Ã©tÃ©",
    "â˜º smile",
    "ðŸ˜€",
    "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "sÃ£o paulo",
    "naÃ¯ve rÃ©sumÃ©",
    "â€” em dash",
    "Â£50",
]
WHITESPACE = [
    "  leading",
    "trailing  ",
    "multiple   spaces",
    "tab\tseparated",
    "new\nline",
    "windows\r\nline end",
    "nbsp\u00a0here",
    "\u2003em space",
    "zero\u200bwidth",
    "\u3000ideographic space",
    "\ufeffBOM start",
    "\t\n \r",
    "   ",
    "line\u2028separator",
    "soft\u00adhyphen",
    "narrow\u202fnbsp",
    "thin\u2009space",
    "vertical\x0btab",
    "form\x0cfeed",
    "next\x85line",
]
CONTROL = [
    "\x00null",
    "bell\x07",
    "esc\x1b[31mred\x1b[0m",
    "del\x7f",
    "\ufffd replacement",
    "private\ue000use",
    "\u200d joiner alone",
]
URLS = [
    "https://example.com/path?q=1&x=2",
    "www.google.com",
    "user@example.com",
    "http://例え.jp",
    "ftp://files.server.org/file.tar.gz",
    "#hashtag @mention",
    "C:\\Windows\\path",
    "/usr/bin/python3",
    "snake_case_name",
    "camelCaseName",
    "kebab-case-name",
    "file_name_v2_final(1).jpg",
]
SPECIAL_TOKENS = [
    "<start_of_text>",
    "<end_of_text>",
    "a <end_of_text> b",
    "<START_OF_TEXT>",
    "<|endoftext|>",
    "</w>",
    "a</w>b",
    "<start_of_text><end_of_text>",
]
SYMBOLS = [
    "∑∫√∞≈≠",
    "x² + y³",
    "½ ¼ ¾",
    "Ⅻ",
    "25°C",
    "™ ® ©",
    "€100 £50 ¥1000 ₹",
    "→ ← ↑ ↓",
    "│┌┐└┘",
    "𝄞 music",
    "𝐁𝐨𝐥𝐝 math",
    "Ⓐⓑⓒ",
    "ℌ ℍ ℕ",
    "\u00b5 micro vs \u03bc mu",
    "\u212a vs K kelvin sign",
    "\u212b angstrom sign",
]
LONG = [
    "a " * 29,
    "a " * 30,
    "a " * 31,
    "dog " * 50,
    "1234567890" * 10,
    "supercalifragilisticexpialidocious" * 3,
    "一只红色的自行车靠在砖墙上" * 4,
    "🐶🐱🐭🐹🐰🦊🐻🐼" * 3,
    "an extremely long and detailed caption describing a crowded city street at dusk, with neon "
    "signs, wet asphalt reflecting the lights, dozens of pedestrians holding umbrellas, taxis, buses "
    "and a street vendor selling roasted chestnuts from a small cart near the corner",
    "the quick brown fox jumps over the lazy dog " * 4,
    "&amp; " * 40,
    "!!! " * 40,
    "café naïve résumé " * 8,
    "word " * 31 + "end",
    "3.14159265358979323846264338327950288419716939937510",
]

CORPUS: list[str] = [
    *PLAIN,
    *CASE,
    *PUNCTUATION,
    *NUMBERS,
    *CONTRACTIONS,
    *ACCENTS,
    *COMBINING,
    *CJK,
    *RTL,
    *SCRIPTS,
    *EMOJI,
    *HTML,
    *MOJIBAKE,
    *WHITESPACE,
    *CONTROL,
    *URLS,
    *SPECIAL_TOKENS,
    *SYMBOLS,
    *LONG,
    "",
]


def main() -> int:
    if len(set(CORPUS)) != len(CORPUS):
        duplicates = sorted({text for text in CORPUS if CORPUS.count(text) > 1})
        raise SystemExit(f"duplicate captions: {duplicates}")
    # A JSON reader joins an escaped surrogate pair into one character, so such a caption would not reach
    # the test as the official tokenizer saw it.
    altered = [text for text in CORPUS if json.loads(json.dumps(text, ensure_ascii=True)) != text]
    if altered:
        raise SystemExit(f"captions that do not survive a JSON round trip: {altered!r}")
    official = load_official_modules()
    tokenizer = official.tokenizer_ve.SimpleTokenizer(bpe_path=str(BPE_PATH))
    ids = tokenizer(CORPUS, context_length=CONTEXT_LENGTH).tolist()
    header = {
        "context_length": CONTEXT_LENGTH,
        "source": f"sam3 {official_package_version()} sam3.model.tokenizer_ve.SimpleTokenizer",
    }
    # One entry a line keeps the file reviewable; ASCII escapes keep invisible characters visible.
    entries = ",\n".join(
        json.dumps({"text": text, "ids": row}, ensure_ascii=True) for text, row in zip(CORPUS, ids, strict=True)
    )
    head = json.dumps(header, ensure_ascii=True)[:-1]
    OUTPUT.write_text(f'{head}, "entries": [\n{entries}\n]}}\n')
    truncated = sum(row[-1] != 0 for row in ids)
    print(f"{OUTPUT.relative_to(REPO_ROOT)}: {len(CORPUS)} captions, {truncated} fill the context")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
