"""How well insertion with `suffix` (OpenAI's completions, serve/openai.py) picks its text: remove a span of 1 to 16
tokens (whole words and phrases, ending before a word, a punctuation mark or a line end) from held-out windows,
insert between what is left with every length from 1 to max_tokens (16) filled greedily, and compare each way of
choosing the length with the truth.

    python -m maria_onnx.tools.bench_insert --windows tests/data/default_model_eval_windows.npy --per-length 12 \
        --out insert.json

Windows are split in two: the first half chooses what is tuned (the constant length, a rule's weight), the second
half reports. Each rule picks one of the same candidates:
    AR total           log p_AR of the whole filled text (what `[MASK:a-b]` uses)
    AR total + b x len the same, plus b per inserted token (b tuned on the first half)
    AR mean            log p_AR of the whole filled text over its token count
    suffix + mean fill log p_AR of the suffix given the fill, plus the fill's mean log p_AR per token (what
                       `suffix` uses: runtime/likelihood.py's insertion_scores, less the prefix's constant)
    MARIA + suffix     MARIA's own log-probabilities of the fill (teacher forced), plus log p_AR of the suffix
    constant           always one length: the one most often right, and the one of best token F1, on the first half
Against them: the AR alone continuing the prefix for the true span's length (it is told the length), and the best
candidate in hindsight (an upper bound on any rule over these candidates).
"""

import collections
import json

import numpy as np

from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.likelihood import ar_sample, ar_token_logprobs
from maria_onnx.runtime.requests import FillRequest, Prepared
from maria_onnx.runtime.text import MaskedText

from . import held_out_parser, run_main, write_json
from .bench_spans import _fill_scores

LONGEST = 16  # max_tokens: the lengths tried, and the longest span removed
EDGE = 8  # tokens of context kept on each side of a span at least
BONUSES = np.round(np.arange(-2.0, 6.01, 0.25), 2)  # the per-token weights b tried on the first half


def boundaries(tokenizer, window: np.ndarray) -> tuple[list[int], set[int]]:
    """(starts, ends) of spans in a window of byte-level BPE ids: a span starts at a token that begins a word (a
    space and a letter), and ends before a token that begins a word, a punctuation mark or a line."""
    pieces = [tokenizer.id_to_token(int(t)) or "" for t in window]
    starts = [i for i, p in enumerate(pieces) if p.startswith("Ġ") and p[1:2].isalpha()]
    ends = {i for i, p in enumerate(pieces) if p[:1] in ("Ġ", "Ċ", ".", ",", ":", ";", ")")}
    return starts, ends


def pick_spans(windows: np.ndarray, tokenizer, windows_of: range, per_length: int, seed: int) -> list[tuple]:
    """(window, start, end) of up to `per_length` spans of each length 1..LONGEST, drawn with `seed` from the
    windows `windows_of`, with EDGE tokens of context each side."""
    by_length = collections.defaultdict(list)
    for w in windows_of:
        starts, ends = boundaries(tokenizer, windows[w])
        for start in starts:
            for end in range(start + 1, min(start + LONGEST, len(windows[w]) - EDGE) + 1):
                if start >= EDGE and end in ends:
                    by_length[end - start].append((w, start, end))
    rng, spans = np.random.default_rng(seed), []
    for length in range(1, LONGEST + 1):
        found = by_length[length]
        spans += [found[i] for i in sorted(rng.permutation(len(found))[:per_length])]
    return spans


def overlap(got: list, want: list) -> float:
    """Token F1 of a fill against the true span (the bag of tokens in common)."""
    common = sum((collections.Counter(got) & collections.Counter(want)).values())
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def candidates_of(infiller: Infiller, windows: np.ndarray, spans: list[tuple], batch: int = 4) -> list[dict]:
    """Per span: every length's greedy fill and what each rule scores it by."""
    mask, out = infiller.special.mask, []
    for begin in range(0, len(spans), batch):
        group, requests = spans[begin : begin + batch], []
        for w, start, end in group:
            window = windows[w].astype(np.int64)
            tried = []
            for length in range(1, LONGEST + 1):
                ids = np.concatenate([window[:start], np.full(length, mask), window[end:]])
                masked = np.zeros(len(ids), dtype=bool)
                masked[start : start + length] = True
                tried.append(((length,), MaskedText(ids, masked)))
            requests.append(FillRequest([Prepared(f"window {w}, tokens {start}-{end}", tried)]))
        for (w, start, end), (result,) in zip(group, infiller.infill_requests(requests)):
            window, tail = windows[w].astype(np.int64), len(windows[w]) - end
            filled = [np.asarray(c["ids"]) for c in result.candidates]
            ar = ar_token_logprobs(infiller.backend, filled, infiller.special)
            out.append(
                {
                    "window": int(w),
                    "start": int(start),
                    "true": window[start:end].tolist(),
                    "fills": [x[start : len(x) - tail].tolist() for x in filled],
                    "ar_fill": [float(p[start : len(p) - tail].sum()) for p in ar],
                    "ar_suffix": [float(p[len(p) - tail :].sum()) for p in ar],
                    "ar_total": [float(p.sum()) for p in ar],
                    "tokens": [len(p) for p in ar],
                    "maria_fill": _fill_scores(infiller, result.candidates, start),
                }
            )
    return out


