"""A chat completion request body (OpenAI's shape) -> a validated `ChatRequest`, or a 4xx APIError.

Supported: `messages` (system / user / assistant; content a string or a list of `text` and `image_url`
parts), `model`, `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `stream`,
`stream_options.include_usage`, `n` (1 only), `user`, vLLM's `ignore_eos` (generate exactly max_tokens, for
load tests), and the `corematching` extension field. Anything else
that would change the output (tools, logprobs, penalties, ...) is refused by name rather than ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from .errors import APIError, bad_request
from .images import LoadedImage, load_image
from .methods import parse_method

ROLES = ("system", "user", "assistant")
ACCEPTED_KEYS = {
    "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
    "stream", "stream_options", "n", "user", "corematching", "ignore_eos",
}
# Accepted when they ask for nothing (null, false, 0, empty, "none", a text response format), refused otherwise.
NEUTRAL_WHEN_EMPTY = (
    "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice",
    "parallel_tool_calls", "response_format",
)
MAX_STOP_SEQUENCES = 4
MAX_NUMBER_DIGITS = 40  # no setting needs more; longer integers cost quadratic time to convert


@dataclass
class Limits:
    """What the server accepts; set from the command line."""

    model_name: str
    max_model_len: int  # prompt tokens (image tokens included) + max_tokens
    max_images: int  # images per request
    default_max_tokens: int
    default_temperature: float
    allowed_image_dir: Path | None
    default_method: object
    num_layers: int | None = None  # the language model's depth: a request's layers are checked against it


@dataclass
class ChatRequest:
    messages: list[dict]  # in the processor's chat-template form: content parts {"type": "image"} / "text"
    images: list[LoadedImage]
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    method: object
    max_tokens_given: bool = field(default=False)
    ignore_eos: bool = field(default=False)


def parse_json(body: bytes):
    """The request body as JSON, or a 400: bad UTF-8, bad syntax, NaN / Infinity, numbers too long or too large
    for a float, nesting deeper than the parser's recursion limit."""
    try:
        return json.loads(body, parse_constant=refuse_constant, parse_int=bounded_int, parse_float=finite_float)
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError and the refusals below
        raise bad_request(f"the request body is not valid JSON: {error}", code="invalid_json") from None


def refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number has more than {MAX_NUMBER_DIGITS} digits")
    return int(text)


def finite_float(text: str) -> float:
    if len(text) > 2 * MAX_NUMBER_DIGITS:
        raise ValueError(f"a number is longer than {2 * MAX_NUMBER_DIGITS} characters")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def check_text(value: str, param: str) -> str:
    """A string that can be encoded (JSON lets a lone surrogate such as \\ud800 through; tokenizers fail on it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid Unicode (a lone surrogate)", param=param) from None
    return value


def parse_chat_request(body, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - ACCEPTED_KEYS - set(NEUTRAL_WHEN_EMPTY))
    if unknown:
        raise bad_request(f"unrecognized request argument: {unknown[0]}", param=unknown[0],
                          code="unsupported_parameter")
    for name in NEUTRAL_WHEN_EMPTY:
        if name in body and not asks_nothing(body[name]):
            raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (a string; see /v1/models)", param="model")
    if model != limits.model_name:
        model = model[:64] + ("..." if len(model) > 64 else "")
        raise APIError(404, f"the model {model!r} does not exist; this server serves {limits.model_name!r}",
                       param="model", code="model_not_found")
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise bad_request("only n=1 is supported", param="n", code="unsupported_parameter")
    messages, images = parse_messages(body.get("messages"), limits)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    given = max_tokens is not None
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    max_tokens = integer("max_tokens", max_tokens, minimum=1)
    temperature = number("temperature", body.get("temperature"), limits.default_temperature, 0.0, 2.0)
    top_p = number("top_p", body.get("top_p"), 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("top_p must be in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None:
        seed = integer("seed", seed, minimum=-(2**63), maximum=2**63 - 1)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_request("stream_options accepts only include_usage", param="stream_options")
    if options and not stream:
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options.include_usage must be a boolean", param="stream_options.include_usage")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos must be a boolean", param="ignore_eos")
    method = parse_method(body.get("corematching"), limits.default_method, limits.num_layers)
    return ChatRequest(messages, images, max_tokens, temperature, top_p, seed, parse_stop(body.get("stop")),
                       stream, include_usage, method, given, ignore_eos)


def parse_messages(messages, limits: Limits) -> tuple[list[dict], list[LoadedImage]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    out, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role",
                              code="unsupported_parameter" if isinstance(role, str) else None)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise bad_request(f"{where}.{extra[0]} is not supported", param=f"{where}.{extra[0]}",
                              code="unsupported_parameter")
        content = message.get("content")
        if isinstance(content, str):
            check_text(content, f"{where}.content")
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list) or not content:
            raise bad_request(f"{where}.content must be a string or a non-empty list of parts",
                              param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            spot = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{spot}.text must be a string", param=f"{spot}.text")
                check_text(part["text"], f"{spot}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise bad_request(f"{spot}: images are only accepted in user messages", param=spot)
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if len(images) >= limits.max_images:
                    raise bad_request(f"too many images: this server accepts at most {limits.max_images} per request",
                                      param=spot, code="too_many_images")
                images.append(load_image(url, limits.allowed_image_dir, f"{spot}.image_url"))
                parts.append({"type": "image"})
            else:
                raise bad_request(f"{spot}.type must be 'text' or 'image_url', got {kind!r}", param=f"{spot}.type",
                                  code="unsupported_parameter")
        out.append({"role": role, "content": parts})
    if out[-1]["role"] != "user":
        raise bad_request("the last message must come from the user", param=f"messages[{len(out) - 1}].role")
    if not any(part["type"] == "text" and part["text"].strip() for m in out for part in m["content"]) and not images:
        raise bad_request("the messages hold no text and no image", param="messages")
    return out, images


def asks_nothing(value) -> bool:
    if value is None or value is False or value in ("none", {}, []):
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return value == {"type": "text"}


def parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return [check_text(s, "stop") for s in stop]


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", param=name)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise bad_request(f"{name} is out of range: {value}", param=name)
    return value


def number(name: str, value, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
        raise bad_request(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)
