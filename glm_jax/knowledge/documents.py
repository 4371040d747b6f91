"""A knowledge base's files -> passages (docs/knowledge.md, "Passages").

    passages = read_passages("data/knowledge/docs", tokenizer=tok, max_tokens=256, overlap=32)

Markdown and plain text are split at headings into sections; a section's paragraphs are packed into passages of
at most `max_tokens` tokens (counted by the model's tokenizer), each passage starting with the last paragraphs of
the one before up to `overlap` tokens; a paragraph longer than the budget is cut at sentence ends, and a
sentence longer than the budget by tokens. JSONL records (`text` or `content`, optional `title`) are one section
each; PDF pages (with the optional `pypdf`) one section per page. Every passage keeps its file, its heading path
and where in the file it came from.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from glm_jax.tokenizers import SentencePieceTokenizer

SUFFIXES = (".md", ".markdown", ".txt", ".jsonl", ".pdf")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*")


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrievable unit: its text, the file it came from (relative to the knowledge base's root), the
    headings above it (outermost first; a JSONL record's title; a PDF's file name) and its place in the file
    ("lines 5-9", "record 3", "page 2")."""

    text: str
    source: str
    headings: tuple[str, ...] = ()
    location: str = ""

    @property
    def title(self) -> str:
        """The nearest heading (or the file's name)."""
        return self.headings[-1] if self.headings else Path(self.source).stem

    @property
    def citation(self) -> str:
        """Where the passage came from: "zh/cities.md > 中国城市 > 拉萨 (lines 3-5)"."""
        where = " > ".join([self.source, *self.headings])
        return f"{where} ({self.location})" if self.location else where

    def to_json(self) -> dict:
        return {"text": self.text, "source": self.source, "headings": list(self.headings), "location": self.location}

    @classmethod
    def from_json(cls, obj: dict) -> "Passage":
        return cls(obj["text"], obj["source"], tuple(obj.get("headings", ())), obj.get("location", ""))


@dataclasses.dataclass
class _Section:
    headings: tuple[str, ...]
    paragraphs: list[tuple[str, int, int]]  # (text, first line, last line), 1-based; 0 when lines do not apply
    where: str = ""  # "record 3", "page 2": the location when lines do not apply


def _markdown_sections(text: str, title: str) -> Iterator[_Section]:
    """Sections at headings; paragraphs are runs of non-blank lines (a heading ends one)."""
    stack: list[tuple[int, str]] = []
    section = _Section((title,), [])
    para: list[str] = []
    first = 0

    def close_paragraph(last: int):
        nonlocal para
        if para:
            section.paragraphs.append((" ".join(p.strip() for p in para), first, last))
            para = []

    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADING.match(line)
        if m:
            close_paragraph(n - 1)
            if section.paragraphs:
                yield section
            level = len(m.group(1))
            stack = [(lv, h) for lv, h in stack if lv < level] + [(level, m.group(2))]
            section = _Section(tuple(h for _, h in stack), [])
        elif line.strip():
            if not para:
                first = n
            para.append(line)
        else:
            close_paragraph(n - 1)
    close_paragraph(len(text.splitlines()))
    if section.paragraphs:
        yield section


def _jsonl_sections(path: Path) -> Iterator[_Section]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        text = obj.get("text", obj.get("content")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: a record needs a string 'text' (or 'content') field")
        title = obj.get("title") or f"{path.stem} {n}"
        paragraphs = [(p.strip(), 0, 0) for p in re.split(r"\n\s*\n", text) if p.strip()]
        yield _Section((str(title),), paragraphs, where=f"record {n}")


def _pdf_sections(path: Path) -> Iterator[_Section]:
    try:
        import pypdf
    except ImportError:
        raise ValueError(f"{path}: reading PDF needs the optional pypdf package (pip install 'glm_jax[pdf]')") from None
    for n, page in enumerate(pypdf.PdfReader(str(path)).pages, 1):
        paragraphs = [(" ".join(p.split()), 0, 0) for p in re.split(r"\n\s*\n", page.extract_text() or "")
                      if p.strip()]
        if paragraphs:
            yield _Section((path.stem,), paragraphs, where=f"page {n}")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def _pieces(text: str, count: Callable[[str], int], max_tokens: int) -> list[str]:
    """`text` cut into pieces of at most max_tokens: at sentence ends, then (one long sentence) by characters."""
    if count(text) <= max_tokens:
        return [text]
    out: list[str] = []
    for sentence in _sentences(text):
        if count(sentence) <= max_tokens:
            out.append(sentence)
            continue
        start = 0
        while start < len(sentence):  # the longest prefix within the budget (binary search on characters)
            lo, hi = start + 1, len(sentence)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if count(sentence[start:mid]) <= max_tokens else (lo, mid - 1)
            out.append(sentence[start:lo])
            start = lo
    return out


def _join(parts: Iterable[str]) -> str:
    """Paragraph pieces joined with a space between Latin text and none between CJK characters."""
    out = ""
    for p in parts:
        if out and not (_is_cjk(out[-1]) and _is_cjk(p[0])):
            out += " "
        out += p
    return out


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _pack(section: _Section, source: str, count: Callable[[str], int], max_tokens: int,
          overlap: int) -> Iterator[Passage]:
    """The section's paragraph pieces packed greedily into passages of at most max_tokens, each after the first
    starting with the previous passage's last pieces up to `overlap` tokens."""
    pieces = [(piece, a, b) for text, a, b in section.paragraphs for piece in _pieces(text, count, max_tokens)]
    sizes = [count(p) for p, _, _ in pieces]
    start = 0
    while start < len(pieces):
        end, used = start, 0
        while end < len(pieces) and (end == start or used + sizes[end] <= max_tokens):
            used += sizes[end]
            end += 1
        chunk = pieces[start:end]
        first, last = chunk[0][1], chunk[-1][2]
        where = section.where or (f"lines {first}-{last}" if first else "")
        yield Passage(_join(p for p, _, _ in chunk), source, section.headings, where)
        if end == len(pieces):
            break
        back, kept = end, 0  # step back over at most `overlap` tokens, always moving forward
        while back - 1 > start and kept + sizes[back - 1] <= overlap:
            back -= 1
            kept += sizes[back]
        start = back


def iter_files(root: Path) -> list[Path]:
    """The knowledge base's files under `root` (or `root` itself), sorted, of the readable kinds."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"{root}: no such file or directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def read_passages(root: str | Path, *, tokenizer=None, max_tokens: int = 256, overlap: int = 32) -> list[Passage]:
    """Every passage of the files under `root` (docs/knowledge.md). `tokenizer`: counts the tokens of the
    budget (anything with `encode(text, add_special_tokens=False)`); None: the tokenizer shipped with glm_jax."""
    if max_tokens < 8 or not 0 <= overlap < max_tokens:
        raise ValueError(f"max_tokens {max_tokens} / overlap {overlap}: need max_tokens >= 8 and 0 <= overlap < "
                         f"max_tokens")
    tokenizer = tokenizer or SentencePieceTokenizer()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    root = Path(root)
    base = root if root.is_dir() else root.parent
    passages: list[Passage] = []
    for path in iter_files(root):
        source = path.relative_to(base).as_posix()
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            sections = _jsonl_sections(path)
        elif suffix == ".pdf":
            sections = _pdf_sections(path)
        else:
            sections = _markdown_sections(path.read_text(encoding="utf-8"), path.stem)
        for section in sections:
            passages.extend(_pack(section, source, count, max_tokens, overlap))
    return passages
