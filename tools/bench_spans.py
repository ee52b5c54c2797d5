"""How well MARIA picks the length of a gap: mask one whole word (1 to 4 tokens) of held-out text at a time,
ask for [MASK:?] (1 to 8 tokens), and compare the chosen length and fill with the truth.

    python -m maria_onnx.tools.bench_spans --windows tests/data/default_model_eval_windows.npy --words 300 \
        --out spans.json

Criteria compared on the same candidates (every length decoded greedily, one batch per word):
    AR total        log p_AR of the whole filled text (what `[MASK:?]` uses)
    MARIA fills     the sum of MARIA's own log-probabilities of the fill tokens
    most common     always the length that is most common among the masked words (a baseline)

With --gaps K (2 or more): K whole words of each held-out window become [MASK:?] at once, and the lengths the
gap-by-gap search chooses (runtime/spans.py) are compared with the best of every combination, decoded on the same
text: how often they agree, how far the search's score falls short, and what each costs (rows, seconds).

    python -m maria_onnx.tools.bench_spans --windows tests/data/default_model_eval_windows.npy --gaps 3 --texts 40 \
        --out search.json
"""

import collections
import json
import math
import time

import numpy as np

from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import FillRequest, Prepared
from maria_onnx.runtime.text import ANY_LENGTH, MaskedText

from . import held_out_parser, run_main, write_json


def whole_words(tokenizer, window: np.ndarray, longest: int = 4) -> list[tuple[int, int]]:
    """(start, end) of each whole word in a window of byte-level BPE ids: a token that begins with a space and
    a letter, and the letter-only tokens that continue it; words of 1 to `longest` tokens."""
    pieces = [tokenizer.id_to_token(int(t)) or "" for t in window]
    words, start = [], None
    for position, piece in enumerate(pieces + ["Ġ"]):
        begins = piece.startswith("Ġ") and piece[1:2].isalpha()
        continues = start is not None and not piece.startswith("Ġ") and piece.isalpha()
        if start is not None and not continues:
            if (
                position - start <= longest
                and position < len(pieces)
                and pieces[position][:1] in ("Ġ", ".", ",", ":", ";", ")")
            ):
                words.append((start, position))
            start = None
        if begins:
            start = position
    return words


def pick(windows: np.ndarray, tokenizer, count: int, seed: int) -> list[tuple[int, int, int]]:
    """(window, start, end) of `count` words drawn without replacement, seeded."""
    every = [(w, s, e) for w, window in enumerate(windows) for s, e in whole_words(tokenizer, window)]
    order = np.random.default_rng(seed).permutation(len(every))[:count]
    return [every[i] for i in sorted(order)]


def measure(infiller: Infiller, windows: np.ndarray, count: int, seed: int = 0, batch: int = 4) -> dict:
    words = pick(windows, infiller.tokenizer, count, seed)
    low, high = ANY_LENGTH
    rows = []
    for begin in range(0, len(words), batch):
        requests = []
        for w, start, end in words[begin : begin + batch]:
            window = windows[w]
            candidates = []
            for length in range(low, high + 1):
                ids = np.concatenate([window[:start], np.full(length, infiller.special.mask), window[end:]])
                masked = np.zeros(len(ids), dtype=bool)
                masked[start : start + length] = True
                candidates.append(((length,), MaskedText(ids.astype(np.int64), masked)))
            requests.append(FillRequest([Prepared(f"window {w}, tokens {start}-{end}", candidates)]))
        for (w, start, end), (result,) in zip(words[begin : begin + batch], infiller.infill_requests(requests)):
            true = windows[w][start:end].tolist()
            fill_scores = _fill_scores(infiller, result.candidates, start)
            by_fills = result.candidates[int(np.argmax(fill_scores))]
            rows.append(
                {
                    "window": w,
                    "start": start,
                    "true_length": end - start,
                    "true": true,
                    "ar_total_length": result.span_lengths[0],
                    "ar_total_exact": result.ids[start : start + result.span_lengths[0]] == true
                    and result.span_lengths[0] == end - start,
                    "maria_fills_length": by_fills["lengths"][0],
                    "maria_fills_exact": by_fills["ids"][start : start + by_fills["lengths"][0]] == true
                    and by_fills["lengths"][0] == end - start,
                }
            )
    return summarize(rows)


def _fill_scores(infiller, candidates: list[dict], start: int) -> list[float]:
    """Per candidate, the sum of MARIA's log-probabilities of its fill tokens, teacher forced (one scorer call)."""
    ids = [np.asarray(c["ids"]) for c in candidates]
    masked = [np.zeros(len(x), dtype=bool) for x in ids]
    for flags, candidate in zip(masked, candidates):
        flags[start : start + candidate["lengths"][0]] = True
    return [-nll for nll in infiller.score(ids, masked, batch_size=len(ids))]


