"""`maria`: train a MARIA head, export it to an ONNX bundle, fill masked text. Each command parses its options and
calls one library function (the input and output machinery lives in console/).

Training and export need the `train` extra (torch, transformers, optimum-onnx); they are imported inside those
commands so that `maria infill` runs with the runtime's dependencies alone.
"""

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from maria_onnx.console.outputs import fail
from maria_onnx.tools import error_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="MARIA: fill masked tokens with an autoregressive model, on ONNX Runtime.",
)


def show_versions(asked: bool) -> None:
    """`maria --version`: runtime.sessions.installation(), then exit."""
    if asked:
        from maria_onnx.runtime.sessions import installation

        typer.echo("\n".join(installation()))
        raise typer.Exit()


@app.callback()
def maria(
    versions: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=show_versions,
        help="Show the versions (package, ONNX Runtime, Python) and whether CUDA can run, then exit.",
    ),
) -> None:
    """MARIA: fill masked tokens with an autoregressive model, on ONNX Runtime."""


def threads_option() -> Any:
    return typer.Option(
        None,
        min=1,
        envvar="MARIA_THREADS",
        help="CPU threads per ONNX Runtime session (default: the CPUs this process may use where "
        "an affinity mask or a container's cpuset or CPU quota leaves it fewer than the "
        "machine's, else ONNX Runtime's own; `maria --version` shows which).",
    )


def decoder_option() -> Any:
    return typer.Option(
        "auto",
        help="engine (the KV cache written in place, texts joining as others "
        "finish) | concat (Optimum's decoder, the cache copied each step) | "
        "auto (the engine where the bundle has it).",
    )


def speculate_option() -> Any:
    return typer.Option(
        0,
        min=0,
        help="Fill up to this many masked positions per AR step, drafted by the MLM head and kept while MARIA "
        "agrees (greedy fills unchanged, sampled ones drawn from the same distribution); 0: one per step. "
        "Pays only where an AR step costs about the same whatever its width (docs/benchmarks.md).",
    )


def one_line_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turns the library's edge errors into one line on stderr and exit code 2, with no traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:  # the reader left (`| head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
            raise typer.Exit(141) from None  # 128 + SIGPIPE, the status a shell gives such a tool
        except (ValueError, OSError) as error:  # FileNotFoundError, PermissionError, UnicodeDecodeError...
            fail(error_line(error))
        except MemoryError:  # numpy's own message names a size in GiB and a Python type
            fail("out of memory: the work does not fit this machine; lower --batch-size (or the texts' lengths)")
        except ImportError as error:
            fail(f"{error.name or error}: this command needs the training extra; pip install 'maria-onnx[train]'")
        except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT
            fail("interrupted", code=130)

    return run


