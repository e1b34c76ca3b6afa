"""Open Inference Protocol (KServe v2) messages for an image classifier, without Ray or HTTP.

Parses an infer request (JSON `data`, or the binary tensor data extension: a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw tensors) into one validated image tensor,
and encodes the response (JSON data, or binary outputs appended after the JSON header). Everything a
client can get wrong raises OIPError with an HTTP status and a message saying what to send instead.

The model has one input, `input`: UINT8 images (normalised inside the engine) or FP32 images already
normalised, N x 3 x H x W or N x H x W x 3 (the layout is where the 3 is; when dims 1 and 3 are both 3,
the `layout` parameter says which). Outputs: `logits` (FP32, N x classes),
and top-k `labels` (BYTES, N x k) and `probs` (FP32, N x k) when requested, k from the output's or the
request's `topk` parameter (default 5). `logits` also honours Triton's classification extension
(`"classification": k` gives "logit:index:label" strings, as tritonclient's class_count asks).
A server may offer more (fastres.serving.outputs: `embedding`, a feature engine's layers): FP32 tensors
passed through as the engine computed them.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine import LAYOUTS
from ..errors import RequestError

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "labels", "probs")
INPUT_DATATYPES = {"UINT8": np.dtype("uint8"), "FP32": np.dtype("<f4")}
DEFAULT_TOPK = 5
EXTENSIONS = ["binary_tensor_data", "classification", "statistics"]


class OIPError(RequestError):
    """A request the server cannot answer; `status` is the HTTP status (400, or 404 for a model)."""


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    topk: int | None = None  # labels/probs: how many; logits: Triton classification count, else None


@dataclass
class InferRequest:
    images: np.ndarray  # as sent: uint8 N x 3 x H x W or N x H x W x 3, or float32 N x 3 x H x W
    datatype: str
    layout: str  # "NCHW" or "NHWC"
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])


@dataclass
class OutputTensor:
    name: str
    datatype: str  # "FP32" or "BYTES"
    array: np.ndarray  # float32, or an object array of bytes for BYTES
    binary: bool


def parse_header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise OIPError(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
    if length < 0 or length > body_length:
        raise OIPError(
            f"Inference-Header-Content-Length {length} is beyond the request body ({body_length} bytes): "
            "it must be the length of the JSON header that starts the body"
        )
    return length


def _json_object(raw: bytes, what: str) -> dict:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OIPError(
            f"{what} is not valid JSON ({exc}); send a JSON object with an 'inputs' list"
        ) from None
    except RecursionError:  # lists nested thousands deep: the parser's recursion limit, not a bug
        raise OIPError(f"{what} nests JSON too deeply; send 'data' as a flat row-major list") from None
    if not isinstance(obj, dict):
        raise OIPError(f"{what} must be a JSON object with an 'inputs' list, got {type(obj).__name__}")
    return obj


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise OIPError(f"'parameters' of {where} must be a JSON object")
    return params


def parse_topk(value: Any, num_classes: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_classes:
        raise OIPError(
            f"{where} must be an integer from 1 to {num_classes} (the model's classes), got {value!r}"
        )
    return value


def _layout(shape: list[int], datatype: str, requested: Any) -> str:
    if requested is not None and requested not in LAYOUTS:
        raise OIPError(f"parameter 'layout' must be 'NCHW' or 'NHWC', got {requested!r}")
    nchw, nhwc = shape[1] == 3, shape[3] == 3
    if requested is not None:
        if (requested == "NCHW" and not nchw) or (requested == "NHWC" and not nhwc):
            raise OIPError(f"shape {shape} is not {requested} with 3 channels")
        return requested
    if nchw and nhwc:
        raise OIPError(
            f"shape {shape} is ambiguous (3 in dims 1 and 3); add the request parameter "
            '"layout": "NCHW" or "NHWC"'
        )
    if not (nchw or nhwc):
        raise OIPError(f"{datatype} images must be N x 3 x H x W or N x H x W x 3 (RGB), got shape {shape}")
    return "NCHW" if nchw else "NHWC"


def _json_tensor(data: Any, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise OIPError("input 'data' must be a JSON list of numbers (flat, row-major, or nested)")
    try:
        array = np.asarray(data)
    except (ValueError, RecursionError):  # ragged, or nested deeper than numpy's 64 dimensions
        raise OIPError(
            "input 'data' is a ragged or too deeply nested list; send a flat row-major list"
        ) from None
    if array.size != count:
        raise OIPError(f"input 'data' has {array.size} values but the shape needs {count}")
    if count and datatype == "UINT8":
        if array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255:
            raise OIPError("UINT8 input 'data' must hold integers from 0 to 255")
    elif count and array.dtype.kind not in "iuf":
        raise OIPError("FP32 input 'data' must hold numbers")
    return array.reshape(-1).astype(INPUT_DATATYPES[datatype])


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    *,
    num_classes: int,
    max_batch: int,
    max_pixels: int | None = None,
    output_names: tuple[str, ...] = OUTPUT_NAMES,
    default_outputs: tuple[str, ...] = ("logits",),
) -> InferRequest:
    """Validate an OIP infer request body and return its images and requested outputs.

    output_names: the outputs the model has (a request listing another is refused); default_outputs:
    what a request that lists none gets."""
    length = parse_header_length(header_length, len(body))
    header, binary = (body, b"") if length is None else (body[:length], body[length:])
    request = _json_object(header, "the request" if length is None else "the JSON request header")
    params = _parameters(request, "the request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise OIPError(f"'inputs' must be a list with one tensor named '{INPUT_NAME}' (the images)")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise OIPError(f"unknown input {tensor.get('name')!r}; this model has one input, '{INPUT_NAME}'")
    datatype = tensor.get("datatype")
    if datatype not in INPUT_DATATYPES:
        raise OIPError(
            f"input datatype {datatype!r} is not supported; send UINT8 images or FP32 normalised "
            "images, N x 3 x H x W or N x H x W x 3"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise OIPError(f"input shape must be 4 positive integers (a batch of images), got {shape!r}")
    tensor_params = _parameters(tensor, "the input")
    layout = _layout(shape, datatype, tensor_params.get("layout", params.get("layout")))
    if shape[0] > max_batch:
        raise OIPError(
            f"batch of {shape[0]} images is over this server's limit of {max_batch}; split the request"
        )
    height, width = shape[1:3] if layout == "NHWC" else shape[2:4]
    if max_pixels is not None and shape[0] * height * width > max_pixels:
        raise OIPError(
            f"{shape[0]} images of {height}x{width} are over this server's limit of {max_pixels} pixels "
            "per request; send fewer or smaller images"
        )
    count = math.prod(shape)
    size = tensor_params.get("binary_data_size")
    if size is not None:
        nbytes = count * INPUT_DATATYPES[datatype].itemsize
        if "data" in tensor:
            raise OIPError("the input has both 'data' and binary_data_size; send one of them")
        if length is None:
            raise OIPError("binary_data_size needs the Inference-Header-Content-Length header")
        if size != len(binary) or size != nbytes:
            raise OIPError(
                f"binary input data is {len(binary)} bytes (binary_data_size {size}) but shape {shape} "
                f"of {datatype} needs {nbytes}"
            )
        array = np.frombuffer(binary, dtype=INPUT_DATATYPES[datatype])
    else:
        if binary:
            raise OIPError(f"{len(binary)} bytes follow the JSON header but no input has binary_data_size")
        if "data" not in tensor:
            raise OIPError("the input has no 'data' (nor binary_data_size with binary data)")
        array = _json_tensor(tensor["data"], datatype, count)
    if datatype == "FP32" and not np.isfinite(array).all():
        raise OIPError("FP32 input holds NaN or infinity")
    outputs = _requested_outputs(request, params, num_classes, output_names, default_outputs)
    request_id = request.get("id")
    if not (request_id is None or isinstance(request_id, (str, int, float))):  # OIP: a string
        raise OIPError(f"'id' must be a string, got {type(request_id).__name__}")
    return InferRequest(
        array.reshape(shape), datatype, layout, outputs, None if request_id is None else str(request_id)
    )


def _requested_outputs(
    request: dict, params: dict, num_classes: int, names: tuple[str, ...], default: tuple[str, ...]
) -> list[RequestedOutput]:
    binary_default = bool(params.get("binary_data_output", False))
    default_k = min(DEFAULT_TOPK, num_classes)
    if "topk" in params:
        default_k = parse_topk(params["topk"], num_classes, "request parameter 'topk'")
    listed = request.get("outputs")
    if listed is None:
        return [RequestedOutput(name, binary_default) for name in default]
    if not isinstance(listed, list) or not all(isinstance(o, dict) for o in listed):
        raise OIPError("'outputs' must be a list of objects with a 'name'")
    outputs = []
    for item in listed:
        name = item.get("name")
        if not isinstance(name, str) or name not in names:
            raise OIPError(f"unknown output {name!r}; this model's outputs are {', '.join(names)}")
        oparams = _parameters(item, f"output {name!r}")
        binary = bool(oparams.get("binary_data", binary_default))
        if name == "logits":
            k = oparams.get("classification")
            k = None if not k else parse_topk(k, num_classes, "output parameter 'classification'")
        elif name not in OUTPUT_NAMES:  # an embedding or a feature: passed through, no top-k
            k = None
        else:
            k = (
                parse_topk(oparams["topk"], num_classes, f"'topk' of output {name!r}")
                if "topk" in oparams
                else default_k
            )
        outputs.append(RequestedOutput(name, binary, k))
    return outputs


def softmax_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k class indices (best first; ties keep index order) and their float32 softmax probabilities."""
    logits = np.asarray(logits, dtype=np.float32)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    return order, np.take_along_axis(probs, order, axis=1).astype(np.float32)