def summarize(rows: list[dict]) -> dict:
    lengths = collections.Counter(r["true_length"] for r in rows)
    common = lengths.most_common(1)[0][0]
    share = lambda key: sum(bool(r[key]) for r in rows) / len(rows)
    return {
        "words": len(rows),
        "true_lengths": dict(sorted(lengths.items())),
        "most_common_length": common,
        "length_accuracy": {
            "AR total": sum(r["ar_total_length"] == r["true_length"] for r in rows) / len(rows),
            "MARIA fills": sum(r["maria_fills_length"] == r["true_length"] for r in rows) / len(rows),
            "most common": lengths[common] / len(rows),
        },
        "exact_match": {"AR total": share("ar_total_exact"), "MARIA fills": share("maria_fills_exact")},
        "chosen_lengths": {
            "AR total": dict(sorted(collections.Counter(r["ar_total_length"] for r in rows).items())),
            "MARIA fills": dict(sorted(collections.Counter(r["maria_fills_length"] for r in rows).items())),
        },
        "rows": rows,
    }


def gap_texts(infiller: Infiller, windows: np.ndarray, count: int, gaps: int, seed: int) -> list[tuple]:
    """`count` (text, true lengths): a held-out window (one without special tokens) with `gaps` of its whole words
    replaced by [MASK:?], the window and its words drawn with `seed`."""
    rng, texts = np.random.default_rng(seed), []
    decode = infiller.tokenizer.decode
    for w in rng.permutation(len(windows)):
        words = whole_words(infiller.tokenizer, windows[w])
        if len(words) < gaps or np.isin(windows[w], infiller.special.all).any():
            continue
        pieces: list[str] = []
        true: list[int] = []
        position = 0
        for start, end in (words[i] for i in sorted(rng.choice(len(words), gaps, replace=False))):
            pieces += [decode(windows[w][position:start].tolist()), " [MASK:?]"]
            position, true = end, true + [end - start]
        texts.append(("".join(pieces) + decode(windows[w][position:].tolist()), true))
        if len(texts) == count:
            break
    if not texts:
        raise ValueError(
            f"no window without special tokens holds {gaps} whole words; give other windows or fewer --gaps"
        )
    return texts


def measure_search(infiller: Infiller, texts: list[tuple], batch_size: int = 8) -> dict:
    """Per text, the gap-by-gap search against every combination, in alternating order, batch_size rows at once
    (as `maria infill` decodes)."""
    rows = []
    for number, (text, true) in enumerate(texts):
        ways = {
            "search": infiller.prepare(text, most=1),  # several gaps: searched
            "every": infiller.prepare(text, most=math.inf),
        }
        row = {"text": text, "true_lengths": true}
        for name in sorted(ways, reverse=number % 2 == 1):
            began = time.perf_counter()
            (result,) = infiller.infill_requests([FillRequest([ways[name]])], batch_size=batch_size)[0]
            row.update(
                {
                    f"{name}_seconds": time.perf_counter() - began,
                    f"{name}_lengths": result.span_lengths,
                    f"{name}_score": result.score,
                    f"{name}_rows": len(result.candidates),
                }
            )
        rows.append(row)
    return summarize_search(rows)


def summarize_search(rows: list[dict]) -> dict:
    shortfall = np.array([r["every_score"] - r["search_score"] for r in rows])
    speedup = np.array([r["every_seconds"] / r["search_seconds"] for r in rows])
    right = lambda name: np.mean([np.equal(r[f"{name}_lengths"], r["true_lengths"]).mean() for r in rows])
    return {
        "texts": len(rows),
        "gaps": len(rows[0]["true_lengths"]),
        "combinations": rows[0]["every_rows"],
        "same_lengths": float(np.mean([r["search_lengths"] == r["every_lengths"] for r in rows])),
        "score_shortfall": {"median": float(np.median(shortfall)), "max": float(shortfall.max())},
        "search_rows": {
            "median": float(np.median([r["search_rows"] for r in rows])),
            "max": max(r["search_rows"] for r in rows),
        },
        "time_ratio_every_over_search": {
            "median": float(np.median(speedup)),
            "p10": float(np.percentile(speedup, 10)),
            "p90": float(np.percentile(speedup, 90)),
        },
        "gap_length_right": {"search": float(right("search")), "every": float(right("every"))},
        "rows": rows,
    }


def main():
    parser = held_out_parser(__doc__)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument(
        "--gaps", type=int, default=1, help="[MASK:?] per text; 2 or more: the search against every combination"
    )
    parser.add_argument("--texts", type=int, default=40, help="texts to measure with --gaps")
    args = parser.parse_args()
    infiller, windows = Infiller(args.model, device="cpu"), np.load(args.windows).astype(np.int64)
    if args.gaps > 1:
        report = measure_search(infiller, gap_texts(infiller, windows, args.texts, args.gaps, args.seed))
    else:
        report = measure(infiller, windows, args.words, args.seed)
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    run_main(main)
