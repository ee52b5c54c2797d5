"""Bundle -> fills, with onnxruntime, numpy and tokenizers only.

`Infiller` loads a bundle's sessions and tokenizer once; each call fills a list of texts through the decode
engine (runtime/engine.py: batch_size slots, texts joining as others finish), or with decoder="concat" through
the batch loop over Optimum's decoder (runtime/decode.py); runtime/rounds.py adds span candidates, reranking and
per-text seeds.
"""

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .choose import Sampling
from .decode import Fill, infill, score, sequence_rngs
from .default_model import resolve_bundle
from .driver import BatchDecoder, Decoder
from .engine import Engine, engine_infill
from .errors import SettingError
from .manifest import load_manifest
from .onnx_backend import OnnxBackend
from .requests import FillRequest, Prepared
from .results import Infilled
from .rounds import OnRequestFill, run_requests
from .text import MAX_CANDIDATES, MaskedText, candidates_of, encode_masked_text, literal, span_ranges, with_lengths
from .utf8 import Utf8Rule

__all__ = ["FillRequest", "Infilled", "Infiller", "Prepared"]
DECODERS = ("auto", "engine", "concat")


def chosen_decoder(decoder: str, graphs: dict) -> str:
    """The decoder a setting runs on a bundle of these graphs: auto is the engine where the bundle has it."""
    if decoder != "auto":
        return decoder
    return "engine" if "ar_step" in graphs else "concat"


def check_speculate(speculate: int, decoder: str, graphs: dict) -> int:
    """speculate, where the decoder and the bundle's graphs can draft; a SettingError naming what stands in the
    way."""
    if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 0 or speculate == 1:
        raise SettingError(
            f"{{speculate}} takes 0 (off) or the masked positions a step may fill, at least 2; got {speculate!r}",
            "speculate",
        )
    if speculate and decoder != "engine":
        raise SettingError("{speculate} needs the engine; use it with {decoder} engine or auto", "speculate", "decoder")
    if speculate and "mlm_decoder" not in graphs:
        raise SettingError(
            "{speculate} drafts with the MLM head (mlm_decoder.onnx), which this bundle lacks; re-export it with "
            "`maria export` (without --no-baseline-heads), or leave {speculate} at 0",
            "speculate",
        )
    return speculate


