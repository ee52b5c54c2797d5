"""Benchmarks, baselines, the default model's recipe and profiling: `maria bench*`,
`python -m maria_onnx.tools.NAME`."""

import argparse
import json
import os
import sys
from pathlib import Path

from maria_onnx.runtime.errors import SettingError


def flag(setting: str) -> str:
    """The option that gives a setting on the command line: num_samples -> --num-samples."""
    return "--" + setting.replace("_", "-")


def error_line(error: Exception) -> str:
    """The one line a command prints for an error in what it was given: the library's own message with each setting
    named as its option (a SettingError), or the system's reason after its path ("out.json: No space left on
    device", without "[Errno 28]")."""
    if isinstance(error, SettingError):
        return error.worded(flag)
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


def run_main(main, *args) -> None:
    """Runs a `python -m maria_onnx.tools.NAME` entry point: an error in its input is one line on stderr and exit
    status 2, as in the `maria` commands."""
    try:
        main(*args)
    except (ValueError, OSError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)


def write_whole(path: Path, write) -> None:
    """write(file) writes a report or a plot whole or not at all: into a file beside `path`, renamed over it once
    written, so a write that fails (a full disk, an interrupt) leaves no truncated file and the previous one as it
    was. A link, a device or a pipe (/dev/stdout) is written where it points, in place."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        write(path)
        return
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def write_json(path: Path, value) -> None:
    """Writes value as indented JSON, whole or not at all (write_whole)."""
    text = json.dumps(value, indent=2) + "\n"
    write_whole(path, lambda file: file.write_text(text))


def save_figure(figure, path: Path) -> None:
    """Saves a matplotlib figure as PNG, whole or not at all (write_whole)."""
    write_whole(path, lambda file: figure.savefig(file, dpi=120, format="png"))


def held_out_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a measurement on held-out windows of the shipped model or another bundle: --windows,
    --model, --seed and --out; the tool adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=Path, required=True, help=".npy of token-id windows of held-out text")
    parser.add_argument("--model", type=Path, default=None, help="a bundle; default: the shipped model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser
