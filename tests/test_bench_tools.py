"""The span-length and generation measurements run and report consistent numbers (quality is not asserted)."""

import numpy as np
import pytest

from runtime.infiller import Infiller
from runtime.text import plain_encoder
from tiny import corpus
from tools import bench_generate, bench_spans


@pytest.fixture(scope="module")
def infiller(bundles):
    return Infiller(bundles["olmo"], device="cpu")


def test_whole_words_are_found_and_lengths_chosen_within_range(infiller):
    encode = plain_encoder(infiller.tokenizer)
    windows = np.array([encode(" ".join(corpus(40, seed=seed)))[:64] for seed in range(4)])
    found = [bench_spans.whole_words(infiller.tokenizer, window) for window in windows]
    assert all(1 <= end - start <= 4 for words in found for start, end in words)
    for window, words in zip(windows, found):
        for start, end in words:
            assert infiller.tokenizer.id_to_token(int(window[start])).startswith("Ġ")
    count = min(6, sum(map(len, found)))
    assert count >= 3
    report = bench_spans.measure(infiller, windows, count=count, seed=1, batch=4)
    assert report["words"] == count and sum(report["true_lengths"].values()) == count
    for row in report["rows"]:
        assert 1 <= row["ar_total_length"] <= 8 and 1 <= row["maria_fills_length"] <= 8
    assert 0 <= report["length_accuracy"]["AR total"] <= 1
    assert report["length_accuracy"]["most common"] == max(report["true_lengths"].values()) / count


def test_generation_bench_reports_each_system(infiller, tmp_path):
    rows = bench_generate.measure(infiller, length=5, samples=2, steps=[0, 2], repeats=1, seed=0, schedule={})
    assert [r["system"] for r in rows] == ["AR sampling", "MARIA, K=0", "MARIA, K=2"]
    assert all(r["generative_perplexity"] > 1 and r["seconds_median"] > 0 for r in rows)
    bench_generate.plot(rows, tmp_path / "g.png", "tiny")
    assert (tmp_path / "g.png").stat().st_size > 1000
