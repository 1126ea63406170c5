"""data: IDX parsing and verification (synthetic files), layouts, cache, download failure, real MNIST."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from mnist_deploy.cli import cli
from mnist_deploy.data import mnist as data
from mnist_deploy.data.cache_check import tensor_digest
from mnist_deploy.errors import DataError


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_parse_idx_round_trip():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(data.parse_idx(_idx(arr)), arr)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b"\x00\x00\x09" + b[3:], "bad IDX magic"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:2], "too short"),
    ],
)
def test_parse_idx_rejects_bad_files(mutate, message):
    raw = _idx(np.zeros((2, 3, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=message):
        data.parse_idx(mutate(raw), "x")


def test_normalize_matches_origin_transform():
    img = np.array([[0, 255], [128, 1]], dtype=np.uint8)[None]
    expected = ((img.astype(np.float64) / 255 - 0.1307) / 0.3081).reshape(1, 4)
    np.testing.assert_allclose(data.normalize(img), expected, rtol=1e-6)
    assert data.normalize(img).dtype == np.float32


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DEPLOY_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "opt") == tmp_path / "opt"
    assert data.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("MNIST_DEPLOY_DATA")
    assert str(data.resolve_data_dir(None)) == "data"


def _link_real(mnist_dir, dst, *, raw_layout=False, skip=()):
    folder = dst / "MNIST" / "raw" if raw_layout else dst
    folder.mkdir(parents=True, exist_ok=True)
    for key in data.FILES:
        if key in skip:
            continue
        src = data.find_file(mnist_dir, key)
        (folder / src.name).symlink_to(src.resolve())
    return dst


@pytest.mark.integration
@pytest.mark.parametrize("raw_layout", [False, True])
def test_real_mnist_both_layouts(mnist_dir, tmp_path, raw_layout):
    root = _link_real(mnist_dir, tmp_path, raw_layout=raw_layout)
    info = data.summary(root, allow_download=False)
    assert info["splits"]["train"]["count"] == 60000
    assert info["splits"]["test"]["count"] == 10000
    assert info["splits"]["test"]["per_class"]["1"] == 1135
    assert sum(info["splits"]["train"]["per_class"].values()) == 60000


@pytest.mark.integration
def test_uncompressed_files_accepted(mnist_dir, tmp_path):
    root = _link_real(mnist_dir, tmp_path, skip=("test-labels",))
    src = data.find_file(mnist_dir, "test-labels")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(src.read_bytes()))
    arr, md5 = data.load_verified(tmp_path / "t10k-labels-idx1-ubyte", "test-labels")
    assert arr.shape == (10000,) and md5 == data.FILES["test-labels"].md5
    info = data.summary(root, allow_download=False)  # three .gz files and one raw file together
    assert info["files"]["t10k-labels-idx1-ubyte"]["path"].endswith("t10k-labels-idx1-ubyte")


@pytest.mark.integration
def test_tampered_and_truncated_files_are_named(mnist_dir, tmp_path):
    raw = bytearray(gzip.decompress(data.find_file(mnist_dir, "test-labels").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: MD5 .* is not MNIST's"):
        data.load_verified(bad, "test-labels")
    bad.write_bytes(bytes(raw[:5000]))
    with pytest.raises(DataError, match="truncated"):
        data.load_verified(bad, "test-labels")
    gz = tmp_path / "x" / "t10k-labels-idx1-ubyte.gz"
    gz.parent.mkdir()
    gz.write_bytes(data.find_file(mnist_dir, "test-labels").read_bytes()[:300])
    with pytest.raises(DataError, match="cannot be read"):
        data.load_verified(gz, "test-labels")


@pytest.mark.integration
def test_cli_data_reports_broken_file_with_exit_2(mnist_dir, tmp_path):
    root = _link_real(mnist_dir, tmp_path, skip=("train-labels",))
    raw = bytearray(gzip.decompress(data.find_file(mnist_dir, "train-labels").read_bytes()))
    raw[9] ^= 1
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    res = CliRunner().invoke(cli, ["data", "--data-dir", str(root), "--no-download"])
    assert res.exit_code == 2
    assert "train-labels-idx1-ubyte: MD5" in res.output
    assert "Traceback" not in res.output


def test_cli_data_missing_files_no_download(tmp_path):
    res = CliRunner().invoke(cli, ["data", "--data-dir", str(tmp_path), "--no-download"])
    assert res.exit_code == 2
    assert "missing train-images-idx3-ubyte" in res.output and "--data-dir" in res.output


def test_download_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    # A closed loopback port: refused at once, as an offline machine would be.
    monkeypatch.setattr(data, "MIRROR", "https://127.0.0.1:9/mnist/")
    res = CliRunner().invoke(cli, ["data", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "cannot download" in res.output and "--data-dir" in res.output
    assert not any(tmp_path.rglob("*.gz")), "nothing half-written"


@pytest.mark.integration
def test_cache_is_used_and_rebuilt_when_stale(mnist_dir, tmp_path):
    import torch

    splits, md5 = data.load_splits(mnist_dir, cache_dir=tmp_path, allow_download=False)
    cache = tmp_path / "mnist_test_processed.pth"
    assert cache.is_file() and (tmp_path / "mnist_train_processed.pth").is_file()
    obj = torch.load(cache, weights_only=True)
    assert obj["source_md5"]["images"] == md5["test-images"]
    # A cache keyed by other source files is stale: it must be rebuilt, not trusted.
    obj["source_md5"]["images"] = "0" * 32
    obj["source_stamp"]["images"] = ["/elsewhere/t10k-images-idx3-ubyte", 0, 0, 0, 0, 0]
    obj["images"] = torch.zeros_like(obj["images"])
    torch.save(obj, cache)
    again, _ = data.load_splits(mnist_dir, cache_dir=tmp_path, allow_download=False)
    torch.testing.assert_close(again["test"].images, splits["test"].images)
    assert torch.load(cache, weights_only=True)["source_md5"]["images"] == md5["test-images"]
    img0 = data.load_raw(mnist_dir, allow_download=False).arrays["test-images"][0]
    np.testing.assert_allclose(splits["test"].images[0].numpy(), data.normalize(img0[None])[0])


@pytest.mark.integration
def test_cache_skips_verification_only_for_unchanged_sources(mnist_dir, tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "mnist"
    shutil.copytree(mnist_dir, src, ignore=shutil.ignore_patterns("README*"))
    cache = tmp_path / "cache"
    first, md5 = data.load_splits(src, cache_dir=cache, allow_download=False)
    calls = []
    real_load_raw = data.load_raw
    monkeypatch.setattr(data, "load_raw", lambda *a, **k: calls.append(1) or real_load_raw(*a, **k))
    again, md5_again = data.load_splits(src, cache_dir=cache, allow_download=False)
    assert calls == [] and md5_again == md5  # unchanged files: the stamped cache, no re-read
    assert torch_equal(again["train"].images, first["train"].images)
    # Touching a file (even back to its old mtime) moves its ctime: verified again, then re-stamped.
    labels = next(src.glob("t10k-labels*"))
    st = labels.stat()
    train_cache = (cache / "mnist_train_processed.pth").stat()
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
    data.load_splits(src, cache_dir=cache, allow_download=False)
    assert calls == [1]
    assert (cache / "mnist_train_processed.pth").stat().st_ino == train_cache.st_ino  # its files did not change
    data.load_splits(src, cache_dir=cache, allow_download=False)
    assert calls == [1]
    # A tampered source fails loudly although the cache is warm.
    raw = bytearray(gzip.decompress(labels.read_bytes()) if labels.suffix == ".gz" else labels.read_bytes())
    raw[-1] = (raw[-1] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(raw)) if labels.suffix == ".gz" else bytes(raw))
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old mtime
    with pytest.raises(data.DataError, match="MD5"):
        data.load_splits(src, cache_dir=cache, allow_download=False)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.integration
def test_preview_png(mnist_dir, tmp_path):
    out = tmp_path / "preview.png"
    res = CliRunner().invoke(cli, ["data", "--data-dir", str(mnist_dir), "--no-download", "--preview", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test  " in res.output and "10000 images" in res.output


@pytest.mark.integration
def test_download_fetches_verifies_and_keeps_torchvision_layout(mnist_dir, tmp_path, mirror):
    for key in data.FILES:
        src = data.find_file(mnist_dir, key)
        (mirror / f"{data.FILES[key].name}.gz").symlink_to(src.resolve())
    dest = tmp_path / "data"
    _link_real(mnist_dir, dest, skip=("test-labels", "test-images"))  # two present, two to fetch
    info = data.summary(dest, allow_download=True)
    assert info["splits"]["test"]["count"] == 10000
    fetched = sorted(p.name for p in (dest / "MNIST" / "raw").iterdir())
    assert fetched == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.mark.integration
def test_download_of_wrong_bytes_is_not_saved(mnist_dir, tmp_path, mirror):
    raw = bytearray(gzip.decompress(data.find_file(mnist_dir, "test-labels").read_bytes()))
    raw[50] ^= 1
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    dest = tmp_path / "data"
    _link_real(mnist_dir, dest, skip=("test-labels",))
    with pytest.raises(DataError, match="downloaded data has MD5"):
        data.load_raw(dest, allow_download=True)
    assert not (dest / "MNIST").exists() or not any((dest / "MNIST").rglob("*"))


# ---------------------------------------------------------------------------------------------
# Hostile IDX headers and gzip bombs: one DataError naming the file, bounded memory.


@pytest.mark.parametrize(
    "raw, message",
    [
        # 2**31 * 2**31 * 4 == 2**64: numpy's int64 product wrapped to 0, so 16 bytes "matched" the header.
        (struct.pack(">HBB3I", 0, 8, 3, 2**31, 2**31, 4), "needs 18446744073709551632 bytes"),
        (struct.pack(">HBB3I", 0, 8, 3, 2**32 - 1, 2**32 - 1, 2**32 - 1), "truncated"),
        # 255 dimensions of size 1 and one pixel: the sizes agree, numpy cannot make a 255-d array.
        (struct.pack(">HBB", 0, 8, 255) + struct.pack(">255I", *[1] * 255) + b"\x00", "255 dimensions"),
    ],
)
def test_parse_idx_hostile_headers(raw, message):
    with pytest.raises(DataError, match=message):
        data.parse_idx(raw, "x")


def _bomb(path, gib: int) -> None:
    """A gzip of ``gib`` GiB of zeros, as concatenated members (``gzip`` reads them all), ~1 MB per GiB."""
    member = gzip.compress(bytes(1 << 26), compresslevel=9)  # 64 MiB of zeros -> ~65 KB
    with open(path, "wb") as fh:
        for _ in range(16 * gib):
            fh.write(member)


# Runs the command under a small launcher so that the peak RSS is the command's own: a child forked
# from pytest starts with pytest's resident pages, and ru_maxrss keeps that peak across exec.
_LAUNCHER = """
import resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails the test, not the machine
r = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, timeout=float(sys.argv[1]))
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _run_measured(args, timeout=120):
    """Run ``args``; return (exit code, stderr, peak RSS in MB of that command)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LAUNCHER, str(timeout), *args], capture_output=True, text=True,
                       timeout=timeout + 30)
    code, rss_kb = (int(v) for v in r.stdout.split())
    return code, r.stderr, rss_kb / 1024


@pytest.mark.integration
def test_gzip_bomb_is_refused_in_bounded_memory(mnist_dir, tmp_path):
    import sys

    root = _link_real(mnist_dir, tmp_path / "data", skip=("train-images",))
    bomb = root / "train-images-idx3-ubyte.gz"
    _bomb(bomb, 1)
    assert bomb.stat().st_size < 2_000_000
    code, err, peak_mb = _run_measured([sys.executable, "-m", "mnist_deploy", "data", "--data-dir", str(root),
                                        "--no-download"])
    assert peak_mb < 500, f"peak RSS {peak_mb:.0f} MB while refusing a 1 GiB gzip bomb"  # about 90 MB
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{bomb}: inflates to more than the 47,040,016 bytes" in err


@pytest.mark.integration
@pytest.mark.parametrize("gz", [False, True])
def test_cli_data_hostile_header_is_one_line(mnist_dir, tmp_path, gz):
    root = _link_real(mnist_dir, tmp_path / "data", skip=("test-labels",))
    raw = struct.pack(">HBB", 0, 8, 255) + struct.pack(">255I", *[1] * 255) + b"\x00"
    bad = root / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(gzip.compress(raw) if gz else raw)
    res = CliRunner().invoke(cli, ["data", "--data-dir", str(root), "--no-download"])
    assert res.exit_code == 2, res.output
    assert f"{bad}: IDX header claims 255 dimensions" in res.output
    assert "Traceback" not in res.output


def test_download_bomb_is_not_inflated(tmp_path, mirror):
    _bomb(mirror / "t10k-labels-idx1-ubyte.gz", 1)
    with pytest.raises(DataError, match="downloaded file: inflates to more than the 10,008 bytes"):
        data.download(tmp_path / "data", ["test-labels"], progress=False)
    assert not (tmp_path / "data").exists()


def test_download_larger_than_any_mnist_file_is_cut_off(tmp_path, mirror):
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\0" * (2 << 20))  # 2 MiB where 4.5 KB belong
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: 2,097,152 bytes announced, more than 1,058,584"):
        data.download(tmp_path / "data", ["test-labels"], progress=False)
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------
# Issue 18, item 4: a tampered or malformed preprocessed cache was trusted while the sources' stamps held.


@pytest.fixture(scope="module")
def good_cache(mnist_dir, tmp_path_factory):
    """A cache built once from the real files; each test takes its own copy (see ``own_cache``)."""
    folder = tmp_path_factory.mktemp("good-cache")
    splits, _ = data.load_splits(mnist_dir, cache_dir=folder, allow_download=False)
    return folder, {k: (v.images.clone(), v.labels.clone()) for k, v in splits.items()}


@pytest.fixture
def own_cache(good_cache, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    for f in good_cache[0].iterdir():
        os.link(f, folder / f.name)  # a rebuild replaces the file (a new inode): the original stays good
    return folder


def _rewrite(path, *, fix_digest: bool, **change):
    """Rewrite a cache entry with some of its values changed, keeping the source MD5s and stamps (so the
    stamps still say "unchanged"); ``fix_digest`` also stores the digest of the new tensors, as a careful
    attacker would."""
    import torch

    obj = dict(torch.load(path, weights_only=True))
    obj.update(change)
    if fix_digest:
        obj["digest"] = tensor_digest(obj["images"], obj["labels"])
    path.unlink()
    torch.save(obj, path)


def _swap_label(labels, a=7, b=1):
    out = labels.clone()
    out[out == a] = b
    return out


@pytest.mark.integration
def test_swapped_labels_in_the_cache_are_caught_and_rebuilt(mnist_dir, good_cache, own_cache, caplog):
    # The attack: every 7 in the cached train and test labels made a 1. train exited 0 at 96.65% with a
    # model that never predicts 7, while the manifest recorded MNIST's canonical MD5s.
    _, clean = good_cache
    for split in ("train", "test"):
        path = own_cache / f"mnist_{split}_processed.pth"
        _rewrite(path, fix_digest=False, labels=_swap_label(clean[split][1]))
    with caplog.at_level("WARNING", logger="mnist_deploy.data.mnist"):
        splits, _ = data.load_splits(mnist_dir, cache_dir=own_cache, allow_download=False)
    for split in ("train", "test"):
        assert torch_equal(splits[split].labels, clean[split][1])
        assert int((splits[split].labels == 7).sum()) > 1000
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("do not match the sha256 stored with them" in w for w in warned), warned
    assert all("rebuilding it from the verified MNIST files" in w for w in warned)
    caplog.clear()
    again, _ = data.load_splits(mnist_dir, cache_dir=own_cache, allow_download=False)  # rebuilt: warm, quiet
    assert torch_equal(again["test"].labels, clean["test"][1]) and not caplog.records


@pytest.mark.integration
@pytest.mark.parametrize("change, message", [
    (lambda x, y: {"labels": _swap_label(y)}, "its labels differ from"),  # digest recomputed: the source tells
    (lambda x, y: {"images": x[:10].clone(), "labels": y[:10].clone()}, "not float32 (10000, 784)"),
    (lambda x, y: {"images": _with(x, (5, 300), float("nan"))}, "outside the normalised 0..255"),
    (lambda x, y: {"images": _with(x, (5, 300), float("inf"))}, "outside the normalised 0..255"),
    (lambda x, y: {"images": _with(x, (5, 300), 40.0)}, "outside the normalised 0..255"),
    (lambda x, y: {"labels": _with(y, (3,), 10)}, "labels range over 0..10"),
    (lambda x, y: {"labels": _with(y, (3,), -1)}, "labels range over -1..9"),
    (lambda x, y: {"labels": y.double()}, "not int64 (10000,)"),
    (lambda x, y: {"images": x.reshape(-1, 28, 28)[:, :27, :27].reshape(-1, 729).clone()}, "not float32"),
    (lambda x, y: {"labels": y[:-1].clone()}, "not int64 (10000,)"),
    (lambda x, y: {"images": x.double()}, "not float32"),
], ids=["swapped-labels-with-digest", "ten-rows", "nan-pixel", "inf-pixel", "pixel-out-of-range",
        "label-10", "label-minus-1", "float-labels", "27x27", "lengths-differ", "float64-images"])
def test_a_malformed_cache_is_rebuilt_with_a_warning(mnist_dir, good_cache, own_cache, caplog, change, message):
    _, clean = good_cache
    path = own_cache / "mnist_test_processed.pth"
    x, y = clean["test"]
    _rewrite(path, fix_digest=True, **change(x, y))
    with caplog.at_level("WARNING", logger="mnist_deploy.data.mnist"):
        splits, _ = data.load_splits(mnist_dir, cache_dir=own_cache, allow_download=False)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and message in warned[0] and "mnist_test_processed.pth" in warned[0], warned
    assert torch_equal(splits["test"].images, x) and torch_equal(splits["test"].labels, y)


def _with(t, index, value):
    out = t.clone()
    out[index] = value
    return out


@pytest.mark.integration
def test_an_unreadable_cache_is_rebuilt_with_a_warning(mnist_dir, good_cache, own_cache, caplog):
    path = own_cache / "mnist_test_processed.pth"
    blob = path.read_bytes()
    path.unlink()
    path.write_bytes(blob[: len(blob) // 2])
    with caplog.at_level("WARNING", logger="mnist_deploy.data.mnist"):
        splits, _ = data.load_splits(mnist_dir, cache_dir=own_cache, allow_download=False)
    assert torch_equal(splits["test"].labels, good_cache[1]["test"][1])
    assert len(caplog.records) == 1 and "unreadable" in caplog.records[0].getMessage()


@pytest.mark.integration
def test_a_cache_edited_in_place_with_its_mtime_reset_is_rebuilt(mnist_dir, good_cache, own_cache, caplog):
    # The warm path skips re-hashing only while the file's stat stamp is the one recorded when it was
    # hashed; an edit in place (size and mtime kept) still moves its ctime.
    path = own_cache / "mnist_train_processed.pth"
    data.load_splits(mnist_dir, cache_dir=own_cache, allow_download=False)  # re-recorded for this copy
    path.unlink()
    path.write_bytes((good_cache[0] / path.name).read_bytes())  # its own inode, not the shared one
    data.load_splits(mnist_dir, cache_dir=own_cache, allow_download=False)
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))  # the lowest mantissa bit of one pixel: still in range
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level("WARNING", logger="mnist_deploy.data.mnist"):
        splits, _ = data.load_splits(mnist_dir, cache_dir=own_cache, allow_download=False)
    warned = [r.getMessage() for r in caplog.records]
    # Caught by the digest, or by the range check first when the flip pushed a pixel past 0 or 255.
    assert len(warned) == 1 and ("do not match the sha256" in warned[0] or "outside" in warned[0]), warned
    assert torch_equal(splits["train"].images, good_cache[1]["train"][0])
