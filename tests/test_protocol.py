"""Reading requests (Open Inference Protocol tensors, sampling settings): what a malformed one is told, without a
server."""

import json
import re
import struct

import pytest

from maria_onnx.runtime.readers import loads_json, nesting
from maria_onnx.serve.core import ClientError, sampling_of
from maria_onnx.serve.protocol import BadRequest, infer_response, parse_infer


def text_input(texts: list[str], shape=None) -> dict:
    return {"name": "text", "datatype": "BYTES", "shape": [len(texts)] if shape is None else shape, "data": texts}


def binary_request(inputs: list[tuple[dict, bytes]], trailing: bytes = b"") -> tuple[bytes, int]:
    """A body of a JSON header and the inputs' binary data; returns (body, header length)."""
    head = json.dumps({"inputs": [dict(spec, parameters={"binary_data_size": len(raw)}) for spec, raw in inputs]})
    head = head.encode()
    return head + b"".join(raw for _, raw in inputs) + trailing, len(head)


def bytes_tensor(texts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


def test_well_formed_requests_are_read():
    body = json.dumps(
        {
            "inputs": [
                text_input(["a [MASK]", "b [MASK]"], shape=[2, 1]),
                {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]},
            ]
        }
    ).encode()
    parsed = parse_infer(body, None)
    assert parsed.texts == ["a [MASK]", "b [MASK]"] and parsed.settings == {"seed": 3}
    nested = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": [["a [MASK]"], ["b [MASK]"]]}]}
    ).encode()
    assert parse_infer(nested, None).texts == ["a [MASK]", "b [MASK]"]
    body, length = binary_request(
        [
            ({"name": "text", "datatype": "BYTES", "shape": [1]}, bytes_tensor(["c [MASK]"])),
            ({"name": "temperature", "datatype": "FP32", "shape": [1]}, struct.pack("<f", 0.5)),
        ]
    )
    parsed = parse_infer(body, length)
    assert parsed.texts == ["c [MASK]"] and parsed.settings == {"temperature": 0.5}


@pytest.mark.parametrize(
    "spec, message",
    [
        (text_input(["a [MASK]"], shape=[3]), "input 'text' has shape [3] (3 elements) but holds 1; make the shape"),
        (text_input(["a [MASK]", "b [MASK]"], shape=[1, 1]), "has shape [1, 1] (1 elements) but holds 2"),
        ({"name": "text", "datatype": "BYTES", "data": ["a [MASK]"]}, "input 'text' needs a 'shape'"),
        (text_input(["a [MASK]"], shape=[-1]), "a list of non-negative integers"),
        (text_input(["a [MASK]"], shape=["1"]), "a list of non-negative integers"),
    ],
)
def test_a_shape_that_does_not_match_the_data_is_refused(spec, message):
    with pytest.raises(BadRequest) as refused:
        parse_infer(json.dumps({"inputs": [spec]}).encode(), None)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_malformed_binary_data_is_refused():
    text = ({"name": "text", "datatype": "BYTES", "shape": [1]}, bytes_tensor(["a [MASK]"]))
    body, length = binary_request([text, ({"name": "temperature", "datatype": "FP32", "shape": [1]}, b"abc")])
    with pytest.raises(
        BadRequest,
        match=r"input 'temperature' has 3 bytes of binary data, not a whole number of "
        r"FP32 values \(4 bytes each\)",
    ):
        parse_infer(body, length)
    body, length = binary_request([text], trailing=b"extra")
    with pytest.raises(BadRequest, match="the body holds 5 bytes after the inputs' binary data"):
        parse_infer(body, length)
    body, length = binary_request([({"name": "text", "datatype": "BYTES", "shape": [2]}, bytes_tensor(["a [MASK]"]))])
    with pytest.raises(BadRequest, match=r"shape \[2\] \(2 elements\) but holds 1"):
        parse_infer(body, length)


