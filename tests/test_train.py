"""L_MARIA training: it learns, it repeats with a seed, it resumes exactly, and the CLI drives it."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from maria_onnx import train as maria_train
from maria_onnx.checkpoint import load_maria
from maria_onnx.cli import app
from maria_onnx.config import MariaConfig, TrainConfig
from maria_onnx.data import read_documents
from maria_onnx.train import train

SMALL = dict(seq_len=32, batch_size=4, learning_rate=3e-2, warmup_steps=2, eval_every=100, eval_batches=2, seed=3)


def head_of(folder):
    return load_file(folder / "head.safetensors")


def test_training_lowers_held_out_perplexity(pairs, corpus_file, tmp_path, capsys):
    mlm, ar = pairs["olmo"]
    train(
        mlm,
        ar,
        corpus_file,
        tmp_path / "zero",
        TrainConfig(steps=1, learning_rate=1e-9, **{k: v for k, v in SMALL.items() if k != "learning_rate"}),
        device="cpu",
    )
    before = "".join(capsys.readouterr())
    train(mlm, ar, corpus_file, tmp_path / "run", TrainConfig(steps=40, **SMALL), device="cpu")
    after = "".join(capsys.readouterr())
    perplexity = lambda text: float(text.rsplit("perplexity ", 1)[1].split()[0])
    assert perplexity(after) < 0.7 * perplexity(before)
    backbones, head, config = load_maria(tmp_path / "run")
    assert config.trained_steps == 40 and config.train["seq_len"] == 32
    assert head.linear.weight.shape == (backbones.vocab_size, config.mlm_hidden_size + config.ar_hidden_size)


def test_same_seed_same_run_and_resume_is_exact(pairs, corpus_file, tmp_path, monkeypatch):
    mlm, ar = pairs["llama"]
    config = TrainConfig(steps=6, save_every=3, **SMALL)
    train(mlm, ar, corpus_file, tmp_path / "a", config, device="cpu")
    train(mlm, ar, corpus_file, tmp_path / "b", config, device="cpu")

    save = maria_train._save

    def save_then_crash(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(maria_train, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(mlm, ar, corpus_file, tmp_path / "c", config, device="cpu")  # interrupted after step 3
    monkeypatch.setattr(maria_train, "_save", save)
    assert not torch.equal(head_of(tmp_path / "a")["weight"], head_of(tmp_path / "c")["weight"])
    train(mlm, ar, corpus_file, tmp_path / "c", config, device="cpu")  # resumed
    for other in ("b", "c"):
        for name in ("weight", "bias"):
            torch.testing.assert_close(
                head_of(tmp_path / other)[name], head_of(tmp_path / "a")[name], atol=1e-6, rtol=1e-5
            )
    with pytest.raises(ValueError, match="other settings \\(seq_len\\)"):
        train(mlm, ar, corpus_file, tmp_path / "c", TrainConfig(steps=8, **{**SMALL, "seq_len": 16}), device="cpu")


def test_a_run_into_another_pairs_checkpoint_is_refused(pairs, corpus_file, tmp_path):
    """Resuming or overwriting a checkpoint of other backbones would leave a head that does not belong to the
    backbones its config names: refused, and the checkpoint is left as it was."""
    out, config = tmp_path / "c", TrainConfig(steps=2, **SMALL)
    train(*pairs["olmo"], corpus_file, out, config, device="cpu")
    before = head_of(out)["weight"]
    message = (
        f"holds a checkpoint of other backbones (--mlm {pairs['olmo'][0].resolve()} --ar {pairs['olmo'][1].resolve()})"
    )
    for left in ("with its training state", "finished, its training state deleted"):
        with pytest.raises(ValueError, match=re.escape(message)):
            train(*pairs["llama"], corpus_file, out, config, device="cpu")
        assert torch.equal(head_of(out)["weight"], before) and MariaConfig.load(out).ar_model_type == "olmo", left
        shutil.rmtree(out / "train_state", ignore_errors=True)
    train(*pairs["olmo"], corpus_file, out, config, device="cpu")  # its own backbones: trained afresh


def test_cli_train_writes_a_checkpoint(pairs, corpus_file, tmp_path):
    mlm, ar = pairs["olmo2"]
    out = tmp_path / "ckpt"
    paths = ["--mlm", str(mlm), "--ar", str(ar), "--data", str(corpus_file), "--out", str(out)]
    result = CliRunner().invoke(app, ["train", *paths, *"--steps 3 --seq-len 16 --batch-size 2 --device cpu".split()])
    assert result.exit_code == 0, result.output
    config = MariaConfig.from_dict(json.loads((out / "maria_config.json").read_text()))
    assert config.ar_model_type == "olmo2" and config.trained_steps == 3
    assert (
        "warning: --warmup-steps 50 is not below --steps 3: the learning rate rises for the whole run" in result.output
    )  # the default warmup outlasts 3 steps


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask-rate-min", "0.8", "--mask-rate-max", "0.2"], "mask rate range"),
        (["--data", "/nowhere/text.txt"], "does not exist"),
        (["--seq-len", "100000"], "over the backbones' maximum"),
        (
            ["--seq-len", "500", "--data", str(Path(__file__).parent.parent / ".gitignore")],
            f"{Path(__file__).parent.parent / '.gitignore'} holds",
        ),
        (
            ["--seq-len", "500", "--data", str(Path(__file__).parent.parent / ".gitignore")],
            "fewer than one window of --seq-len 500; add text or lower --seq-len",
        ),
        (["--out", __file__], "is a file; --out names the checkpoint folder to write"),
    ],
)
def test_cli_train_bad_input_is_one_line(pairs, corpus_file, tmp_path, args, message):
    mlm, ar = pairs["olmo"]
    paths = ["--mlm", str(mlm), "--ar", str(ar), "--data", str(corpus_file), "--out", str(tmp_path / "o")]
    base = ["train", *paths, "--steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_documents_from_jsonl_and_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one doc"}\n\n{"text": "two doc"}\n')
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    assert read_documents(tmp_path, line_documents=True) == ["one doc", "two doc", "line one", "line two"]
    assert read_documents(tmp_path / "b.txt") == ["line one\nline two\n"]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no string field 'text'"):
        read_documents(tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "marked doc"}\n')  # a byte order mark: not text
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfmarked\x0cpage\n")
    assert read_documents(tmp_path / "c.jsonl") == ["marked doc"]
    assert read_documents(tmp_path / "d.txt", line_documents=True) == ["marked\x0cpage"]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(
        ValueError, match="photos holds no .txt, .md, .rst or .jsonl files; pass a text file or a folder"
    ):
        read_documents(tmp_path / "photos")


def test_a_folder_is_read_without_its_hidden_files_and_with_suffixes_in_any_case(tmp_path):
    """A dataset cloned with git: its .git/ (binary objects, no suffix) and .gitattributes are not documents;
    NOTES.TXT and DATA.JSONL are read as their suffixes say."""
    import subprocess

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("first document\n")
    (tmp_path / "data" / "NOTES.TXT").write_text("shouting document\n")
    (tmp_path / "data" / "DATA.JSONL").write_text('{"text": "json document"}\n')
    (tmp_path / "data" / "b.ndjson").write_text('{"text": "ndjson document"}\n')
    (tmp_path / "data" / ".gitattributes").write_text("*.txt text\n")
    (tmp_path / "data" / ".cache").mkdir()
    (tmp_path / "data" / ".cache" / "old.txt").write_text("a cached copy\n")
    git = ["git", "-c", "user.email=maria@example.com", "-c", "user.name=maria", "-C", str(tmp_path / "data")]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "data"]):
        subprocess.run(git + args, check=True)
    assert read_documents(tmp_path / "data") == [
        "json document",
        "shouting document\n",
        "first document\n",
        "ndjson document",
    ]
    assert read_documents(tmp_path / "data" / "DATA.JSONL") == ["json document"]


def test_a_long_document_is_tokenized_in_pieces_to_the_same_ids(pairs, monkeypatch):
    """A file as one document is cut at line starts for the tokenizer (one 100 MB text took it 19 GB), into ids
    the same as the whole text's; where the tokenizer marks a text's start, the document stays whole."""
    from transformers import AutoTokenizer

    from maria_onnx.runtime import windows as corpus_windows
    from maria_onnx.runtime.text import plain_encoder
    from maria_onnx.runtime.windows import pack_windows, pieces

    encode = plain_encoder(AutoTokenizer.from_pretrained(pairs["olmo"][1]))
    document = "".join(f"Line {i}: the quick  brown fox,\n\n  indented {i}\tand tabbed\r\n" for i in range(400))
    cut = list(pieces(document, encode, size=1000))
    assert len(cut) > 10 and "".join(cut) == document
    assert all(piece.startswith("Line") for piece in cut[1:])
    assert [i for piece in cut for i in encode(piece)] == encode(document)
    from tokenizers import Tokenizer

    from maria_onnx.runtime.default_model import DEFAULT_MODEL

    shipped = plain_encoder(Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json")))
    assert [i for piece in pieces(document, shipped, size=1000) for i in shipped(piece)] == shipped(document)
    monkeypatch.setattr(corpus_windows, "PIECE_CHARS", 1000)
    seen = []
    windows = pack_windows([document, document], lambda piece: seen.append(piece) or encode(piece), 16, 0)
    whole = (encode(document) + [0]) * 2
    assert document not in seen and all(seen.count(piece) == 2 for piece in cut)  # cut, both times
    assert windows.tolist() == [whole[i : i + 16] for i in range(0, len(whole) - 15, 16)]
    marked = lambda text: [0] + [ord(c) for c in text]  # noqa: E731
    assert list(pieces(document, marked, size=1000)) == [document]
    assert list(pieces("no line breaks " * 200, encode, size=100)) == ["no line breaks " * 200]