def top_predictions(logits: np.ndarray, labels: list[str], k: int) -> list[list[dict]]:
    """/v1/classify's answer: per image, the k best as {index, label, prob}, best first."""
    indices, probs = softmax_topk(logits, k)
    return [
        [{"index": int(j), "label": labels[j], "prob": float(p)} for j, p in zip(row, prow)]
        for row, prow in zip(indices, probs)
    ]


def build_outputs(
    request: InferRequest, computed: np.ndarray | dict[str, np.ndarray], labels: list[str]
) -> list[OutputTensor]:
    """The requested outputs from float32 logits (N x classes), or from a dict of what the engine
    computed (name -> float32 array: logits, embedding, features)."""
    computed = computed if isinstance(computed, dict) else {"logits": computed}
    logits = None if "logits" not in computed else np.asarray(computed["logits"], dtype=np.float32)
    result = []
    for out in request.outputs:
        if out.name not in OUTPUT_NAMES:
            array = np.asarray(computed[out.name], dtype=np.float32)
            result.append(OutputTensor(out.name, "FP32", array, out.binary))
            continue
        if out.name == "logits" and out.topk is None:
            result.append(OutputTensor("logits", "FP32", logits, out.binary))
            continue
        top, probs = softmax_topk(logits, out.topk)
        if out.name == "logits":  # Triton's classification extension: "value:index:label"
            strings = [
                [f"{logits[i, j]:f}:{j}:{labels[j]}".encode() for j in row] for i, row in enumerate(top)
            ]
            result.append(OutputTensor("logits", "BYTES", _bytes_array(strings), out.binary))
        elif out.name == "labels":
            names = [[labels[j].encode() for j in row] for row in top]
            result.append(OutputTensor("labels", "BYTES", _bytes_array(names), out.binary))
        else:
            result.append(OutputTensor("probs", "FP32", probs, out.binary))
    return result