def rules(bonus: float) -> dict:
    """Each rule: a candidate's score from its span's row and its index (length - 1)."""
    return {
        "AR total (used)": lambda r, i: r["ar_total"][i],
        f"AR total + {bonus:g} x len": lambda r, i: r["ar_total"][i] + bonus * (i + 1),
        "AR mean": lambda r, i: r["ar_total"][i] / r["tokens"][i],
        "suffix + mean fill": lambda r, i: r["ar_suffix"][i] + r["ar_fill"][i] / (i + 1),
        "MARIA + suffix": lambda r, i: r["maria_fill"][i] + r["ar_suffix"][i],
    }


def chosen(rows: list[dict], score) -> list[int]:
    return [max(range(LONGEST), key=lambda i: score(r, i)) for r in rows]


def judged(rows: list[dict], picks: list[int]) -> dict:
    """Length right, exact match and token F1 of one pick per row."""
    right = [len(r["true"]) == i + 1 for r, i in zip(rows, picks)]
    exact = [r["fills"][i] == r["true"] for r, i in zip(rows, picks)]
    f1 = [overlap(r["fills"][i], r["true"]) for r, i in zip(rows, picks)]
    return {"length_right": float(np.mean(right)), "exact": float(np.mean(exact)), "f1": float(np.mean(f1))}


def tune(rows: list[dict]) -> tuple[int, float, int]:
    """On the tuning half: the constant length most often right, the per-token bonus of best token F1, and the
    constant length of best token F1 (as indices: length - 1)."""
    constant = collections.Counter(len(r["true"]) for r in rows).most_common(1)[0][0]
    bonus = max(
        BONUSES, key=lambda b: judged(rows, chosen(rows, lambda r, i, b=b: r["ar_total"][i] + b * (i + 1)))["f1"]
    )
    best_f1_constant = max(range(LONGEST), key=lambda i: judged(rows, [i] * len(rows))["f1"])
    return constant - 1, float(bonus), best_f1_constant


def ar_alone(infiller: Infiller, windows: np.ndarray, rows: list[dict]) -> list[list[int]]:
    """The AR continuing each prefix, greedily, for its true span's length (it is told the length)."""
    out = []
    for row in rows:
        prefix = windows[row["window"]][: row["start"]].astype(np.int64)
        rng = [np.random.default_rng(0)]  # unused: greedy
        (filled,) = ar_sample(infiller.backend, [prefix], len(row["true"]), infiller.special, Sampling(), rng)
        out.append(filled[row["start"] :].tolist())
    return out


def report(infiller: Infiller, windows: np.ndarray, tuning: list[dict], held: list[dict]) -> dict:
    constant, bonus, f1_constant = tune(tuning)
    table = {name: judged(held, chosen(held, score)) for name, score in rules(bonus).items()}
    table[f"constant {constant + 1} (most often right)"] = judged(held, [constant] * len(held))
    table[f"constant {f1_constant + 1} (best F1)"] = judged(held, [f1_constant] * len(held))
    alone = ar_alone(infiller, windows, held)
    table["AR alone, told the length"] = {
        "length_right": 1.0,
        "exact": float(np.mean([a == r["true"] for a, r in zip(alone, held)])),
        "f1": float(np.mean([overlap(a, r["true"]) for a, r in zip(alone, held)])),
    }
    best = [max(range(LONGEST), key=lambda i: overlap(r["fills"][i], r["true"])) for r in held]
    table["best candidate in hindsight"] = judged(held, best)
    by_length = {
        name: {
            length: judged(
                [r for r in held if len(r["true"]) == length],
                [i for r, i in zip(held, chosen(held, score)) if len(r["true"]) == length],
            )["length_right"]
            for length in (1, 2, 4, 8, 16)
        }
        for name, score in rules(bonus).items()
    }
    tuned = {name: judged(tuning, chosen(tuning, score)) for name, score in rules(bonus).items()}
    return {
        "tuning_spans": len(tuning),
        "held_spans": len(held),
        "bonus": bonus,
        "table": table,
        "tuning_table": tuned,
        "f1_against_the_rule_used": {
            name: paired_difference(held, score, rules(bonus)["AR total (used)"])
            for name, score in rules(bonus).items()
            if name != "AR total (used)"
        },
        "length_right_by_true_length": by_length,
    }


def paired_difference(rows: list[dict], score, used, draws: int = 5000) -> dict:
    """Mean token-F1 difference of one rule over another on the same spans, with a 95% bootstrap interval."""
    f1 = lambda s: np.array([overlap(r["fills"][i], r["true"]) for r, i in zip(rows, chosen(rows, s))])
    difference = f1(score) - f1(used)
    rng = np.random.default_rng(0)
    means = [difference[rng.integers(0, len(difference), len(difference))].mean() for _ in range(draws)]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(difference.mean()), "low": float(low), "high": float(high)}


def main(argv=None) -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("--per-length", type=int, default=12, help="spans of each length 1-16 in each half")
    args = parser.parse_args(argv)
    infiller = Infiller(args.model, device="cpu")
    windows = np.load(args.windows)
    half = len(windows) // 2
    tuning, held = (
        candidates_of(infiller, windows, pick_spans(windows, infiller.tokenizer, part, args.per_length, args.seed))
        for part in (range(half), range(half, len(windows)))
    )
    result = report(infiller, windows, tuning, held)
    write_json(args.out, {**result, "rows": {"tuning": tuning, "held": held}})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
