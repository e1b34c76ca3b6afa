"""fastres serve's HTTP layer (fastres.serving.http) without a server: routes, methods, the API key,
body limits and the multipart parser. tests/test_serve.py checks each behaviour once over real HTTP."""

import time

import pytest

from fastres.errors import RequestError
from fastres.serving import http, protocol
from fastres.serving.protocol import OIPError

KEY = "s3cret-key"


def _refusal(method, path, **options) -> RequestError:
    with pytest.raises(RequestError) as info:
        http.resolve(method, path, "birds", **options)
    return info.value


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("POST", "/v2/models/birds/ready", "GET"),
        ("DELETE", "/v2/health/live", "GET"),
        ("PUT", "/v2/health/ready", "GET"),
        ("GET", "/v2/models/birds/infer", "POST"),
        ("GET", "/v1/classify", "POST"),
        ("POST", "/v2/models/birds/versions/1/stats", "GET"),
        ("POST", "/v2", "GET"),
    ],
)
def test_wrong_methods_get_405_with_allow(method, path, allow):
    error = _refusal(method, path)
    assert error.status == 405 and error.headers == {"allow": allow}, error
    assert f"use {allow}" in str(error)


def test_routes_and_unknown_paths_and_models():
    assert http.resolve("GET", "/v2/health/live/", "birds").action == "live"
    assert http.resolve("GET", "/v2/models/birds/versions/1/ready", "birds").action == "model_ready"
    assert http.resolve("POST", "/v2/models/birds/infer", "birds").action == "infer"
    assert http.resolve("GET", "/v2/models/birds", "birds").action == "model"
    assert http.resolve("POST", "/v1/classify", "birds").action == "classify"
    for path in ("/v2/models/cats", "/v2/models/birds/versions/2/ready"):
        error = _refusal("GET", path)
        assert error.status == 404 and "unknown model" in str(error)
    assert _refusal("GET", "/v3/anything").status == 404


PROTECTED = [
    ("POST", "/v2/models/birds/infer"),
    ("POST", "/v1/classify"),
    ("GET", "/v2/models/birds"),
    ("GET", "/v2/models/birds/stats"),
    ("GET", "/v2"),
]


@pytest.mark.parametrize("method, path", PROTECTED)
def test_api_key_is_required_on_all_but_health(method, path):
    for authorization in (None, "", f"Basic {KEY}", "Bearer wrong", f"Bearer {KEY}x", KEY):
        error = _refusal(method, path, api_key=KEY, authorization=authorization)
        assert error.status == 401 and "Authorization: Bearer KEY" in str(error), authorization
        assert error.headers["www-authenticate"].startswith("Bearer")
    for authorization in (f"Bearer {KEY}", f"bearer {KEY}", f"  Bearer  {KEY} "):
        http.resolve(method, path, "birds", api_key=KEY, authorization=authorization)
    # Without the key nothing is revealed: a wrong model, or method, is still a 401.
    assert _refusal("DELETE", path.replace("birds", "cats"), api_key=KEY).status == 401
    http.resolve(method, path, "birds")  # no key configured: open


def test_health_routes_stay_open_with_a_key():
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/birds/ready"):
        assert http.resolve("GET", path, "birds", api_key=KEY).action in ("live", "ready", "model_ready")


def test_content_length_limits_and_unicode_digits():
    http.check_content_length(None, 100)
    http.check_content_length("100", 100)
    for value, status in (("101", 413), ("9" * 5000, 413), ("\u00b2", 400), ("-1", 400), ("1e3", 400)):
        with pytest.raises(RequestError) as info:
            http.check_content_length(value, 100)
        assert info.value.status == status, value


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "9" * 5000, "-1", "", "2.0"])
def test_topk_query_that_is_no_ascii_integer_is_a_400(value):
    # '²' and Arabic-Indic digits pass str.isdigit() but not int(); 5000 digits pass neither int()
    with pytest.raises(OIPError, match="from 1 to 10") as info:
        protocol.parse_topk(http.query_int(value), 10, "query parameter 'topk'")
    assert info.value.status == 400
    assert http.query_int("3") == 3


def _multipart(files, boundary="----fastresBoundary7", headers=b"Content-Type: application/octet-stream\r\n"):
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f{i}.bin"\r\n'.encode()
        + headers
        + b"\r\n"
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_files_come_back_byte_exact():
    files = [bytes(range(256)) + b"\r\n--x\r\n", b"\x89PNG\r\n\x1a\n" + bytes(100), b"--", b"\r\n"]
    body, content_type = _multipart(files)
    assert http.split_multipart(body, content_type, max_parts=8) == files
    assert http.split_multipart(b"preamble\r\n" + body + b"epilogue", content_type, max_parts=8) == files
    quoted = content_type.replace("boundary=----fastresBoundary7", 'boundary="----fastresBoundary7"')
    assert http.split_multipart(body, quoted, max_parts=8) == files
    no_headers = b"--B\r\n\r\nabc\r\n--B \t\r\n\r\ndef\r\n--B--"  # transport padding after a delimiter
    assert http.split_multipart(no_headers, "multipart/form-data; boundary=B", 8) == [b"abc", b"def"]
    assert http.split_multipart(b"raw", "image/png", 8) == [b"raw"]


@pytest.mark.parametrize(
    "body, content_type, message",
    [
        (b"", "image/jpeg", "empty request body"),
        (b"------fastresBoundary7--\r\n", None, "holds no file"),
        (b"no delimiter at all", None, "no parts for its boundary"),
        (b"------fastresBoundary7\r\n\r\nabc", None, "no closing boundary"),
        (b"------fastresBoundary7\r\nX: y\r\nabc", None, "part headers do not end"),
        (
            b"------fastresBoundary7\r\nX: y\r\n"
            b"------fastresBoundary7\r\n\r\nabc\r\n------fastresBoundary7--",
            None,
            "part headers do not end",
        ),
        (b"------fastresBoundary7junk\r\n\r\nabc\r\n------fastresBoundary7--", None, "not followed by CRLF"),
        (b"x", "multipart/form-data", "needs a boundary"),
        (b"x", "multipart/form-data; boundary=" + "b" * 71, "needs a boundary"),
    ],
)
def test_malformed_multipart_is_a_400(body, content_type, message):
    with pytest.raises(RequestError, match=message) as info:
        http.split_multipart(body, content_type or "multipart/form-data; boundary=----fastresBoundary7", 8)
    assert info.value.status == 400


def test_transfer_encoded_parts_are_refused():
    body, content_type = _multipart([b"aGVsbG8="], headers=b"Content-Transfer-Encoding: base64\r\n")
    with pytest.raises(RequestError, match="Content-Transfer-Encoding 'base64'"):
        http.split_multipart(body, content_type, 8)
    body, content_type = _multipart([b"hello"], headers=b"Content-Transfer-Encoding: binary\r\n")
    assert http.split_multipart(body, content_type, 8) == [b"hello"]


def test_a_250000_part_body_is_refused_fast():
    body, content_type = _multipart([b"x"] * 250_000, boundary="b", headers=b"")
    started = time.perf_counter()
    with pytest.raises(RequestError, match="250000 parts, over this server's limit of 16") as info:
        http.split_multipart(body, content_type, max_parts=16)
    assert info.value.status == 413
    # one bytes.count over 2.5 MB; the email package's parser took ~20 s on this body
    assert time.perf_counter() - started < 0.5
    assert len(http.split_multipart(*_multipart([b"x"] * 16), max_parts=16)) == 16
