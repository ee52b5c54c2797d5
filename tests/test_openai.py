"""OpenAI's completions API on `maria serve`, driven by the real `openai` SDK: insertion with `suffix`,
continuation, markers, n, streams, logprobs, stop, errors and the model list. Each server is on 127.0.0.1 (an
ephemeral port) and stopped by its process id; every SDK call has a timeout and no retries."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn, prometheus-client) is not installed")
openai = pytest.importorskip("openai", reason="the openai SDK (the dev extra) is not installed")

from maria_onnx.runtime.default_model import DEFAULT_MODEL  # noqa: E402
from maria_onnx.runtime.infiller import Infiller  # noqa: E402
from maria_onnx.runtime.likelihood import insertion_scores  # noqa: E402
from maria_onnx.serve.openai import Streamed  # noqa: E402
from tests.fuzz import random_json  # noqa: E402
from tests.test_serve import call, server  # noqa: E402

CODE, AFTER = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))"
PROMPT = "The exception is raised when the"


@pytest.fixture(scope="module")
def running():
    with server("--api-key", "sesame") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=running + "/v1", api_key="sesame", max_retries=0, timeout=60)


def infill(url: str, text: str, **settings) -> dict:
    """The /v1/infill result of one text, as the same engine fills it."""
    status, _, body = call(url, "/v1/infill", {"text": [text], **settings}, {"Authorization": "Bearer sesame"})
    assert status == 200, body
    return json.loads(body)["results"][0]


def test_insertion_with_suffix_is_the_candidate_of_best_insertion_score(running, client):
    got = client.completions.create(model="maria", prompt=CODE, suffix=AFTER, max_tokens=8, temperature=0, logprobs=0)
    every = infill(running, CODE + "[MASK:1-8]" + AFTER, temperature=0)  # each length's greedy fill
    start = every["masked_positions"][0]
    ids = [np.array(c["ids"]) for c in every["candidates"]]
    masked = [
        np.isin(np.arange(len(x)), range(start, start + c["lengths"][0])) for x, c in zip(ids, every["candidates"])
    ]
    reference = Infiller(DEFAULT_MODEL, device="cpu")
    scores = insertion_scores(reference.backend, ids, masked, reference.special)
    best = every["candidates"][int(np.argmax(scores))]
    length = best["lengths"][0]
    inserted = reference.tokenizer.decode(best["ids"][start : start + length])
    (choice,) = got.choices
    assert choice.text == inserted[1:] if inserted.startswith(" ") else inserted  # the prompt's space is not repeated
    assert choice.finish_reason == ("length" if length == 8 else "stop")
    assert "".join(choice.logprobs.tokens) == inserted and len(choice.logprobs.token_logprobs) == length
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert choice.logprobs.text_offset[0] == len(CODE) - inserted.startswith(" ")
    assert got.usage.completion_tokens == length
    assert got.usage.prompt_tokens == len(best["ids"]) - length
    assert got.usage.total_tokens == got.usage.prompt_tokens + length
    assert got.object == "text_completion" and got.model == "maria" and got.id.startswith("cmpl-")


def test_without_suffix_the_prompt_is_continued_for_max_tokens(running, client):
    got = client.completions.create(model="maria", prompt=PROMPT, max_tokens=5, temperature=0)
    want = infill(running, PROMPT + "[MASK:5]", temperature=0)
    assert got.choices[0].text == "".join(want["fills"])
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 5
    echoed = client.completions.create(model="maria", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + got.choices[0].text


def test_markers_in_the_prompt_come_back_filled_before_the_completion(running, client):
    prompt = "The [MASK] statement is used to"
    got = client.completions.create(model="maria", prompt=prompt, max_tokens=3, temperature=0)
    want = infill(running, prompt + "[MASK:3]", temperature=0)
    assert got.choices[0].text == want["text"] and "[MASK" not in got.choices[0].text
    assert got.usage.completion_tokens == 4


def test_n_samples_with_a_seed_repeat_and_do_not_depend_on_their_batch(client):
    ask = dict(model="maria", max_tokens=4, temperature=1.0, seed=11, n=3)
    alone = [c.text for c in client.completions.create(prompt=PROMPT, **ask).choices]
    assert len(set(alone)) > 1  # three samples, not one repeated
    listed = client.completions.create(prompt=[PROMPT, CODE], **ask).choices
    assert [c.index for c in listed] == list(range(6)) and [c.text for c in listed[:3]] == alone
    with ThreadPoolExecutor(4) as pool:  # batched with other requests by the server, or not
        runs = list(pool.map(lambda p: client.completions.create(prompt=p, **ask), [PROMPT, CODE, PROMPT, CODE]))
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[2].choices] == alone


def test_the_stream_sends_each_token_then_the_finish_and_usage(client):
    ask = dict(model="maria", prompt=PROMPT, max_tokens=6, temperature=0.8, seed=5, logprobs=0)
    whole = client.completions.create(**ask).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert len(pieces) >= 6 and "".join(p.text for p in pieces) == whole.text
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == "length"
    assert sum((p.logprobs.token_logprobs for p in pieces), []) == pytest.approx(whole.logprobs.token_logprobs)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_a_streamed_insertion_comes_whole_at_its_end(client):
    ask = dict(model="maria", prompt=CODE, suffix=AFTER, max_tokens=6, temperature=0)
    whole = client.completions.create(**ask).choices[0]
    pieces = [c.choices[0] for c in client.completions.create(stream=True, **ask)]
    assert [(p.text, p.finish_reason) for p in pieces] == [(whole.text, whole.finish_reason)]


def test_a_stop_sequence_ends_the_text_before_it(client):
    ask = dict(model="maria", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    free = client.completions.create(**ask).choices[0]
    stop = free.logprobs.tokens[3]
    cut = free.text[: free.text.find(stop)]
    got = client.completions.create(stop=[stop, "never in it"], **ask).choices[0]
    assert (got.text, got.finish_reason) == (cut, "stop")
    streamed = [c.choices[0] for c in client.completions.create(stop=stop, stream=True, **ask)]
    assert "".join(p.text for p in streamed) == cut and streamed[-1].finish_reason == "stop"


def test_a_stream_holds_back_what_may_begin_a_stop_sequence():
    stream = Streamed(prompt="x ", stops=("\n\n",))
    assert stream.add(" a", -1.0)[:2] == ("a", [(" a", -1.0, 1)])  # the prompt's space is not repeated
    assert stream.add("\n", -2.0) == ("", [], None)  # may begin "\n\n": held
    assert stream.add("\n", -3.0) == ("", [], "stop")  # the stop sequence's tokens are not sent
    assert stream.add("b", -4.0) == ("", [], None)


def test_the_models_route_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("maria", "model", "maria-onnx")
    assert client.models.retrieve("maria").id == "maria"
    with pytest.raises(openai.NotFoundError, match="no model 'other' here; this server serves 'maria'"):
        client.models.retrieve("other")


@pytest.mark.parametrize(
    "ask, error, line",
    [
        (dict(model="gpt-4"), openai.NotFoundError, "no model 'gpt-4' here; this server serves 'maria'"),
        (dict(temperature=3), openai.BadRequestError, "'temperature' must be from 0 to 2, got 3"),
        (dict(best_of=3), openai.BadRequestError, "'best_of' is not supported here; leave it out"),
        (dict(prompt=[1, 2]), openai.BadRequestError, "'prompt' must be a string or a non-empty list of strings"),
        (dict(suffix="x", max_tokens=64, n=2), openai.BadRequestError, "= 128 decode rows, over this server's limit"),
        (dict(suffix="[MASK]"), openai.BadRequestError, "'suffix' holds a [MASK] marker; markers go in 'prompt'"),
        (dict(prompt="[MASK:x]"), openai.UnprocessableEntityError, "'[MASK:x]' is not a marker"),
        (dict(max_tokens=0), openai.BadRequestError, "'max_tokens' must be from 1 to"),
    ],
)
def test_errors_carry_the_servers_line_in_the_sdks_exception(client, ask, error, line):
    with pytest.raises(error) as raised:
        client.completions.create(**{"model": "maria", "prompt": PROMPT, **ask})
    assert line in str(raised.value)
    assert raised.value.body["message"] in str(raised.value) and "type" in raised.value.body


def test_unknown_fields_and_a_wrong_key_are_refused(running, client):
    with pytest.raises(openai.BadRequestError, match="unknown fields \\['tools'\\]"):
        client.completions.create(model="maria", prompt=PROMPT, extra_body={"tools": []})
    stranger = openai.OpenAI(base_url=running + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="missing or wrong bearer token"):
        stranger.completions.create(model="maria", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError, match="no route /v1/chat/completions"):
        client.chat.completions.create(model="maria", messages=[{"role": "user", "content": "hi"}])


def test_fuzzed_completions_get_an_answer_or_one_line_never_a_5xx(running):
    """150 seeded random bodies of OpenAI's fields: each is answered, or refused with a 4xx and OpenAI's error
    object holding one line."""
    import random

    rng = random.Random(0)
    atoms = [None, True, False, 0, -1, 1, 2, 2.5, 1e300, 2**70, "", "maria", "a [MASK]", "[MASK:?]", "x", [], {}]
    fields = ["model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "echo"]
    fields += ["logprobs", "stream", "stream_options", "user", "best_of", "include_usage", "tools"]

    def rand():
        return random_json(rng, atoms, fields, deepest=1, leaves=0.6)

    for _ in range(150):
        body = {"model": "maria", "prompt": "Hello", "max_tokens": 2}
        body.update({rng.choice(fields): rand() for _ in range(rng.randint(1, 4))})
        status, _, answer = call(running, "/v1/completions", body, {"Authorization": "Bearer sesame"})
        assert 200 <= status < 500, (body, answer[:300])
        if status >= 400:
            error = json.loads(answer)["error"]
            assert error["message"] and "\n" not in error["message"], (body, error)


def test_the_readmes_sdk_example_runs_as_written(running, capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### OpenAI SDK") :]
    example = section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]
    example = example.replace("http://127.0.0.1:8000", running).replace('api_key="unused"', 'api_key="sesame"')
    exec(compile(example, "README.md", "exec"), {})
    printed = "None if the path is not None. length\nos.path\n"  # what the README says the shipped model prints
    assert capsys.readouterr().out == printed


def test_the_deadline_holds_on_openai_routes_too():
    with server("--timeout", "0.3") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError, match="no answer within the deadline of 0.3 s") as raised:
            client.completions.create(model="maria", prompt=PROMPT, max_tokens=1500)
        assert raised.value.status_code == 504 and raised.value.body["type"] == "server_error"
        chunks = client.completions.create(model="maria", prompt=PROMPT, max_tokens=1500, stream=True)
        with pytest.raises(openai.APIError, match="no answer within the deadline of 0.3 s"):
            list(chunks)
