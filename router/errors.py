"""OpenAI-shaped error bodies, `{"error": {"message", "type", "param", "code"}}`, and the handlers
that make sure nothing a client sends is answered with a 500."""
from __future__ import annotations

import logging
import reprlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


# How much of a client-sent value an error message may quote, and how long a message may be.
QUOTE_CHARS = 64
MAX_MESSAGE_CHARS = 1024


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 8, 8, 4
_REPR.maxstring = _REPR.maxother = QUOTE_CHARS


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """repr() of a client-sent value, cut to a short prefix: errors must not echo megabytes back."""
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:limit + 1])  # never repr() the whole of a 10 MB value
    elif isinstance(value, int) and value.bit_length() > 64:
        text = f"<an integer of {value.bit_length()} bits>"  # repr() refuses huge ints
    else:
        text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + f"... ({len(message) - MAX_MESSAGE_CHARS} more characters)"


# Wording vLLM's server uses where clients and vLLM's own tests match on the message; the
# completions and chat endpoints both take them from here.
EMPTY_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty."
ECHO_WITH_EMBEDS = "Echo is unsupported with prompt embeds."
PROMPT_LOGPROBS_WITH_EMBEDS = "prompt_logprobs is not compatible with prompt embeds."
EMBEDS_PART_WITHOUT_DATA = ("prompt_embeds content part requires a non-empty `data` field "
                            "(base64 of torch.save bytes).")


def out_of_vocabulary(token_id: int) -> str:
    return f"Token id {quote(token_id)} is out of vocabulary"


class EmbedsError(ValueError):
    """A prompt embeds payload the router refuses; ``status`` is the HTTP status (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


def embeds_too_large(what: str, size: int, max_bytes: int) -> EmbedsError:
    return EmbedsError(f"prompt_embeds too large: {what} is {size} bytes, the limit is "
                       f"{max_bytes} bytes", status=413)


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str | None = None, type: str | None = None, headers: dict | None = None):
        message = _capped(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param=param)


def overloaded(message: str = "all replicas are busy; retry later", retry_after_s: int = 1) -> APIError:
    return APIError(message, 429, code="server_overloaded", headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str = "no live replica can serve this request", retry_after_s: int = 5) -> APIError:
    return APIError(message, 503, code="no_live_replica", headers={"Retry-After": str(retry_after_s)})


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def from_validation_errors(errors: list[dict]) -> APIError:
    """One 400 naming each bad field (never echoing the input: it may be megabytes of base64)."""
    parts, params = [], []
    for e in errors[:10]:
        # a location may hold client-sent map keys, a message the value itself: keep both short
        loc = ".".join(str(x)[:QUOTE_CHARS] for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid value"))[:2 * QUOTE_CHARS]
        params.append(loc)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return APIError("; ".join(parts) or "invalid request", 400, param=params[0] if params else None)


# errors() builds every line error, about 20 us each: a body with a million wrong elements would
# hold the router for many seconds to report ten of them.
MAX_LISTED_ERRORS = 1000


def from_pydantic_error(exc: ValidationError) -> APIError:
    count = exc.error_count()
    if count > MAX_LISTED_ERRORS:
        return APIError(f"request body fails validation in {count} places", 400)
    return from_validation_errors(exc.errors(include_url=False, include_context=False,
                                             include_input=False))


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        return error_response(from_validation_errors(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError):
        return error_response(from_pydantic_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(str(exc.detail), exc.status_code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        return error_response(APIError(f"internal error: {type(exc).__name__}", 500, code="internal_error"))
