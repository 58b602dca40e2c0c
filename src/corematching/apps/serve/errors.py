"""Errors as OpenAI's API shapes them: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

import json


class APIError(Exception):
    """A request the server refuses or cannot finish; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or default_kind(status)

    def body(self) -> dict:
        # Messages may quote what a client sent: bounded, so an error is never larger than a few hundred bytes.
        return {"error": {"message": clip(self.message, MAX_MESSAGE), "type": self.kind,
                          "param": clip(self.param, MAX_PARAM), "code": self.code}}

    def response(self):
        """The JSON response, ASCII-escaped (a lone surrogate a client sent cannot break its encoding)."""
        from starlette.responses import Response

        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.status in (408, 413):  # the rest of the body is never read: the connection cannot be reused
            headers["Connection"] = "close"
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=headers)


MAX_MESSAGE = 600
MAX_PARAM = 120


def clip(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 3] + "..."


def default_kind(status: int) -> str:
    if status == 429:
        return "rate_limit_exceeded"
    if status == 503:
        return "service_unavailable"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "server_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
