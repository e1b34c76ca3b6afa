"""Open Inference Protocol messages (fastres.serving.protocol): parsing, validation, encoding, without Ray."""

import json
import struct

import numpy as np
import pytest
import torch

from fastres.serving import protocol
from fastres.serving.protocol import OIPError

CLASSES = 10
LABELS = [f"bird {i}" for i in range(CLASSES)]


def _images(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(np.float32)


def _request(images, datatype="UINT8", **extra):
    tensor = {
        "name": "input",
        "datatype": datatype,
        "shape": list(images.shape),
        "data": images.ravel().tolist(),
    }
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _binary_request(images, datatype="UINT8", **extra):
    raw = images.tobytes()
    tensor = {"name": "input", "datatype": datatype, "shape": list(images.shape)}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    return header + raw, str(len(header))


def _parse(body, header_length=None, max_batch=8):
    return protocol.parse_infer_request(body, header_length, num_classes=CLASSES, max_batch=max_batch)


@pytest.mark.parametrize(
    "shape, layout",
    [
        pytest.param((2, 3, 5, 7), "NCHW", id="nchw"),
        pytest.param((3, 5, 7, 3), "NHWC", id="nhwc"),
        pytest.param((1, 3, 1, 1), "NCHW", id="1x1"),
    ],
)
def test_json_uint8_images_keep_values_and_layout(shape, layout):
    images = _images(shape)
    parsed = _parse(_request(images))
    assert parsed.layout == layout and parsed.datatype == "UINT8" and parsed.batch == shape[0]
    assert parsed.images.dtype == np.uint8 and np.array_equal(parsed.images, images)
    assert [o.name for o in parsed.outputs] == ["logits"] and not parsed.outputs[0].binary


def test_nested_json_data_is_accepted():
    images = _images((2, 3, 4, 6))
    tensor = {"name": "input", "datatype": "UINT8", "shape": [2, 3, 4, 6], "data": images.tolist()}
    parsed = _parse(json.dumps({"inputs": [tensor]}).encode())
    assert np.array_equal(parsed.images, images)


def test_fp32_and_binary_inputs_are_bit_exact():
    images = _images((2, 3, 6, 5), np.float32, seed=1)
    assert np.array_equal(_parse(_request(images, "FP32")).images, images)
    body, length = _binary_request(images, "FP32")
    parsed = _parse(body, length)
    assert parsed.images.dtype == np.float32 and np.array_equal(parsed.images, images)
    nhwc = _images((2, 5, 6, 3), np.float32, seed=2)
    parsed = _parse(_request(nhwc, "FP32"))
    assert parsed.layout == "NHWC" and np.array_equal(parsed.images, nhwc)
    body, length = _binary_request(_images((1, 4, 4, 3)), id="req-7")
    parsed = _parse(body, length)
    assert parsed.layout == "NHWC" and parsed.id == "req-7"


def test_ambiguous_layout_needs_the_layout_parameter():
    images = _images((2, 3, 4, 3))
    with pytest.raises(OIPError, match="ambiguous.*layout"):
        _parse(_request(images))
    assert _parse(_request(images, parameters={"layout": "NHWC"})).layout == "NHWC"
    assert _parse(_request(images, parameters={"layout": "NCHW"})).layout == "NCHW"


def _tensor_body(**changes):
    tensor = {"name": "input", "datatype": "UINT8", "shape": [1, 3, 2, 2], "data": list(range(12))}
    tensor.update(changes)
    return json.dumps({"inputs": [tensor]}).encode()


def _nested(depth):
    data = [1] * 12
    for _ in range(depth):
        data = [data]
    return data


BAD_REQUESTS = [
    pytest.param(b"{not json", None, "not valid JSON", id="not-json"),
    pytest.param(b"[1, 2]", None, "JSON object", id="not-an-object"),
    pytest.param(b'{"inputs": []}', None, "one tensor named 'input'", id="no-inputs"),
    pytest.param(_tensor_body(name="pixels"), None, "unknown input 'pixels'", id="wrong-name"),
    pytest.param(_tensor_body(datatype="FP16"), None, "datatype 'FP16' is not supported", id="fp16"),
    pytest.param(_tensor_body(shape=[3, 2, 2]), None, "4 positive integers", id="3d-shape"),
    pytest.param(_tensor_body(shape=[1, 3, 0, 2]), None, "4 positive integers", id="zero-dim"),
    pytest.param(_tensor_body(shape=[1, 4, 2, 2]), None, "N x 3 x H x W or N x H x W x 3", id="4-channels"),
    pytest.param(
        _tensor_body(data=list(range(11))), None, "11 values but the shape needs 12", id="short-data"
    ),
    pytest.param(_tensor_body(data=[300] * 12), None, "integers from 0 to 255", id="uint8-range"),
    pytest.param(_tensor_body(data=[0.5] * 12), None, "integers from 0 to 255", id="uint8-floats"),
    pytest.param(_tensor_body(data=[[1, 2], [3]]), None, "ragged", id="ragged"),
    pytest.param(_tensor_body(data=_nested(200)), None, "too deeply nested", id="nested-200"),
    pytest.param(  # str() of a list nested ~1000 deep would be a RecursionError, hence a 500
        json.dumps({"inputs": json.loads(_tensor_body())["inputs"], "id": _nested(900)}).encode(),
        None,
        "'id' must be a string",
        id="id-list",
    ),
    pytest.param(  # json.loads raises RecursionError, which is no ValueError
        _tensor_body(data=None).replace(b"null", b"[" * 100_000 + b"1" + b"]" * 100_000),
        None,
        "nests JSON too deeply",
        id="nested-100000",
    ),
    pytest.param(_tensor_body(data="abc"), None, "JSON list", id="data-string"),
    pytest.param(_tensor_body(data=None), None, "JSON list", id="data-null"),
    pytest.param(
        _tensor_body(datatype="FP32", shape=[1, 2, 2, 2], data=[0.5] * 8),
        None,
        "FP32 images must be",
        id="fp32-2ch",
    ),
    pytest.param(_tensor_body(datatype="FP32", data=[float("nan")] * 12), None, "NaN", id="fp32-nan"),
    pytest.param(
        _tensor_body(shape=[9, 3, 2, 2], data=[1] * 108), None, "9 images is over", id="batch-limit"
    ),
    pytest.param(_tensor_body(), "10000", "beyond the request body", id="header-beyond-body"),
    pytest.param(_tensor_body(), "-1", "beyond the request body", id="header-negative"),
    pytest.param(_tensor_body(), "12x", "must be an integer", id="header-not-int"),
    pytest.param(_tensor_body(parameters={"layout": "NWHC"}), None, "'layout' must be", id="bad-layout"),
]


@pytest.mark.parametrize("body, header_length, message", BAD_REQUESTS)
def test_bad_requests_say_what_is_wrong(body, header_length, message):
    with pytest.raises(OIPError, match=message) as info:
        _parse(body, header_length)
    assert info.value.status == 400
    assert json.loads(protocol.error_body(str(info.value))) == {"error": str(info.value)}


def test_pixel_limit_counts_every_image_of_the_request():
    images = _images((2, 6, 5, 3))
    assert _parse_limited(_request(images), 60).batch == 2
    with pytest.raises(OIPError, match="2 images of 6x5 are over this server's limit of 59 pixels"):
        _parse_limited(_request(images), 59)


def _parse_limited(body, max_pixels):
    return protocol.parse_infer_request(body, None, num_classes=CLASSES, max_batch=8, max_pixels=max_pixels)


def test_binary_data_length_must_match_the_shape():
    body, length = _binary_request(_images((1, 3, 4, 4)))
    with pytest.raises(OIPError, match="needs 48"):
        _parse(body[:-1], length)
    with pytest.raises(OIPError, match="no input has binary_data_size"):
        _parse(_request(_images((1, 3, 2, 2))) + b"xx", str(len(_request(_images((1, 3, 2, 2))))))
    with pytest.raises(OIPError, match="needs the Inference-Header-Content-Length"):
        _parse(body[: int(length)])


def test_requested_outputs_topk_binary_and_classification():
    images = _images((2, 3, 4, 4))
    outputs = [
        {"name": "labels", "parameters": {"topk": 3}},
        {"name": "probs", "parameters": {"binary_data": True}},
        {"name": "logits", "parameters": {"classification": 2}},
    ]
    parsed = _parse(_request(images, outputs=outputs, parameters={"topk": 4}))
    assert [(o.name, o.binary, o.topk) for o in parsed.outputs] == [
        ("labels", False, 3),
        ("probs", True, 4),
        ("logits", False, 2),
    ]
    parsed = _parse(_request(images, parameters={"binary_data_output": True}))
    assert [(o.name, o.binary) for o in parsed.outputs] == [("logits", True)]
    for bad, message in [
        ([{"name": "scores"}], "unknown output 'scores'"),
        ([{"name": "labels", "parameters": {"topk": 0}}], "from 1 to 10"),
        ([{"name": "labels", "parameters": {"topk": 11}}], "from 1 to 10"),
        ([{"name": "probs", "parameters": {"topk": "3"}}], "from 1 to 10"),
    ]:
        with pytest.raises(OIPError, match=message):
            _parse(_request(images, outputs=bad))


def test_outputs_match_a_float64_softmax_and_topk():
    logits = np.random.default_rng(3).standard_normal((3, CLASSES)).astype(np.float32)
    images = _images((3, 3, 2, 2))
    outputs = [
        {"name": "logits"},
        {"name": "labels"},
        {"name": "probs"},
        {"name": "logits", "parameters": {"classification": 2}},
    ]
    parsed = _parse(_request(images, outputs=outputs, parameters={"topk": 3}))
    got = {(o.name, o.datatype): o.array for o in protocol.build_outputs(parsed, logits, LABELS)}
    ref = torch.from_numpy(logits).double().softmax(1)
    top = ref.topk(3, dim=1)
    assert np.array_equal(got["logits", "FP32"], logits)
    assert got["labels", "BYTES"].tolist() == [
        [LABELS[j].encode() for j in row] for row in top.indices.tolist()
    ]
    assert got["probs", "FP32"].dtype == np.float32
    np.testing.assert_allclose(got["probs", "FP32"], top.values.numpy(), rtol=1e-6)
    first = got["logits", "BYTES"][0, 0].decode().split(":")
    best = int(top.indices[0, 0])
    assert first == [f"{logits[0, best]:f}", str(best), LABELS[best]]
    predictions = protocol.top_predictions(logits, LABELS, 2)
    assert [[p["index"] for p in row] for row in predictions] == top.indices[:, :2].tolist()
    assert predictions[0][0]["label"] == LABELS[best]


def _response(outputs_json, binary_default):
    logits = np.random.default_rng(4).standard_normal((2, CLASSES)).astype(np.float32)
    params = {"topk": 3, "binary_data_output": binary_default}
    parsed = _parse(_request(_images((2, 3, 2, 2)), outputs=outputs_json, parameters=params, id="abc"))
    body, headers = protocol.encode_infer_response(
        "birds", protocol.build_outputs(parsed, logits, LABELS), parsed.id
    )
    return logits, body, headers


def test_json_response_round_trips():
    logits, body, headers = _response([{"name": "logits"}, {"name": "labels"}], False)
    assert headers == {"content-type": "application/json"}
    response = json.loads(body)
    assert response["model_name"] == "birds" and response["id"] == "abc"
    out = {o["name"]: o for o in response["outputs"]}
    assert out["logits"]["shape"] == [2, CLASSES] and out["logits"]["datatype"] == "FP32"
    assert np.array_equal(np.array(out["logits"]["data"], dtype=np.float32).reshape(2, CLASSES), logits)
    assert out["labels"]["shape"] == [2, 3] and all(isinstance(s, str) for s in out["labels"]["data"])


def test_binary_response_layout():
    logits, body, headers = _response([{"name": "logits"}, {"name": "labels"}], True)
    length = int(headers["inference-header-content-length"])
    header = json.loads(body[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert "data" not in header["outputs"][0] and length + sum(sizes) == len(body)
    assert np.array_equal(np.frombuffer(body[length : length + sizes[0]], "<f4").reshape(2, CLASSES), logits)
    blob, strings, pos = body[length + sizes[0] :], [], 0
    while pos < len(blob):
        (n,) = struct.unpack_from("<I", blob, pos)
        strings.append(blob[pos + 4 : pos + 4 + n].decode())
        pos += 4 + n
    assert len(strings) == 6 and all(s in LABELS for s in strings)


def test_binary_response_parses_with_tritonclient():
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    logits, body, headers = _response([{"name": "logits"}, {"name": "labels"}, {"name": "probs"}], True)
    result = http.InferResult.from_response_body(
        body, header_length=int(headers["inference-header-content-length"])
    )
    assert np.array_equal(result.as_numpy("logits"), logits)
    assert result.as_numpy("labels").shape == (2, 3) and result.as_numpy("probs").shape == (2, 3)
    assert result.as_numpy("labels")[0, 0].decode() in LABELS


def test_metadata_and_statistics():
    meta = protocol.model_metadata("birds", CLASSES)
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 3, -1, -1]}]
    assert [o["name"] for o in meta["outputs"]] == list(protocol.OUTPUT_NAMES)
    assert meta["outputs"][0]["shape"] == [-1, CLASSES]
    stats = protocol.InferenceStats()
    stats.record_execution(requests=3, images=4, ns=1000)
    stats.record_execution(requests=1, images=1, ns=500)
    stats.record_failure(ns=7)
    (model,) = stats.triton_statistics("birds")["model_stats"]
    assert (model["inference_count"], model["execution_count"], model["request_count"]) == (5, 2, 4)
    assert model["merged_executions"] == 1 and model["inference_stats"]["fail"]["count"] == 1
    assert model["batch_stats"] == [
        {"batch_size": 1, "compute_infer": {"count": 1, "ns": 500}},
        {"batch_size": 4, "compute_infer": {"count": 1, "ns": 1000}},
    ]
