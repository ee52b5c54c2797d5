"""Training loses nothing: an interrupted run says how to resume, a save cut short resumes from the one before,
a damaged state is named with its fix."""

import json
from pathlib import Path

import pytest
from commands import cli, one_line_error


def test_an_interrupted_training_run_says_how_to_resume(pairs, corpus_file, tmp_path, monkeypatch):
    import maria_onnx.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(maria_onnx.train, "train", interrupted)
    one_line_error(
        cli(*train_args(pairs, corpus_file, tmp_path / "run", 2), "--warmup-steps", "1"),
        f"interrupted; the same command resumes from the last save in {tmp_path / 'run'}",
        code=130,
    )


# -- training state: saves are atomic, damage is named --------------------------------------------------------


def train_args(pairs, corpus_file, out, steps):
    mlm, ar = pairs["olmo"]
    return [
        "train",
        "--mlm",
        mlm,
        "--ar",
        ar,
        "--data",
        corpus_file,
        "--out",
        out,
        "--steps",
        steps,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--save-every",
        "1",
        "--eval-every",
        "100",
        "--device",
        "cpu",
    ]


def test_a_save_cut_short_resumes_from_the_previous_one(pairs, corpus_file, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "run"
    assert cli(*train_args(pairs, corpus_file, out, 2)).exit_code == 0
    save_state = Accelerator.save_state

    def torn_save(self, output_dir=None, **kwargs):
        save_state(self, output_dir, **kwargs)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"")  # killed while the optimizer was written
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", torn_save)
    with pytest.raises(KeyboardInterrupt):
        from maria_onnx.config import TrainConfig
        from maria_onnx.train import train

        mlm, ar = pairs["olmo"]
        train(
            mlm,
            ar,
            corpus_file,
            out,
            TrainConfig(steps=4, seq_len=16, batch_size=2, save_every=1, eval_every=100),
            device="cpu",
        )
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert json.loads((out / "train_state" / "step.json").read_text())["step"] == 2  # the last complete save
    result = cli(*train_args(pairs, corpus_file, out, 4))
    assert result.exit_code == 0, result.output
    assert "starting at step 2 of 4" in result.output


def test_a_damaged_state_is_named_with_the_fix(pairs, corpus_file, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(pairs, corpus_file, out, 1)).exit_code == 0
    (out / "train_state" / "optimizer.bin").write_bytes(b"")
    result = cli(*train_args(pairs, corpus_file, out, 2))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is damaged (optimizer.bin is empty); delete that folder" in result.output


def test_train_seq_len_over_the_backbones_maximum_is_refused(pairs, corpus_file, tmp_path):
    args = train_args(pairs, corpus_file, tmp_path / "run", 1)
    args[args.index("--seq-len") + 1] = "600"
    result = cli(*args)
    assert result.exit_code == 2 and "--seq-len 600 is over the backbones' maximum of 510" in result.output
    assert not (tmp_path / "run" / "train_state").exists()


# -- input lines: one in, one out; formats explicit; bad lines named; --skip-invalid ----------------------------
