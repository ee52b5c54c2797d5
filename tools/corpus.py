"""The default model's corpus: the reStructuredText sources of the Python 3.11 documentation (Debian's
python3.11-doc), stripped to prose and split by document into train / validation / test."""

import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = "usr/share/doc/python3.11/html/_sources"
# directives whose indented body is not prose
SKIP_BODY = {
    "index",
    "toctree",
    "highlight",
    "code-block",
    "sourcecode",
    "literalinclude",
    "productionlist",
    "testsetup",
    "testcleanup",
    "doctest",
    "testcode",
    "testoutput",
    "image",
    "figure",
    "raw",
    "csv-table",
    "list-table",
    "only",
    "tabularcolumns",
    "sectionauthor",
    "moduleauthor",
    "include",
    "audit-event",
    "opcode",
    "cmdoption",
    "option",
    "envvar",
    "c:macro",
    "c:type",
    "c:var",
    "c:member",
    "c:function",
    "c:struct",
    "impl-detail",
    "availability",
    "pdbcommand",
    "2to3fixer",
}
ROLE = re.compile(r":[\w:.-]+:`([^`]+)`")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")
INLINE = re.compile(r"``(.+?)``|\*\*(.+?)\*\*|\*(\S.*?)\*|`([^`]+)`_*")
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")
TABLE = re.compile(r"^\s*([+=][-=+| ]*|\|.*)$")  # grid / simple tables and line blocks


def download_python_docs(folder: Path) -> Path:
    """apt-get download + dpkg -x of python3.11-doc into folder; returns the _sources folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SOURCES).is_dir():
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=scratch, check=True, capture_output=True)
            (deb,) = Path(scratch).glob("python3.11-doc_*.deb")
            subprocess.run(["dpkg", "-x", str(deb), str(folder)], check=True)
    return folder / SOURCES


def _role(content: str) -> str:
    """:role:`title <target>` -> title; :role:`~a.b.c` -> c; :role:`!name` -> name."""
    if content.endswith(">") and "<" in content:
        return content[: content.index("<")].strip()
    return content.lstrip("!~").split(".")[-1] if content.startswith("~") else content.lstrip("!~")


def _inline(text: str) -> str:
    text = LINK.sub(r"\1", text)
    text = ROLE.sub(lambda m: _role(m.group(1)), text)
    text = INLINE.sub(lambda m: next(g for g in m.groups() if g is not None), text)
    return text.replace("\\", "")


def rst_to_prose(source: str) -> str:
    """Drops directives that are not prose, literal blocks, doctests, tables and section underlines;
    keeps the indented prose of description directives; one paragraph per line."""
    lines = source.splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None
    literal_indent: int | None = None
    doctest = False
    for line in lines:
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        doctest = doctest and bool(stripped)  # a doctest and its output run to the next blank line
        if doctest or stripped.startswith(">>>"):
            doctest = True
            continue
        if skip_indent is not None or literal_indent is not None:
            limit = skip_indent if skip_indent is not None else literal_indent
            assert limit is not None
            if not stripped or indent > limit:
                continue
            skip_indent = literal_indent = None
        if not stripped:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        directive = re.match(r"\.\.\s+([\w:-]+)::", stripped)
        if stripped.startswith(".."):
            if directive is None or directive.group(1) in SKIP_BODY:
                skip_indent = indent
            continue
        if UNDERLINE.match(stripped) or TABLE.match(line):
            continue
        if stripped.endswith("::"):
            literal_indent = indent
            stripped = stripped[:-2].rstrip() + (":" if not stripped[:-2].endswith(" ") else "")
            if not stripped.strip(":"):
                continue
        current.append(_inline(stripped))
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(p for p in paragraphs if len(p.split()) >= 4) + "\n"


def split_of(name: str) -> str:
    """train / validation / test by a hash of the document's path: 90 / 5 / 5, stable across machines."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def build_corpus(sources: Path, out: Path) -> dict:
    """Writes out/{train,validation,test}/<doc>.txt, one prose file per source document; returns counts."""
    counts = {"train": 0, "validation": 0, "test": 0}
    for split in counts:
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
    for path in sorted(sources.rglob("*.rst.txt")):
        name = str(path.relative_to(sources))
        prose = rst_to_prose(path.read_text(encoding="utf-8", errors="replace"))
        if len(prose) < 200:
            continue
        split = split_of(name)
        (out / split / (name.replace("/", "__").removesuffix(".rst.txt") + ".txt")).write_text(prose)
        counts[split] += 1
    return counts
