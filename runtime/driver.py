"""The round driver: rows in, decoder steps, results out. One loop for every caller of the decode engine.

    start(rounds) ──▶ each row of the current round submitted to the decoder (a row with nothing masked is
    filled as it is) ──▶ step(): one decoder step for every caller's rows ──▶ a run whose rows are all filled
    hands its fills to rounds.collect, which gives the next round (submitted the same way) or none: the run ends

`maria infill` and `maria generate` drive it to the end (fill_rounds); `maria serve`'s decode worker steps it
while requests come and go (serve/continuous.py). The decoder is the engine (runtime/engine.py: slots, rows
joining between steps), or with the concat decoder the batch loop behind the same interface (BatchDecoder).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer

from .backend import Backend, HeadsBackend, SpecialIds
from .choose import Sampling
from .decode import Fill, infill
from .text import MaskedText
from .utf8 import Utf8Rule

OnFill = Callable[[int, int, float], None]  # (position, token, logprob) of one row's fill
Hear = Callable[[Any], OnFill | None]  # a row -> the on_token of its fills, or None


class Filler(Protocol):
    """What rounds of rows need of a loaded model (Infiller is one): its tokenizer and special ids, the backend
    that scores whole texts, the encoding of a text with markers, and decoders to fill rows with."""

    tokenizer: Tokenizer
    special: SpecialIds

    @property
    def backend(self) -> HeadsBackend: ...

    @property
    def max_sequence_length(self) -> int: ...

    def encode(self, text: str) -> MaskedText: ...

    def new_decoder(self, slots: int) -> Decoder: ...


class RoundRow(Protocol):
    """One decode row: the text with its masked positions, and the generator its fills draw from."""

    @property
    def encoded(self) -> MaskedText: ...

    @property
    def rng(self) -> np.random.Generator: ...


class RoundSource(Protocol):
    """Rounds of rows (runtime/rounds.py's Rounds, runtime/anneal.py's Annealing): `rows` is the round to
    decode; `collect` takes its fills, in order, and returns the next round ([] once it has ended)."""

    @property
    def rows(self) -> list: ...

    def collect(self, fills: list[Fill]) -> list: ...


class Decoded(Protocol):
    """A row submitted to a decoder: done once filled, then its fill."""

    @property
    def done(self) -> bool: ...

    @property
    def slot(self) -> int: ...

    def fill(self) -> Fill: ...


Submit = Callable[[np.ndarray, np.ndarray, Sampling, np.random.Generator, OnFill | None], Decoded]
"""submit(ids, masked, sampling, rng, on_token) queues one row to fill and returns it."""


class Decoder(Protocol):
    """What the driver steps: the decode engine (runtime/engine.py), or BatchDecoder."""

    @property
    def busy(self) -> bool: ...

    @property
    def last_batch(self) -> int: ...

    @property
    def submit(self) -> Submit: ...

    def cancel(self, sequence: Any) -> None: ...  # a Decoded this decoder's submit returned

    def step(self) -> object: ...


@dataclass(eq=False)
class Run:
    """One caller's rounds in the driver. hear(row) gives the on_token of a row's fills, or None to stay
    silent; `sequences` holds, per row of the current round, what the decoder fills (None: nothing masked)."""

    rounds: RoundSource
    sampling: Sampling
    hear: Hear | None = None
    sequences: list[Decoded | None] = field(default_factory=list)
    on_round: Callable[[int, int], None] | None = None  # (rows, ns) of each round once it is filled
    error: Exception | None = None  # what its rounds raised when collecting a round: it ended with this
    round_began: int = 0  # time.monotonic_ns() when the current round went in

    @property
    def started(self) -> bool:
        """Some row of the current round holds (or held) a decoder slot."""
        return any(s is not None and s.slot >= 0 for s in self.sequences)


class RoundDriver:
    """Every caller's rounds through one decoder; a round's rows go in as the previous round is collected."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.runs: list[Run] = []

    @property
    def busy(self) -> bool:
        return bool(self.runs)

    def start(
        self,
        rounds: RoundSource,
        sampling: Sampling,
        hear: Hear | None = None,
        on_round: Callable[[int, int], None] | None = None,
    ) -> Run:
        """Submits the first round of `rounds`; its fills are drawn with `sampling` and each row's generator."""
        run = Run(rounds, sampling, hear, on_round=on_round)
        self.runs.append(run)
        self._submit(run)
        return run

    def cancel(self, run: Run) -> None:
        """Drops a run: its rows leave the decoder (their slots are free at the next step)."""
        if run in self.runs:
            self.runs.remove(run)
        for sequence in run.sequences:
            if sequence is not None:
                self.decoder.cancel(sequence)

    def step(self) -> list[Run]:
        """One decoder step (where any row waits for one); returns the runs whose last round ended with it, and
        those whose rounds raised an error collecting a round (with it as their `error`; the others go on)."""
        if self.decoder.busy:
            self.decoder.step()
        return self._collect()

    def _submit(self, run: Run) -> None:
        run.sequences, run.round_began = [], time.monotonic_ns()
        for row in run.rounds.rows:
            if not row.encoded.masked.any():
                run.sequences.append(None)
                continue
            hear = run.hear(row) if run.hear is not None else None
            run.sequences.append(self.decoder.submit(row.encoded.ids, row.encoded.masked, run.sampling, row.rng, hear))

    def _collect(self) -> list[Run]:
        ended = []
        for run in [r for r in self.runs if all(s is None or s.done for s in r.sequences)]:
            fills = [
                Fill.unchanged(row.encoded.ids) if s is None else s.fill()
                for row, s in zip(run.rounds.rows, run.sequences)
            ]
            if run.on_round is not None:
                run.on_round(len(fills), time.monotonic_ns() - run.round_began)
            try:
                if run.rounds.collect(fills):
                    self._submit(run)
                    continue
            except Exception as error:  # handed to the run's caller, which answers for it
                run.error = error
            self.runs.remove(run)
            ended.append(run)
        return ended


