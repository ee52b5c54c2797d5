"""Fills that keep the text valid UTF-8.

A byte-level tokenizer (GPT-2's byte-level BPE, as OLMo, Llama 3 and Qwen use, or SentencePiece with byte
fallback, as Llama 2 and Mistral use) has tokens that hold part of a character: a lead byte, or continuation
bytes. Left free, a one-token [MASK] can be filled with half an emoji and the filled text shows U+FFFD. The rule
here lets a fill take only tokens after which the bytes so far are valid UTF-8 and from which the span's remaining
fills can still meet the text after it at a character boundary (the user's text is whole characters, so a span
ends on one). Where the text before a fill is itself not valid UTF-8 (arbitrary ids, as in the export's checks),
the fill is left free.

The state is the number of continuation bytes a character still awaits (0 to 3). Overlong and surrogate forms
are not told apart from valid ones: the rule guards the structure, not every code point.
"""

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

FREE = -1  # a state outside the automaton: the bytes before are not valid UTF-8
STATES = 4
REACH = 4  # within this many tokens, every reachable state is reached
Ids = Sequence[int] | np.ndarray  # a text's token ids


def _byte_state(state: int, byte: int) -> int:
    """The state after one byte, or FREE where the byte cannot stand there."""
    if byte < 0x80:
        return 0 if state == 0 else FREE
    if byte < 0xC0:
        return state - 1 if state > 0 else FREE
    if state != 0 or byte in (0xC0, 0xC1) or byte > 0xF4:
        return FREE
    return 1 if byte < 0xE0 else 2 if byte < 0xF0 else 3


def _bytes_state(state: int, data: bytes) -> int:
    for byte in data:
        state = _byte_state(state, byte)
        if state == FREE:
            break
    return state


def _gpt2_byte_decoder() -> dict:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return {character: byte for byte, character in characters.items()}


