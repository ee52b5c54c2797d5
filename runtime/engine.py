"""The decode engine: MARIA's cached left-to-right pass with sequences that join and leave between steps.

    submit(ids, masked, ...) ──▶ waiting ──▶ a free slot: one MLM pass over the step's newcomers
    step(): every sequence in a slot feeds its chunk (cursor .. its next masked position) to the step graph,
            which writes the chunk's keys and values into the slot in place (runtime/slots.py); the fusion head
            runs on (h_mlm, h_ar) at each sequence's masked position; the fills are chosen and written in
    a sequence whose last mask is filled leaves its slot, and a waiting one takes it at the next step

Every sequence in a slot fills one token per step, so a step costs one AR call and one fusion-head call whatever
mix of new and old sequences it holds; a sequence whose next masked position lies more than `max_chunk` tokens on
feeds that many per step until it is within reach (chunked prefill), so no step holds attention over a whole long
text at once, and the others do not wait on it. Fills are the same as the batch loop's (runtime/decode.py): each
sequence sees only its own slot, and draws its samples from its own generator.
"""

import collections
import collections.abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import SlotBackend, SpecialIds
from .choose import Sampling, choose_tokens
from .decode import Fill, encode_masked
from .slots import capacity_for
from .utf8 import Utf8Rule

# Tokens a sequence feeds per step at most: attention over a chunk holds chunk x cache scores, so long prefills are
# cut to bound memory at no cost in time (docs/benchmarks.md, "Smaller measurements").
MAX_CHUNK = 256


@dataclass(eq=False)
class Sequence:
    """One text being filled; `tokens` is [START] x_0 .. x_{n-1} with the fills written in as they are chosen."""

    tokens: np.ndarray
    targets: np.ndarray  # masked positions, ascending (at least one)
    sampling: Sampling
    rng: np.random.Generator
    on_token: Callable | None = None  # (position, token, logprob)
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per target, as it is filled
    mlm_hidden: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [n + 2, d_mlm], once admitted
    slot: int = -1
    cursor: int = 0  # AR tokens fed
    filled: int = 0  # masks filled

    @property
    def done(self) -> bool:
        return self.filled == len(self.targets)

    @property
    def chunk_end(self) -> int:
        """Feeding tokens[cursor:chunk_end] gives the AR's state before the next masked position."""
        return int(self.targets[self.filled]) + 1

    def fill(self) -> Fill:
        return Fill(ids=self.tokens[1:].copy(), positions=self.targets, logprobs=self.logprobs)


