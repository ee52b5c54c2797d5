"""`maria bench` and `maria eval` end to end on tiny models, and the baselines against direct PyTorch."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from maria_onnx.checkpoint import load_maria
from maria_onnx.cli import app
from maria_onnx.model import mlm_input_ids
from maria_onnx.runtime.evaluate import draw_masks, text_windows
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.manifest import load_manifest
from maria_onnx.tools.baselines import baseline_heads, evaluate_baselines, mlm_autoregressive
from maria_onnx.tools.shapes import PAPER
from maria_onnx.tools.tiny import corpus

runner = CliRunner()


def test_bench_writes_json_and_png(checkpoints, bundles, tmp_path):
    result = runner.invoke(
        app,
        [
            "bench",
            "--checkpoint",
            str(checkpoints["olmo"]),
            "--model",
            str(bundles["olmo"]),
            "--out",
            str(tmp_path),
            "--lengths",
            "8,24",
            "--batch-sizes",
            "1,2",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] is True
    assert "length 24, batch 2: pytorch" in result.output  # each point shown as it is measured
    systems = {(r["system"], r["length"], r["batch"]) for r in report["results"]}
    assert systems == {
        (s, n, b) for s in ("onnx-cpu", "onnx-cpu-concat", "pytorch", "mlm-ar") for n in (8, 24) for b in (1, 2)
    }
    assert all(
        r["tokens_per_s"] > 0 and r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"] for r in report["results"]
    )
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bench_stopped_part_way_keeps_what_it_measured(checkpoints, bundles, tmp_path, monkeypatch):
    """Each (length, batch) is written to bench.json ("complete": false) and printed as it is measured: a long
    bench stopped by a time limit keeps its first points."""
    from maria_onnx.tools import bench as tools_bench

    def systems(*args, **kwargs):
        chosen, device = systems_of(*args, **kwargs)
        pytorch = chosen["pytorch"]

        def stops_at_24(ids, masked):
            if len(ids[0]) == 24:
                raise KeyboardInterrupt
            return pytorch(ids, masked)

        return {**chosen, "pytorch": stops_at_24}, device

    systems_of = tools_bench._systems
    monkeypatch.setattr(tools_bench, "_systems", systems)
    (tmp_path / "bench.png").write_bytes(b"an earlier run's plot")
    with pytest.raises(KeyboardInterrupt):
        tools_bench.bench(
            tmp_path,
            checkpoint=checkpoints["olmo"],
            bundle=bundles["olmo"],
            lengths=[8, 24],
            batch_sizes=[1],
            repeats=1,
            device="cpu",
            mlm_ar=False,
            concat=False,
        )
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] is False
    assert {(r["system"], r["length"]) for r in report["results"]} == {("onnx-cpu", 8), ("pytorch", 8)}
    assert not (tmp_path / "bench.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_bench_quantize_runs_quantized_exports_of_the_same_weights_beside(checkpoints, tmp_path):
    args = ["bench", "--checkpoint", str(checkpoints["olmo"]), "--out", str(tmp_path), "--lengths", "8"]
    args += "--batch-sizes 2 --repeats 1 --device cpu --no-mlm-ar --no-concat --quantize int4 --int8".split()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {r["system"] for r in report["results"]} == {"onnx-cpu", "onnx-cpu-int4", "onnx-cpu-int8", "pytorch"}
    assert report["quantized_bundles"] == {how: str(tmp_path / f"bundle-{how}") for how in ("int4", "int8")}
    assert json.loads((tmp_path / "bundle-fp32" / "maria.json").read_text())["quantization"] == "none"
    for how, kernel in (("int8", "MatMulInteger"), ("int4", "MatMulNBits")):
        assert json.loads((tmp_path / f"bundle-{how}" / "maria.json").read_text())["quantization"].startswith(how)
        step = onnx.load(str(tmp_path / f"bundle-{how}" / "ar_step.onnx"))
        assert kernel in {node.op_type for node in step.graph.node}


def test_bench_of_a_bundle_alone_on_a_text_with_speculative_rows(bundles, tmp_path):
    """--model without --checkpoint: the ONNX systems alone, said so; --text: the inputs are windows of the text's
    tokens (a .npy of ids or a UTF-8 file); --speculate: each engine again, as -spec."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ids.npy", rng.integers(5, 200, (4, 16)))
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 20, encoding="utf-8")
    for text in ("ids.npy", "text.txt"):
        out = tmp_path / text.split(".")[0]
        args = ["bench", "--model", str(bundles["olmo"]), "--out", str(out), "--lengths", "12", "--batch-sizes", "2"]
        extra = ["--repeats", "1", "--device", "cpu", "--text", str(tmp_path / text), "--speculate", "3"]
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        assert "the ONNX systems alone" in result.output
        report = json.loads((out / "bench.json").read_text())
        assert {r["system"] for r in report["results"]} == {"onnx-cpu", "onnx-cpu-concat", "onnx-cpu-spec"}
        assert report["text"] == str(tmp_path / text)
        assert report["speculate"] == 3 and report["checkpoint"] is None
    from maria_onnx.tools.bench import _inputs, text_tokens

    tokens = text_tokens(tmp_path / "ids.npy", bundles["olmo"], load_manifest(bundles["olmo"]))
    ids, masked = _inputs(12, 3, 200, 0.5, 0, tokens)
    starts = [int(np.flatnonzero([np.array_equal(tokens[i : i + 12], x) for i in range(len(tokens))])[0]) for x in ids]
    assert len(set(starts)) == 3 and all(start % 12 == 0 for start in starts) and all(m.any() for m in masked)
    short = runner.invoke(app, [*args, "--lengths", "40", "--text", str(tmp_path / "ids.npy")])
    assert (
        short.exit_code == 2 and "holds 64 tokens; the longest length x the largest batch size needs 80" in short.output
    )