@pytest.mark.parametrize(
    "name, kind, value, fits",
    [
        ("top_k", "INT32", 3_000_000_000, False),
        ("top_k", "INT32", 2**31 - 1, True),
        ("seed", "INT64", 2**63, False),
        ("seed", "INT64", 2**63 - 1, True),
        ("temperature", "FP32", 1e39, False),
        ("temperature", "FP32", 3e38, True),
        ("top_k", "UINT8", -1, False),
    ],
)
def test_json_data_must_fit_its_datatype(name, kind, value, fits):
    body = json.dumps(
        {"inputs": [text_input(["a [MASK]"]), {"name": name, "datatype": kind, "shape": [1], "data": [value]}]}
    ).encode()
    if fits:
        assert parse_infer(body, None).settings == {name: value}
        return
    with pytest.raises(BadRequest) as refused:
        parse_infer(body, None)
    assert str(refused.value).startswith(f"input '{name}' is {kind} but holds {value!r}, outside {kind}'s range ")


@pytest.mark.parametrize(
    "name, value",
    [
        ("seed", float("nan")),
        ("seed", float("inf")),
        ("top_k", float("-inf")),
        ("num_samples", 2.5),
        ("seed", "1"),
        ("top_k", True),
        ("seed", 1e30),
        ("seed", 2**63),
        ("num_samples", -(2**63) - 1),
    ],
)
def test_a_setting_that_is_not_an_integer_is_refused(name, value):
    with pytest.raises(ClientError) as refused:
        sampling_of({name: value})
    assert refused.value.status == 400
    assert str(refused.value) == f"parameter '{name}' must be a 64-bit integer, got {value!r}"


LONG = "x" * 10_000


@pytest.mark.parametrize(
    "refuse, message",
    [
        (lambda: sampling_of({"top_p": LONG}), "parameter 'top_p' must be a number, got 'xxxx"),
        (lambda: sampling_of({LONG: 1}), "unknown parameters ['xxxx"),
        (lambda: sampling_of({"seed": list(range(5_000))}), "parameter 'seed' must be a 64-bit integer, got [0, 1, 2"),
        (
            lambda: parse_infer(
                json.dumps(
                    {"inputs": [{"name": LONG, "datatype": "BYTES", "shape": [1], "data": ["a [MASK]"]}]}
                ).encode(),
                None,
            ),
            "unknown input 'xxxx",
        ),
        (
            lambda: parse_infer(
                json.dumps({"inputs": [text_input(["a [MASK]"], shape=[1] + [1] * 5_000 + [2])]}).encode(), None
            ),
            "input 'text' has shape [1, 1, 1",
        ),
        (
            lambda: parse_infer(json.dumps({"inputs": [dict(text_input(["a [MASK]"]), datatype=LONG)]}).encode(), None),
            "input 'text' has datatype 'xxxx",
        ),
        (
            lambda: parse_infer(
                json.dumps({"inputs": [text_input(["a [MASK]"])], "outputs": [{"name": LONG}]}).encode(), None
            ),
            'no output "xxxx',
        ),
        (
            lambda: parse_infer(
                json.dumps({"inputs": [text_input(["a [MASK]"])], "parameters": {"binary_data_output": LONG}}).encode(),
                None,
            ),
            "parameter 'binary_data_output' of the request must be true or false, got \"xxxx",
        ),
    ],
)
def test_a_clients_long_value_is_quoted_cut_short(refuse, message):
    """An error quotes what the client sent, but a value of any size is cut to a few dozen characters with its
    length named: the answer (and the access log's line) stays one short line."""
    with pytest.raises((ClientError, BadRequest)) as refused:
        refuse()
    said = str(refused.value)
    assert said.startswith(message) and len(said) < 300 and "\n" not in said
    assert re.search(r"\.\.\. \([0-9,]+ characters\)", said)


def test_integral_numbers_are_integers():
    sampling, num_samples, rerank = sampling_of({"seed": 7.0, "top_k": 5, "num_samples": 2.0})
    assert (sampling.seed, sampling.top_k, num_samples, rerank) == (7, 5, 2, False)


