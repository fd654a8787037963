"""DeepFloyd IF's caption cleaning (`clean_caption=True`, the IF pipelines' default), as Diffusers does it.

Diffusers cleans a prompt twice with one fixed recipe - URL, HTML, handle, CJK, dash, quote, id, filename and
marketing-phrase removal - built on beautifulsoup4 (HTML to text) and ftfy (mojibake repair). Both are the optional
extra `rapiddiff[if]`. Without them Diffusers logs a warning and uses the plain rule (lower-case, strip); so does
rapiddiff, so the same environment gives the same prompt in both libraries.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

from ..utils.optional import import_optional

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "rapiddiff[if]"  (beautifulsoup4 and ftfy)'

_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
# Ranges of CJK strokes, katakana extensions, enclosed letters, compatibility forms, ideographs and hexagrams.
_CJK_RANGES = ("\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf", "\u4dc0-\u4dff")
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58"
    "\ufe63\uff0d"
)
_BAD_PUNCT = "[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]{1,}"
_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"

# (pattern, replacement) steps, in Diffusers' order; HTML and ftfy steps are marked by name.
_BEFORE_HTML = [
    ("<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),
]
_BEFORE_FTFY = [
    (r"@[\w\d]+\b", ""),
    *((f"[{r}]+", "") for r in (*_CJK_RANGES, "\u4e00-\u9fff")),
    (f"[{_DASHES}]+", "-"),
    ("[`´«»“”¨]", '"'),
    ("[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.(?:{_FILE_TYPES})", ""),  # file names
    (r"[\"\']{2,}", r'"'),
    (r"[\.]{2,}", r" "),
    (_BAD_PUNCT, r" "),
    (r"\s+\.\s+", r" "),
]
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_TYPES})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    (r"\b\s+\:\s+", r": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", r""),
    (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
]
_SEPARATORS = re.compile(r"(?:\-|\_)")


def _apply(steps: list[tuple[str, str]], text: str) -> str:
    for pattern, replacement in steps:
        text = re.sub(pattern, replacement, text)
    return text


def caption_cleaning_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("bs4", "ftfy"))


def clean_caption(caption: str) -> str:
    """One pass of IF's caption cleaning (Diffusers' `_clean_caption`); needs beautifulsoup4 and ftfy."""
    install = f"IF caption cleaning needs beautifulsoup4 and ftfy: {INSTALL_HINT}"
    ftfy = import_optional("ftfy", install)
    BeautifulSoup = import_optional("bs4", install).BeautifulSoup
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = BeautifulSoup(text, features="html.parser").text
    text = _apply(_BEFORE_FTFY, text)
    if len(_SEPARATORS.findall(text)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        text = _SEPARATORS.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _apply(_AFTER_FTFY, text).strip()


def preprocess_text(text: str | Sequence[str], clean: bool) -> list[str]:
    """Diffusers' IF `_text_preprocessing`: each prompt cleaned twice (clean=True), else lower-cased and stripped.
    Without beautifulsoup4 / ftfy, clean=True warns and falls back to the plain rule, as Diffusers does."""
    if clean and not caption_cleaning_available():
        logger.warning(
            "clean_caption=True needs beautifulsoup4 and ftfy (%s); not installed, so the prompt is only lower-cased "
            "and stripped (clean_caption=False), as Diffusers does",
            INSTALL_HINT,
        )
        clean = False
    texts = [text] if isinstance(text, str) else list(text)
    if clean:
        return [clean_caption(clean_caption(t)) for t in texts]
    return [t.lower().strip() for t in texts]


def preprocess_prompt(text: Any, clean: bool) -> Any:
    """`preprocess_text` keeping the prompt's form: None, a string, or a list of strings."""
    if text is None:
        return None
    texts = preprocess_text(text, clean)
    return texts[0] if isinstance(text, str) else texts
