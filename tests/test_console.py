"""The `maria` command's input and output machinery (console/), unit by unit."""

import io
import json
import warnings

import pytest
import typer

from maria_onnx.console.inputs import InputLines, checked_lines, chunks, clashing_field, kept_fields
from maria_onnx.console.outputs import Ranked, fail, shown, warnings_shown
from maria_onnx.runtime.readers import Line
from maria_onnx.runtime.results import Infilled


def result(text: str, segments=(), score=None) -> Infilled:
    return Infilled(
        input="a [MASK]",
        text=text,
        ids=[1, 2],
        masked_positions=[1],
        fill_logprobs=[-0.5],
        fills=[" b"],
        segments=list(segments),
        score=score,
    )


def test_input_lines_from_arguments_and_the_settings_they_refuse():
    lines = InputLines(["a [MASK]", "b [MASK]"], None, None)
    assert [(line.number, line.text) for line in lines] == [(1, "a [MASK]"), (2, "b [MASK]")]
    assert lines.whole
    for texts, file, form, message in (
        ([], None, None, "no text given"),
        (["a"], "x.txt", None, "not both"),
        (["a"], None, "jsonl", "--format describes --input"),
        (["a"], None, "xml", "--format must be text or jsonl, got 'xml'"),
    ):
        with pytest.raises(ValueError, match=message):
            InputLines(texts, file, form)


def test_input_lines_read_a_file_twice_and_refuse_evident_jsonl_as_text(tmp_path):
    plain = tmp_path / "in.txt"
    plain.write_text("first [MASK]\n\n second [MASK]\n")
    with InputLines([], str(plain), None) as lines:
        assert lines.whole and [line.text for line in lines] == ["first [MASK]", " second [MASK]"]
        assert [line.number for line in lines] == [1, 3]  # read again, the same lines
    assert lines.stream is not None and lines.stream.closed
    jsonl = tmp_path / "in.txt"
    jsonl.write_text(json.dumps({"text": "a [MASK]", "id": 7}) + "\n")
    with (
        pytest.raises(ValueError, match="looks like JSONL; pass --format jsonl"),
        InputLines([], str(jsonl), None) as lines,
    ):
        list(lines)
    assert lines.stream is not None and lines.stream.closed  # closed also when a line stops the run
    with InputLines([], str(jsonl), "jsonl") as lines:
        (line,) = lines
    assert line.text == "a [MASK]" and kept_fields(line, from_file=True) == {"line": 1, "id": 7}
    assert kept_fields(line, from_file=False) == {}
    with pytest.raises(ValueError, match="cannot read --input"):
        InputLines([], str(tmp_path / "missing.txt"), None)


def test_chunks_keep_whole_texts_or_split_one_texts_samples():
    assert list(chunks(iter("abc"), num_samples=2, size=4)) == [(["a", "b"], 0, 2), (["c"], 0, 2)]
    assert list(chunks(iter("a"), num_samples=5, size=2)) == [(["a"], 0, 2), (["a"], 2, 2), (["a"], 4, 1)]
    waiting = iter("abc")  # the next text would mean waiting: the piece goes as it is
    assert [piece for piece, _, _ in chunks(waiting, 1, 8, ready=lambda: False)] == [["a"], ["b"], ["c"]]


def test_checked_lines_stop_or_skip_a_bad_line(capsys):
    class Prepare:
        @staticmethod
        def prepare(text, rerank):
            if "[MASK" not in text:
                raise ValueError("no [MASK] marker")
            return text.upper()

    lines = [Line(1, "a [MASK]"), Line(2, "no marker"), Line(3, None, "in.jsonl:3 is not valid JSON")]
    where = lambda line: f"in:{line.number}"  # noqa: E731
    with pytest.raises(ValueError, match=r"^in:2: no \[MASK\] marker \(--skip-invalid fills the other lines\)$"):
        list(checked_lines(lines, Prepare, skip_invalid=False, where=where))
    kept = list(checked_lines(lines, Prepare, skip_invalid=True, where=where))
    assert [(line.number, prepared) for line, prepared in kept] == [(1, "A [MASK]")]
    assert capsys.readouterr().err.splitlines() == [
        "skipped: in:2: no [MASK] marker",
        "skipped: in.jsonl:3 is not valid JSON",
    ]
    clash = Line(4, "a [MASK]", record={"text": "a [MASK]", "score": 1})
    assert clashing_field(clash) == "score"
    with pytest.raises(ValueError, match="has the field 'score', which --json writes"):
        list(checked_lines([clash], Prepare, skip_invalid=False, where=where, as_json=True))


def test_shown_escapes_newlines_and_keeps_the_input_fields_in_json():
    filled = result("a\nb", segments=[("a", False), ("\nb", True)])
    assert shown(filled, as_json=False, styled=False, kept={}) == "a\\nb"
    assert "\\nb" in shown(filled, as_json=False, styled=True, kept={})
    line = json.loads(shown(filled, as_json=True, styled=False, kept={"line": 3, "id": "x"}))
    assert line["line"] == 3 and line["id"] == "x" and line["text"] == "a\nb"


def test_ranked_prints_in_score_order_ties_in_sample_order(capsys):
    ranked = Ranked()
    for sample, score in enumerate([-3.0, -1.0, -3.0, -2.0]):
        ranked.add(score, sample, f"note {sample}" if sample == 1 else "", f"sample {sample}")
    assert ranked.print_all() == 4
    out = capsys.readouterr()
    assert out.out.splitlines() == ["sample 1", "sample 3", "sample 0", "sample 2"]
    assert out.err.splitlines() == ["note 1"]
    assert ranked.print_all() == 0  # forgotten once printed


def test_warnings_are_one_line_each_and_fail_is_one_line_and_a_status(capsys):
    with warnings_shown():
        warnings.warn("CUDA cannot start; running on the CPU instead", RuntimeWarning, stacklevel=1)
    assert capsys.readouterr().err == "warning: CUDA cannot start; running on the CPU instead\n"
    with pytest.raises(typer.Exit) as stopped:
        fail("the bundle is missing", code=2)
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err == "error: the bundle is missing\n"


def test_stdin_is_read_as_it_comes(monkeypatch):
    class Stdin:
        buffer = io.BytesIO(b"a [MASK]\nb [MASK]\n")

    monkeypatch.setattr("sys.stdin", Stdin)
    with InputLines([], "-", None) as lines:
        assert not lines.whole and lines.name == "stdin"
        assert [line.text for line in lines] == ["a [MASK]", "b [MASK]"] and lines.count == 2
    assert not Stdin.buffer.closed  # stdin is not the command's to close