class Infiller:
    def __init__(
        self,
        bundle: str | Path | None = None,
        device: str = "auto",
        io_binding: bool | None = None,
        decoder: str = "auto",
        cuda_graph: bool = False,
        threads: int | None = None,
        speculate: int = 0,
    ) -> None:
        """bundle: a folder written by `maria export`; None for the default model shipped in the package.
        decoder: engine (ar_step.onnx, the KV cache written in place), concat (ar_decoder.onnx, today's path), or
        auto: the engine where the bundle has it. cuda_graph: on CUDA, capture the engine's steps as CUDA graphs.
        threads: CPU threads per ONNX Runtime session; None: as many as this process may use where that is fewer
        than the machine's CPUs (an affinity mask, a container's cpuset or CPU quota), else ONNX Runtime's own.
        speculate: the engine fills up to this many masked positions a step, drafted by the MLM head and kept while
        MARIA agrees (runtime/engine.py); 0: one a step. Greedy fills are the same either way."""
        if decoder not in DECODERS:
            raise SettingError(f"{{decoder}} must be one of {', '.join(DECODERS)}, got '{decoder}'", "decoder")
        self.bundle = resolve_bundle(bundle)
        self.manifest = load_manifest(self.bundle)
        graphs = self.manifest.graphs
        decoder = chosen_decoder(decoder, graphs)
        needed = {"engine": "ar_step", "concat": "ar_decoder"}[decoder]
        if needed not in graphs:
            how = "without --no-concat-decoder" if decoder == "concat" else "with this maria-onnx"
            raise SettingError(
                f"{{decoder}} {decoder} needs {needed}.onnx, which this bundle lacks; re-export it "
                f"with `maria export` {how}, or use {{decoder}} auto",
                "decoder",
            )
        self.decoder = decoder
        self.speculate = check_speculate(speculate, decoder, graphs)
        self.tokenizer = literal(Tokenizer.from_file(str(self.bundle / self.manifest.tokenizer)))
        self.backend = OnnxBackend(
            self.bundle,
            self.manifest,
            device=device,
            io_binding=io_binding,
            cuda_graph=cuda_graph,
            decoder=decoder,
            threads=threads,
        )
        self.special = self.manifest.special_ids
        self._check_mask_token()
        self.utf8 = Utf8Rule.from_tokenizer(self.tokenizer, self.manifest.vocab_size, self.special.all)

    @property
    def device(self) -> str:
        return self.backend.device

    def speculating(self, speculate: int) -> "Infiller":
        """This infiller with another speculate setting, sharing its loaded sessions (no second copy of the model)."""
        other = copy.copy(self)
        other.speculate = check_speculate(speculate, self.decoder, self.manifest.graphs)
        return other

    def encode(self, text: str) -> MaskedText:
        return encode_masked_text(text, self.tokenizer, self.special.mask, self.manifest.max_sequence_length)

    def fill_ids(
        self,
        ids: Sequence[np.ndarray],
        masked: Sequence[np.ndarray],
        sampling: Sampling = Sampling(),
        batch_size: int = 8,
        rngs: list[np.random.Generator] | None = None,
        on_token: Callable[[int, int, int, float], None] | None = None,
    ) -> list[Fill]:
        """Fills content ids at masked positions; sequences without masked positions come back unchanged.
        rngs[i] draws sequence i's samples; by default one generator per sequence from (seed, i, 0)."""
        self._check_ids(ids, masked)
        if self.decoder == "concat":
            return infill(self.backend, ids, masked, self.special, sampling, batch_size, rngs, on_token, self.utf8)
        rngs = sequence_rngs(sampling.seed, len(ids)) if rngs is None else rngs
        return engine_infill(
            self.backend,
            ids,
            masked,
            self.special,
            sampling,
            batch_size,
            rngs,
            on_token,
            fixed_shapes=self.backend.on_device,
            utf8=self.utf8,
            speculate=self.speculate,
        )

    def score(self, ids: Sequence[np.ndarray], masked: Sequence[np.ndarray], batch_size: int = 8) -> list[float]:
        """Summed negative log-likelihood of the given tokens at the masked positions (teacher forced)."""
        self._check_ids(ids, masked)
        return [float(n.sum()) for n in score(self.backend, ids, masked, self.special, batch_size)]

    def prepare(self, text: str, rerank: bool = False, most: float = MAX_CANDIDATES) -> Prepared:
        """Checks and encodes a text: one candidate per combination of its span lengths ([MASK:?], [MASK:a-b]), or,
        where several span markers allow over `most` combinations, their ranges to search gap by gap (its longest
        combination checked). Raises ValueError for text the model cannot fill, naming the problem and the fix."""
        if not isinstance(text, str):
            raise ValueError(f"a text must be a string, got {type(text).__name__}")
        ranges = span_ranges(text, self.manifest.max_sequence_length)
        expanded = candidates_of(text, ranges, most)
        if expanded is None:
            self.encode(with_lengths(text, [r[-1] for r in ranges]))
            prepared = Prepared(text, [], tuple(ranges))
        else:
            prepared = Prepared(text, [(lengths, self.encode(candidate)) for lengths, candidate in expanded])
        if (rerank or prepared.spans) and not self.manifest.has_baseline_heads:
            why = "the AR's whole-text score, and this bundle has no ar_lm_head.onnx; re-export it with `maria export`"
            if rerank:
                raise SettingError(f"{{rerank}} needs {why}", "rerank")
            raise ValueError(f"span markers need {why}")
        return prepared

    def infill(
        self,
        texts: list[str],
        sampling: Sampling = Sampling(),
        batch_size: int = 8,
        num_samples: int = 1,
        indices: list[int] | None = None,
        rerank: bool = False,
    ) -> list[Infilled]:
        """Fills every [MASK] / [MASK:N] / [MASK:?] / [MASK:a-b] of each text; num_samples results per text, in
        input order (with rerank, each text's samples ordered by the AR's whole-text score). Sample j of texts[i]
        is drawn from a generator of (seed, indices[i], j) (indices default to 0, 1, ...), so it is the same
        whatever the batch size or the other texts."""
        if isinstance(texts, (str, bytes)):
            raise ValueError("infill takes a list of texts, got a single string; pass [text]")
        texts = list(texts)
        indices = list(range(len(texts))) if indices is None else list(indices)
        if batch_size < 1 or num_samples < 1 or len(indices) != len(texts):
            raise ValueError(
                f"batch size and number of samples must be at least 1 (got {batch_size}, "
                f"{num_samples}), and indices one per text ({len(indices)} for {len(texts)})"
            )
        request = FillRequest([self.prepare(text, rerank) for text in texts], sampling, num_samples, rerank, indices)
        return self.infill_requests([request], batch_size=batch_size)[0]

    def infill_requests(
        self,
        requests: list[FillRequest],
        on_token: OnRequestFill | None = None,
        batch_size: int | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[list[Infilled]]:
        """Several requests through one decoder of batch_size rows (default, and at most: every row of their first
        rounds at once); each keeps its own seed, so its results do not depend on the others. on_token(request, text,
        sample, position, token, logprob) hears each fill as it is chosen, on_batch(rows, ns) each decoder step."""
        rows = max(1, sum(request.size for request in requests))
        slots = min(batch_size or rows, rows)  # memory follows the rows there are, not a large batch_size
        return run_requests(self, self.new_decoder(slots), requests, on_token, on_batch)

    def new_decoder(self, slots: int) -> Decoder:
        """What the round driver steps, `slots` rows at a time: the decode engine, or with decoder="concat" the
        batch loop over Optimum's decoder."""
        if self.decoder == "concat":
            return BatchDecoder(self.backend, self.special, slots, self.utf8)
        return Engine(
            self.backend,
            self.special,
            slots=slots,
            fixed_shapes=self.backend.on_device,
            utf8=self.utf8,
            speculate=self.speculate,
        )

    @property
    def max_sequence_length(self) -> int:
        return self.manifest.max_sequence_length

    def _check_mask_token(self) -> None:
        """The mask id must name a mask token in the tokenizer, or none (an id only the MLM knows)."""
        token = self.tokenizer.id_to_token(self.special.mask)
        if token is not None and "mask" not in token.lower():
            raise ValueError(
                f"{self.bundle / 'maria.json'}: the mask id {self.special.mask} is the token "
                f"{token!r} in the bundle's tokenizer, not a mask token; re-export the bundle with "
                "`maria export`"
            )

    def _check_ids(self, ids: Sequence[np.ndarray], masked: Sequence[np.ndarray]) -> None:
        for row, (x, m) in enumerate(zip(ids, masked)):
            x = np.asarray(x)
            if len(x) != len(m) or len(x) > self.manifest.max_sequence_length or len(x) == 0:
                raise ValueError(
                    f"sequence {row}: {len(x)} ids and {len(m)} mask flags; need equal lengths from 1 "
                    f"to {self.manifest.max_sequence_length}"
                )
            if x.min() < 0 or x.max() >= self.manifest.vocab_size:
                raise ValueError(f"sequence {row} holds ids outside the vocabulary [0, {self.manifest.vocab_size})")
