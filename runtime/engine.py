"""The decode engine: MARIA's cached left-to-right pass with sequences that join and leave between steps.

    submit(ids, masked, ...) ──▶ waiting ──▶ a free slot: one MLM pass over the step's newcomers
    step(): every sequence in a slot feeds its chunk (cursor .. its next masked position) to the step graph,
            which writes the chunk's keys and values into the slot in place (runtime/slots.py); the fusion head
            runs on (h_mlm, h_ar) at each sequence's masked position; the fills are chosen and written in
    a sequence whose last mask is filled leaves its slot, and a waiting one takes it at the next step

Every sequence in a slot fills a token per step (or more, speculating), so a step costs one AR call and one fusion-
head call whatever mix of new and old sequences it holds; a sequence whose next masked position lies more than
`max_chunk` tokens on feeds that many per step until it is within reach (chunked prefill), so no step holds
attention over a whole long text at once, and the others do not wait on it. Fills are the same as the batch loop's
(runtime/decode.py): each sequence sees only its own slot, and draws its samples from its own generator.

Speculative infilling (speculate=k): a sequence's chunk runs on to its k-th next masked position, with the MLM
head's draft written in at each masked position before it; the fusion head runs at all k, and the fills are chosen
left to right while MARIA keeps the drafts (greedy: its best id is the draft; sampling: runtime/choose.py's
keep_draft). At the first fill that is not the draft, MARIA's own id is written there and the cursor moves back to
it: the positions past it in the slot are written over by the next step. A greedy sequence's fills past that point
were chosen after the rejected draft, not MARIA's id; they become its drafts there, as in Jacobi decoding (fewer
steps on real text: docs/benchmarks.md). Greedy fills are the same as with k = 0; sampled fills follow the same
distribution, drawn differently.
"""

import collections
import collections.abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import SlotBackend, SpecialIds
from .choose import Drafts, Sampling, choose_tokens, draft_tokens
from .decode import Fill, encode_masked
from .slots import capacity_for
from .utf8 import Utf8Rule

# Tokens a sequence feeds per step at most: attention over a chunk holds chunk x cache scores, so long prefills are
# cut to bound memory at no cost in time (docs/benchmarks.md, "Smaller measurements").
MAX_CHUNK = 256
# Speculating, a masked position is drafted only where its draft's probability is at least DRAFT_FLOOR (below it
# MARIA seldom keeps the draft), and only as far as a step may widen: a sampled row to DRAFT_WIDTH tokens, greedy
# rows to DRAFT_TOKENS over the step's rows; a wider step costs more (docs/benchmarks.md, "Speculative infilling").
DRAFT_FLOOR = 0.1
DRAFT_WIDTH = 4
DRAFT_TOKENS = 16
DRAFT_ROWS = 256  # masked positions the MLM head's drafts are read at per call


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
    # speculating, per masked position: the draft there (the MLM head's best id, or a fill chosen past a rejected
    # draft), and its probability
    drafts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
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
class Chunk:
    """What a sequence feeds in one step: tokens[cursor:end], with `drafts` written in at its first masked
    positions (sampling: drawn from `probs` [drafts, V]); the step fills up to `fills` masked positions."""

    end: int
    fills: int
    drafts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    probs: np.ndarray | None = None

    def draft(self, j: int) -> tuple[int, np.ndarray | None] | None:
        """The draft at the j-th masked position of the chunk and its distribution (None: greedy), or None."""
        if j >= len(self.drafts):
            return None
        return int(self.drafts[j]), None if self.probs is None else self.probs[j]


