"""A request on its way through a batcher: what it asks for, where its answer goes, and the queue's refusal."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from maria_onnx.runtime.anneal import AnnealRequest
from maria_onnx.runtime.requests import FillRequest
from maria_onnx.runtime.utf8 import FillPieces

from .stats import Timings


class QueueFull(Exception):
    """The batcher's queue holds max_queue requests: the server answers 503."""


@dataclass(eq=False)  # each job is itself: kept in sets while in flight
class Job:
    """One request (HTTP or gRPC): what to fill (or, from /v1/generate, to generate), and where its result goes."""

    request: FillRequest | AnnealRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    timings: Timings
    on_token: Callable | None = None  # (text index, sample, position, token, logprob), called on the loop
    cancelled: bool = False
    pieces: dict = field(default_factory=dict)  # (text index, sample) -> its FillPieces, for a stream

    def piece(self, tokenizer: Tokenizer, text: int, sample: int, position: int, token: int) -> str:
        """What a fill token adds to its text in whole characters (runtime/utf8.py), as a stream sends it: the
        fills of each text and sample are pieced together apart (a text with fixed markers: one candidate)."""
        if (text, sample) not in self.pieces:
            assert isinstance(self.request, FillRequest), "pieces of a generation's fills"
            self.pieces[text, sample] = FillPieces(tokenizer, self.request.texts[text].candidates[0][1].ids)
        return self.pieces[text, sample].add(position, token)

    @property
    def sampling_key(self) -> tuple:
        return self.request.sampling.batch_key

    @property
    def inferences(self) -> int:
        """What Triton's statistics count it as: its texts (the batch dimension), or a generation's samples."""
        return self.request.num_samples if isinstance(self.request, AnnealRequest) else len(self.request.texts)

    def tokens(self, results: list) -> int:
        """Tokens its results filled: the masked positions of each fill, or the tokens of each generated sample."""
        if isinstance(self.request, AnnealRequest):
            return self.request.length * len(results)
        return sum(len(r.masked_positions) for r in results)

    def finish(self, setter: Callable, value: object) -> None:
        """Sets the job's future on its loop (from the worker thread), once."""

        def set_once() -> None:
            if not self.future.done():
                setter(value)

        self.loop.call_soon_threadsafe(set_once)