def fill_rounds(
    driver: RoundDriver,
    runs: Sequence[tuple[RoundSource, Sampling, Hear | None]],
    on_round: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Drives every (rounds, sampling, hear) to its end. on_round(rows, ns) hears each round once it is filled.
    Returns False where cancelled() turned true before a step (the runs are dropped), True once every round is
    filled."""
    started = [driver.start(rounds, sampling, hear, on_round) for rounds, sampling, hear in runs]
    while driver.busy:
        if cancelled():
            for run in started:
                driver.cancel(run)
            return False
        for run in driver.step():
            if run.error is not None:
                raise run.error
    return True


@dataclass(eq=False)
class Batched:
    """A row of the batch loop: filled, all its masks at once, by the next BatchDecoder step."""

    ids: np.ndarray
    masked: np.ndarray
    sampling: Sampling
    rng: np.random.Generator
    on_token: OnFill | None
    slot: int = -1
    done: bool = False
    filled: Fill | None = None

    def fill(self) -> Fill:
        assert self.filled is not None, "fill() before the row was decoded"
        return self.filled


@dataclass
class BatchDecoder:
    """The concat decoder's batch loop (runtime/decode.py's infill over ar_decoder.onnx) behind the engine's
    interface: a step fills every row submitted since the last, batch_size rows at a time, rows of one sampling
    together."""

    backend: Backend
    special: SpecialIds
    batch_size: int = 8
    utf8: Utf8Rule | None = None
    waiting: list[Batched] = field(default_factory=list)
    last_batch: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def submit(
        self,
        ids: np.ndarray,
        masked: np.ndarray,
        sampling: Sampling,
        rng: np.random.Generator,
        on_token: OnFill | None = None,
    ) -> Batched:
        row = Batched(np.asarray(ids, dtype=np.int64), np.asarray(masked, dtype=bool), sampling, rng, on_token)
        self.waiting.append(row)
        return row

    def cancel(self, sequence: Decoded) -> None:
        if sequence in self.waiting:
            self.waiting.remove(sequence)  # type: ignore[arg-type]

    def step(self) -> list[Batched]:
        rows, self.waiting = self.waiting, []
        self.last_batch = len(rows)
        groups: dict[tuple, list[Batched]] = {}
        for row in rows:
            groups.setdefault(row.sampling.batch_key, []).append(row)
        for group in groups.values():

            def heard(index: int, position: int, token: int, logprob: float, group: list = group) -> None:
                hear = group[index].on_token
                if hear is not None:
                    hear(position, token, logprob)

            fills = infill(
                self.backend,
                [r.ids for r in group],
                [r.masked for r in group],
                self.special,
                group[0].sampling,
                self.batch_size,
                [r.rng for r in group],
                heard,
                self.utf8,
            )
            for row, filled in zip(group, fills):
                row.filled, row.done, row.slot = filled, True, 0
        return rows