def test_only_the_outputs_asked_for_come_back():
    from maria_onnx.runtime.results import Infilled

    def request(outputs):
        body = {"inputs": [text_input(["a [MASK]"])], **({"outputs": outputs} if outputs is not None else {})}
        return parse_infer(json.dumps(body).encode(), None)

    assert request(None).outputs == ("text", "result") and request([{"name": "result"}]).outputs == ("result",)
    with pytest.raises(BadRequest, match='^no output "logits"; this model\'s outputs are text, result$'):
        request([{"name": "logits"}])
    with pytest.raises(BadRequest, match="'outputs' must be a list of"):
        request({"name": "text"})
    filled = Infilled(
        input="a [MASK]", text="a b", ids=[1, 2], masked_positions=[1], fill_logprobs=[-0.5], fills=[" b"]
    )
    body, _ = infer_response("maria", request([{"name": "text"}]), [filled])
    assert json.loads(body)["outputs"] == [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["a b"]}]


def test_the_request_id_comes_back():
    from maria_onnx.runtime.results import Infilled

    filled = Infilled(
        input="a [MASK]", text="a b", ids=[1, 2], masked_positions=[1], fill_logprobs=[-0.5], fills=[" b"]
    )
    for body, echoed in [({"id": "r1"}, {"id": "r1"}), ({}, {})]:
        parsed = parse_infer(json.dumps({"inputs": [text_input(["a [MASK]"])], **body}).encode(), None)
        head = json.loads(infer_response("maria", parsed, [filled])[0])
        assert {key: head[key] for key in ("id",) if key in head} == echoed


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"parameters": 3}, "'parameters' of the request must be a JSON object, got int"),
        ({"id": 7}, "the request's 'id' must be a string, got int; send it as a JSON string"),
        ({"parameters": {"sequence_id": 7}}, "this model is not a sequence model; leave out sequence_id"),
        ({"parameters": {"timeout": -1}}, "parameter 'timeout' is in microseconds, a non-negative integer; got -1"),
        ({"outputs": [{"name": "text", "parameters": [1]}]}, "'parameters' of output 'text' must be a JSON object"),
        (
            {"parameters": {"binary_data_output": "no"}},  # a string would count as true: binary output
            "parameter 'binary_data_output' of the request must be true or false, got \"no\"",
        ),
        (
            {"outputs": [{"name": "text", "parameters": {"binary_data": 1}}]},
            "parameter 'binary_data' of output 'text' must be true or false, got 1",
        ),
    ],
)
def test_protocol_parameters_are_read_or_refused(extra, message):
    with pytest.raises(BadRequest, match=re.escape(message)):
        parse_infer(json.dumps({"inputs": [text_input(["a [MASK]"])], **extra}).encode(), None)


def test_tritons_own_parameters_are_not_sampling_settings():
    body = {
        "inputs": [text_input(["a [MASK]"])],
        "parameters": {"binary_data_output": True, "priority": 2, "timeout": 250_000, "seed": 4},
    }
    parsed = parse_infer(json.dumps(body).encode(), None)
    assert parsed.settings == {"seed": 4} and parsed.binary_outputs == {"text", "result"}
    assert parsed.timeout_s == 0.25


def test_nothing_given_twice_is_dropped():
    """A second copy of an input, of a setting or of a JSON key would silently replace the first: refused."""
    seed = {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]}
    for body, message in [
        ({"inputs": [text_input(["a [MASK]"]), text_input(["b [MASK]"])]}, "input 'text' is given twice"),
        ({"inputs": [text_input(["a [MASK]"]), seed, seed]}, "input 'seed' is given twice"),
        (
            {"inputs": [text_input(["a [MASK]"]), seed], "parameters": {"seed": 4}},
            "'seed' is given both as a request parameter and as an input; give it once",
        ),
    ]:
        with pytest.raises(BadRequest, match=re.escape(message)):
            parse_infer(json.dumps(body).encode(), None)
    raw = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a [MASK]"], "data": ["b"]}]}'
    with pytest.raises(BadRequest, match=re.escape("the request repeats the key 'data' in one object")):
        parse_infer(raw, None)


