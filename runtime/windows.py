"""Text -> token windows: the documents of a corpus tokenized a piece at a time, joined, cut into windows of
seq_len tokens. Training (maria_onnx/data.py, maria_onnx/train.py) and the torch-free `maria eval` both use it, so
it lives in the runtime.
"""

import array
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

PIECE_CHARS = 1 << 20
LINE_START = re.compile(r"(?<=\n)\S")
Encode = Callable[[str], Sequence[int]]  # text -> content ids


def pieces(document: str, encode: Encode, size: int = PIECE_CHARS) -> Iterator[str]:
    """A long document in pieces of about `size` characters for the tokenizer, whose memory grows with the text
    it takes at once (a 100 MB file as one document took 19 GB). A cut falls where a line starts with a
    non-space character, and only where the tokenizer gives the two lines around it the same ids apart as
    together (with a tokenizer that marks a text's start, the document stays whole)."""
    start = 0
    while len(document) - start > size:
        found = LINE_START.search(document, start + size)
        if found is None:
            break
        cut = found.start()
        end = document.find("\n", cut)
        before = document[document.rfind("\n", start, cut - 1) + 1 : cut]
        after = document[cut : len(document) if end < 0 else end]
        if list(encode(before + after)) != list(encode(before)) + list(encode(after)):
            break
        yield document[start:cut]
        start = cut
    yield document[start:]


def pack_windows(
    documents: Iterable[str],
    encode: Encode,
    seq_len: int,
    separator_id: int,
    name: str = "the text",
    most: int | None = None,
) -> np.ndarray:
    """Tokenizes documents (any iterable) with encode (text -> ids, no special tokens; a long document in
    pieces), joins them with separator_id and cuts [windows, seq_len]; with `most`, reads documents only until
    that many windows are full and returns the first `most`. `name` (where the documents come from) names them in
    the error where none fits."""
    ids = array.array("q")  # 8 bytes a token (a list of ints takes about 36)
    for document in documents:
        for piece in pieces(document, encode, PIECE_CHARS):
            ids.extend(encode(piece))
        ids.append(separator_id)
        if most is not None and len(ids) >= most * seq_len:
            break
    count = len(ids) // seq_len if most is None else min(most, len(ids) // seq_len)
    if count == 0:
        raise ValueError(
            f"{name} holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; add text or lower --seq-len"
        )
    return np.frombuffer(ids, dtype=np.int64, count=count * seq_len).reshape(count, seq_len)
