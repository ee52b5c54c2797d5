"""The span-length and generation measurements run and report consistent numbers (quality is not asserted)."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.text import plain_encoder
from maria_onnx.tools import bench_generate, bench_spans, error_line, write_json
from maria_onnx.tools.tiny import corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def infiller(bundles):
    return Infiller(bundles["olmo"], device="cpu")


def test_whole_words_are_found_and_lengths_chosen_within_range(infiller):
    encode = plain_encoder(infiller.tokenizer)
    windows = np.array([encode(" ".join(corpus(40, seed=seed)))[:64] for seed in range(4)])
    found = [bench_spans.whole_words(infiller.tokenizer, window) for window in windows]
    assert all(1 <= end - start <= 4 for words in found for start, end in words)
    for window, words in zip(windows, found):
        for start, _ in words:
            assert infiller.tokenizer.id_to_token(int(window[start])).startswith("Ġ")
    count = min(6, sum(map(len, found)))
    assert count >= 3
    report = bench_spans.measure(infiller, windows, count=count, seed=1, batch=4)
    assert report["words"] == count and sum(report["true_lengths"].values()) == count
    for row in report["rows"]:
        assert 1 <= row["ar_total_length"] <= 8 and 1 <= row["maria_fills_length"] <= 8
    assert 0 <= report["length_accuracy"]["AR total"] <= 1
    assert report["length_accuracy"]["most common"] == max(report["true_lengths"].values()) / count


def test_the_search_is_measured_against_every_combination_on_the_same_texts(infiller):
    encode = plain_encoder(infiller.tokenizer)
    windows = np.array([encode(" ".join(corpus(40, seed=seed)))[:64] for seed in range(6)])
    texts = bench_spans.gap_texts(infiller, windows, count=2, gaps=3, seed=0)
    assert len(texts) == 2 and all(text.count("[MASK:?]") == 3 and len(true) == 3 for text, true in texts)
    report = bench_spans.measure_search(infiller, texts)
    assert report["texts"] == 2 and report["combinations"] == 512
    for row in report["rows"]:
        assert row["every_rows"] == 512 and 8 <= row["search_rows"] < 512
        assert row["search_score"] <= row["every_score"] + 1e-9  # the best of all is never beaten
        assert all(1 <= n <= 8 for n in row["search_lengths"] + row["every_lengths"])
    assert report["score_shortfall"]["max"] >= 0


def test_generation_bench_reports_each_system(infiller, tmp_path):
    rows = bench_generate.measure(infiller, length=5, samples=2, steps=[0, 2], repeats=1, seed=0, schedule={})
    assert [r["system"] for r in rows] == ["AR sampling", "MARIA, K=0", "MARIA, K=2"]
    assert all(r["generative_perplexity"] > 1 and r["seconds_median"] > 0 for r in rows)
    bench_generate.plot(rows, tmp_path / "g.png", "tiny")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_the_step_profile_names_the_cache_copy_and_the_in_place_writes(bundles, tmp_path):
    from maria_onnx.tools import profile_step

    profile_step.main(bundles["olmo"], tmp_path / "profile.json")
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["shape"]["cached_tokens"] == 1024 and report["shape"]["layers"] == 2
    for new in ("1 new tokens", "4 new tokens"):
        concat, step = report[new]["ar_decoder (concat)"], report[new]["ar_step (in place)"]
        assert concat["ms_per_step_in_kernels"] > 0 and step["ms_per_step_in_kernels"] > 0
        assert "Concat" in concat["ms_by_op"]  # the cache copied into present.*
        writes = {"ScatterElements", "ScatterND"}  # values and keys written into the slots
        assert writes <= set(step["ms_by_op"]) and not writes & set(concat["ms_by_op"])
        assert 0 < sum(step["share"].values()) <= 1.001
    assert list(tmp_path.iterdir()) == [tmp_path / "profile.json"]  # ONNX Runtime's traces removed


def test_two_steps_are_compared_side_by_side(bundles, tmp_path):
    from maria_onnx.tools import compare_steps

    report = compare_steps.main(bundles["olmo"], bundles["llama"], tmp_path / "steps.json", runs=4)
    assert json.loads((tmp_path / "steps.json").read_text()) == report
    assert report["nodes"]["A"]["RotaryEmbedding"] == report["nodes"]["B"]["RotaryEmbedding"] == 4
    assert [(r["batch"], r["new_tokens"]) for r in report["shapes"]] == [(1, 1), (1, 1), (8, 1), (8, 4)]
    assert max(r["cached_tokens"] for r in report["shapes"]) < 512  # the tiny models' positions
    for row in report["shapes"]:
        assert row["A"]["median_ms"] > 0 and row["B_over_A"] == round(row["B"]["median_ms"] / row["A"]["median_ms"], 3)


@pytest.mark.parametrize(
    "tool, args, message",
    [
        ("compare_steps", ("BUNDLE", "NONE", "OUT"), "bundle NONE does not exist"),
        ("compare_steps", ("BUNDLE", "BUNDLE", "OUT", "--runs", "2"), "--runs must be at least 4, got 2"),
        ("profile_step", ("NONE", "OUT"), "bundle NONE does not exist; pass a folder written by `maria export`"),
        ("profile_step", ("BUNDLE", "OUT", "--batch", "0"), "--batch must be at least 1 and --cached at least 0"),
        ("profile_step", ("BUNDLE", "NONE/p.json"), "NONE/p.json: no folder NONE; give a path in an existing folder"),
        ("bench_spans", ("--windows", "NONE", "--out", "OUT"), "NONE: No such file or directory"),
        ("bench_generate", ("--out", "OUT", "--steps", "a"), "--steps takes comma-separated integers"),
        ("bench_generate", ("--out", "OUT", "--schedule", '{"foo": 1}'), "--schedule takes a JSON object of"),
    ],
)
def test_the_tools_name_bad_arguments_in_one_line(bundles, tmp_path, tool, args, message):
    """`python -m maria_onnx.tools.NAME` as the docs run them: one line on stderr, exit status 2, nothing written."""
    paths = {"NONE": str(tmp_path / "none"), "OUT": str(tmp_path / "out.json"), "BUNDLE": str(bundles["olmo"])}
    for placeholder, path in paths.items():
        args, message = tuple(a.replace(placeholder, path) for a in args), message.replace(placeholder, path)
    result = subprocess.run(
        [sys.executable, "-m", f"tools.{tool}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


def test_a_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A report that cannot be written (a full disk, here feigned after ten bytes) leaves the previous one intact,
    no truncated file, and one line naming the report."""
    report = tmp_path / "bench.json"
    write_json(report, {"runs": [1]})
    real_write = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        real_write(path, text[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError) as failed:
        write_json(report, {"runs": [1, 2]})
    monkeypatch.undo()
    assert error_line(failed.value) == f"{report}: No space left on device"
    assert json.loads(report.read_text()) == {"runs": [1]} and list(tmp_path.iterdir()) == [report]


def test_a_report_through_a_link_is_written_where_it_points(tmp_path):
    """/dev/stdout and the like are links: the link stays, the file it names gets the report."""
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    write_json(link, {"runs": [3]})
    assert link.is_symlink() and json.loads(target.read_text()) == {"runs": [3]}


def test_a_plot_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A plot whose save is interrupted (Ctrl-C, here feigned after some bytes) leaves the previous PNG intact and
    no partial file; a finished save is a PNG whatever the name's suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from maria_onnx.tools import save_figure

    png, figure = tmp_path / "bench.png", plt.figure()
    save_figure(figure, png)
    before = png.read_bytes()
    assert before.startswith(b"\x89PNG")
    real_save = Figure.savefig

    def interrupted(self, file, *args, **kwargs):
        real_save(self, file, *args, **kwargs)
        Path(file).write_bytes(Path(file).read_bytes()[:50])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    figure.suptitle("changed")
    with pytest.raises(KeyboardInterrupt):
        save_figure(figure, png)
    plt.close(figure)
    assert png.read_bytes() == before and list(tmp_path.iterdir()) == [png]


def test_an_fp32_step_is_compared_with_its_int4_export_and_profiled(checkpoints, bundles, tmp_path):
    from maria_onnx.export.bundle import export_bundle
    from maria_onnx.tools import compare_steps, profile_step

    export_bundle(checkpoints["olmo"], tmp_path / "int4", quantize="int4", concat_decoder=False)
    report = compare_steps.main(bundles["olmo"], tmp_path / "int4", tmp_path / "steps.json", runs=4)
    assert report["quantization"] == {"A": "none", "B": "int4-weight-only"}
    assert report["nodes"]["B"]["MatMulNBits"] > 0 and "MatMulNBits" not in report["nodes"]["A"]
    assert all(row["B"]["median_ms"] > 0 for row in report["shapes"])
    profiled = profile_step.main(tmp_path / "int4", tmp_path / "profile.json")
    assert profiled["quantization"] == "int4-weight-only"
    assert "MatMulNBits" in profiled["1 new tokens"]["ar_step (in place)"]["ms_by_op"]
