"""OpenAI's completions API over the server core: what `POST /v1/completions` asks for, as the texts and settings
the core fills, and its answer, chunks and errors in OpenAI's shapes (serve/app.py routes it).

`suffix` is insertion: the text goes between prompt and suffix as one span marker, `[MASK:1-max_tokens]`, whose
length is chosen by the insertion score (runtime/likelihood.py); without a suffix the prompt is continued by
`[MASK:max_tokens]`.
`[MASK]` markers inside the prompt are filled too, and such a prompt comes back filled, before the completion.
"""

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from maria_onnx.runtime.requests import KIND_NAMES
from maria_onnx.runtime.results import Infilled
from maria_onnx.runtime.text import MARKER_LIKE, MAX_CANDIDATES, quoted

from .core import ClientError

OWNER = "maria-onnx"
MAX_STOPS = 4  # stop sequences, as OpenAI allows
MAX_LOGPROBS = 5  # OpenAI's bound on `logprobs`; the answer carries the chosen tokens' only
UNSUPPORTED = {  # fields OpenAI defines that change sampling in ways this server does not: their neutral values
    "best_of": (None, 1),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
}
FIELDS = (
    "model",
    "prompt",
    "suffix",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "echo",
    "logprobs",
    "stream",
    "stream_options",
    "user",
    *UNSUPPORTED,
)
ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(ClientError):
    """A client error that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param, self.code = param, code


def unknown_model(name: object, model: str) -> OpenAIError:
    message = f"no model {quoted(name)} here; this server serves '{model}'"
    return OpenAIError(404, message, "model", "model_not_found")


def error_body(error: ClientError) -> dict:
    """OpenAI's error object for a client error (the SDK puts `message` in its exception's text)."""
    kind = ERROR_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    return {
        "error": {
            "message": str(error),
            "type": kind,
            "param": getattr(error, "param", None),
            "code": getattr(error, "code", None),
        }
    }


@dataclass(frozen=True)
class Completion:
    """A completions request, checked: one text per prompt for the core, and how to answer."""

    prompts: list
    suffix: str | None = None
    max_tokens: int = 16
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    stop: tuple = ()
    stream: bool = False
    include_usage: bool = False
    settings: dict = field(default_factory=dict)  # temperature, top_p, seed, num_samples: the core's settings
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def texts(self) -> list[str]:
        """Each prompt with the completion's marker: a span between it and the suffix, or fixed after it."""
        marker = f"[MASK:1-{self.max_tokens}]" if self.suffix is not None else f"[MASK:{self.max_tokens}]"
        return [prompt + marker + (self.suffix or "") for prompt in self.prompts]

    @property
    def span_score(self) -> str:
        """How the insertion's length is chosen: by the text around it and its mean token log-probability
        (measured better than the whole text's likelihood for spans of 1 to 16 tokens: MODEL.md)."""
        return "insertion" if self.suffix is not None else "text"

    def marked(self, index: int) -> bool:
        """Whether prompt `index` has markers of its own (it comes back filled)."""
        return MARKER_LIKE.search(self.prompts[index]) is not None

    @property
    def streams_tokens(self) -> bool:
        """Whether each fill token can be sent as it is chosen: a plain continuation (a span's length, and a
        filled prompt's text, are known only at the end)."""
        return self.suffix is None and not any(self.marked(i) for i in range(len(self.prompts)))


def _typed(payload: dict, name: str, kinds: tuple, default: object) -> object:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        wanted = " or ".join(KIND_NAMES.get(kind, kind.__name__) for kind in kinds)
        raise OpenAIError(400, f"'{name}' must be {wanted}, got {quoted(value)}", name)
    return value


def _bounded(payload: dict, name: str, kinds: tuple, default: float, low: float, high: float) -> float:
    value = _typed(payload, name, kinds, default)
    assert isinstance(value, int | float)
    if not low <= value <= high:
        raise OpenAIError(400, f"'{name}' must be from {low:g} to {high:g}, got {quoted(value)}", name)
    return value


