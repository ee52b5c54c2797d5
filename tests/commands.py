"""Running `maria` in-process, and what a one-line error looks like: shared by the tests of bad input."""

from click.testing import Result
from typer.testing import CliRunner

from maria_onnx.cli import app

runner = CliRunner()


def cli(*args: object, input: str | bytes | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line_error(result: Result, message: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
