"""Triton's gRPC client against our server: run by tests/serve/test_grpc_v2.py in .venv-tritonclient
(scripts/tritonclient_env.sh), as a subprocess, since tritonclient[grpc] wants a protobuf that .venv cannot have.

    python _triton_grpc_client.py HOST:PORT MODEL PIXELS_MODEL IN.npz OUT.npz

IN.npz holds ``pixels`` (uint8 [N, 28, 28]) and ``input`` (float32 [N, 784], normalised). The client
checks nothing itself: it records what the server answered and writes it to OUT.npz (the logits of each
infer, under ``{input}-{batch}``) and to stdout as one JSON object (health, metadata, the error cases'
status codes), for the test to judge.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _status(call) -> dict:
    """What a call that should fail got: its gRPC status (e.g. StatusCode.NOT_FOUND) and message."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": "OK", "message": ""}


def _infer(client, model: str, name: str, array: np.ndarray, class_count: int = 0, **kwargs):
    datatype = "UINT8" if array.dtype == np.uint8 else "FP32"
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    outputs = [grpcclient.InferRequestedOutput("logits", class_count=class_count),
               grpcclient.InferRequestedOutput("probabilities")]
    return client.infer(model, [tensor], outputs=outputs, **kwargs)


def _metadata(client, model: str) -> dict:
    meta = client.get_model_metadata(model, as_json=True)
    return {"name": meta["name"], "versions": meta.get("versions", []),
            "inputs": {t["name"]: [t["datatype"], [int(d) for d in t["shape"]]] for t in meta["inputs"]},
            "outputs": {t["name"]: [t["datatype"], [int(d) for d in t["shape"]]] for t in meta["outputs"]}}


def main(url: str, model: str, pixels_model: str, inputs: str, out: str) -> None:
    data = np.load(inputs)
    client = grpcclient.InferenceServerClient(url=url)
    report = {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "model_ready": [client.is_model_ready(model), client.is_model_ready(model, "1"),
                        client.is_model_ready(pixels_model)],
        "server": client.get_server_metadata(as_json=True),
        "metadata": {m: _metadata(client, m) for m in dict.fromkeys((model, pixels_model))},
    }
    results = {}
    for batch in (1, 64):
        for name, m in (("input", model), ("pixels", pixels_model)):
            result = _infer(client, m, name, data[name][:batch], request_id=f"{name}-{batch}")
            response = result.get_response(as_json=True)
            report[f"{name}-{batch}"] = {"id": response.get("id", ""), "model_name": response["model_name"]}
            results[f"{name}-{batch}"] = result.as_numpy("logits")
            results[f"{name}-{batch}-probabilities"] = result.as_numpy("probabilities")
    pixels = data["pixels"][:1]
    report["errors"] = {
        "unknown model": _status(lambda: _infer(client, "no-such-model", "pixels", pixels)),
        "unknown version": _status(lambda: _infer(client, pixels_model, "pixels", pixels, model_version="7")),
        "model ready, unknown model": _status(lambda: client.is_model_ready("no-such-model")),
        "metadata, unknown model": _status(lambda: client.get_model_metadata("no-such-model")),
        "wrong datatype": _status(lambda: _infer(client, pixels_model, "pixels", pixels.astype(np.float32))),
        "unknown input": _status(lambda: _infer(client, pixels_model, "image", pixels)),
        "not 28x28": _status(lambda: _infer(client, pixels_model, "pixels", pixels[:, :14])),
        "FP32 out of range": _status(lambda: _infer(client, model, "input", np.full((1, 784), 3e38, np.float32))),
        "over the size limit": _status(lambda: _infer(client, pixels_model, "pixels",
                                                      np.zeros((2048, 28, 28), np.uint8))),
        "Triton-only method": _status(lambda: client.get_inference_statistics(model)),
        "classification (class_count)": _status(lambda: _infer(client, pixels_model, "pixels", pixels, class_count=3)),
    }
    np.savez(out, **results)
    client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