@dataclass
class Engine:
    backend: SlotBackend
    special: SpecialIds
    slots: int = 8
    fixed_shapes: bool = False  # CUDA graphs: every step over all slots, chunks padded to a power of two,
    # the cache sized for whole sequences when they join (no resize mid-run)
    utf8: Utf8Rule | None = None  # fills keep the text valid UTF-8 (runtime/utf8.py); None: free
    max_chunk: int = MAX_CHUNK  # tokens a sequence feeds per step at most
    waiting: collections.deque = field(default_factory=collections.deque)
    active: dict = field(default_factory=dict)  # slot -> Sequence
    cache: Any = None  # the backend's cache of slots (runtime/slots.py), made at the first step
    steps: int = 0
    last_batch: int = 0  # sequences in the last step

    def submit(
        self,
        ids: np.ndarray | collections.abc.Sequence[int],
        masked: np.ndarray | collections.abc.Sequence[bool],
        sampling: Sampling = Sampling(),
        rng: np.random.Generator | None = None,
        on_token: Callable | None = None,
    ) -> Sequence:
        """Queues one sequence (with at least one masked position); it joins at the next step with a free slot."""
        ids, masked = np.asarray(ids, dtype=np.int64), np.asarray(masked, dtype=bool)
        targets = np.flatnonzero(masked)
        if not len(targets):
            raise ValueError("a sequence needs at least one masked position to fill")
        sequence = Sequence(
            tokens=np.concatenate([[self.special.start], ids]).astype(np.int64),
            targets=targets,
            sampling=sampling,
            rng=rng if rng is not None else np.random.default_rng(sampling.seed),
            on_token=on_token,
            logprobs=np.zeros(len(targets)),
        )
        self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Drops a sequence, waiting or in a slot (its slot is free at the next step)."""
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        elif self.active.get(sequence.slot) is sequence:
            del self.active[sequence.slot]

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def _admit(self) -> None:
        """Moves waiting sequences into free slots (lowest first) with one MLM pass over them."""
        free = [slot for slot in range(self.slots) if slot not in self.active]
        joining = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        if not joining:
            return
        masked = [np.isin(np.arange(len(s.tokens) - 1), s.targets) for s in joining]
        hidden = encode_masked(self.backend, [s.tokens[1:] for s in joining], masked, self.special)
        for sequence, slot, rows in zip(joining, free, hidden):
            sequence.slot, sequence.mlm_hidden = slot, rows[: len(sequence.tokens) + 1]
            self.active[slot] = sequence

    def _ensure_capacity(self, width: int) -> None:
        """The cache holds every position this step writes (chunks are right-padded to `width`)."""
        sequences = self.active.values()
        need = max((len(s.tokens) if self.fixed_shapes else s.cursor) + width for s in sequences)
        if self.cache is None:
            self.cache = self.backend.new_cache(self.slots, capacity_for(need))
        elif need > self.cache.capacity or (capacity_for(need) * 2 <= self.cache.capacity and not self.fixed_shapes):
            self.cache.resize(capacity_for(need))  # grow, or shrink once the longest sequences have left

    def step(self) -> list[Sequence]:
        """One AR step for every sequence in a slot; returns the sequences finished by it."""
        self._admit()
        self.last_batch = len(self.active)
        if not self.active:
            return []
        ends = {slot: min(s.chunk_end, s.cursor + self.max_chunk) for slot, s in self.active.items()}
        width = max(ends[slot] - s.cursor for slot, s in self.active.items())
        if self.fixed_shapes:
            width = 1 << (width - 1).bit_length()  # few shapes, so few graphs to capture
        self._ensure_capacity(width)
        rows = self.slots if self.fixed_shapes else max(self.active) + 1
        input_ids = np.full((rows, width), self.special.pad, dtype=np.int64)
        cursors = np.zeros(rows, dtype=np.int64)  # free slots in range feed padding into themselves
        for slot, s in self.active.items():
            input_ids[slot, : ends[slot] - s.cursor] = s.tokens[s.cursor : ends[slot]]
            cursors[slot] = s.cursor
        hidden = self.backend.cache_step(input_ids, cursors[:, None] + np.arange(width), self.cache)
        order = sorted(slot for slot, s in self.active.items() if ends[slot] == s.chunk_end)  # at a mask
        if order:
            sequences = [self.active[slot] for slot in order]
            ar_hidden = hidden[order, [ends[slot] - 1 for slot in order] - cursors[order]]
            mlm_hidden = np.stack([s.mlm_hidden[s.targets[s.filled] + 1] for s in sequences])
            self._choose(sequences, self.backend.fuse(mlm_hidden, ar_hidden))
        finished = []
        for slot, s in sorted(self.active.items()):
            s.cursor = ends[slot]
            if s.done:
                finished.append(self.active.pop(slot))
        self.steps += 1
        return finished

    def _choose(self, sequences: list[Sequence], logits: np.ndarray) -> None:
        """Chooses each sequence's fill with its own sampling and generator, and writes it in."""
        groups = collections.defaultdict(list)
        for row, s in enumerate(sequences):
            groups[s.sampling].append(row)
        for sampling, rows in groups.items():
            refused = (
                None
                if self.utf8 is None
                else [
                    self.utf8.refused(sequences[row].tokens[1:], sequences[row].targets, sequences[row].filled)
                    for row in rows
                ]
            )
            tokens, logprobs = choose_tokens(
                logits[rows], self.special.all, sampling, [sequences[row].rng for row in rows], refused
            )
            for row, token, logprob in zip(rows, tokens, logprobs):
                s = sequences[row]
                position = int(s.targets[s.filled])
                s.tokens[position + 1], s.logprobs[s.filled] = token, logprob
                s.filled += 1
                if s.on_token is not None:
                    s.on_token(position, int(token), float(logprob))

    def run(self) -> None:
        """Steps until every submitted sequence is filled."""
        while self.busy:
            self.step()


def engine_infill(
    backend: SlotBackend,
    ids: collections.abc.Sequence[np.ndarray],
    masked: collections.abc.Sequence[np.ndarray],
    special: SpecialIds,
    sampling: Sampling,
    slots: int,
    rngs: list[np.random.Generator],
    on_token: Callable[[int, int, int, float], None] | None = None,
    fixed_shapes: bool = False,
    utf8: Utf8Rule | None = None,
) -> list[Fill]:
    """Fills every sequence through one engine of `slots` slots, sequences joining as others finish; sequences
    without a masked position come back unchanged. on_token(i, position, token, logprob) and utf8 as in
    decode.infill."""
    engine = Engine(backend, special, slots=slots, fixed_shapes=fixed_shapes, utf8=utf8)
    results, sequences = [], {}
    for index, (x, m) in enumerate(zip(ids, masked)):
        x, m = np.asarray(x, dtype=np.int64), np.asarray(m, dtype=bool)
        results.append(Fill.unchanged(x))
        if m.any():
            hear = None if on_token is None else (lambda *fill, index=index: on_token(index, *fill))
            sequences[index] = engine.submit(x, m, sampling, rngs[index], hear)
    engine.run()
    for index, sequence in sequences.items():
        results[index] = sequence.fill()
    return results
