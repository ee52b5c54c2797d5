"""`maria generate` over HTTP (POST /v1/generate) on a real `maria serve`: the samples of the CLI's annealing
for the same settings, beside other requests in the decode worker, with one-line errors and the deadline's rows
leaving the engine. Each test stops the server it started, by its process id."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from maria_onnx.runtime.anneal import AnnealRequest, Schedule, anneal, encode_ends
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.infiller import Infiller

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn, prometheus-client) is not installed")

from tests.test_serve import call, server  # noqa: E402

SETTINGS = {
    "length": 6,
    "prefix": "The",
    "suffix": " module.",
    "steps": 3,
    "num_samples": 3,
    "seed": 7,
    "temperature": 0.9,
}


def expected(bundle, decoder: str, batch_size: int) -> list[dict]:
    """The samples `maria generate` makes in process for SETTINGS."""
    infiller = Infiller(bundle, device="cpu", decoder=decoder)
    prefix, suffix = encode_ends(infiller, SETTINGS["prefix"], SETTINGS["suffix"])
    schedule, sampling = Schedule(steps=SETTINGS["steps"]), Sampling(temperature=0.9, seed=7)
    request = AnnealRequest(prefix, suffix, SETTINGS["length"], SETTINGS["num_samples"], schedule, sampling)
    results = anneal(infiller, request, batch_size=batch_size)
    return [r.to_dict() for r in results]


def same_samples(got: list[dict], want: list[dict]) -> None:
    assert [(g["text"], g["ids"], g["accepted"]) for g in got] == [(w["text"], w["ids"], w["accepted"]) for w in want]
    assert np.allclose([g["energies"] for g in got], [w["energies"] for w in want], rtol=1e-4)


def test_generate_gives_the_cli_samples_beside_other_requests():
    """Through the decode engine, with infill requests sent at the same time (their rows share its steps): the
    samples of in-process annealing."""
    want = expected(DEFAULT_MODEL, "auto", 8)
    with server() as (url, _):
        with ThreadPoolExecutor(4) as pool:
            fills = [
                pool.submit(
                    call, url, "/v1/infill", {"text": ["Use the [MASK:30] module."], "seed": i, "temperature": 1.0}
                )
                for i in range(3)
            ]
            status, _, body = call(url, "/v1/generate", SETTINGS)
            assert status == 200, body
            assert all(f.result()[0] == 200 for f in fills)
        got = json.loads(body)["results"]
        same_samples(got, want)
        assert all(g["text"].startswith("The") and g["text"].endswith(" module.") for g in got)
        assert all(len(g["energies"]) == SETTINGS["steps"] + 1 for g in got)
        status, _, body = call(url, "/v2/models/maria/stats")
        assert json.loads(body)["model_stats"][0]["inference_count"] == 3 + SETTINGS["num_samples"]
        _, _, metrics = call(url, "/metrics")
        assert b'maria_requests_total{route="/v1/generate",status="200"} 1.0' in metrics
        filled = float(re.search(rb"\nmaria_tokens_filled_total (\S+)", metrics)[1])
        assert filled == 3 * 30 + SETTINGS["length"] * SETTINGS["num_samples"]  # fills, and generated tokens


def test_generate_on_the_concat_decoder_runs_alone_with_the_same_samples(bundles):
    want = expected(bundles["olmo"], "concat", 2)
    with server("--model", str(bundles["olmo"]), "--decoder", "concat", "--max-batch-size", "2") as (url, _):
        status, _, body = call(url, "/v1/generate", SETTINGS)
        assert status == 200, body
        same_samples(json.loads(body)["results"], want)


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ({"prefix": "The"}, 400, 'the request has no "length" field'),
        ([6], 400, 'send a JSON object {"length": N, ...}, got list'),
        ({"length": 6, "temperature_x": 1}, 400, "unknown parameters ['temperature_x']; parameters are length, "),
        ({"length": "6"}, 400, "parameter 'length' must be a 64-bit integer, got '6'"),
        ({"length": 6, "prefix": 3}, 400, "parameter 'prefix' must be a string, got 3"),
        ({"length": 0}, 422, "length and num_samples must be at least 1, got 0, 1"),
        ({"length": 3000}, 422, "prefix, 3000 tokens and suffix make 3000 tokens, over the bundle's maximum"),
        ({"length": 4, "prefix": "a [MASK] b"}, 422, "prefix and suffix are plain text"),
        ({"length": 4, "suffix": "\ud800"}, 422, "suffix: the text is not valid Unicode"),
        ({"length": 4, "fraction_start": 2}, 422, "fraction_start is a share of the generated tokens, in (0, 1]"),
        ({"length": 4, "steps": -1}, 422, "steps must be >= 0, got -1"),
        ({"length": 4, "top_p": 0}, 422, "top-p must be in (0, 1]"),
        ({"length": 4, "num_samples": 65}, 413, "65 samples are over the limit of 64 per request; ask for at most 64"),
    ],
)
def test_a_bad_generation_gets_one_line(generating, payload, status, message):
    got, _, body = call(generating, "/v1/generate", payload)
    assert got == status and json.loads(body)["error"].startswith(message), body


@pytest.fixture(scope="module")
def generating():
    with server() as (url, _):
        yield url


@pytest.mark.parametrize("decoder", ["engine", "concat"])
def test_a_generation_past_its_deadline_gets_504_and_leaves_the_worker(bundles, decoder):
    with server("--model", str(bundles["olmo"]), "--decoder", decoder, "--timeout", "2") as (url, _):
        status, _, body = call(url, "/v1/generate", {"length": 64, "steps": 100000, "num_samples": 8})
        assert status == 504 and json.loads(body)["error"] == "no answer within the deadline of 2 s"
        status, _, body = call(url, "/v1/infill", {"text": ["Use the [MASK] module."]}, timeout=30)
        assert status == 200, body  # answered: the generation left the decode worker


def test_a_bundle_without_the_ar_head_answers_501_and_still_fills(checkpoints, tmp_path):
    from maria_onnx.export.bundle import export_bundle

    export_bundle(checkpoints["olmo"], tmp_path / "lean", baseline_heads=False)
    with server("--model", str(tmp_path / "lean")) as (url, _):
        status, _, body = call(url, "/v1/generate", {"length": 4})
        assert status == 501 and json.loads(body)["error"].startswith(
            "generation needs the AR's whole-text score, and the served bundle has no ar_lm_head.onnx"
        )
        assert call(url, "/v1/infill", {"text": ["a [MASK] b"]})[0] == 200
