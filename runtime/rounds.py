"""Requests -> decode rows, round after round -> results, each request keeping its own seed.

    rows: (request, text, sample, span lengths) of every text, filled together  ──▶ the round driver (driver.py)
    spans: the candidate whose filled text is most likely under the AR wins (log p_AR of the whole text: the text
           outside the gaps is the same for every candidate, so the totals compare fairly). Where a text's
           markers allow more combinations than are decoded together, its lengths are searched gap by gap
           (runtime/spans.py): each gap is one more round of rows, until the search ends.
    rerank: a text's samples ordered by that same whole-text score

Sample j of text i (i: its index in the request, or FillRequest.indices[i]) draws from a generator of
(seed, i, j), its candidate c of a span text from (seed, i, j, c), and its lengths L of a searched text from
(seed, i, j, *L): the same whatever it is batched with.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .driver import Decoder, Filler, OnFill, RoundDriver, fill_rounds
from .likelihood import SPAN_SCORES
from .requests import FillRequest
from .results import Infilled, build_result
from .spans import GapSearch
from .text import MAX_CANDIDATES, MaskedText, with_lengths

OnRequestFill = Callable[[int, int, int, int, int, float], None]  # (request, text, sample, position, token, logprob)


@dataclass(frozen=True)
class Row:
    """One decode row: sample `sample` of text `text` of request `number`, with these span lengths."""

    number: int
    text: int
    sample: int
    lengths: tuple
    encoded: MaskedText
    rng: np.random.Generator


class Rounds:
    """The decode rows of the requests numbered `numbers`, round after round, and their results: one round unless
    a text's span lengths are searched gap by gap. `rows` is the round to decode; `collect` takes its fills and
    returns the next round ([] once every result is in `results`)."""

    def __init__(self, filler: Filler, requests: list[FillRequest], numbers: list[int]):
        self.filler, self.requests, self.numbers = filler, requests, numbers
        # [request][text][sample]: None until that sample's result is in
        self.results: list[list[list[Infilled | None]]] = [[[None] * r.num_samples for _ in r.texts] for r in requests]
        # (number, text, sample) -> (GapSearch, {lengths: Infilled}) while it runs
        self.searches: dict[tuple[int, int, int], tuple[GapSearch, dict[tuple, Infilled]]] = {}
        self.rows: list[Row] = []
        for number in numbers:
            request = requests[number]
            for text, prepared in enumerate(request.texts):
                for sample in range(request.num_samples):
                    if prepared.ranges:
                        self.searches[(number, text, sample)] = GapSearch(list(prepared.ranges)), {}
                    for c, (lengths, encoded) in enumerate(prepared.candidates):
                        key = [c] if prepared.spans else []
                        self.rows.append(self._row(number, text, sample, lengths, encoded, key))
        self.rows += self._search_rows()

    def hearing(self, on_token: OnRequestFill) -> Callable[[Row], OnFill | None]:
        """The round driver's hear: a row's fills go to on_token(request, text, sample, position, token, logprob),
        except a span text's candidates (its fill is known only once the best is chosen)."""

        def hear(row: Row) -> OnFill | None:
            if self.requests[row.number].texts[row.text].spans:
                return None
            return functools.partial(on_token, row.number, row.text, row.sample)

        return hear

    def _row(self, number: int, text: int, sample: int, lengths: tuple, encoded: MaskedText, key: list) -> Row:
        request = self.requests[number]
        rng = np.random.default_rng(
            [request.sampling.seed, request.index(text), request.first_sample + sample] + list(key)
        )
        return Row(number, text, sample, tuple(lengths), encoded, rng)

    def _search_rows(self) -> list[Row]:
        """The next round of each running search; a search that has ended gives its result instead."""
        rows = []
        for key, (search, _) in list(self.searches.items()):
            pending = search.pending()
            if not pending:
                self._end_search(key)
                continue
            number, text, sample = key
            written = self.requests[number].texts[text].text
            rows += [
                self._row(
                    number, text, sample, lengths, self.filler.encode(with_lengths(written, lengths)), list(lengths)
                )
                for lengths in pending
            ]
        return rows

    def collect(self, fills: list) -> list[Row]:
        """Takes the fills of `rows` (in order): scores what needs a whole-text score, keeps the best candidate of
        span texts, steps the searches; returns the next round, and reranks samples once there is none."""
        built = [
            build_result(self.filler.tokenizer, self.requests[row.number].texts[row.text].text, row.encoded, fill)
            for row, fill in zip(self.rows, fills)
        ]
        need = [
            i
            for i, row in enumerate(self.rows)
            if self.requests[row.number].texts[row.text].spans or self.requests[row.number].rerank
        ]
        for rule, score in SPAN_SCORES.items():
            scored = [i for i in need if self.requests[self.rows[i].number].span_score == rule]
            if scored:
                ids = [np.asarray(built[i].ids) for i in scored]
                masked = [np.isin(np.arange(len(x)), built[i].masked_positions) for x, i in zip(ids, scored)]
                for i, value in zip(scored, score(self.filler.backend, ids, masked, self.filler.special)):
                    built[i].score = value
        candidates: dict[tuple[int, int, int], list[Infilled]] = {}
        for row, result in zip(self.rows, built):
            key = (row.number, row.text, row.sample)
            if key in self.searches:
                search, tried = self.searches[key]
                search.scores[row.lengths], tried[row.lengths] = _score(result), result
            else:
                candidates.setdefault(key, []).append(result)
        for key, results in candidates.items():
            self._choose(key, results)
        self.rows = self._search_rows()
        if not self.rows:
            self._rerank()
        return self.rows

    def _choose(self, key: tuple, candidates: list[Infilled]) -> None:
        """The result of a text decoded in one round: its one fill, or its span candidate with the best score."""
        number, text, sample = key
        prepared = self.requests[number].texts[text]
        best = max(range(len(candidates)), key=lambda c: _score(candidates[c])) if prepared.spans else 0
        chosen = candidates[best]
        if prepared.spans:
            chosen.span_lengths = list(prepared.candidates[best][0])
            chosen.candidates = [_candidate(lengths, r) for (lengths, _), r in zip(prepared.candidates, candidates)]
        self.results[number][text][sample] = chosen

    def _end_search(self, key: tuple) -> None:
        number, text, sample = key
        search, tried = self.searches.pop(key)
        chosen = tried[search.best]
        chosen.span_lengths = list(search.best)
        chosen.candidates = [_candidate(lengths, r) for lengths, r in tried.items()]
        why = (
            f"all are tried only up to {MAX_CANDIDATES}"
            if search.combinations > MAX_CANDIDATES
            else "all of them take more decode rows than the request may use"
        )
        chosen.note = (
            f"span lengths searched gap by gap: {len(tried)} of {search.combinations} combinations "
            f"tried ({why}), the best found, not necessarily the best of all"
        )
        self.results[number][text][sample] = chosen

    def _rerank(self) -> None:
        for number in self.numbers:
            if self.requests[number].rerank:
                for samples in self.results[number]:
                    samples.sort(key=lambda r: -_score(r))

    def flat(self, number: int) -> list[Infilled]:
        """The results of request `number`: num_samples per text, text-major."""
        results = [result for samples in self.results[number] for result in samples]
        assert all(r is not None for r in results), "flat() before every round was collected"
        return results  # type: ignore[return-value]


