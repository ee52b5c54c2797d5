"""Requests -> one decode batch per sampling setting -> results, each request keeping its own seed.

    FillRequest: texts (each Prepared: one candidate per combination of span lengths), sampling, num_samples
    rows: (request, text, sample, candidate), all filled together   ──▶ decode.infill
    spans: the candidate whose filled text is most likely under the AR wins (log p_AR of the whole text: the
           text outside the gaps is the same for every candidate, so the totals compare fairly)
    rerank: a text's samples ordered by that same whole-text score

Sample j of text i (i: its index in the request, or FillRequest.indices[i]) draws from a generator of
(seed, i, j), and its candidate c of a span text from (seed, i, j, c): the same whatever it is batched with.
"""

from dataclasses import dataclass

import numpy as np

from .choose import Sampling
from .likelihood import ar_loglikelihood
from .results import Infilled, build_result
from .text import MaskedText


@dataclass(frozen=True)
class Prepared:
    """A text ready to fill: (span lengths, encoding) per candidate; one candidate with () for fixed markers."""
    text: str
    candidates: list

    @property
    def spans(self) -> bool:
        return bool(self.candidates[0][0])


@dataclass(frozen=True)
class FillRequest:
    texts: list                    # Prepared per text (Infiller.prepare)
    sampling: Sampling = Sampling()
    num_samples: int = 1
    rerank: bool = False
    indices: list | None = None    # per text, the index its generators derive from (default 0, 1, ...)

    @property
    def size(self) -> int:
        """Decode rows: texts x samples x candidates."""
        return self.num_samples * sum(len(p.candidates) for p in self.texts)

    def index(self, text: int) -> int:
        return text if self.indices is None else self.indices[text]


SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "seed": int, "num_samples": int, "rerank": bool}
KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false"}


class TooLarge(ValueError):
    """A request that asks for more decode rows than a server takes at once."""


def check_size(limit: int, texts: int, num_samples: int, request: FillRequest | None = None) -> None:
    """Raises TooLarge where a request needs more than `limit` decode rows: texts x samples (checked before the
    texts are prepared), and with the span candidates of the prepared request."""
    if texts * num_samples > limit:
        fits = limit // num_samples       # texts per request at this many samples
        fix = (f"ask for at most {limit} samples" if texts == 1 else
               f"split the request (at most {fits} text{'s' * (fits != 1)} of {num_samples} samples each)" if fits
               else f"ask for at most {limit} samples of one text per request")
        raise TooLarge(f"{texts} text{'s' * (texts != 1)} x {num_samples} samples is over the limit of {limit} per "
                       f"request; {fix}")
    if request is not None and request.size > limit:
        widest = max(len(p.candidates) for p in request.texts) * request.num_samples     # rows of its largest text
        fix = ("split the request" if widest <= limit else
               "narrow the span markers ([MASK:a-b]), fix some lengths ([MASK:N]) or ask for fewer samples")
        raise TooLarge(f"the request needs {request.size} decode rows (texts x samples x span candidates), over "
                       f"the limit of {limit}; {fix}")


class SettingTypeError(ValueError):
    """A request setting that is unknown or of the wrong type (a server answers 400; a refused value, 422)."""


def _fits(value, kind) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int) or (isinstance(value, float) and (kind is float or value.is_integer()))


def read_settings(given: dict) -> tuple[Sampling, int, bool]:
    """Sampling, num_samples and rerank from a request's settings as JSON gives them. An integer setting takes an
    integral number (2.0), never 2.5, NaN or a string; rerank takes only true or false. SettingTypeError for an
    unknown setting or a wrong type, ValueError for a refused value (a negative seed, top_p over 1)."""
    unknown = set(given) - set(SETTINGS)
    if unknown:
        raise SettingTypeError(f"unknown parameters {sorted(unknown)}; parameters are {', '.join(SETTINGS)}")
    values = {}
    for name, value in given.items():
        kind = SETTINGS[name]
        if not _fits(value, kind):
            raise SettingTypeError(f"parameter '{name}' must be {KIND_NAMES[kind]}, got {value!r}")
        values[name] = kind(value)
    num_samples, rerank = values.pop("num_samples", 1), values.pop("rerank", False)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    try:
        return Sampling(**values), num_samples, rerank
    except ValueError as error:
        raise ValueError(str(error).replace("--", "")) from None         # the CLI's message, without its flag