def _kinds(decoder: dict | None) -> set:
    """The decoder types of a tokenizer.json decoder (a Sequence's parts included)."""
    if not decoder:
        return set()
    return {decoder.get("type"), *(part.get("type") for part in decoder.get("decoders") or [])}


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each id stands for, for a `tokenizers.Tokenizer`: exact for byte-level and byte-fallback
    tokenizers; elsewhere each token's text (whole characters). Ids past the tokenizer's stand for no bytes."""
    kinds = _kinds(json.loads(tokenizer.to_str()).get("decoder"))
    byte_level, fallback = "ByteLevel" in kinds, "ByteFallback" in kinds
    decoder = _gpt2_byte_decoder() if byte_level else {}
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    data = [b""] * vocab_size
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if index >= vocab_size:
            continue
        if token in special:
            data[index] = token.encode("utf-8")
        elif byte_level and all(c in decoder for c in token):
            data[index] = bytes(decoder[c] for c in token)
        elif fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            data[index] = bytes([int(token[3:5], 16)])
        else:
            data[index] = token.replace("\u2581", " ").encode("utf-8")
    return data


class Utf8Rule:
    def __init__(self, data: list[bytes], banned: Iterable[int]) -> None:
        """data: the bytes of each id (token_bytes); banned: ids never chosen (special tokens)."""
        self.data = data
        self.next = np.array([[_bytes_state(state, d) for d in data] for state in range(STATES)], dtype=np.int8)
        self.next[:, list(banned)] = FREE
        # reach[k][a, b]: from state a, some k tokens end in state b
        reach = [np.eye(STATES, dtype=bool)]
        steps = np.zeros((STATES, STATES), dtype=bool)
        for state in range(STATES):
            steps[state, np.unique(self.next[state][self.next[state] != FREE])] = True
        for _ in range(REACH):
            reach.append((steps.astype(np.int64) @ reach[-1].astype(np.int64)) > 0)
        self.reach = reach
        self._masks: dict[tuple, np.ndarray | None] = {}  # per (state, fills left, awaited)
        self._refusals: dict[tuple, np.ndarray] = {}  # per (state, fills left, awaited): at most 4 x 5 x 4 each

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, banned: Iterable[int]) -> "Utf8Rule":
        """For a `tokenizers.Tokenizer` or a transformers tokenizer."""
        return cls(token_bytes(getattr(tokenizer, "backend_tokenizer", tokenizer), vocab_size), banned)

    def state_before(self, ids: Ids, position: int) -> int:
        """The state after ids[:position]: read back from the last lead or ASCII byte, at most 4 bytes."""
        tail, index = b"", position - 1
        while index >= 0 and len(tail) < 4:
            tail = self.data[ids[index]] + tail
            index -= 1
        for back in range(1, min(len(tail), 4) + 1):
            byte = tail[-back]
            if byte < 0x80 or byte >= 0xC0:  # a character starts here
                return _bytes_state(0, tail[-back:])
        return 0 if index < 0 and not tail else FREE

    def awaited_after(self, ids: Ids, position: int) -> int:
        """The continuation bytes the text from ids[position] on begins with: what a span before it must leave
        pending (0 at the end of the text)."""
        head, index = b"", position
        while index < len(ids) and len(head) < 4:
            head += self.data[ids[index]]
            index += 1
        count = 0
        while count < min(len(head), 3) and 0x80 <= head[count] < 0xC0:
            count += 1
        return count

    def allowed(self, ids: Ids, targets: np.ndarray, index: int) -> np.ndarray | None:
        """The ids that may fill ids[targets[index]] (the fills before it written into ids), as a bool mask over
        the vocabulary; None where the fill is free."""
        key = self._key(ids, targets, index)
        return None if key is None else self._mask(*key)

    def refused(self, ids: Ids, targets: np.ndarray, index: int) -> np.ndarray | None:
        """The ids that may not fill ids[targets[index]], or None where the fill is free: what the decoders
        take, since setting a few hundred scores is cheaper than masking the whole vocabulary (docs/benchmarks.md,
        "Smaller measurements")."""
        key = self._key(ids, targets, index)
        return None if key is None else self._refused(*key)

    def _key(self, ids: Ids, targets: np.ndarray, index: int) -> tuple | None:
        """(state before the fill, fills left in its span after it, bytes the text after the span awaits)."""
        position = int(targets[index])
        gaps = np.flatnonzero(np.diff(targets[index:]) != 1)
        end = index + int(gaps[0]) if len(gaps) else len(targets) - 1  # the span runs to targets[end]
        state = self.state_before(ids, position)
        if state == FREE:
            return None
        key = (state, min(end - index, REACH), self.awaited_after(ids, int(targets[end]) + 1))
        return key if self._mask(*key) is not None else None

    def _mask(self, state: int, left: int, awaited: int) -> np.ndarray | None:
        """Ids valid after `state` from which `left` more tokens can end in `awaited`; None where no id is (the
        fill is then free). Computed once per key."""
        key = (state, left, awaited)
        if key not in self._masks:
            after = self.next[state]
            valid = after != FREE
            mask = valid & self.reach[left][np.where(valid, after, 0), awaited]
            self._masks[key] = mask if mask.any() else None
        return self._masks[key]

    def _refused(self, state: int, left: int, awaited: int) -> np.ndarray:
        key = (state, left, awaited)
        if key not in self._refusals:
            mask = self._mask(state, left, awaited)
            self._refusals[key] = np.flatnonzero(~mask) if mask is not None else np.zeros(0, dtype=np.int64)
        return self._refusals[key]


class FillPieces:
    """The text each fill adds to its filled text, fill by fill as the decode loop chooses them, in whole
    characters: a token that holds part of a character adds "", and the token that completes the character adds
    all of it, so the pieces of a span join into the span's text (one token decoded alone would show U+FFFD).
    Each piece is decoded after the token before it (for a span's first fill, the text's token before the span),
    so a tokenizer that drops the leading space of a decode's first token keeps the fill's own."""

    def __init__(self, tokenizer: Any, ids: Iterable[int]) -> None:
        """tokenizer: a `tokenizers.Tokenizer` or a transformers tokenizer; ids: the text's content ids."""
        self.tokenizer, self.ids = tokenizer, [int(i) for i in ids]
        self.start = self.read = self.end = -1  # ids[start:read] decoded already; ids[read:end] held back

    def add(self, position: int, token: int) -> str:
        """The piece that filling ids[position] with token adds (fills come left to right)."""
        self.ids[position] = int(token)
        if position != self.end:  # a new span
            self.start, self.read = max(position - 1, 0), position
        self.end = position + 1
        return self._advance(complete=False)

    def rest(self) -> str:
        """What the span holds back: part of a character, which only a fill left free can end with."""
        return self._advance(complete=True)

    def _advance(self, complete: bool) -> str:
        done = self._decode(self.start, self.read)
        text = self._decode(self.start, self.end)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not complete):
            return ""
        self.start, self.read = self.read, self.end
        return text[len(done) :]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=False) if end > start else ""


def fill_pieces(tokenizer: Any, ids: Ids, positions: Ids) -> list[str]:
    """The piece each fill of a filled text adds (FillPieces), one per masked position."""
    pieces, out = FillPieces(tokenizer, ids), []
    for index, position in enumerate(positions):
        out.append(pieces.add(int(position), int(ids[position])))
        if index + 1 == len(positions) or positions[index + 1] != position + 1:  # the span ends here
            out[-1] += pieces.rest()
    return out