def _score(result: Infilled | None) -> float:
    """A result's whole-text score (computed wherever a choice or a reranking needs it)."""
    assert result is not None and result.score is not None, "a result chosen or reranked without its score"
    return result.score


def _candidate(lengths: tuple, result: Infilled) -> dict:
    return {"lengths": list(lengths), "score": result.score, "text": result.text, "ids": result.ids}


def run_requests(
    filler: Filler,
    decoder: Decoder,
    requests: list[FillRequest],
    on_token: OnRequestFill | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[Infilled]]:
    """Per request, its results: num_samples per text, text-major (reranked where asked), every request's rows
    through one decoder (the round driver, runtime/driver.py), each with its own seed: one round of rows per
    temperature / top-k / top-p, and another per step of a gap-by-gap search. on_token(request, text, sample,
    position, token, logprob) hears each fill of the fixed-marker texts; on_batch(rows, ns) each round once it is
    filled."""
    groups: dict[tuple, list[int]] = {}
    for number, request in enumerate(requests):
        groups.setdefault(request.sampling.batch_key, []).append(number)
    rounds = [Rounds(filler, requests, numbers) for numbers in groups.values()]
    runs = [(r, requests[r.numbers[0]].sampling, r.hearing(on_token) if on_token else None) for r in rounds]
    fill_rounds(RoundDriver(decoder), runs, on_batch)
    results: list[list[Infilled]] = [[] for _ in requests]
    for r in rounds:
        for number in r.numbers:
            results[number] = r.flat(number)
    return results