def request_rows(requests: list[FillRequest], numbers: list[int]) -> list[tuple]:
    """(request, text, sample, candidate, generator) for every decode row of these requests."""
    rows = []
    for number in numbers:
        request = requests[number]
        for text, prepared in enumerate(request.texts):
            for sample in range(request.num_samples):
                for candidate in range(len(prepared.candidates)):
                    key = [request.sampling.seed, request.index(text), sample] + ([candidate] if prepared.spans
                                                                                 else [])
                    rows.append((number, text, sample, candidate, np.random.default_rng(key)))
    return rows


def row_encoding(requests: list[FillRequest], row: tuple) -> MaskedText:
    number, text, _, candidate, _ = row
    return requests[number].texts[text].candidates[candidate][1]


def empty_results(requests: list[FillRequest]) -> list:
    return [[[None] * r.num_samples for _ in r.texts] for r in requests]


def flat_results(results: list) -> list[list[Infilled]]:
    """Per request, its results: num_samples per text, text-major."""
    return [[result for samples in texts for result in samples] for texts in results]


def run_requests(infiller, requests: list[FillRequest], batch_size: int | None = None,
                 on_token=None) -> list[list[Infilled]]:
    """Per request, its results: num_samples per text, text-major (reranked where asked).
    on_token(request, text, sample, position, token, logprob) hears each fill of the fixed-marker texts."""
    results = empty_results(requests)
    groups = {}
    for number, request in enumerate(requests):
        groups.setdefault((request.sampling.temperature, request.sampling.top_k, request.sampling.top_p),
                          []).append(number)
    for numbers in groups.values():
        rows = request_rows(requests, numbers)
        encoded: list[MaskedText] = [row_encoding(requests, row) for row in rows]

        def hear(row, *fill):
            number, text, sample, _, _ = rows[row]
            if not requests[number].texts[text].spans:
                on_token(number, text, sample, *fill)

        fills = infiller.fill_ids([e.ids for e in encoded], [e.masked for e in encoded],
                                  requests[numbers[0]].sampling, batch_size=batch_size or max(1, len(rows)),
                                  rngs=[row[-1] for row in rows], on_token=hear if on_token else None)
        collect(infiller, requests, rows, fills, results)
    return flat_results(results)


def collect(infiller, requests: list[FillRequest], rows: list[tuple], fills: list, results: list) -> None:
    """Puts each row's fill into results[request][text][sample]: the best candidate of span texts, samples
    reranked where asked."""
    filled = {}
    for row, fill in zip(rows, fills):
        number, text, sample, _, _ = row
        prepared = requests[number].texts[text]
        filled.setdefault((number, text, sample), []).append(build_result(infiller.tokenizer, prepared.text,
                                                                          row_encoding(requests, row), fill))
    _choose(infiller, requests, filled, results)


def _choose(infiller, requests, filled: dict, results) -> None:
    """Scores what needs a whole-text score, keeps the best candidate of span texts, reranks samples."""
    need = [(key, c) for key, candidates in filled.items() for c in range(len(candidates))
            if requests[key[0]].texts[key[1]].spans or requests[key[0]].rerank]
    scores = dict(zip(need, ar_loglikelihood(infiller.backend, [np.asarray(filled[k][c].ids) for k, c in need],
                                             infiller.special))) if need else {}
    for (number, text, sample), candidates in filled.items():
        prepared = requests[number].texts[text]
        for c, result in enumerate(candidates):
            result.score = scores.get(((number, text, sample), c))
        best = max(range(len(candidates)), key=lambda c: candidates[c].score) if prepared.spans else 0
        chosen = candidates[best]
        if prepared.spans:
            chosen.span_lengths = list(prepared.candidates[best][0])
            chosen.candidates = [{"lengths": list(lengths), "score": r.score, "text": r.text, "ids": r.ids}
                                 for (lengths, _), r in zip(prepared.candidates, candidates)]
        results[number][text][sample] = chosen
    for number, request in enumerate(requests):
        if request.rerank:
            for samples in results[number]:
                if None not in samples:
                    samples.sort(key=lambda r: -r.score)
