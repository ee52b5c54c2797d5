"""Bundle -> fills, with onnxruntime, numpy and tokenizers only.

`Infiller` loads a bundle's sessions and tokenizer once; each call runs the shared decode loop over a list of
texts in batches.
"""

from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from .choose import Sampling
from .decode import Fill, infill, score
from .default_model import resolve_bundle
from .manifest import load_manifest
from .onnx_backend import OnnxBackend
from .text import MaskedText, encode_masked_text, segments


@dataclass
class Infilled:
    """One filled text: the filled string, its content ids, where the fills are and how likely each was."""
    input: str
    text: str
    ids: list
    masked_positions: list
    fill_logprobs: list
    fills: list                  # each fill token, decoded
    segments: list = field(repr=False, default_factory=list)    # (piece, is_fill) runs of text
    note: str = ""

    def to_dict(self) -> dict:
        """The JSON object of one result, as `maria infill --json` prints it."""
        return {"input": self.input, "text": self.text, "ids": self.ids, "masked_positions": self.masked_positions,
                "fills": self.fills, "fill_logprobs": self.fill_logprobs, "note": self.note}


@dataclass(frozen=True)
class FillRequest:
    """Texts that share sampling settings, already encoded (Infiller.encode); text i's sample j draws from a
    generator of (sampling.seed, i, j)."""
    texts: list
    encoded: list
    sampling: Sampling = Sampling()
    num_samples: int = 1

    @property
    def size(self) -> int:
        return len(self.texts) * self.num_samples


