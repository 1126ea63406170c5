"""predict: the MNIST-style preprocessing of real images, model loading by manifest, files and the CLI."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from _serving import mnist_test_digits, png_bytes
from _tolerance import PROBABILITIES_ATOL
from click.testing import CliRunner
from PIL import Image, ImageDraw

from mnist_deploy.cli import PREDICT_RUNTIMES, cli
from mnist_deploy.data.images import mnist_image, pixels_to_array, preprocess_image
from mnist_deploy.data.mnist import normalize
from mnist_deploy.errors import InputError, IntegrityError, ManifestError, RuntimeUnavailable
from mnist_deploy.formats import format_names
from mnist_deploy.predict import expand_inputs, load_model, predict_files, top_k


def _drawn_seven(size=(300, 220), ink=0, paper=255, width=14) -> Image.Image:
    """A large "7" drawn off-centre, as a person would on paper (dark ink on white by default)."""
    img = Image.new("L", size, paper)
    d = ImageDraw.Draw(img)
    d.line([(60, 60), (170, 60), (110, 250)], fill=ink, width=width, joint="curve")
    return img


def _centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    return float((a * ys).sum() / a.sum()), float((a * xs).sum() / a.sum())


# ---------------------------------------------------------------------------------------------
# Preprocessing, against the real MNIST test set.


@pytest.mark.integration
def test_mnist_png_round_trip_predicts_like_the_tensor(mnist_dir, model):
    """A test image saved as PNG and read back through the preprocessing predicts as the tensor does."""
    images, labels = mnist_test_digits(mnist_dir, 500)
    from_tensor = model.probabilities(normalize(images)).argmax(1)
    from_png = np.stack([mnist_image(png_bytes(a)) for a in images])
    # MNIST images are (almost) fixed points of the procedure that made them.
    assert np.abs(from_png - images).max() <= 1.0
    x = np.concatenate([preprocess_image(png_bytes(a)) for a in images])
    assert np.array_equal(model.probabilities(x).argmax(1), from_tensor)
    assert (from_tensor == labels).mean() > 0.95


@pytest.mark.integration
def test_black_on_white_and_white_on_black_predict_the_same(mnist_dir, model):
    images, _ = mnist_test_digits(mnist_dir, 200)
    for a in images:
        assert np.array_equal(mnist_image(png_bytes(a)), mnist_image(png_bytes(255 - a)))
    seven_dark = _drawn_seven()
    seven_light = Image.eval(seven_dark, lambda v: 255 - v)
    a, b = mnist_image(seven_dark), mnist_image(seven_light)
    np.testing.assert_array_equal(a, b)
    p = model.probabilities(np.concatenate([preprocess_image(seven_dark), preprocess_image(seven_light)]))
    assert p.argmax(1).tolist() == [7, 7]


@pytest.mark.integration
def test_noisy_jpeg_photos_of_digits_are_recognised(mnist_dir, model):
    """Dark ink on grey noisy paper, enlarged, off-centre, JPEG-compressed: still read as the digit."""
    images, labels = mnist_test_digits(mnist_dir, 100)
    rng = np.random.default_rng(0)
    rows = []
    for a in images:
        big = np.asarray(Image.fromarray(a).resize((168, 168), Image.Resampling.BICUBIC), dtype=np.float32)
        canvas = np.zeros((300, 240), np.float32)
        canvas[40:208, 50:218] = big
        photo = np.clip(210 - canvas * (160 / 255) + rng.normal(0, 8, canvas.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(photo).convert("RGB").save(buf, "JPEG", quality=80)
        rows.append(preprocess_image(buf.getvalue()))
    predicted = model.probabilities(np.concatenate(rows)).argmax(1)
    assert (predicted == labels).mean() >= 0.85


def test_digit_is_scaled_to_20px_keeping_aspect_and_centred_by_mass():
    img = Image.new("L", (200, 120), 0)
    ImageDraw.Draw(img).rectangle([150, 10, 159, 89], fill=255)  # 10 wide, 80 tall, near the right edge
    out = mnist_image(img)
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert rows[-1] - rows[0] + 1 == 20
    assert cols[-1] - cols[0] + 1 in (2, 3, 4)  # 10 * 20 / 80 = 2.5 plus resampling fringe
    cy, cx = _centre_of_mass(out)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert out.max() == pytest.approx(255.0)


def test_transparent_background_drawing_equals_opaque_one():
    opaque = _drawn_seven(ink=255, paper=0)  # white ink on black
    rgba = Image.new("RGBA", opaque.size, (0, 0, 0, 0))
    rgba.putalpha(opaque)  # black ink whose alpha is the stroke, on a clear background
    np.testing.assert_allclose(mnist_image(png_bytes(np.asarray(rgba))), mnist_image(opaque), atol=1.0)


def test_sixteen_bit_and_palette_images_are_read():
    base = mnist_image(_drawn_seven())
    sixteen = Image.fromarray(np.asarray(_drawn_seven(), dtype=np.uint16) * 257)
    np.testing.assert_allclose(mnist_image(sixteen), base, atol=1.0)
    palette = _drawn_seven().convert("P")
    np.testing.assert_allclose(mnist_image(palette), base, atol=1.0)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): a decompression-bomb probe."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


@pytest.mark.parametrize(
    "data, message",
    [
        (b"hello, not an image", "not an image"),
        (b"", "not an image"),
        (png_bytes(np.full((40, 40), 255, np.uint8)), "no digit found"),
        (png_bytes(np.zeros((40, 40), np.uint8)), "no digit found"),
        (png_bytes(np.eye(64, dtype=np.uint8) * 255)[:-30], "corrupt or truncated"),
        (_png_header_only(100_000, 100_000), "refusing to decode"),
        (_png_header_only(5000, 5000), "refusing to decode"),
    ],
)
def test_bad_images_are_input_errors(data, message):
    with pytest.raises(InputError, match=message):
        mnist_image(data)


def test_pixel_limit_is_configurable():
    data = png_bytes(np.eye(64, dtype=np.uint8) * 255)
    assert mnist_image(data, max_pixels=64 * 64).shape == (28, 28)
    with pytest.raises(InputError, match="64x64 = 4,096 pixels"):
        mnist_image(data, max_pixels=64 * 64 - 1)


@pytest.mark.parametrize(
    "values, message",
    [
        ([0] * 783, "784 values.*got 783"),
        ([0] * 785, "got 785"),
        ([[0] * 28] * 27, r"shape \(27, 28\)"),
        ([0] * 783 + [float("nan")], "finite.*index 783"),
        ([0] * 783 + [float("inf")], "finite"),
        ([0] * 10 + [-1] + [0] * 773, "0..255.*-1 at index 10"),
        ([0] * 783 + [256], "0..255.*256"),
        (["0"] * 784, "numbers.*strings"),
        ([True] * 784, "booleans"),
        ([None] * 784, "numbers"),
        ([[1, 2], [3]], "ragged"),
        ({"a": 1}, "numbers"),
    ],
)
def test_bad_pixels_are_input_errors(values, message):
    with pytest.raises(InputError, match=message):
        pixels_to_array(values)


def test_pixels_accept_flat_square_and_batches():
    flat = np.arange(784) % 256
    assert pixels_to_array(flat.tolist()).shape == (1, 784)
    np.testing.assert_array_equal(pixels_to_array(flat.reshape(28, 28).tolist()), pixels_to_array(flat.tolist()))
    assert pixels_to_array([flat.tolist()] * 3, batch=True).shape == (3, 784)
    assert pixels_to_array([flat.reshape(28, 28).tolist()] * 2, batch=True).shape == (2, 784)
    with pytest.raises(InputError, match="empty"):
        pixels_to_array([], batch=True)
    with pytest.raises(InputError, match="list of images"):
        pixels_to_array(flat.tolist(), batch=True)


def test_top_k_is_sorted_best_first():
    p = np.array([0.05, 0.6, 0.05, 0.3, 0, 0, 0, 0, 0, 0])
    assert [t["digit"] for t in top_k(p, 3)] == [1, 3, 0]


# ---------------------------------------------------------------------------------------------
# Loading models through the manifest.


def test_runtime_choices_mirror_the_registry():
    assert set(PREDICT_RUNTIMES) == set(format_names())


@pytest.mark.integration
def test_eager_pytorch_and_onnx_agree(served, model, mnist_dir):
    images, _ = mnist_test_digits(mnist_dir, 200)
    eager = load_model(artifacts=served, runtime="pytorch")
    x = normalize(images)
    np.testing.assert_allclose(eager.probabilities(x), model.probabilities(x), atol=PROBABILITIES_ATOL)
    assert model.entry["sha256"] and model.predictor.runtime == "onnxruntime"


@pytest.mark.integration
def test_cnn_input_shape_from_the_manifest_is_respected(quick_cnn, mnist_dir):
    cnn = load_model(artifacts=quick_cnn, runtime="pytorch")
    assert cnn.input_shape == (1, 28, 28)
    images, labels = mnist_test_digits(mnist_dir, 100)
    assert (cnn.probabilities(normalize(images)).argmax(1) == labels).mean() > 0.8


def test_cuda_without_a_gpu_is_a_clear_error(served):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeUnavailable, match="cuda"):
        load_model(artifacts=served, runtime="onnx", device="cuda")
    res = CliRunner().invoke(cli, ["predict", str(served / "manifest.json"), "--artifacts", str(served),
                                   "--device", "cuda"])
    assert res.exit_code == 2 and "cuda" in res.stderr and "Traceback" not in res.output


def test_tampered_artifact_is_refused(served, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(served, folder)
    onnx = folder / "mnist_model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_model(artifacts=folder, runtime="onnx")


def test_missing_or_failed_exports_say_what_to_do(served, tmp_path):
    with pytest.raises(ManifestError, match="no 'pt2' artifact.*mnist-deploy export"):
        load_model(artifacts=served, runtime="pt2")
    folder = tmp_path / "art"
    shutil.copytree(served, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["onnx"]["status"] = "failed"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="marked 'failed'"):
        load_model(artifacts=folder, runtime="onnx")
    with pytest.raises(ManifestError, match="no such artifacts folder"):
        load_model(artifacts=tmp_path / "nope")
    with pytest.raises(InputError, match="unknown runtime"):
        load_model(artifacts=served, runtime="tensorflow")


# ---------------------------------------------------------------------------------------------
# Files and the CLI.


@pytest.fixture
def image_dir(tmp_path, mnist_dir):
    images, labels = mnist_test_digits(mnist_dir, 4)
    folder = tmp_path / "digits"
    (folder / "sub").mkdir(parents=True)
    for i, a in enumerate(images[:3]):
        Image.fromarray(a).save(folder / f"{i}_label{labels[i]}.png")
    Image.fromarray(255 - images[3]).save(folder / "sub" / f"3_label{labels[3]}.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"not really a png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder, labels


@pytest.mark.integration
def test_predict_files_reports_per_file_and_keeps_going(served, image_dir):
    folder, labels = image_dir
    records = predict_files([folder], artifacts=served, top=3)
    names = [r["file"].split("/")[-1] for r in records]
    assert names == ["0_label7.png", "1_label2.png", "2_label1.png", "broken.png", "3_label0.jpg"]
    assert "not an image" in records[3]["error"] and "digit" not in records[3]
    ok = [r for r in records if "error" not in r]
    assert [r["digit"] for r in ok] == [int(n.split("label")[1][0]) for n in names if n != "broken.png"]
    for r in ok:
        assert len(r["top_k"]) == 3 and r["top_k"][0]["digit"] == r["digit"]
        assert r["confidence"] == pytest.approx(r["top_k"][0]["probability"])
    assert labels[:4].tolist() == [7, 2, 1, 0]
    assert expand_inputs([folder / "notes.txt"]) == [folder / "notes.txt"]  # named files are always tried


@pytest.mark.integration
def test_cli_predict_prints_one_line_per_file_and_exits_1_on_a_bad_file(served, image_dir):
    folder, _ = image_dir
    res = CliRunner().invoke(cli, ["predict", str(folder / "0_label7.png"), str(folder / "broken.png"),
                                   str(folder / "missing.png"), str(folder / "sub"), "--artifacts", str(served)])
    assert res.exit_code == 1, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[1] == "7" and "top-3:" in lines[0]
    assert lines[1].split()[1] == "0"
    assert "broken.png: not an image" in res.stderr
    assert "missing.png: cannot read" in res.stderr
    assert "2 of 4 file(s) could not be predicted" in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.integration
def test_cli_predict_json_and_runtimes(served, image_dir):
    folder, _ = image_dir
    args = ["predict", str(folder / "0_label7.png"), str(folder / "1_label2.png"), "--artifacts", str(served),
            "--json", "--top-k", "2"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    records = json.loads(res.stdout)
    assert [r["digit"] for r in records] == [7, 2]
    assert all(len(r["top_k"]) == 2 and r["runtime"] == "onnx" for r in records)
    res = CliRunner().invoke(cli, [*args, "--runtime", "pytorch"])
    assert res.exit_code == 0 and [r["digit"] for r in json.loads(res.stdout)] == [7, 2]


def test_cli_predict_bad_options_and_artifacts(tmp_path, served):
    res = CliRunner().invoke(cli, ["predict", "x.png", "--top-k", "11"])
    assert res.exit_code == 2 and "--top-k" in res.output
    res = CliRunner().invoke(cli, ["predict", "x.png", "--runtime", "tflite"])
    assert res.exit_code == 2 and "'tflite' is not one of" in res.output
    img = tmp_path / "d.png"
    Image.new("L", (28, 28), 0).save(img)
    res = CliRunner().invoke(cli, ["predict", str(img), "--artifacts", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no such artifacts folder" in res.stderr and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["predict", str(img), "--artifacts", str(served), "--runtime", "pt2"])
    assert res.exit_code == 2 and "no 'pt2' artifact" in res.stderr
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "empty"), "--artifacts", str(served)])
    assert res.exit_code == 2 and "no image files found" in res.stderr


def test_load_model_threads_leave_torch_global_count_as_found(served):
    import torch

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    loaded = load_model(artifacts=served, runtime="pytorch", threads=wanted)
    assert torch.get_num_threads() == before
    loaded.probabilities(np.zeros((4, 784), dtype=np.float32))
    assert torch.get_num_threads() == before


@pytest.mark.integration
def test_cli_predict_refuses_a_fifo_without_opening_it(served, image_dir, tmp_path):
    # Opening a FIFO blocks until a writer comes: predict hung until killed. In a subprocess with a
    # deadline, so a regression fails instead of hanging the suite.
    import os
    import subprocess
    import sys

    folder, _ = image_dir
    fifo = tmp_path / "digit.png"
    os.mkfifo(fifo)
    os.mkfifo(folder / "sub" / "fifo.png")  # in a folder walk: skipped (not a file), never opened
    out = subprocess.run([sys.executable, "-m", "mnist_deploy", "predict", str(fifo), str(folder / "0_label7.png"),
                          str(folder / "sub"), "--artifacts", str(served)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"{fifo}: a FIFO, not an image file" in out.stderr
    assert len(out.stdout.strip().splitlines()) == 2 and "Traceback" not in out.stderr