def read_completion(payload: object, model: str, max_rows: int, max_length: int) -> Completion:
    """A completions request's JSON body, checked; OpenAIError (400, 404) naming the field at fault.
    max_rows: decode rows a request may take (--max-texts); max_length: the bundle's tokens."""
    if not isinstance(payload, dict):
        raise OpenAIError(400, f'send a JSON object {{"model": ..., "prompt": ...}}, got {type(payload).__name__}')
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise OpenAIError(400, f"unknown fields {quoted(unknown)}; fields are {', '.join(FIELDS)}", unknown[0])
    for name, neutral in UNSUPPORTED.items():
        if payload.get(name) not in neutral:
            raise OpenAIError(400, f"'{name}' is not supported here; leave it out", name)
    if payload.get("model") != model:
        raise unknown_model(payload.get("model"), model)
    if "prompt" not in payload:
        raise OpenAIError(400, "the request has no 'prompt'; send a string or a list of strings", "prompt")
    prompt = payload["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise OpenAIError(
            400,
            f"'prompt' must be a string or a non-empty list of strings (not token ids), got {quoted(prompt)}",
            "prompt",
        )
    suffix = _typed(payload, "suffix", (str,), None)
    if isinstance(suffix, str) and MARKER_LIKE.search(suffix):
        raise OpenAIError(400, "'suffix' holds a [MASK] marker; markers go in 'prompt'", "suffix")
    n = int(_bounded(payload, "n", (int,), 1, 1, max_rows))
    max_tokens = int(_bounded(payload, "max_tokens", (int,), 16, 1, max_length))
    if suffix is not None:
        if max_tokens > MAX_CANDIDATES:
            raise OpenAIError(
                400,
                f"with 'suffix', max_tokens is the longest insertion tried, at most {MAX_CANDIDATES}; got {max_tokens}",
                "max_tokens",
            )
        rows = len(prompts) * n * max_tokens
        if rows > max_rows:
            raise OpenAIError(
                400,
                f"with 'suffix', every length up to max_tokens is tried: {len(prompts)} prompt(s) x n {n} x "
                f"max_tokens {max_tokens} = {rows} decode rows, over this server's limit of {max_rows}; "
                "lower max_tokens or n",
                "max_tokens",
            )
    stop = _typed(payload, "stop", (str, list), [])
    stops: list = [stop] if isinstance(stop, str) else stop  # type: ignore[assignment]
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError(400, f"'stop' must be a string or up to {MAX_STOPS} non-empty strings", "stop")
    logprobs = _typed(payload, "logprobs", (int,), None)
    if logprobs is not None:
        logprobs = int(_bounded(payload, "logprobs", (int,), 0, 0, MAX_LOGPROBS))
    options = _typed(payload, "stream_options", (dict,), {})
    assert isinstance(options, dict)
    if set(options) - {"include_usage"}:
        raise OpenAIError(400, "'stream_options' takes only include_usage", "stream_options")
    _typed(payload, "user", (str,), None)
    seed = _typed(payload, "seed", (int,), None)
    settings = {
        "temperature": _bounded(payload, "temperature", (int, float), 1.0, 0, 2),
        "top_p": _bounded(payload, "top_p", (int, float), 1.0, 0, 1),
        "seed": secrets.randbelow(2**63) if seed is None else seed,  # none given: a fresh draw, as OpenAI's
        "num_samples": n,
    }
    if settings["top_p"] == 0:
        raise OpenAIError(400, "'top_p' must be over 0 (1 keeps every token)", "top_p")
    return Completion(
        prompts,
        suffix,  # type: ignore[arg-type]
        max_tokens,
        n,
        bool(_typed(payload, "echo", (bool,), False)),
        logprobs,
        tuple(stops),
        bool(_typed(payload, "stream", (bool,), False)),
        bool(_typed(options, "include_usage", (bool,), False)),
        settings,
    )


@dataclass
class Choice:
    """One choice's text: `lead` (the prompt, or a marked prompt filled) then the completion's tokens."""

    lead: str
    pieces: list  # the completion's tokens, as text
    logprobs: list
    drop_space: bool  # the prompt's last space, given to the first token (runtime/text.py), is not repeated
    finish_reason: str
    marked: bool  # the prompt had markers: the lead is shown filled

    @property
    def completion(self) -> str:
        return "".join(self.pieces)[1 if self.drop_space else 0 :]