@dataclass
class Engine:
    backend: SlotBackend
    special: SpecialIds
    slots: int = 8
    fixed_shapes: bool = False  # CUDA graphs: every step over all slots, chunks padded to a power of two,
    # the cache sized for whole sequences when they join (no resize mid-run)
    utf8: Utf8Rule | None = None  # fills keep the text valid UTF-8 (runtime/utf8.py); None: free
    max_chunk: int = MAX_CHUNK  # tokens a sequence feeds per step at most
    speculate: int = 0  # masked positions a sequence may fill per step, drafted by the MLM head (0: one, no drafts)
    draft_width: int = DRAFT_WIDTH  # a sampled row's drafts widen its chunk to this many tokens, or its own width
    draft_tokens: int = DRAFT_TOKENS  # greedy rows' drafts widen the step to this many tokens over its rows, or
    # its widest chunk without them
    draft_floor: float = DRAFT_FLOOR  # drafts only where the draft's probability is at least this
    waiting: collections.deque = field(default_factory=collections.deque)
    active: dict = field(default_factory=dict)  # slot -> Sequence
    cache: Any = None  # the backend's cache of slots (runtime/slots.py), made at the first step
    steps: int = 0
    last_batch: int = 0  # sequences in the last step
    drafted: int = 0  # drafts fed to the step graph
    kept: int = 0  # drafts MARIA kept

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
        if self.speculate > 1:
            self._read_drafts(joining)

    def _read_drafts(self, joining: list[Sequence]) -> None:
        """The MLM head at every masked position of the joining sequences, once: its best id there and that id's
        probability, DRAFT_ROWS rows a call (a whole text's logits at once could take gigabytes)."""
        rows = np.concatenate([s.mlm_hidden[s.targets + 1] for s in joining])
        best, confidence = np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows))
        for begin in range(0, len(rows), DRAFT_ROWS):
            ids, logprobs = self.backend.mlm_best(rows[begin : begin + DRAFT_ROWS], self.special.all)
            best[begin : begin + len(ids)], confidence[begin : begin + len(ids)] = ids, np.exp(logprobs)
        for s, at in zip(joining, np.split(np.arange(len(rows)), np.cumsum([len(s.targets) for s in joining])[:-1])):
            s.drafts, s.confidence = best[at], confidence[at]

    def _ensure_capacity(self, width: int) -> None:
        """The cache holds every position this step writes (chunks are right-padded to `width`)."""
        sequences = self.active.values()
        need = max((len(s.tokens) if self.fixed_shapes else s.cursor) + width for s in sequences)
        if self.cache is None:
            self.cache = self.backend.new_cache(self.slots, capacity_for(need))
        elif need > self.cache.capacity or (capacity_for(need) * 2 <= self.cache.capacity and not self.fixed_shapes):
            self.cache.resize(capacity_for(need))  # grow, or shrink once the longest sequences have left

    def _reach(self, s: Sequence) -> Chunk:
        """Up to `speculate` next masked positions of s (one without speculation) whose chunk fits in max_chunk
        tokens; where even the next lies past that, max_chunk tokens on and no fill (chunked prefill)."""
        ends = s.targets[s.filled : s.filled + max(1, self.speculate)] + 1
        fills = int(np.searchsorted(ends - s.cursor, self.max_chunk, side="right"))
        return Chunk(int(ends[fills - 1]), fills) if fills else Chunk(s.cursor + self.max_chunk, 0)

    def step(self) -> list[Sequence]:
        """One AR step for every sequence in a slot; returns the sequences finished by it."""
        self._admit()
        self.last_batch = len(self.active)
        if not self.active:
            return []
        chunks = {slot: self._reach(s) for slot, s in self.active.items()}
        if self.speculate > 1:
            self._draft(chunks)
        width = max(chunks[slot].end - s.cursor for slot, s in self.active.items())
        if self.fixed_shapes:
            width = 1 << (width - 1).bit_length()  # few shapes, so few graphs to capture
        self._ensure_capacity(width)
        rows = self.slots if self.fixed_shapes else max(self.active) + 1
        input_ids = np.full((rows, width), self.special.pad, dtype=np.int64)
        cursors = np.zeros(rows, dtype=np.int64)  # free slots in range feed padding into themselves
        for slot, s in self.active.items():
            input_ids[slot, : chunks[slot].end - s.cursor] = s.tokens[s.cursor : chunks[slot].end]
            input_ids[slot, s.targets[s.filled : s.filled + len(chunks[slot].drafts)] + 1 - s.cursor] = chunks[
                slot
            ].drafts
            cursors[slot] = s.cursor
        hidden = self.backend.cache_step(input_ids, cursors[:, None] + np.arange(width), self.cache)
        fused = [(s, j) for slot, s in sorted(self.active.items()) for j in range(chunks[slot].fills)]
        if fused:
            at = [(s.slot, int(s.targets[s.filled + j]) - s.cursor) for s, j in fused]
            ar_hidden = hidden[tuple(np.array(at).T)]
            mlm_hidden = np.stack([s.mlm_hidden[s.targets[s.filled + j] + 1] for s, j in fused])
            refused = None if self.utf8 is None else [self._refused(s, j, chunks[s.slot].drafts) for s, j in fused]
            if all(s.sampling.greedy for s, _ in fused):  # chosen where the logits are (a GPU's memory)
                chosen = self.backend.fuse_best(mlm_hidden, ar_hidden, self.special.all, refused)
            else:
                chosen = self._choose(fused, self.backend.fuse(mlm_hidden, ar_hidden), chunks, refused)
            self._write(fused, *chosen, chunks)
        finished = []
        for slot, s in sorted(self.active.items()):
            s.cursor = int(s.targets[s.filled - 1]) + 1 if chunks[slot].fills else chunks[slot].end
            if s.done:
                finished.append(self.active.pop(slot))
        self.steps += 1
        return finished

    def _draft(self, chunks: dict[int, Chunk]) -> None:
        """Drafts each chunk's masked positions but its last where the chunk stays within reach and the draft is
        sure enough, and ends the chunk at the first masked position where either fails. Within reach: greedy rows
        as far as the step's widest chunk without drafts (its padding the drafts then fill) or draft_tokens shared
        by the step's rows; sampled rows as far as their own chunk or draft_width tokens, so their draws do not
        depend on their batch. Sure enough: the draft's probability is at least draft_floor. Both are decided
        before a sampled draft is drawn, so sampled fills stay exact. Greedy drafts are the sequence's (the MLM
        head's best ids, or fills chosen past a rejected draft), up to the first the UTF-8 rule refuses (MARIA
        could not keep it); sampled ones are drawn from the head's distribution without the refused ids."""
        widths = {slot: min(s.chunk_end - s.cursor, self.max_chunk) for slot, s in self.active.items()}
        widest = max(widths.values())
        shared = max(widest, self.draft_tokens // len(self.active))
        sampled: list[Sequence] = []
        for slot, s in self.active.items():
            chunk = chunks[slot]
            if not chunk.fills:  # still on its way to its next masked position
                continue
            room = shared if s.sampling.greedy else max(widths[slot], self.draft_width)
            fits = s.targets[s.filled + 1 : s.filled + chunk.fills] + 1 - s.cursor <= room
            confident = (s.confidence[s.filled : s.filled + chunk.fills - 1] >= self.draft_floor) & fits
            drafts = s.drafts[
                s.filled : s.filled + (int(np.argmin(confident)) if not confident.all() else len(confident))
            ]
            if s.sampling.greedy and self.utf8 is not None:
                drafts = drafts[: next((j for j, d in enumerate(drafts) if d in self._refused(s, j, drafts)), None)]
            elif not s.sampling.greedy and len(drafts):
                sampled.append(s)
            chunk.fills, chunk.end, chunk.drafts = len(drafts) + 1, int(s.targets[s.filled + len(drafts)]) + 1, drafts
            self.drafted += len(drafts)
        if sampled:
            rows = [s.mlm_hidden[s.targets[s.filled : s.filled + len(chunks[s.slot].drafts)] + 1] for s in sampled]
            logits = self.backend.mlm_logits(np.concatenate(rows))
            row = 0
            for s in sampled:
                chunk = chunks[s.slot]
                chunk.drafts, chunk.probs = chunk.drafts.copy(), np.zeros((len(chunk.drafts), logits.shape[-1]))
                for j in range(len(chunk.drafts)):  # in order: the UTF-8 rule at j reads the drafts before it
                    refused = None if self.utf8 is None else [self._refused(s, j, chunk.drafts)]
                    drawn = draft_tokens(logits[row : row + 1], self.special.all, s.sampling, s.rng, refused)
                    assert drawn.probs is not None
                    chunk.drafts[j], chunk.probs[j], row = drawn.ids[0], drawn.probs[0], row + 1

    def _choose(
        self, fused: list[tuple[Sequence, int]], logits: np.ndarray, chunks: dict[int, Chunk], refused: list | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Chooses every fused position's fill at once, each sequence's with its own sampling and generator (the
        j-th as if the drafts before it were kept: its AR state saw them), never one of refused[row]: (ids,
        log-probabilities)."""
        groups = collections.defaultdict(list)
        for row, (s, _) in enumerate(fused):
            groups[s.sampling].append(row)
        chosen = np.zeros(len(fused), dtype=np.int64), np.zeros(len(fused))
        for sampling, rows in groups.items():
            drafts = [chunks[fused[row][0].slot].draft(fused[row][1]) for row in rows]
            tokens, logprobs = choose_tokens(
                logits[rows],
                self.special.all,
                sampling,
                [fused[row][0].rng for row in rows],
                None if refused is None else [refused[row] for row in rows],
                Drafts.of(drafts) if any(d is not None for d in drafts) else None,
            )
            chosen[0][rows], chosen[1][rows] = tokens, logprobs
        return chosen

    def _write(
        self, fused: list[tuple[Sequence, int]], tokens: np.ndarray, logprobs: np.ndarray, chunks: dict[int, Chunk]
    ) -> None:
        """Writes the chosen fills in, each sequence's left to right up to and including the first that is not its
        draft; the fills past it are dropped, a greedy sequence's kept as its drafts there."""
        stopped: set[int] = set()
        first = {s.slot: s.filled for s, _ in fused}
        for row, (s, j) in enumerate(fused):
            if s.slot in stopped:
                if s.sampling.greedy:
                    at = first[s.slot] + j
                    s.drafts[at], s.confidence[at] = tokens[row], np.exp(logprobs[row])
                continue
            token, logprob, draft = int(tokens[row]), float(logprobs[row]), chunks[s.slot].draft(j)
            position = int(s.targets[s.filled])
            s.tokens[position + 1], s.logprobs[s.filled] = token, logprob
            s.filled += 1
            if draft is None or token != draft[0]:
                stopped.add(s.slot)
            else:
                self.kept += 1
            if s.on_token is not None:
                s.on_token(position, token, logprob)

    def _refused(self, s: Sequence, j: int, drafts: np.ndarray) -> np.ndarray:
        """The ids the UTF-8 rule refuses at s's j-th fused position, drafts[:j] written in before it."""
        assert self.utf8 is not None
        tokens, drafts = s.tokens, drafts[:j]
        if len(drafts):
            tokens = tokens.copy()
            tokens[s.targets[s.filled : s.filled + j] + 1] = drafts
        refused = self.utf8.refused(tokens[1:], s.targets, s.filled + j)
        return np.zeros(0, dtype=np.int64) if refused is None else refused

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
    speculate: int = 0,
) -> list[Fill]:
    """Fills every sequence through one engine of `slots` slots, sequences joining as others finish; sequences
    without a masked position come back unchanged. on_token(i, position, token, logprob) and utf8 as in
    decode.infill; speculate as Engine's."""
    engine = Engine(backend, special, slots=slots, fixed_shapes=fixed_shapes, utf8=utf8, speculate=speculate)
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