class Infiller:
    def __init__(self, bundle=None, device: str = "auto", io_binding: bool | None = None):
        """bundle: a folder written by `maria export`; None for the default model shipped in the package."""
        self.bundle = resolve_bundle(bundle)
        self.manifest = load_manifest(self.bundle)
        self.tokenizer = Tokenizer.from_file(str(self.bundle / self.manifest.tokenizer))
        self.backend = OnnxBackend(self.bundle, self.manifest, device=device, io_binding=io_binding)
        self.special = self.manifest.special_ids
        self._check_mask_token()

    @property
    def device(self) -> str:
        return self.backend.device

    def encode(self, text: str) -> MaskedText:
        return encode_masked_text(text, self.tokenizer, self.special.mask, self.manifest.max_sequence_length)

    def fill_ids(self, ids, masked, sampling: Sampling = Sampling(), batch_size: int = 8,
                 rngs: list[np.random.Generator] | None = None, on_token=None) -> list[Fill]:
        """Fills content ids at masked positions; sequences without masked positions come back unchanged.
        rngs[i] draws sequence i's samples; by default one generator per sequence from (seed, i, 0)."""
        self._check_ids(ids, masked)
        return infill(self.backend, ids, masked, self.special, sampling, batch_size, rngs, on_token)

    def score(self, ids, masked, batch_size: int = 8) -> list[float]:
        """Summed negative log-likelihood of the given tokens at the masked positions (teacher forced)."""
        self._check_ids(ids, masked)
        return [float(n.sum()) for n in score(self.backend, ids, masked, self.special, batch_size)]

    def infill(self, texts: list[str], sampling: Sampling = Sampling(), batch_size: int = 8,
               num_samples: int = 1, indices: list[int] | None = None) -> list[Infilled]:
        """Fills every [MASK] / [MASK:N] of each text; num_samples results per text, in input order.
        Sample j of texts[i] is drawn from a generator of (seed, indices[i], j) (indices default to 0, 1, ...),
        so it is the same whatever the batch size or the other texts."""
        if isinstance(texts, (str, bytes)):
            raise ValueError("infill takes a list of texts, got a single string; pass [text]")
        texts = list(texts)
        indices = list(range(len(texts))) if indices is None else list(indices)
        if batch_size < 1 or num_samples < 1 or len(indices) != len(texts):
            raise ValueError(f"batch size and number of samples must be at least 1 (got {batch_size}, "
                             f"{num_samples}), and indices one per text ({len(indices)} for {len(texts)})")
        encoded = [self.encode(text) for text in texts]
        inputs = [(text, e) for text, e in zip(texts, encoded) for _ in range(num_samples)]
        rngs = [np.random.default_rng([sampling.seed, index, sample])
                for index in indices for sample in range(num_samples)]
        fills = self.fill_ids([e.ids for _, e in inputs], [e.masked for _, e in inputs], sampling, batch_size,
                              rngs)
        return [self.result(text, e, fill) for (text, e), fill in zip(inputs, fills)]

    def infill_requests(self, requests: list[FillRequest], on_token=None) -> list[list[Infilled]]:
        """Several requests in one decode batch per temperature / top-k / top-p; each keeps its own seed, so its
        results do not depend on the others. on_token(request, text, sample, position, token, logprob) hears
        each fill as it is chosen."""
        results = [[] for _ in requests]
        groups = {}
        for number, request in enumerate(requests):
            key = (request.sampling.temperature, request.sampling.top_k, request.sampling.top_p)
            groups.setdefault(key, []).append(number)
        for numbers in groups.values():
            rows = [(number, index, sample) for number in numbers for index in range(len(requests[number].texts))
                    for sample in range(requests[number].num_samples)]
            encoded = [requests[number].encoded[index] for number, index, _ in rows]
            rngs = [np.random.default_rng([requests[number].sampling.seed, index, sample])
                    for number, index, sample in rows]
            hear = None if on_token is None else lambda row, *fill: on_token(*rows[row], *fill)
            fills = self.fill_ids([e.ids for e in encoded], [e.masked for e in encoded],
                                  requests[numbers[0]].sampling, batch_size=max(1, len(rows)), rngs=rngs,
                                  on_token=hear)
            for (number, index, _), fill in zip(rows, fills):
                results[number].append(self.result(requests[number].texts[index], requests[number].encoded[index],
                                                   fill))
        return results

    def result(self, text: str, encoded: MaskedText, fill: Fill) -> Infilled:
        """The result of one text from its encoding and its fill."""
        if not encoded.masked.any():
            return Infilled(input=text, text=text, ids=encoded.ids.tolist(), masked_positions=[], fill_logprobs=[],
                            fills=[], segments=[(text, False)], note="no [MASK] in the text; returned unchanged")
        return Infilled(input=text, text=self.tokenizer.decode(fill.ids.tolist(), skip_special_tokens=False),
                        ids=fill.ids.tolist(), masked_positions=fill.positions.tolist(),
                        fill_logprobs=[float(p) for p in fill.logprobs],
                        fills=[self.tokenizer.decode([int(t)]) for t in fill.ids[fill.positions]],
                        segments=segments(fill.ids, encoded.masked, self.tokenizer))

    def _check_mask_token(self) -> None:
        """The mask id must name a mask token in the tokenizer, or none (an id only the MLM knows)."""
        token = self.tokenizer.id_to_token(self.special.mask)
        if token is not None and "mask" not in token.lower():
            raise ValueError(f"{self.bundle / 'maria.json'}: the mask id {self.special.mask} is the token "
                             f"{token!r} in the bundle's tokenizer, not a mask token; re-export the bundle with "
                             "`maria export`")

    def _check_ids(self, ids, masked) -> None:
        for row, (x, m) in enumerate(zip(ids, masked)):
            x = np.asarray(x)
            if len(x) != len(m) or len(x) > self.manifest.max_sequence_length or len(x) == 0:
                raise ValueError(f"sequence {row}: {len(x)} ids and {len(m)} mask flags; need equal lengths from 1 "
                                 f"to {self.manifest.max_sequence_length}")
            if x.min() < 0 or x.max() >= self.manifest.vocab_size:
                raise ValueError(f"sequence {row} holds ids outside the vocabulary [0, {self.manifest.vocab_size})")