def choice_of(completion: Completion, index: int, result: Infilled, tokenizer: Any) -> Choice:
    """The completion of prompt `index` in one filled result (runtime/results.py's Infilled): its last span."""
    length = result.span_lengths[-1] if completion.suffix is not None else completion.max_tokens
    pieces, logprobs = result.fills[-length:], result.fill_logprobs[-length:]
    if completion.marked(index):
        lead, drop = tokenizer.decode(result.ids[: result.masked_positions[-length]], skip_special_tokens=False), False
    else:
        prompt = completion.prompts[index]
        lead, drop = prompt, bool(pieces) and repeats_space(prompt, pieces[0])
    finish = "length" if completion.suffix is None or length == completion.max_tokens else "stop"
    return Choice(lead, list(pieces), list(logprobs), drop, finish, completion.marked(index))


def repeats_space(prompt: str, first: str) -> bool:
    """Whether the first token's leading space is the prompt's last one: a marker takes the space before it into
    its fill (runtime/text.py), so the completion leaves it out rather than show it twice."""
    return prompt.endswith(" ") and first.startswith(" ")


def stopped(text: str, stops: tuple) -> int | None:
    """Where the first stop sequence in text begins; None for none."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def held(text: str, stops: tuple) -> int:
    """Characters at text's end that could begin a stop sequence (a stream keeps them until it knows)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def rendered(completion: Completion, choice: Choice) -> tuple[str, dict | None, str]:
    """(text, logprobs, finish_reason) of a choice as the answer gives it: cut at a stop sequence, the lead shown
    where echo asks for it or the prompt had markers."""
    text, finish = choice.completion, choice.finish_reason
    cut = stopped(text, completion.stop)
    if cut is not None:
        text, finish = text[:cut], "stop"
    shown = completion.echo or choice.marked
    tokens, at = [], -1 if choice.drop_space else 0
    for piece, logprob in zip(choice.pieces, choice.logprobs):
        if at >= len(text):
            break
        tokens.append((piece, logprob, len(choice.lead) + at))
        at += len(piece)
    return (choice.lead if shown else "") + text, logprobs_of(completion, tokens), finish


