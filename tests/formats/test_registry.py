"""The registry is the one place a runtime lives: a toy format registered here, inside the test (a NumPy
implementation of the MLP, saved as .npz plus a .json of its layer names), goes through export with its
parity gate, verify, bench, predict and serve with no other edit anywhere."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mnist_deploy import formats
from mnist_deploy.artifacts.files import sha256_file
from mnist_deploy.artifacts.manifest import load_manifest, verified_path
from mnist_deploy.errors import IntegrityError
from mnist_deploy.formats import Format, ParitySpec, Predictor, option

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class ToyOptions:
    toy_dtype: str = option("float32", "numpy-mlp: the dtype the weights are stored in.",
                            choices=("float32", "float64"))


class NumpyMLP(Predictor):
    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.layers = layers
        self.runtime = "numpy"
        self.details = {"precision": str(layers[0][0].dtype)}

    def prepare(self, x):
        return np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)

    def run(self, x):
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x

    def finish(self, out):
        return np.asarray(out, dtype=np.float32)


def _export_npz(model, path: Path, options: ToyOptions, ctx) -> None:
    state = {k: v.detach().numpy().astype(options.toy_dtype) for k, v in model.state_dict().items()}
    with open(path, "wb") as fh:
        np.savez(fh, **state)
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    path.with_suffix(".json").write_text(json.dumps({"layers": names, **ctx.metadata}))


def _load_npz(path: Path, *, device: str, threads, manifest: dict) -> Predictor:
    layers = json.loads(path.with_suffix(".json").read_text())["layers"]
    with np.load(path) as z:
        return NumpyMLP([(z[f"{n}.weight"], z[f"{n}.bias"]) for n in layers])


TOY = Format("numpy-mlp", "numpy", "the MLP in NumPy (a test's toy format)",
             files=("mnist_model_numpy.npz", "mnist_model_numpy.json"), load=_load_npz, export=_export_npz,
             options=ToyOptions, parity=ParitySpec("logits", atol=1e-4), devices=("cpu",), packages=("numpy",))


@pytest.fixture
def toy():
    with formats.registered(TOY) as fmt:
        yield fmt


@pytest.fixture
def folder(trained_mlp, tmp_path):
    dst = tmp_path / "artifacts"
    shutil.copytree(trained_mlp, dst)
    return dst


def _data(mnist_dir, cache_dir):
    return {"data_dir": mnist_dir, "cache_dir": cache_dir, "allow_download": False}


def _digit_png(mnist_dir, cache_dir, path: Path) -> int:
    from PIL import Image

    from mnist_deploy.data.mnist import MEAN, STD, load_splits

    splits, _ = load_splits(mnist_dir, cache_dir=cache_dir, allow_download=False)
    x = splits["test"].images[0].numpy().reshape(28, 28)
    pixels = np.clip(np.rint((x * STD + MEAN) * 255), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return int(splits["test"].labels[0])


def test_toy_format_flows_through_every_stage(toy, folder, tmp_path, mnist_dir, cache_dir):
    from starlette.testclient import TestClient

    from mnist_deploy.bench.run import run_bench
    from mnist_deploy.export.run import export_artifacts, verify_artifacts
    from mnist_deploy.predict import predict_files
    from mnist_deploy.serve import create_app

    # export, with the parity gate, and every file recorded with its sha256
    report = export_artifacts(artifacts=folder, formats=["numpy-mlp"], toy_dtype="float32", **_data(mnist_dir, cache_dir))
    assert report.ok, [r.error for r in report.failures]
    entry = load_manifest(folder)["artifacts"]["numpy-mlp"]
    assert entry["status"] == "ok" and entry["parity"]["passed"] is True and entry["parity"]["max_abs_diff"] < 1e-4
    assert entry["options"] == {"toy_dtype": "float32"}
    assert [f["path"] for f in entry["files"]] == list(TOY.files)
    assert all(f["sha256"] == sha256_file(folder / f["path"]) for f in entry["files"])
    assert entry["parity"]["applied"] == {"precision": "float32"}

    # verify
    verified = verify_artifacts(artifacts=folder, **_data(mnist_dir, cache_dir))
    item = next(i for i in verified.items if i.key == "numpy-mlp")
    assert verified.ok and "parity" in item.checks and "loads in numpy" in item.checks

    # bench, by runtime name and by format name
    result = run_bench(artifacts=folder, runtimes="numpy", batch_sizes="1,8", device="cpu", threads=1, warmup=1,
                       min_time=0.005, min_calls=3, peak_sizes=(128,), **_data(mnist_dir, cache_dir))
    rows = [r for r in result["records"] if r["runtime"] == "numpy"]
    assert [(r["status"], r["batch_size"]) for r in rows] == [("ok", 1), ("ok", 8)]
    assert rows[0]["accuracy"] == pytest.approx(load_manifest(folder)["metrics"]["accuracy"], abs=1e-9)
    assert result["environment"]["numpy"]  # its package version is recorded

    # predict
    label = _digit_png(mnist_dir, cache_dir, tmp_path / "digit.png")
    (record,) = predict_files([tmp_path / "digit.png"], artifacts=folder, runtime="numpy-mlp")
    assert record["digit"] == label and record["runtime"] == "numpy-mlp"

    # serve
    app = create_app(artifacts=folder, runtime="numpy-mlp", threads=1)
    with TestClient(app) as client:
        from PIL import Image

        pixels = np.asarray(Image.open(tmp_path / "digit.png"), dtype=np.float64).ravel().tolist()
        response = client.post("/predict", json={"pixels": pixels})
        assert response.status_code == 200, response.text
        assert response.json()["digit"] == label


def test_toy_parity_failure_and_a_tampered_second_file(toy, folder, mnist_dir, cache_dir):
    from mnist_deploy.export.run import export_artifacts

    def wrong(model, path, options, ctx):
        _export_npz(model, path, options, ctx)
        with np.load(path) as z:
            state = {k: z[k] for k in z.files}
        state["fc3.bias"] = state["fc3.bias"] + 0.01
        with open(path, "wb") as fh:
            np.savez(fh, **state)

    formats.register(dataclasses.replace(TOY, export=wrong), replace=True)
    try:
        report = export_artifacts(artifacts=folder, formats=["numpy-mlp"], **_data(mnist_dir, cache_dir))
    finally:
        formats.register(TOY, replace=True)
    assert not report.ok and "exceeds atol 0.0001" in report.failures[0].error
    assert load_manifest(folder)["artifacts"]["numpy-mlp"]["status"] == "failed"
    assert not any((folder / f).exists() for f in TOY.files)

    assert export_artifacts(artifacts=folder, formats=["numpy-mlp"], **_data(mnist_dir, cache_dir)).ok
    side = folder / TOY.files[1]
    side.write_text(side.read_text().replace("fc1", "fc2", 1))  # the second file changes: refused
    with pytest.raises(IntegrityError, match="mnist_model_numpy.json: sha256"):
        verified_path(folder, "numpy-mlp")


def test_registry_entries_carry_everything():
    assert "numpy-mlp" not in formats.FORMATS  # the toy left with its test
    for fmt in formats.FORMATS.values():
        assert fmt.load is not None and fmt.runtime and fmt.devices and fmt.packages
        assert fmt.exportable == bool(fmt.files)
        formats.validate_options(fmt.default_options())
    assert formats.option_types()["opset"].default == formats.DEFAULT_OPSET


def test_a_cold_start_note_comes_from_the_entry(folder, mnist_dir, cache_dir):
    # What a cold start includes is the entry's to say (torch.compile's compilation); bench only asks.
    from mnist_deploy.bench.run import run_bench
    from mnist_deploy.export.run import export_artifacts

    calls = []

    def cold_start():
        calls.append("after load")
        return lambda: calls.append("after the first call") or "cold start includes a toy warm-up"

    with formats.registered(dataclasses.replace(TOY, cold_start=cold_start, roofline=False)):
        assert export_artifacts(artifacts=folder, formats=["numpy-mlp"], parity_images=500,
                                **_data(mnist_dir, cache_dir)).ok
        result = run_bench(artifacts=folder, runtimes="numpy", batch_sizes="1,2",
                           device="cpu", warmup=1, min_time=0.005, min_calls=3, peak_sizes=(64,), threads=1,
                           **_data(mnist_dir, cache_dir))
    rows = [r for r in result["records"] if r["runtime"] == "numpy"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["reason"] == "cold start includes a toy warm-up" for r in rows)
    assert calls == ["after load", "after the first call"]
    assert formats.FORMATS["torch.compile"].cold_start is not None and formats.FORMATS["onnx"].cold_start is None