def _bytes_array(rows: list[list[bytes]]) -> np.ndarray:
    array = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        array[i, :] = row
    return array


def _serialize(out: OutputTensor) -> bytes:
    if out.datatype == "BYTES":  # each element: 4-byte little-endian length, then the bytes
        return b"".join(struct.pack("<I", len(b)) + b for b in out.array.reshape(-1))
    return np.ascontiguousarray(out.array, dtype="<f4").tobytes()


def encode_infer_response(
    model_name: str, outputs: list[OutputTensor], request_id: str | None = None, model_version: str = "1"
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: plain JSON, or a JSON header plus binary outputs after it."""
    tensors, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
        if out.binary:
            blob = _serialize(out)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif out.datatype == "BYTES":
            entry["data"] = [b.decode() for b in out.array.reshape(-1)]
        else:
            entry["data"] = out.array.reshape(-1).tolist()
        tensors.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def classifier_outputs(num_classes: int) -> list[dict]:
    """The metadata of a classifier's outputs (OUTPUT_NAMES)."""
    return [
        {"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]},
        {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "probs", "datatype": "FP32", "shape": [-1, -1]},
    ]


def model_metadata(name: str, num_classes: int, platform: str = "fastres", outputs=None) -> dict:
    """GET /v2/models/{name}: one input and its outputs (default a classifier's three; `outputs`:
    {"name", "datatype", "shape"} dicts), -1 for the batch and variable sizes."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": platform,
        # UINT8 N x 3 x H x W is the advertised form; N x H x W x 3 and FP32 (normalised) are
        # accepted too (OIP metadata has one datatype and shape per input).
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 3, -1, -1]}],
        "outputs": [dict(o) for o in outputs] if outputs is not None else classifier_outputs(num_classes),
    }


class InferenceStats:
    """Counters for Triton's statistics extension (GET /v2/models/{name}/stats), thread-safe.

    inference_count counts images, execution_count engine calls: their ratio above one request per
    execution is dynamic batching at work. merged_executions counts engine calls that served more
    than one request (a fastres field).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.images = self.executions = self.merged = 0
        self.failures = self.success_ns = self.fail_ns = self.last_inference_ms = 0
        self.batches: dict[int, list[int]] = {}  # images per engine call -> [count, ns]

    def record_execution(self, requests: int, images: int, ns: int) -> None:
        with self._lock:
            self.requests += requests
            self.images += images
            self.executions += 1
            self.merged += requests > 1
            self.success_ns += ns
            entry = self.batches.setdefault(images, [0, 0])
            entry[0] += 1
            entry[1] += ns
            self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, ns: int) -> None:
        with self._lock:
            self.failures += 1
            self.fail_ns += ns

    def triton_statistics(self, name: str, replica: dict | None = None) -> dict:
        """Triton's statistics for this replica; `replica` (a fastres field): which one it is."""
        with self._lock:
            stats = {
                "name": name,
                "version": "1",
                "last_inference": self.last_inference_ms,
                "inference_count": self.images,
                "execution_count": self.executions,
                "request_count": self.requests,
                "merged_executions": self.merged,
                "inference_stats": {
                    "success": {"count": self.requests, "ns": self.success_ns},
                    "fail": {"count": self.failures, "ns": self.fail_ns},
                    "compute_infer": {"count": self.executions, "ns": self.success_ns},
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": {"count": count, "ns": ns}}
                    for size, (count, ns) in sorted(self.batches.items())
                ],
            }
        if replica is not None:
            stats["replica"] = replica
        return {"model_stats": [stats]}
