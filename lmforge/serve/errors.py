"""Errors in OpenAI's shape, and the checks every request passes before it reaches a route.

Every error the server sends is `{"error": {"message", "type", "param", "code"}}` with its
HTTP status: 400 a bad value (`param` names the field), 401 a missing or wrong API key,
404 an unknown route or model, 413 a body over the size limit, 422 a request that does not
match the schema, 429 a full queue, 503 a server shutting down.

`Guard` is the outermost ASGI middleware: it checks the API key (every path but /health and
the playground page /), then reads the body, at most `max_body_bytes` of it (a larger
Content-Length, or more bytes than that arriving, is a 413 before anything else reads it),
and counts each response by endpoint and status for /metrics.
"""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = ("/health", "/")  # no API key: the liveness probe, and the playground page (a static file)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_value(message: str, param: str | None = None) -> APIError:
    """A 400 for a value the server cannot take."""
    return APIError(400, message, param, "invalid_value")


def install_handlers(app) -> None:
    """Answer APIError, FastAPI's validation errors and Starlette's HTTP errors (404, 405) in
    OpenAI's shape."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        error = validation_api_error(e.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), None, code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))


def validation_api_error(errors: list[dict]) -> APIError:
    """FastAPI's list of validation errors as one APIError naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        None, "invalid_json")
    where = f"field '{param}': " if param else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(422, f"{where}{first['msg']}{more}", param, "invalid_type")


async def _send_error(send, e: APIError, headers: list | None = None) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: API key, body size limit, and the request count of /metrics."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics=None, endpoints=()):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.metrics, self.endpoints = metrics, frozenset(endpoints)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"  # bounded label values
        status = 500

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self._check_key(scope)
            if error is None:
                receive, error = await self._bounded_body(scope, receive)
            if error is not None:
                headers = [(b"www-authenticate", b"Bearer")] if error.status == 401 else None
                await _send_error(counted_send, error, headers)
                return
            await self.app(scope, receive, counted_send)
        finally:
            if self.metrics is not None:
                self.metrics.request(endpoint, status)

    def _check_key(self, scope) -> APIError | None:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = given.partition(b" ")
        if scheme.lower() != b"bearer" or not key:
            return APIError(401, "no API key: send the header 'Authorization: Bearer <key>'", None, "invalid_api_key")
        if not hmac.compare_digest(key.strip(), self.api_key.encode()):
            return APIError(401, "the API key is not valid", None, "invalid_api_key")
        return None

    async def _bounded_body(self, scope, receive):
        """(a receive that replays the body, None), or (None, a 413) when the body is too large.
        At most max_body_bytes are ever held."""
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                             None, "request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return None, too_large
            except ValueError:
                return None, APIError(400, "the Content-Length header is not a number", None, "invalid_header")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return _replay([message], receive), None
            size += len(message.get("body", b""))
            if size > limit:
                return None, too_large
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive), None


def _replay(messages: list, receive):
    """A receive that gives `messages` first, then the client's own (e.g. http.disconnect)."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()
    return replay
