"""The HTTP layer of `fastres serve`, without Ray: routes and methods, the API key, body limits, multipart.

Pure functions of a request's method, path, headers and body, so that every refusal is tested without a
server. The deployment applies them in this order: route (404), API key (401, before anything about
the model is revealed), method (405 with Allow), Content-Length (413), then parses. Each refusal is a
RequestError with its status and a message saying what to send instead.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from ..errors import RequestError

_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
# (pattern, action, allowed methods, needs the API key). Health stays open: load balancers and
# Kubernetes probes carry no key; OIP counts model readiness as health too.
_ROUTES = [
    (re.compile(r"/v2/health/live"), "live", ("GET",), False),
    (re.compile(r"/v2/health/ready"), "ready", ("GET",), False),
    (re.compile(_MODEL + r"/ready"), "model_ready", ("GET",), False),
    (re.compile(r"/v2"), "server", ("GET",), True),
    (re.compile(_MODEL), "model", ("GET",), True),
    (re.compile(_MODEL + r"/stats"), "stats", ("GET",), True),
    (re.compile(_MODEL + r"/infer"), "infer", ("POST",), True),
    (re.compile(r"/v1/classify"), "classify", ("POST",), True),
]
_MODEL_ACTIONS = {"model_ready", "model", "stats", "infer"}
_MAX_INT_DIGITS = 9  # int() refuses strings over 4300 digits with a ValueError; no limit needs more


@dataclass(frozen=True)
class Route:
    action: str  # live, ready, model_ready, server, model, stats, infer or classify


def resolve(
    method: str, path: str, model: str, *, api_key: str | None = None, authorization: str | None = None
) -> Route:
    """The route of `method path` for the server of `model`, or the RequestError to answer."""
    path = path.rstrip("/") or "/"
    for pattern, action, methods, protected in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if protected and api_key:
            check_api_key(authorization, api_key)
        if method not in methods:
            allow = ", ".join(methods)
            raise RequestError(f"use {allow} for {path}, not {method}", 405, {"allow": allow})
        if action in _MODEL_ACTIONS and (match["name"] != model or match["version"] not in (None, "1")):
            raise RequestError(
                f"unknown model {match['name']!r} (version {match['version'] or 'any'}); "
                f"this server serves {model!r} version 1",
                404,
            )
        return Route(action)
    raise RequestError(f"no route {method} {path}; see GET /v2/models/{model}", 404)


def check_api_key(authorization: str | None, api_key: str) -> None:
    """Raise a 401 unless the header is `Bearer API_KEY`; compared in constant time."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    # compare_digest takes the time of the key's length whatever the guess: no timing oracle.
    if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())):
        raise RequestError(
            "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
            401,
            {"www-authenticate": 'Bearer realm="fastres"'},
        )


def too_large(limit: int) -> RequestError:
    return RequestError(
        f"request body is over this server's limit of {limit} bytes (--max-body-mb); split the batch", 413
    )


def too_slow(timeout_s: float) -> RequestError:
    # Connection: close, since the rest of the body may still be on its way.
    return RequestError(
        f"the request body did not arrive within {timeout_s:g} s (--body-timeout-s)",
        408,
        {"connection": "close"},
    )


def check_content_length(value: str | None, limit: int) -> None:
    """Refuse a declared body over `limit` before reading any of it (a chunked body is counted as read)."""
    if value is None:
        return
    if not (value.isascii() and value.isdigit()):  # str.isdigit accepts '²', which int() refuses
        raise RequestError(f"Content-Length must be a number of bytes, got {value!r}")
    if len(value) > len(str(limit)) or int(value) > limit:
        raise too_large(limit)


def query_int(value: str):
    """A query parameter as an int when it is ASCII digits, else as sent (for the caller's message)."""
    if value.isascii() and value.isdigit() and len(value) <= _MAX_INT_DIGITS:
        return int(value)
    return value


_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]{1,70})"|([^";\s]{1,70}))\s*(?:;|$)', re.IGNORECASE)
_IDENTITY_ENCODINGS = (b"", b"7bit", b"8bit", b"binary")


def split_multipart(body: bytes, content_type: str, max_parts: int) -> list[bytes]:
    """The files of a multipart/form-data body, in order; any other body is one raw file.

    A flat linear scan (RFC 2046 delimiters), not the email package's parser: that one is pure Python
    per line and part (seconds for a few megabytes of empty parts) and recurses into nested multiparts.
    Parts are counted with bytes.count before any is split out, so a body of many tiny parts costs one
    pass over its bytes and a 413.
    """
    if not content_type.lower().startswith("multipart/"):
        if not body:
            raise RequestError("empty request body; send image bytes, or files as multipart/form-data")
        return [body]
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise RequestError("multipart Content-Type needs a boundary parameter of 1 to 70 characters")
    boundary = (found[1] or found[2]).encode("latin-1")
    first, delimiter = b"--" + boundary, b"\r\n--" + boundary
    if body.startswith(first):
        pos = len(first)
    else:  # a preamble before the first delimiter is allowed, and ignored
        pos = body.find(delimiter)
        if pos < 0:
            raise RequestError("malformed multipart/form-data body (no parts for its boundary)")
        pos += len(delimiter)
    parts = body.count(delimiter, pos)  # after the first delimiter: one per part, the closing one included
    if parts > max_parts:
        raise RequestError(
            f"the multipart body has {parts} parts, over this server's limit of {max_parts} images", 413
        )
    files = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise RequestError("malformed multipart/form-data body (a boundary line is not followed by CRLF)")
        if body.startswith(b"\r\n", line_end + 2):  # a part without headers
            headers, start = b"", line_end + 4
        else:
            headers_end = body.find(b"\r\n\r\n", line_end + 2)
            if headers_end < 0 or body.find(delimiter, line_end, headers_end) >= 0:  # not in this part
                raise RequestError("malformed multipart/form-data body (part headers do not end)")
            headers, start = body[line_end + 2 : headers_end], headers_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise RequestError("malformed multipart/form-data body (no closing boundary)")
        _check_part_headers(headers)
        if end > start:
            files.append(body[start:end])
        pos = end + len(delimiter)
    if not files:
        raise RequestError(
            "the multipart/form-data body holds no file; send images with curl -F file=@image.jpg"
        )
    return files


def _check_part_headers(headers: bytes) -> None:
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        # RFC 7578 deprecates transfer encodings in form data and no client sends them: refuse rather
        # than hand base64 text to the image decoder.
        if (
            name.strip().lower() == b"content-transfer-encoding"
            and value.strip().lower() not in _IDENTITY_ENCODINGS
        ):
            raise RequestError(
                f"multipart Content-Transfer-Encoding {value.strip().decode('latin-1')!r} is "
                "not supported; send the files' bytes as they are (curl -F file=@image.jpg)"
            )