def test_json_nesting_is_counted_outside_strings_and_bounded_alike_on_every_python():
    """Brackets inside strings (escaped quotes included) do not count; past 128 levels a request is refused with
    the same line whether or not this Python's parser would follow it (3.13 follows 5,000 levels, 3.11 1,000)."""
    assert nesting('{"a": "[[[{{", "b": [1, [2, {"c": "]]\\"[[\\\\"}]]}') == 4
    assert nesting('"[["') == 0 and nesting("[[],[[]],[]]") == 3
    assert loads_json(("[" * 128 + "]" * 128).encode("utf-16")) == json.loads("[" * 128 + "]" * 128)
    for depth in (129, 900, 5000, 100_000):
        with pytest.raises(BadRequest, match=re.escape("the request nests arrays or objects more than 128 deep")):
            parse_infer(("[" * depth + "]" * depth).encode(), None)


@pytest.mark.parametrize(
    "texts, samples, message",
    [
        (1, 100, "1 text x 100 samples is over the limit of 64 per request; ask for at most 64 samples"),
        (
            9,
            8,
            "9 texts x 8 samples is over the limit of 64 per request; split the request (at most 8 texts of 8 "
            "samples each)",
        ),
        (
            2,
            40,
            "2 texts x 40 samples is over the limit of 64 per request; split the request (at most 1 text of 40 "
            "samples each)",
        ),
        (
            2,
            65,
            "2 texts x 65 samples is over the limit of 64 per request; ask for at most 64 samples of one text per "
            "request",
        ),
    ],
)
def test_a_request_over_the_row_limit_is_told_how_to_fit(texts, samples, message):
    from maria_onnx.runtime.requests import TooLarge, check_size

    check_size(64, 8, 8)
    with pytest.raises(TooLarge) as refused:
        check_size(64, texts, samples)
    assert str(refused.value) == message


def test_a_span_request_over_the_row_limit_is_told_how_to_fit():
    from maria_onnx.runtime.requests import FillRequest, Prepared, TooLarge, check_size

    def prepared(candidates):
        return Prepared("t", [((length,), None) for length in range(1, candidates + 1)])

    for texts, fix in [
        ([prepared(8)] * 3, "split the request"),
        ([prepared(8), prepared(40)], "narrow the span markers ([MASK:a-b]), fix some lengths"),
    ]:
        with pytest.raises(TooLarge, match=re.escape(fix)):
            check_size(16, len(texts), 1, FillRequest(texts))
    searched = Prepared("t", [], (range(1, 9), range(1, 9), range(1, 9)))  # a round holds one gap's lengths
    assert searched.rows == 8 and FillRequest([searched, prepared(1)], num_samples=2).size == 18
    with pytest.raises(TooLarge, match="needs 24 decode rows"):
        check_size(16, 3, 1, FillRequest([searched] * 3))


def test_a_gzip_body_of_several_members_is_read_whole_and_junk_after_the_data_is_refused():
    import gzip
    import zlib

    from maria_onnx.serve.encoding import EncodingError, decompress

    body = b'{"text": ["a [MASK]"]}'
    members = gzip.compress(body[:10]) + gzip.compress(body[10:])  # what `cat a.gz b.gz` gives; gunzip reads both
    assert decompress(members, "gzip", 1 << 20) == body
    with pytest.raises(EncodingError, match="over the limit of 20 bytes once decompressed"):
        decompress(members, "gzip", 20)  # the limit holds across members
    with pytest.raises(EncodingError, match="not valid gzip data") as junk:
        decompress(gzip.compress(body) + b"junk", "gzip", 1 << 20)
    assert junk.value.status == 400
    with pytest.raises(EncodingError, match="holds 4 bytes after its deflate data"):
        decompress(zlib.compress(body) + b"junk", "deflate", 1 << 20)
    with pytest.raises(EncodingError) as unknown:
        decompress(body, "x" * 60_000, 1 << 20)
    assert unknown.value.status == 415 and len(str(unknown.value)) < 200 and "(60,002 characters)" in str(unknown.value)
