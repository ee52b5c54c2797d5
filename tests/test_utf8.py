"""Fills keep the text valid UTF-8: a byte-level tokenizer's part-character tokens are taken only where the
span can still end on a character boundary."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from runtime.choose import Sampling
from runtime.default_model import DEFAULT_MODEL
from runtime.infiller import Infiller
from runtime.utf8 import Utf8Rule, token_bytes

TEXTS = ["日本語の[MASK:3]テキスト 🙂 [MASK] émoji", "Grüße [MASK] aus Köln, [MASK:2] café.",
         "数据[MASK]处理 [MASK:4] 模块。", "🙂[MASK]🙃 [MASK:3] ok"]


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
        b"".join(infiller.utf8.data[i] for i in result.ids).decode("utf-8")        # raises where invalid
    free = Infiller(DEFAULT_MODEL, device="cpu")
    free.utf8 = None                                   # the same model with its fills left free
    assert any("\ufffd" in r.text for r in free.infill(TEXTS, Sampling(temperature=1.0, seed=3), num_samples=8))


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
    first = rule.allowed(ids, np.array([1, 2]), 0)      # two tokens left: a two-byte character can start here
    assert first[byte_ids(infiller, b"\xc3")[0]] and not first[cont]
    assert not first[lead] or rule.reach[1][2, 0]       # a three-byte lead only if one token can end it
    ids[1] = byte_ids(infiller, b"\xc3")[0]
    last = rule.allowed(ids, np.array([1, 2]), 1)       # the last fill must finish the character
    assert last[cont] and not last[a[0]] and not last[lead]
    ids = np.array(a + [infiller.special.mask] + [cont] + b)    # the text after the span awaits one byte
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
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    assert token_bytes(tokenizer, 6) == [b"<unk>", b"\xe3", b"\x81", b" the", b"a", b""]
    rule = Utf8Rule(token_bytes(tokenizer, 6), banned=[0])
    assert list(rule.next[0]) == [-1, 2, -1, 0, 0, 0] and list(rule.next[1]) == [-1, -1, 0, -1, -1, 1]
