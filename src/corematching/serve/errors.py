"""Errors as OpenAI's API shapes them: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations


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
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
