"""Fills keep the text valid UTF-8: a byte-level tokenizer's part-character tokens are taken only where the
span can still end on a character boundary."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.utf8 import FillPieces, Utf8Rule, fill_pieces, token_bytes

TEXTS = [
    "日本語の[MASK:3]テキスト 🙂 [MASK] émoji",
    "Grüße [MASK] aus Köln, [MASK:2] café.",
    "数据[MASK]处理 [MASK:4] 模块。",
    "🙂[MASK]🙃 [MASK:3] ok",
]


@pytest.fixture(scope="module")
def infiller():
    return Infiller(DEFAULT_MODEL, device="cpu")


def byte_ids(infiller, data: bytes) -> list[int]:
    """The ids of the default model's one-byte tokens for these bytes."""
    index = {d: i for i, d in enumerate(infiller.utf8.data) if len(d) == 1}
    return [index[bytes([b])] for b in data]


def test_sampled_fills_of_multilingual_text_are_whole_characters(infiller):
    results = infiller.infill(TEXTS, Sampling(temperature=1.0, seed=3), num_samples=8)
    assert len(results) == 32
    for result in results:
        assert "\ufffd" not in result.text, result.text
        b"".join(infiller.utf8.data[i] for i in result.ids).decode("utf-8")  # raises where invalid
    free = Infiller(DEFAULT_MODEL, device="cpu")
    free.utf8 = None  # the same model with its fills left free
    assert any("\ufffd" in r.text for r in free.infill(TEXTS, Sampling(temperature=1.0, seed=3), num_samples=8))


def spans(result) -> list[str]:
    """The text of each span of a result, as its fills join: runs of adjacent masked positions."""
    joined, last = [], None
    for position, piece in zip(result.masked_positions, result.fills):
        if last is not None and position == last + 1:
            joined[-1] += piece
        else:
            joined.append(piece)
        last = position
    return joined


def test_a_spans_fills_join_into_its_text(infiller):
    """A token that holds part of a character adds "" and the one that completes it the whole character."""
    dash = byte_ids(infiller, b"a") + byte_ids(infiller, "—".encode()) + byte_ids(infiller, b"b")
    assert fill_pieces(infiller.tokenizer, dash, [1, 2, 3]) == ["", "", "—"]
    assert [infiller.tokenizer.decode([i]) for i in dash[1:4]] == ["�"] * 3  # each token alone
    results = infiller.infill(["🙂[MASK:3]🙃"] + TEXTS, Sampling(temperature=3.0, seed=0), num_samples=16)
    assert any("" in r.fills for r in results)  # part-character tokens were chosen
    for result in results:
        assert spans(result) == [piece for piece, fill in result.segments if fill] and "\ufffd" not in result.text
    free = Infiller(DEFAULT_MODEL, device="cpu")
    free.utf8 = None  # fills left free: a span may end inside a character
    for result in free.infill(TEXTS, Sampling(temperature=1.0, seed=3), num_samples=8):
        assert spans(result) == [piece for piece, fill in result.segments if fill]


def test_a_fills_piece_keeps_its_leading_space():
    """A SentencePiece decoder (Llama 2's) drops the space of a decode's first token; a span's first fill is
    decoded after the token before it, so it keeps its own."""
    vocab = {"<unk>": 0, "<0xE3>": 1, "<0x81>": 2, "<0x82>": 3, "\u2581the": 4, "a": 5}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    ids = [5, 4, 1, 2, 3, 5]  # "a the\u3042a"
    assert tokenizer.decode([4]) == "the" and tokenizer.decode(ids) == "a the\u3042a"
    assert fill_pieces(tokenizer, ids, [1, 2, 3, 4]) == [" the", "", "", "\u3042"]
    assert fill_pieces(tokenizer, ids, [0, 1, 3]) == ["a", " the", "\ufffd"]  # a free span's cut character
    pieces = FillPieces(tokenizer, ids)  # as a stream hears them
    assert [pieces.add(p, ids[p]) for p in (2, 3, 4)] == ["", "", "\u3042"] and pieces.add(0, 5) == "a"


def test_the_concat_decoder_keeps_the_same_rule(bundles):
    engine, concat = (Infiller(bundles["olmo"], device="cpu", decoder=d) for d in ("engine", "concat"))
    sampling = Sampling(temperature=1.0, seed=5)
    filled = [engine.infill(TEXTS, sampling, num_samples=4), concat.infill(TEXTS, sampling, num_samples=4)]
    assert [r.ids for r in filled[0]] == [r.ids for r in filled[1]]
    assert not any("\ufffd" in r.text for r in filled[0])


def test_a_span_ends_on_a_character_boundary(infiller):
    rule = infiller.utf8
    a, b = byte_ids(infiller, b"a"), byte_ids(infiller, b"b")
    lead, cont = byte_ids(infiller, b"\xe3")[0], byte_ids(infiller, b"\x81")[0]
    ids = np.array(a + [infiller.special.mask] * 2 + b)
    first = rule.allowed(ids, np.array([1, 2]), 0)  # two tokens left: a two-byte character can start here
    assert first[byte_ids(infiller, b"\xc3")[0]] and not first[cont]
    assert not first[lead] or rule.reach[1][2, 0]  # a three-byte lead only if one token can end it
    ids[1] = byte_ids(infiller, b"\xc3")[0]
    last = rule.allowed(ids, np.array([1, 2]), 1)  # the last fill must finish the character
    assert last[cont] and not last[a[0]] and not last[lead]
    ids = np.array(a + [infiller.special.mask] + [cont] + b)  # the text after the span awaits one byte
    assert rule.awaited_after(ids, 2) == 1
    before = rule.allowed(ids, np.array([1]), 0)
    assert before[byte_ids(infiller, b"\xc3")[0]] and not before[a[0]]


def test_a_fill_after_text_that_is_not_utf8_is_free(infiller):
    cont = byte_ids(infiller, b"\x81")[0]
    ids = np.array([cont] * 5 + [infiller.special.mask])
    assert infiller.utf8.state_before(ids, 5) == -1 and infiller.utf8.allowed(ids, np.array([5]), 0) is None


def test_byte_fallback_tokens_stand_for_their_byte():
    vocab = {"<unk>": 0, "<0xE3>": 1, "<0x81>": 2, "\u2581the": 3, "a": 4}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert token_bytes(tokenizer, 6) == [b"<unk>", b"\xe3", b"\x81", b" the", b"a", b""]
    rule = Utf8Rule(token_bytes(tokenizer, 6), banned=[0])
    assert list(rule.next[0]) == [-1, 2, -1, 0, 0, 0] and list(rule.next[1]) == [-1, -1, 0, -1, -1, 1]
