"""`maria`: train a MARIA head, export it to an ONNX bundle, fill masked text. Each command calls one library function.

Training and export need the `train` extra (torch, transformers, optimum-onnx); they are imported inside those
commands so that `maria infill` runs with the runtime's dependencies alone.
"""

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MARIA: fill masked tokens with an autoregressive model, on ONNX Runtime.")


@app.callback()
def maria():
    """MARIA: fill masked tokens with an autoregressive model, on ONNX Runtime."""


def fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def one_line_errors(command):
    """Turns the library's edge errors into one line on stderr and exit code 2, with no traceback."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as error:     # FileNotFoundError, PermissionError, UnicodeDecodeError...
            fail(str(error))
        except ImportError as error:
            fail(f"{error.name or error}: this command needs the training extra; pip install 'maria-onnx[train]'")
    return run


@app.command()
@one_line_errors
def train(
    mlm: Path = typer.Option(..., help="Local Hugging Face folder of the masked LM (e.g. ModernBERT)."),
    ar: Path = typer.Option(..., help="Local Hugging Face folder of the causal LM (e.g. OLMo)."),
    data: Path = typer.Option(..., help="Training text: a .txt/.md/.rst/.jsonl file or a folder of them."),
    out: Path = typer.Option(..., help="Checkpoint folder; an interrupted run in it is resumed."),
    eval_data: Optional[Path] = typer.Option(None, help="Held-out text; default: 5% of the training windows."),
    steps: int = typer.Option(1000, min=1),
    seq_len: int = typer.Option(128, min=2, help="Tokens per training window."),
    batch_size: int = typer.Option(8, min=1, help="Windows per step and process."),
    learning_rate: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(50, min=0),
    mask_rate_min: float = typer.Option(0.0, help="Per-sequence mask rate ~ U(min, max)."),
    mask_rate_max: float = typer.Option(1.0),
    eval_every: int = typer.Option(100, min=1),
    save_every: int = typer.Option(100, min=1),
    seed: int = typer.Option(0),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
    line_documents: bool = typer.Option(False, help="Plain text: one document per line instead of per file."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (under `accelerate launch`, its settings)."),
):
    """Train the MARIA fusion head (L_MARIA) on frozen MLM + AR backbones."""
    from maria_onnx.config import TrainConfig
    from maria_onnx.train import train as run_train

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got '{device}'")
    config = TrainConfig(steps=steps, seq_len=seq_len, batch_size=batch_size, learning_rate=learning_rate,
                         warmup_steps=warmup_steps, mask_rate_min=mask_rate_min, mask_rate_max=mask_rate_max,
                         eval_every=eval_every, save_every=save_every, seed=seed, text_field=text_field,
                         line_documents=line_documents)
    result = run_train(mlm, ar, data, out, config, eval_data=eval_data, device=device)
    typer.echo(f"wrote {out} (step {result.trained_steps})")


@app.command("export")
@one_line_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder written by `maria train`."),
    out: Path = typer.Option(..., help="The bundle folder to write."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 (hidden states and KV cache; fp16 is for CUDA)."),
    int8: bool = typer.Option(False, "--int8", help="Dynamically quantize the weights to int8 (CPU edge devices)."),
    opset: int = typer.Option(17, help="ONNX opset."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle at --out (only once the new one passed)."),
):
    """Export a trained checkpoint to a validated ONNX bundle (mlm, ar_decoder, fusion_head)."""
    from export.bundle import export_bundle

    export_bundle(checkpoint, out, dtype=dtype, int8=int8, opset=opset, overwrite=overwrite)


def main():
    app(prog_name="maria")


if __name__ == "__main__":
    sys.exit(main())