@app.command()
@one_line_errors
def train(
    mlm: Path = typer.Option(..., help="Local Hugging Face folder of the masked LM (e.g. ModernBERT)."),
    ar: Path = typer.Option(..., help="Local Hugging Face folder of the causal LM (e.g. OLMo)."),
    data: Path = typer.Option(..., help="Training text: a .txt/.md/.rst/.jsonl file or a folder of them."),
    out: Path = typer.Option(..., help="Checkpoint folder; an interrupted run in it is resumed."),
    eval_data: Path | None = typer.Option(None, help="Held-out text; default: 5% of the training windows."),
    steps: int = typer.Option(1000, min=1),
    seq_len: int = typer.Option(128, min=2, help="Tokens per training window."),
    batch_size: int = typer.Option(8, min=1, help="Windows per step and process."),
    learning_rate: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(50, min=0),
    mask_rate_min: float = typer.Option(0.0, help="Per-sequence mask rate ~ U(min, max)."),
    mask_rate_max: float = typer.Option(1.0),
    eval_every: int = typer.Option(100, min=1),
    save_every: int = typer.Option(100, min=1),
    seed: int = typer.Option(0, min=0),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
    line_documents: bool = typer.Option(False, help="Plain text: one document per line instead of per file."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (under `accelerate launch`, its settings)."),
) -> None:
    """Train the MARIA fusion head (L_MARIA) on frozen MLM + AR backbones."""
    from maria_onnx.config import TrainConfig
    from maria_onnx.runtime.device import check_device
    from maria_onnx.train import train as run_train

    check_device(device)
    config = TrainConfig(
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        mask_rate_min=mask_rate_min,
        mask_rate_max=mask_rate_max,
        eval_every=eval_every,
        save_every=save_every,
        seed=seed,
        text_field=text_field,
        line_documents=line_documents,
    )
    if warmup_steps >= steps:
        typer.secho(
            f"warning: --warmup-steps {warmup_steps} is not below --steps {steps}: the learning rate rises for "
            f"the whole run and never reaches --learning-rate {learning_rate:g}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    try:
        result = run_train(mlm, ar, data, out, config, eval_data=eval_data, device=device)
    except KeyboardInterrupt:
        fail(f"interrupted; the same command resumes from the last save in {out}", code=130)
    typer.echo(f"wrote {out} (step {result.trained_steps})")


@app.command("tiny-backbones")
@one_line_errors
def tiny_backbones(
    out: Path = typer.Argument(..., help="A new folder for the backbones and the training text."),
    ar_type: str = typer.Option("olmo", help="The causal LM's family: olmo | olmo2 | llama | qwen2."),
    seed: int = typer.Option(0, min=0),
) -> None:
    """Make tiny random backbones (a ModernBERT and a causal LM sharing a vocabulary) and a small training text, for
    a first try of train -> export -> infill with no model hub."""
    from maria_onnx.tools.tiny import tiny_backbones as make_tiny_backbones

    made = make_tiny_backbones(out, ar_type, seed)
    checkpoint, bundle = out / "checkpoint", out / "bundle"
    typer.echo(f"wrote {made['mlm']}, {made['ar']} and {made['data']}; next:")
    typer.echo(
        f"  maria train --mlm {made['mlm']} --ar {made['ar']} --data {made['data']} --out {checkpoint} --steps 50"
    )
    typer.echo(f"  maria export {checkpoint} --out {bundle}")
    typer.echo(f'  maria infill "The [MASK] statement is used to [MASK] an exception." --model {bundle}')


def quantized(quantize: str | None, int8: bool) -> str | None:
    """--quantize, or int8 where the old spelling --int8 asks for it (both given must agree)."""
    if int8 and quantize not in (None, "int8"):
        raise ValueError(f"--int8 is --quantize int8; drop one of --int8 and --quantize {quantize}")
    return "int8" if int8 else quantize


def quantizations(quantize: str, int8: bool) -> tuple[str, ...]:
    """bench's --quantize (int8, int4 or both, comma-separated), with int8 where --int8 asks for it, each once."""
    return tuple(dict.fromkeys([*filter(None, quantize.split(",")), *(["int8"] if int8 else [])]))


@app.command("export")
@one_line_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder written by `maria train`."),
    out: Path = typer.Option(..., help="The bundle folder to write."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 (hidden states and KV cache; fp16 is for CUDA)."),
    quantize: str = typer.Option(
        None,
        help="Quantize the weights: int8 (dynamic int8) | int4 (weight-only, blocks of 32, embedding tables "
        "left fp32; at 1B-class shapes the smallest and, at batch 1 on CPUs, the fastest).",
    ),
    int8: bool = typer.Option(False, "--int8", help="The same as --quantize int8."),
    opset: int = typer.Option(17, help="ONNX opset."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle at --out (only once the new one passed)."),
    baseline_heads: bool = typer.Option(
        True,
        help="Include the AR's LM head and the MLM's decoder (whole-text "
        "scores, baselines); --no-baseline-heads for very large bundles.",
    ),
    concat_decoder: bool = typer.Option(
        True,
        help="Include Optimum's decoder (ar_decoder.onnx) for --decoder "
        "concat beside the engine's step graph; --no-concat-decoder "
        "halves the AR's share of the bundle.",
    ),
    attention: str = typer.Option(
        "eager",
        help="The step graph's attention: eager (its operations, the faster "
        "on CPUs) | fused (one ONNX Runtime MultiHeadAttention node a "
        "layer; needs a key/value head per query head).",
    ),
) -> None:
    """Export a trained checkpoint to a validated ONNX bundle (mlm, ar_step, ar_decoder, fusion_head)."""
    from maria_onnx.export.bundle import export_bundle

    try:
        export_bundle(
            checkpoint,
            out,
            dtype=dtype,
            quantize=quantized(quantize, int8),
            opset=opset,
            overwrite=overwrite,
            baseline_heads=baseline_heads,
            concat_decoder=concat_decoder,
            attention=attention,
        )
    except KeyboardInterrupt:
        fail(f"interrupted; nothing was written to {out} (a bundle already there is unchanged)", code=130)


@app.command()
@one_line_errors
def infill(
    texts: list[str] = typer.Argument(None, help="Texts with [MASK] (one token) or [MASK:N] (N tokens) markers."),
    model: Path | None = typer.Option(None, "--model", "-m", help="A bundle folder written by `maria export`."),
    input_file: str | None = typer.Option(
        None, "--input", "-i", help='One text per line, or JSONL with a "text" field; - for stdin.'
    ),
    input_format: str | None = typer.Option(
        None, "--format", help="text | jsonl (default: from --input's suffix, .jsonl/.ndjson = jsonl)."
    ),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Report bad input lines on stderr and fill the rest (default: stop at the first)."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="One JSON object per result (ids, positions, log-probs; "
        "with --input, the line number and a JSONL line's other "
        "fields).",
    ),
    batch_size: int = typer.Option(8, min=1),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, help="Sample from the smallest set with this much probability (1 = all)."),
    seed: int = typer.Option(
        0, help="Seed for sampling: a text's samples depend only on the seed and its line, whatever the batching."
    ),
    num_samples: int = typer.Option(1, min=1, help="Results per input."),
    rerank: bool = typer.Option(False, "--rerank", help="Order each text's samples by the AR's whole-text score."),
    device: str = typer.Option("auto", help="auto | cuda | cuda:N (GPU N) | cpu"),
    threads: int | None = threads_option(),
    decoder: str = decoder_option(),
    speculate: int = speculate_option(),
) -> None:
    """Fill the masked tokens of each text with a MARIA bundle (no PyTorch needed). [MASK] is one token,
    [MASK:N] N tokens, [MASK:?] 1 to 8 and [MASK:a-b] a to b tokens (the model chooses the length; over 64
    combinations of lengths, gap by gap)."""
    from maria_onnx.console.fill import fill_texts
    from maria_onnx.runtime.choose import Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    fill_texts(
        texts or [],
        input_file,
        input_format,
        model,
        sampling,
        batch_size=batch_size,
        num_samples=num_samples,
        rerank=rerank,
        skip_invalid=skip_invalid,
        as_json=as_json,
        device=device,
        threads=threads,
        decoder=decoder,
        speculate=speculate,
    )


@app.command()
@one_line_errors
def generate(
    length: int = typer.Option(..., min=1, help="Tokens to generate between --prefix and --suffix."),
    prefix: str = typer.Option("", help="Text before the generated tokens."),
    suffix: str = typer.Option("", help="Text after them."),
    steps: int = typer.Option(16, min=0, help="Annealing steps after the one-shot MARIA fill (0: one-shot)."),
    num_samples: int = typer.Option(
        1, min=1, help="Samples, advanced together (16 batches at a time, each group printed when it ends)."
    ),
    batch_size: int = typer.Option(8, min=1, help="Samples decoded at once (the rest wait for a free slot)."),
    fraction_start: float = typer.Option(0.5, help="Share of the generated tokens re-masked at the first step."),
    fraction_end: float = typer.Option(0.1, help="... and at the last (geometric in between)."),
    anneal_start: float = typer.Option(1.0, help="Metropolis temperature (nats) at the first step."),
    anneal_end: float = typer.Option(0.05, help="... and at the last."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of MARIA's fills."),
    top_p: float = typer.Option(1.0, help="Top-p of MARIA's fills."),
    seed: int = typer.Option(0, help="Seed: sample j's draws at step k come from (seed, j, k)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="A bundle; default: the shipped model."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample, with the energy per step."),
    device: str = typer.Option("auto", help="auto | cuda | cuda:N (GPU N) | cpu"),
    threads: int | None = threads_option(),
    speculate: int = speculate_option(),
) -> None:
    """Generate text by simulated annealing with MARIA (energy: -log p under the AR), optionally between a prefix
    and a suffix."""
    from maria_onnx.console.generate import generate_samples
    from maria_onnx.runtime.anneal import Schedule
    from maria_onnx.runtime.choose import Sampling

    schedule = Schedule(steps, fraction_start, fraction_end, anneal_start, anneal_end)
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    generate_samples(
        length,
        prefix,
        suffix,
        num_samples,
        schedule,
        sampling,
        model,
        batch_size=batch_size,
        as_json=as_json,
        device=device,
        threads=threads,
        speculate=speculate,
    )


def int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got '{text}'") from None


@app.command()
@one_line_errors
def bench(
    out: Path = typer.Option(Path("bench-results"), help="Folder for bench.json, bench.png (and exported bundles)."),
    checkpoint: Path | None = typer.Option(None, help="A trained checkpoint (`maria train --out`)."),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Its bundle; exported into --out if omitted. Without --checkpoint: the ONNX systems alone.",
    ),
    shapes: str | None = typer.Option(
        None,
        help="Random weights instead: 'default' (the shipped model's "
        "shapes; used when no --checkpoint is given), 'paper' "
        "(ModernBERT-large + OLMo-1B) or a JSON file of two configs.",
    ),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 (bundle export and PyTorch on CUDA)."),
    lengths: str = typer.Option("64,128,256,512,1024", help="Input lengths in tokens."),
    batch_sizes: str = typer.Option("1,8"),
    mask_rate: float = typer.Option(0.5),
    repeats: int = typer.Option(3, min=1),
    seed: int = typer.Option(0, min=0),
    device: str = typer.Option("auto", help="auto | cuda | cuda:N (GPU N) | cpu"),
    mlm_ar: bool = typer.Option(True, help="Include the autoregressive-MLM baseline (quadratic)."),
    mlm_ar_max_tokens: int = typer.Option(512, help="Run mlm-ar only where batch x length is at most this."),
    concat: bool = typer.Option(
        True,
        help="Include the concat decoder beside the engine; --no-concat holds one "
        "copy of the AR in memory instead of two (large shapes).",
    ),
    quantize: str = typer.Option(
        "",
        help="Also export the weights quantized (int8, int4 or int8,int4) into --out/bundle-int8 and "
        "--out/bundle-int4 and bench each one's engine on the CPU (onnx-cpu-int8, onnx-cpu-int4).",
    ),
    int8: bool = typer.Option(False, "--int8", help="The same as --quantize int8."),
    speculate: int = typer.Option(
        0, help="Also bench each engine with --speculate K (rows named -spec); drafts pay only on real --text."
    ),
    text: Path | None = typer.Option(
        None, help="Inputs cut from this text (UTF-8, or a .npy of token ids) instead of random ids."
    ),
) -> None:
    """Infilling throughput against input length: ONNX runtime, PyTorch reference, MLM decoded autoregressively."""
    from maria_onnx.tools.bench import bench as run_bench

    if model is not None and checkpoint is None and shapes is not None:
        raise ValueError("--model with --shapes: the PyTorch systems would run other weights; give --checkpoint")

    run_bench(
        out,
        checkpoint=checkpoint,
        bundle=model,
        shapes=shapes,
        dtype=dtype,
        lengths=int_list(lengths, "--lengths"),
        batch_sizes=int_list(batch_sizes, "--batch-sizes"),
        mask_rate=mask_rate,
        repeats=repeats,
        seed=seed,
        device=device,
        mlm_ar=mlm_ar,
        mlm_ar_max_tokens=mlm_ar_max_tokens,
        concat=concat,
        quantize=quantizations(quantize, int8),
        speculate=speculate,
        text=text,
    )


@app.command("bench-serve")
@one_line_errors
def bench_serve(
    out: Path = typer.Option(Path("bench-results"), help="Folder for bench-serve.json."),
    model: Path | None = typer.Option(None, "--model", "-m", help="A bundle; default: the shipped model."),
    clients: int = typer.Option(32, min=1, help="Concurrent clients."),
    requests: int = typer.Option(256, min=1, help="Requests in all, one text each."),
    max_batch_sizes: str = typer.Option("1,16", help="Server --max-batch-size settings to compare (1: none)."),
    delay_ms: float = typer.Option(5.0, min=0, help="Server --max-batch-delay-ms."),
    stagger_ms: float = typer.Option(10.0, min=0, help="Each client starts this long after the last."),
    repeats: int = typer.Option(1, min=1, help="Runs per setting, interleaved."),
    device: str = typer.Option("cpu", help="auto | cuda | cuda:N (GPU N) | cpu"),
    decoders: str = typer.Option(
        "auto",
        help="Server --decoder settings to compare: engine (continuous batching), concat (batch at a time), auto.",
    ),
    texts_file: Path | None = typer.Option(
        None, "--texts", help="The texts the clients send, one per line (default: four short texts)."
    ),
    protocols: str = typer.Option(
        "http",
        help="What the clients speak, compared: http (POST /v1/infill), grpc "
        "(ModelInfer through tritonclient.grpc), grpc-stream (a "
        "ModelStreamInfer stream per client).",
    ),
) -> None:
    """Load on a real `maria serve`: throughput, p50/p99 latency and batch sizes, with and without batching."""
    from maria_onnx.runtime.device import check_device
    from maria_onnx.tools.bench_serve import bench_serve as run_bench_serve

    check_device(device)
    chosen = [d.strip() for d in decoders.split(",") if d.strip()]
    if not chosen or set(chosen) - {"auto", "engine", "concat"}:
        raise ValueError(f"--decoders takes a comma-separated list of auto, engine, concat; got '{decoders}'")
    from maria_onnx.tools.bench_serve import TEXTS

    texts = TEXTS
    if texts_file is not None:
        from maria_onnx.runtime.readers import decode_utf8, read_lines, texts_of

        try:
            data = texts_file.read_bytes()
        except OSError as error:
            raise ValueError(
                f"--texts {texts_file}: cannot be read ({error.strerror}); give a UTF-8 text file"
            ) from None
        texts = texts_of(read_lines(decode_utf8(data, f"--texts {texts_file}"), str(texts_file), jsonl=False))
        if not texts:
            raise ValueError(f"--texts {texts_file} holds no text; give one text with [MASK] markers per line")
    run_bench_serve(
        out,
        model=model,
        clients=clients,
        requests=requests,
        max_batch_sizes=int_list(max_batch_sizes, "--max-batch-sizes"),
        delay_ms=delay_ms,
        stagger_ms=stagger_ms,
        repeats=repeats,
        device=device,
        decoders=chosen,
        texts=texts,
        protocols=[p.strip() for p in protocols.split(",") if p.strip()],
    )


@app.command("eval")
@one_line_errors
def eval_command(
    text_file: Path = typer.Argument(
        ..., help="UTF-8 text to mask: a file (one document per line) or a folder (one document per file)."
    ),
    model: Path | None = typer.Option(None, "--model", "-m", help="A bundle; default: the shipped model."),
    backbones_from: Path | None = typer.Option(
        None, help="Checkpoint whose backbones give the baselines in PyTorch (instead of the bundle's heads)."
    ),
    mask_rate: float = typer.Option(0.5),
    span: bool = typer.Option(False, help="Mask spans (mean length 4) instead of single tokens."),
    seq_len: int = typer.Option(128, help="Tokens per evaluation window."),
    windows: int = typer.Option(64, min=1, help="At most this many windows."),
    seed: int = typer.Option(0, min=0),
    batch_size: int = typer.Option(16, min=1),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the table as JSON here."),
    device: str = typer.Option("auto", help="auto | cuda | cuda:N (GPU N) | cpu"),
    threads: int | None = threads_option(),
) -> None:
    """Masked-token perplexity and greedy top-1 accuracy of MARIA and its baselines (AR alone, MLM alone, product of
    experts), all from the bundle's own heads on ONNX Runtime; with --backbones-from, or a bundle exported with
    --no-baseline-heads, the baselines run in PyTorch (the train extra) on the backbone folders."""
    from maria_onnx.console.evaluation import evaluate_text

    options = dict(mask_rate=mask_rate, span=span, seq_len=seq_len, windows=windows, seed=seed)
    evaluate_text(
        text_file, model, as_json, device, threads, batch_size=batch_size, backbones_from=backbones_from, **options
    )


@app.command()
@one_line_errors
def serve(
    model: Path | None = typer.Option(None, "--model", "-m", help="A bundle; default: the shipped model."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port, printed at start)."),
    grpc_port: int | None = typer.Option(
        None,
        min=0,
        max=65535,
        help="Also serve the Open Inference Protocol "
        "over gRPC on this port (Triton's is 8001; 0: any free port); needs "
        "the grpc extra.",
    ),
    device: str = typer.Option("auto", help="auto | cuda | cuda:N (GPU N) | cpu"),
    threads: int | None = threads_option(),
    model_name: str = typer.Option("maria", help="The model's name in the protocol's paths."),
    max_batch_size: int = typer.Option(
        8,
        min=1,
        help="Texts (x samples) decoded at once: the engine's slots, or the size of a batch with --decoder concat.",
    ),
    max_batch_delay_ms: float = typer.Option(
        5.0,
        min=0,
        help="With --decoder concat, how long a batch waits for more requests (the engine takes them between steps).",
    ),
    max_queue: int = typer.Option(256, min=1, help="Requests waiting for the model; beyond it, 503."),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="Largest request body; beyond it, 413."),
    max_texts: int = typer.Option(64, min=1, help="Texts x samples per request; beyond it, 413."),
    timeout: float = typer.Option(60.0, min=0.001, help="Seconds a request may take; beyond it, 504."),
    api_key: str | None = typer.Option(
        None, envvar="MARIA_API_KEY", help="Require 'Authorization: Bearer KEY' (health routes stay open)."
    ),
    grace: float = typer.Option(30.0, min=0, help="Seconds in-flight requests get to finish on SIGTERM."),
    head_timeout: float = typer.Option(
        10.0, min=0.001, help="Seconds a connection may take to send a whole request head; beyond it, 408."
    ),
    body_timeout: float = typer.Option(30.0, min=0.001, help="Seconds a request's body may take; beyond it, 408."),
    keep_alive: float = typer.Option(5.0, min=0.001, help="Seconds an idle connection (HTTP or gRPC) stays open."),
    max_connections: int = typer.Option(
        512, min=1, help="Open HTTP connections (and gRPC streams a connection); beyond it, 503 as they open."
    ),
    decoder: str = decoder_option(),
    speculate: int = speculate_option(),
) -> None:
    """Serve a bundle over HTTP: the Open Inference Protocol (KServe v2 / Triton) with Triton's generate extension,
    /v1/infill and its SSE stream; with --grpc-port, the Open Inference Protocol over gRPC too."""
    from maria_onnx.console.serving import start_server

    settings = dict(  # serve/core.py's ServeSettings: the server's name, batching, bounds and deadlines
        model_name=model_name,
        max_batch_size=max_batch_size,
        max_batch_delay_ms=max_batch_delay_ms,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_texts=max_texts,
        timeout_s=timeout,
        api_key=api_key,
        head_timeout_s=head_timeout,
        body_timeout_s=body_timeout,
        keep_alive_s=keep_alive,
        max_connections=max_connections,
    )
    start_server(model, settings, host, port, grpc_port, device, threads, grace, decoder, speculate)


@app.command("triton-repo")
@one_line_errors
def triton_repo(
    bundle: Path | None = typer.Argument(None, help="A bundle folder; default: the shipped model."),
    out: Path = typer.Option(..., help="The model repository folder to write."),
    model_name: str = typer.Option("maria", help="The model's name in the repository and the protocol's paths."),
    kind: str = typer.Option("gpu", help="gpu | cpu: where Triton runs the model's instances."),
    instances: int = typer.Option(1, min=1, help="Instances per GPU (or on the CPU)."),
    max_batch_size: int = typer.Option(8, min=1, help="Texts per dynamic batch."),
    max_queue_delay_us: int = typer.Option(5000, min=0, help="How long Triton waits to grow a batch."),
    max_queue: int = typer.Option(256, min=1, help="Requests waiting; beyond it Triton rejects."),
    timeout_us: int = typer.Option(60_000_000, min=1, help="How long a request may wait in the queue."),
    max_texts: int = typer.Option(
        64, min=1, help="Texts x samples (x span candidates) per request; beyond it, refused."
    ),
    threads: int | None = typer.Option(
        None,
        min=1,
        help="CPU threads per ONNX Runtime session of each instance "
        "(default: several CPU instances share the CPUs equally; else as "
        "`maria serve`).",
    ),
    link: bool = typer.Option(False, "--link", help="Link the bundle instead of copying it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a repository this command wrote."),
    speculate: int = speculate_option(),
) -> None:
    """Write a Triton Inference Server model repository (Python backend) serving a bundle."""
    from maria_onnx.runtime.default_model import resolve_bundle
    from maria_onnx.serve.triton import write_repository

    folder = write_repository(
        resolve_bundle(bundle),
        out,
        name=model_name,
        kind=kind,
        instances=instances,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        max_queue=max_queue,
        timeout_us=timeout_us,
        link=link,
        overwrite=overwrite,
        max_texts=max_texts,
        threads=threads,
        speculate=speculate,
    )
    typer.echo(f"wrote {folder}; run: tritonserver --model-repository {out}")


def main() -> None:
    app(prog_name="maria")


if __name__ == "__main__":
    main()  # typer exits with the command's status