def logprobs_of(completion: Completion, tokens: list) -> dict | None:
    """OpenAI's logprobs object of (token text, logprob, offset) triples, where the request asks for it; the
    offsets count from the prompt's start, as OpenAI's do."""
    if completion.logprobs is None:
        return None
    return {
        "tokens": [t for t, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": None,
        "text_offset": [at for _, _, at in tokens],
    }


@dataclass
class Streamed:
    """A choice of a plain continuation, streamed: each token's text is sent once no stop sequence can begin in
    it, and nothing after a stop sequence."""

    prompt: str
    stops: tuple
    text: str = ""  # the completion so far
    sent: int = 0  # characters of it sent
    waiting: list = field(default_factory=list)  # (token text, logprob, offset) not yet sent
    done: bool = False

    def add(self, piece: str, logprob: float) -> tuple[str, list, str | None]:
        """(text to send, its tokens, "stop" where a stop sequence ended the choice) after one more token."""
        if self.done:
            return "", [], None
        drop = not self.text and repeats_space(self.prompt, piece)
        self.waiting.append((piece, logprob, len(self.prompt) + len(self.text) - drop))
        self.text += piece[1:] if drop else piece
        cut = stopped(self.text, self.stops)
        self.done = cut is not None
        return self.flush(len(self.text) - held(self.text, self.stops) if cut is None else cut) + (
            "stop" if self.done else None,
        )

    def flush(self, limit: int) -> tuple[str, list]:
        """The text up to `limit` not yet sent, and the tokens that begin in it."""
        text, self.sent = self.text[self.sent : limit], max(self.sent, limit)
        tokens = [t for t in self.waiting if t[2] - len(self.prompt) < limit]
        self.waiting = self.waiting[len(tokens) :]
        return text, tokens


def usage_of(completion: Completion, results: list) -> dict:
    """Prompt tokens (each prompt's and suffix's content once) and completion tokens (every fill of every choice)."""
    prompt = sum(len(r.ids) - len(r.masked_positions) for r in results[:: completion.n])
    filled = sum(len(r.masked_positions) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": filled, "total_tokens": prompt + filled}


DONE = "data: [DONE]\n\n"


class Answer:
    """The answer to one completions request, from its results (Infilled, num_samples per text)."""

    def __init__(self, completion: Completion, model: str, tokenizer: Any) -> None:
        self.completion, self.model, self.tokenizer = completion, model, tokenizer

    def choices(self, results: list) -> list[Choice]:
        """A choice per result, prompt-major as the results come."""
        n = self.completion.n
        return [choice_of(self.completion, number // n, r, self.tokenizer) for number, r in enumerate(results)]

    def body(self, results: list) -> dict:
        """The whole answer: a choice per prompt and sample, with usage."""
        choices = [self.rendered(number, choice) for number, choice in enumerate(self.choices(results))]
        return {**self.head(), "choices": choices, "usage": usage_of(self.completion, results)}

    def rendered(self, number: int, choice: Choice) -> dict:
        text, logprobs, finish = rendered(self.completion, choice)
        return {"text": text, "index": number, "logprobs": logprobs, "finish_reason": finish}

    def head(self) -> dict:
        c = self.completion
        return {"id": c.id, "object": "text_completion", "created": c.created, "model": self.model}

    def chunk(self, choices: list, usage_now: dict | None = None) -> str:
        """One server-sent event of a stream: `data: {...}` with these choices."""
        body = {**self.head(), "choices": choices, **({"usage": usage_now} if usage_now is not None else {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class Stream:
    """A streamed answer: `hear` takes each fill token as it is chosen (a plain continuation's; the others are
    sent whole at the end), `events` holds what to send, `line` writes one, `answered` the last ones."""

    def __init__(self, answer: Answer, piece: Callable[[int, int, int, int], str]):
        """piece(prompt, sample, position, token): what a fill token adds in whole characters (Job.piece)."""
        self.answer, self.completion, self.piece = answer, answer.completion, piece
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices: dict = {}  # (prompt, sample) -> its Streamed
        c = self.completion
        self.hear = self._hear if c.streams_tokens else None
        if c.echo and c.streams_tokens:
            for number in range(len(c.prompts) * c.n):
                self.events.put_nowait((number, c.prompts[number // c.n], [], None))

    def _hear(self, index: int, sample: int, position: int, token: int, logprob: float) -> None:
        if (index, sample) not in self.choices:
            self.choices[index, sample] = Streamed(self.completion.prompts[index], self.completion.stop)
        text, tokens, finish = self.choices[index, sample].add(self.piece(index, sample, position, token), logprob)
        if text or finish:
            self.events.put_nowait((index * self.completion.n + sample, text, tokens, finish))

    def line(self, event: tuple) -> str:
        number, text, tokens, finish = event
        logprobs = logprobs_of(self.completion, tokens)
        return self.answer.chunk([{"text": text, "index": number, "logprobs": logprobs, "finish_reason": finish}])

    def answered(self, results: list) -> list[str]:
        """Each choice's rest: whole where it was not streamed, else what was held back, and its finish."""
        lines = []
        for number, choice in enumerate(self.answer.choices(results)):
            streamed = self.choices.get(divmod(number, self.completion.n))
            if streamed is None:
                lines.append(self.answer.chunk([self.answer.rendered(number, choice)]))
            elif not streamed.done:
                rest = streamed.flush(len(streamed.text))
                lines.append(self.line((number, *rest, choice.finish_reason)))
        if self.completion.include_usage:
            lines.append(self.answer.chunk([], usage_of(self.completion, results)))
        return [*lines, DONE]


def error_event(error: ClientError) -> str:
    """An error mid-stream, as OpenAI sends it (the SDK raises it with the message)."""
    return f"data: {json.dumps(error_body(error), ensure_ascii=False)}\n\n"


def models(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": OWNER}
