"""Training text: local files -> documents (packed into windows by runtime.windows.pack_windows) -> random masks."""

from pathlib import Path

import numpy as np

from maria_onnx.runtime.readers import decode_utf8, read_lines, texts_of

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}


def _is_jsonl(file: Path) -> bool:
    return file.suffix.lower() in JSONL_SUFFIXES


def _files(path: Path) -> list[Path]:
    """The file itself, or a folder's text and JSONL files in name order: by suffix, in any case, and none that is
    hidden or inside a hidden folder (a dataset cloned with git holds .git/ and .gitattributes)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file()
            and file.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        if files:
            return files
        raise ValueError(f"{path} holds no .txt, .md, .rst or .jsonl files; pass a text file or a folder of them")
    raise FileNotFoundError(f"data path {path} does not exist; pass a text/JSONL file or a folder of them")


def _read_text(path: Path) -> str:
    return decode_utf8(path.read_bytes(), str(path))


def iter_documents(path, text_field: str = "text", line_documents: bool = False):
    """The documents of read_documents, a file at a time: a reader that needs only the first ones (`maria eval`)
    reads only their files."""
    for file in _files(path):
        text = _read_text(file)
        if _is_jsonl(file) or line_documents:
            documents = texts_of(read_lines(text, str(file), _is_jsonl(file), text_field))
        else:
            documents = [text]
        yield from (document for document in documents if document.strip())


def read_documents(path, text_field: str = "text", line_documents: bool = False) -> list[str]:
    """Plain text: one document per file (or per line with line_documents); JSONL: one per line, from text_field."""
    documents = list(iter_documents(path, text_field, line_documents))
    if not documents:
        raise ValueError(f"{path} holds no text")
    return documents


def random_masks(rng: np.random.Generator, batch: int, seq_len: int, rate_min: float, rate_max: float) -> np.ndarray:
    """[batch, seq_len] bool: per sequence a rate ~ U(rate_min, rate_max), then each position masked with it.
    Every sequence gets at least one masked position."""
    rates = rng.uniform(rate_min, rate_max, size=(batch, 1))
    masked = rng.random((batch, seq_len)) < rates
    empty = ~masked.any(axis=1)
    masked[empty, rng.integers(0, seq_len, size=int(empty.sum()))] = True
    return masked


def split_windows(windows: np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Holds out a seeded fraction of windows (at least one) for evaluation when no eval data is given."""
    if len(windows) < 2:
        raise ValueError(
            "the data makes only one window: too little to hold out evaluation windows; "
            "add text, lower --seq-len, or pass --eval-data"
        )
    order = np.random.default_rng(seed).permutation(len(windows))
    held = max(1, int(len(windows) * eval_fraction))
    return windows[order[held:]], windows[order[:held]]
