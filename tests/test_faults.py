"""Fault injection: a full disk through a small tmpfs (root only), and train killed at every named
fault point with a good previous set in place, then `mnist-deploy verify` (issue 9)."""

from __future__ import annotations

import errno
import functools
import http.server
import os
import subprocess
import threading
from pathlib import Path

import pytest

from mnist_deploy import data
from mnist_deploy.artifacts import atomic_write_text
from mnist_deploy.errors import DataError


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled to the last block; yields its path. Root only (mount), skipped elsewhere."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, and mounting one needs root")
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {m.stderr.strip() or m.returncode}")
    try:
        (mnt / "old.json").write_text('{"previous": true}\n')
        (mnt / "MNIST").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(full_disk):
    with pytest.raises(OSError) as err:
        atomic_write_text(full_disk / "old.json", '{"new": "' + "x" * 100_000 + '"}')
    assert err.value.errno == errno.ENOSPC
    assert (full_disk / "old.json").read_text() == '{"previous": true}\n'
    assert _leftovers(full_disk) == []


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A real HTTP server on loopback serving a folder as the download mirror."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
    yield root
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_download_onto_a_full_disk_is_one_data_error(full_disk, mirror, mnist_dir):
    (mirror / "t10k-labels-idx1-ubyte.gz").symlink_to(data.find_file(mnist_dir, "test-labels").resolve())
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: cannot save the download \(No space left"):
        data.download(full_disk, ["test-labels"], progress=False)
    assert _leftovers(full_disk) == []


@pytest.mark.integration
def test_cache_on_a_full_disk_costs_only_the_cache(full_disk, mnist_dir):
    splits, _ = data.load_splits(mnist_dir, cache_dir=full_disk, allow_download=False)
    assert len(splits["test"]) == 10000
    assert _leftovers(full_disk) == [] and not list(full_disk.glob("*.pth"))