def test_bench_on_random_shapes_from_a_config_file(tmp_path):
    size = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    shapes = {  # the paper's MLM made small, and a Llama with grouped-query attention: any shapes, any family
        "mlm": {**PAPER["mlm"], **size, "max_position_embeddings": 64},
        "ar": dict(model_type="llama", **size, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=1),
    }
    shapes["ar"].update(bos_token_id=0, eos_token_id=0)
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))

    def bench(*extra: str) -> set:
        args = ["bench", "--shapes", str(tmp_path / "shapes.json"), "--out", str(tmp_path / "o"), "--lengths", "8"]
        result = runner.invoke(app, args + ["--batch-sizes", "2", "--repeats", "1", "--no-mlm-ar", *extra])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "o" / "bench.json").read_text())
        return {r["system"] for r in report["results"]}

    assert bench() == {"onnx-cpu", "onnx-cpu-concat", "pytorch"}
    assert bench("--no-concat") == {"onnx-cpu", "pytorch"}
    result = runner.invoke(app, ["bench", "--shapes", "nowhere.json", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "not 'paper', 'default' or a JSON file" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--batch-sizes", "0"], "--batch-sizes takes batch sizes of at least 1, got [0]"),
        (["bench", "--lengths", "8,1"], "--lengths takes input lengths of at least 2 tokens, got [8, 1]"),
        (["bench", "--mask-rate", "1.5"], "--mask-rate must be in (0, 1], got 1.5"),
        (["bench", "--shapes", "SHAPES"], "cannot be read as JSON"),
        (["bench", "--shapes", "GPT2"], "the ar config is a 'gpt2' model; supported: llama, mistral, olmo"),
        (
            ["bench", "--shapes", "HEADS"],
            "the mlm config builds no model (The hidden size (30) is not a multiple of the "
            "number of attention heads (7))",
        ),
        (
            ["bench", "--shapes", "paper", "--lengths", "128,2048"],
            "--lengths [2048] exceed the model's maximum of 2047 tokens; give lengths up to 2047",
        ),
        (["bench", "--shapes", "paper", "--checkpoint", "x"], "give either --checkpoint (trained weights) or --shapes"),
        (
            ["bench", "--int8", "--device", "cuda"],
            "--quantize benches quantized bundles on the CPU; use it with --device cpu",
        ),
        (["bench", "--quantize", "int3"], "--quantize takes int8 and int4, got int3"),
        (["bench", "--speculate", "1"], "--speculate takes 0 (no -spec rows) or at least 2, got 1"),
        (["bench-serve", "--clients", "8", "--requests", "4"], "--requests must be at least --clients"),
        (["bench-serve", "--max-batch-sizes", "4,0"], "--max-batch-sizes takes batch sizes of at least 1, got [4, 0]"),
        (
            ["bench-serve", "--stagger-ms", "inf"],
            "--stagger-ms takes a finite number of milliseconds, at least 0; got inf",
        ),
        (["bench-serve", "--delay-ms", "inf"], "--delay-ms takes a finite number of milliseconds, at least 0; got inf"),
    ],
)
def test_bad_bench_settings_are_one_line_and_write_nothing(tmp_path, args, message):
    (tmp_path / "shapes.json").write_text("{not json")
    (tmp_path / "gpt2.json").write_text(
        json.dumps(
            {"mlm": {"model_type": "modernbert", "vocab_size": 64}, "ar": {"model_type": "gpt2", "vocab_size": 64}}
        )
    )
    (tmp_path / "heads.json").write_text(
        json.dumps(
            {
                "mlm": {
                    "model_type": "modernbert",
                    "vocab_size": 64,
                    "pad_token_id": 1,
                    "hidden_size": 30,
                    "num_attention_heads": 7,
                },
                "ar": {"model_type": "olmo", "vocab_size": 64},
            }
        )
    )
    files = {
        "SHAPES": str(tmp_path / "shapes.json"),
        "GPT2": str(tmp_path / "gpt2.json"),
        "HEADS": str(tmp_path / "heads.json"),
    }
    args = [files.get(a, a) for a in args]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_lengths_a_checkpoint_cannot_take_are_refused_before_its_export(checkpoints, tmp_path):
    result = runner.invoke(
        app,
        ["bench", "--checkpoint", str(checkpoints["olmo"]), "--lengths", "8,100000", "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 2 and "--lengths [100000] exceed the model's maximum of" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, holds", [("bench", "bench.json and bench.png"), ("bench-serve", "bench-serve.json")])
def test_an_out_that_is_a_file_is_named(tmp_path, command, holds):
    (tmp_path / "notes.txt").write_text("keep")
    result = runner.invoke(app, [command, "--out", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip() == f"error: --out {tmp_path / 'notes.txt'} is a file; --out names the folder for {holds}"
    )
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_mlm_autoregressive_runs_on_half_precision_backbones(checkpoints):
    """`maria bench --dtype fp16` loads the backbones in half precision: the MLM's decoder gets its hidden
    states in its own dtype (bf16 here: the CPU's half type for matrix products)."""
    backbones, _, _ = load_maria(checkpoints["olmo"])
    backbones.mlm.to(torch.bfloat16)
    rng = np.random.default_rng(0)
    ids, masked = [rng.integers(6, backbones.vocab_size, 10)], [np.zeros(10, dtype=bool)]
    masked[0][[2, 7]] = True
    filled = mlm_autoregressive(backbones, ids, masked)[0]
    assert np.array_equal(filled[~masked[0]], ids[0][~masked[0]])
    assert filled[masked[0]].min() >= 0 and filled[masked[0]].max() < backbones.vocab_size


def test_mlm_autoregressive_fills_with_the_mlm_alone(checkpoints):
    backbones, head, _ = load_maria(checkpoints["olmo"])
    rng = np.random.default_rng(0)
    ids = [rng.integers(6, backbones.vocab_size, 10)]
    masked = [np.zeros(10, dtype=bool)]
    masked[0][[2, 7]] = True
    filled = mlm_autoregressive(backbones, ids, masked)[0]
    assert np.array_equal(filled[~masked[0]], ids[0][~masked[0]])
    first = torch.from_numpy(ids[0])[None]
    with torch.no_grad():  # the first fill is the MLM's argmax with both positions masked
        logits = backbones.mlm(mlm_input_ids(backbones, first, torch.from_numpy(masked[0])[None])).logits
    logits = logits[0, 3, : backbones.vocab_size]
    logits[backbones.special.all] = -float("inf")
    allowed = backbones.utf8.allowed(ids[0], np.array([2, 7]), 0)  # as every decoder's fills
    if allowed is not None:
        logits[torch.from_numpy(~allowed)] = -float("inf")
    assert filled[2] == int(logits.argmax())


def baselines_case(checkpoint, seed: int, shape: tuple[int, int], mask_seed: int, batch_size: int):
    """(backbones, random windows, masks at rate 0.5, the PyTorch baselines' rows by system) of a checkpoint."""
    backbones, _, _ = load_maria(checkpoint)
    windows = np.random.default_rng(seed).integers(6, backbones.vocab_size, shape)
    masks = draw_masks(windows, 0.5, seed=mask_seed)
    rows = evaluate_baselines(backbones, windows, masks, batch_size=batch_size)
    return backbones, windows, masks, {r["system"]: r for r in rows}


def test_baseline_perplexities_agree_with_direct_pytorch(checkpoints, bundles):
    backbones, windows, masks, rows = baselines_case(checkpoints["llama"], 1, (5, 16), 3, 2)
    ids, masked = torch.from_numpy(windows), torch.from_numpy(np.stack(masks))
    start = torch.full((5, 1), backbones.special.start)
    with torch.no_grad():
        ar = backbones.ar(torch.cat([start, ids[:, :-1]], 1)).logits.log_softmax(-1)
        mlm = backbones.mlm(mlm_input_ids(backbones, ids, masked)).logits[:, 1:-1, : backbones.vocab_size]
        mlm = mlm.log_softmax(-1)
    truth = ids[masked]
    direct = {"AR alone": ar[masked].gather(1, truth[:, None]), "MLM alone": mlm[masked].gather(1, truth[:, None])}
    for name, logprobs in direct.items():
        assert math.isclose(rows[name]["perplexity"], math.exp(-logprobs.mean().item()), rel_tol=1e-4)
    assert set(baseline_heads(backbones)) == {"AR alone", "MLM alone", "PoE init"}


def test_eval_reports_maria_and_baselines_on_the_same_masks(checkpoints, bundles, tmp_path):
    (tmp_path / "text.txt").write_text("\n".join(corpus(60, seed=9)))
    result = runner.invoke(
        app,
        [
            "eval",
            str(tmp_path / "text.txt"),
            "--model",
            str(bundles["olmo"]),
            "--backbones-from",
            str(checkpoints["olmo"]),
            "--seq-len",
            "24",
            "--windows",
            "6",
            "--mask-rate",
            "0.5",
            "--span",
            "--json",
            str(tmp_path / "eval.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    rows = {r["system"]: r for r in report["rows"]}
    assert set(rows) == {"MARIA", "AR alone", "MLM alone", "PoE init"}
    assert len({r["masked_tokens"] for r in rows.values()}) == 1
    # the tiny checkpoint's head is the PoE head plus noise: its perplexity is that of the ONNX scorer
    infiller = Infiller(bundles["olmo"], device="cpu")
    windows = text_windows(tmp_path / "text.txt", infiller, 24, 6)
    masks = draw_masks(windows, 0.5, seed=0, span=True)
    nll = sum(infiller.score(list(windows), masks))
    assert math.isclose(rows["MARIA"]["perplexity"], math.exp(nll / sum(m.sum() for m in masks)), rel_tol=1e-9)
    assert 0 <= rows["MARIA"]["top1_accuracy"] <= 1


def test_onnx_baselines_match_the_pytorch_ones(checkpoints, bundles):
    from maria_onnx.runtime.evaluate import evaluate_baselines as onnx_baselines

    _, windows, masks, want = baselines_case(checkpoints["olmo2"], 4, (6, 20), 1, 4)
    got = {r["system"]: r for r in onnx_baselines(Infiller(bundles["olmo2"], device="cpu"), windows, masks, 4)}
    assert set(got) == set(want) == {"AR alone", "MLM alone", "PoE init"}
    for system in got:
        assert got[system]["perplexity"] == pytest.approx(want[system]["perplexity"], rel=1e-4)
        assert got[system]["top1_accuracy"] == want[system]["top1_accuracy"]
        assert got[system]["masked_tokens"] == want[system]["masked_tokens"]


def test_eval_reads_a_file_as_training_reads_lines(bundles, tmp_path):
    """One document per line, split on newlines only (a form feed stays in its line), a byte order mark dropped:
    the windows `maria train --line-documents` would pack from the same file."""
    from maria_onnx.data import read_documents
    from maria_onnx.runtime.evaluate import document_windows

    infiller = Infiller(bundles["olmo"], device="cpu")
    text = "".join(f"document {i} with\x0ca form feed\r\n" for i in range(40))
    (tmp_path / "held.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    windows = text_windows(tmp_path / "held.txt", infiller, 16, 8)
    documents = read_documents(tmp_path / "held.txt", line_documents=True)
    assert len(documents) == 40 and documents[0] == "document 0 with\x0ca form feed"
    np.testing.assert_array_equal(windows, document_windows(documents, infiller, 16, 8))


def test_eval_reads_only_as_far_as_its_windows_need(bundles, tmp_path):
    """The first --windows windows are the same however much text follows, and the text after them is not read:
    a file whose tail (or a folder whose last file) is not UTF-8 gives its first windows (reading it all would
    fail), and pack_windows takes documents only until its windows are full."""
    from maria_onnx.runtime.windows import pack_windows

    infiller = Infiller(bundles["olmo"], device="cpu")
    head = "".join(f"document {i} of the held-out text\n" for i in range(40)).encode()
    (tmp_path / "head.txt").write_bytes(head)
    (tmp_path / "long.txt").write_bytes(head + b"more text\n" * 200_000 + b"\xff\n")
    want = text_windows(tmp_path / "head.txt", infiller, 16, 8)
    np.testing.assert_array_equal(text_windows(tmp_path / "long.txt", infiller, 16, 8), want)
    from maria_onnx.tools.evaluate import windows_of

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_bytes(head)
    (tmp_path / "folder" / "b.txt").write_bytes(b"\xff")  # one document a file, in name order
    assert windows_of(tmp_path / "folder", infiller, 16, 8).shape == (8, 16)
    with pytest.raises(ValueError, match="b.txt is not valid UTF-8"):  # reached where the windows need it
        windows_of(tmp_path / "folder", infiller, 16, 1000)
    taken = []

    def documents():
        for number in range(1000):
            taken.append(number)
            yield "one two three"

    encode = lambda text: [len(word) for word in text.split()]  # noqa: E731
    windows = pack_windows(documents(), encode, 4, 0, most=3)
    assert windows.shape == (3, 4) and len(taken) == 3  # 4 ids a document, 12 ids wanted
    assert pack_windows(["a b c"] * 5, encode, 4, 0).shape == (5, 4)  # without most: every document


@pytest.mark.parametrize("rate", ["1.5", "0", "nan"])
def test_eval_names_a_bad_mask_rate_before_reading_the_text(bundles, tmp_path, rate):
    (tmp_path / "short.txt").write_text("too short to fill one window\n")
    result = runner.invoke(
        app,
        ["eval", str(tmp_path / "short.txt"), "--model", str(bundles["olmo"]), "--mask-rate", rate, "--device", "cpu"],
    )
    assert result.exit_code == 2 and result.output.strip() == f"error: --mask-rate must be in (0, 1], got {float(rate)}"
