"""The OpenAI error envelope: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status to send."""

from __future__ import annotations

__all__ = ["APIError", "bad_request", "envelope"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the server answers with ``status`` and the envelope; never carries a traceback."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return envelope(self.message, self.status, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def envelope(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
