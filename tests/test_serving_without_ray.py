"""fastres.serving.config and fastres.serving.protocol work where Ray is not installed.

A fresh interpreter blocks `import ray` (sys.modules["ray"] = None makes it raise ImportError), so a
module that reached for Ray at import time, directly or through another serving module, fails here.
The deployment is imported last, in the same interpreter, to show that the block does stop Ray.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np

WITHOUT_RAY = textwrap.dedent(
    """
    import json, sys
    sys.modules["ray"] = None

    import numpy as np
    from fastres.serving import http, protocol  # noqa: F401  (http too: no Ray)
    from fastres.serving.config import ServeConfig

    config = ServeConfig("/ckpt/birds-v2.pth", max_batch=4)
    images = np.array(json.loads(sys.argv[1]), dtype=np.uint8)
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(images.shape),
                     "data": images.ravel().tolist()}]}
    ).encode()
    request = protocol.parse_infer_request(body, None, num_classes=3, max_batch=config.max_batch)
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    outputs = protocol.build_outputs(request, logits, ["a", "b", "c"])
    payload, _ = protocol.encode_infer_response(config.model_name, outputs, request.id)
    ray_modules = sorted(name for name, module in sys.modules.items() if name.startswith("ray") and module)
    try:
        import fastres.serving.deployment  # noqa: F401
        deployment = "imported"
    except ImportError as exc:
        deployment = str(exc)
    print(json.dumps({
        "images": request.images.tolist(), "layout": request.layout, "response": json.loads(payload),
        "ray_modules": ray_modules, "deployment": deployment,
    }))
    """
)


def test_config_and_protocol_import_and_work_without_ray():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, json.dumps(images.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ray_modules"] == []
    assert np.array_equal(np.array(report["images"]), images) and report["layout"] == "NHWC"
    response = report["response"]
    assert response["model_name"] == "birds-v2"
    assert response["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": list(range(6))}
    ]
    assert "pip install 'fastres[serve]'" in report["deployment"]
