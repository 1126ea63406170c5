"""The client side of the framed runner protocol: a model loaded in its own process (the C++ runner,
``native/runner.cpp``; the Node runner, ``js/node_runner.mjs``), driven over its stdin/stdout.

The protocol is documented at the top of both runners: a hello frame after loading, then one framed
request per call (``run`` a float32 batch, ``time`` the runner's own loop over one, ``quit``). One
process per loaded model, so the parity gate's 10,000 batch-1 calls are 10,000 round trips through a
pipe, not 10,000 process starts; the runner times its own calls (``time_calls``), which the bench uses
instead of timing the pipe.
"""

from __future__ import annotations

import json
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..errors import MnistDeployError
from .base import LoadError, Predictor

OP_QUIT, OP_RUN, OP_TIME = 0, 1, 2


class RunnerError(MnistDeployError):
    """A runner process refused a request or died."""

    exit_code = 1


class FramedPredictor(Predictor):
    """A model loaded by a runner process; calls are framed requests over its stdin/stdout.

    A subclass names the runner (``what``, in messages), its error type, and starts it with
    :meth:`_start`. ``time_calls`` has the runner time its own loop (warm-up, then per-call ns until
    ``min_time`` and ``min_calls``), which is what a service in that language would see; the bench
    uses it in place of timing ``run`` from Python.
    """

    what = "the runner"
    error: type[MnistDeployError] = RunnerError
    _proc: subprocess.Popen | None = None

    def _start(self, cmd: list[str], path: Path, env: dict | None = None) -> dict:
        """Start the runner on ``path``; return its hello info, or raise :class:`LoadError` in one line."""
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      env=env)
        try:
            status, text = self._read_status()
        except self.error as exc:
            self.close()
            raise LoadError(f"{path}: {self.what} cannot load it ({exc})") from None
        if status != 0:
            self.close()
            raise LoadError(f"{path}: {self.what} cannot load it ({text})")
        return json.loads(text)

    # -- framing
    def _died(self) -> MnistDeployError:
        code = self._proc.poll() if self._proc is not None else None
        return self.error(f"{self.what} died (exit {code}): {self._stderr_tail()}")

    def _read(self, n: int) -> bytes:
        data = self._proc.stdout.read(n) if n else b""
        if len(data) != n:
            raise self._died()
        return data

    def _read_status(self) -> tuple[int, str]:
        status, n = struct.unpack("<II", self._read(8))
        return status, self._read(n).decode("utf-8", "replace")

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except (OSError, ValueError):
            lines = []
        return lines[-1].strip() if lines else "no message"

    def _send(self, op: int, x: np.ndarray, extra: bytes = b"") -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        header = struct.pack(f"<II{x.ndim}q", op, x.ndim, *x.shape)
        try:
            self._proc.stdin.write(header)
            self._proc.stdin.write(memoryview(x).cast("B"))
            if extra:
                self._proc.stdin.write(extra)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._died() from None

    def _reply(self) -> None:
        (status,) = struct.unpack("<I", self._read(4))
        if status != 0:
            (n,) = struct.unpack("<I", self._read(4))
            raise self.error(f"{self.what}: {self._read(n).decode('utf-8', 'replace')}")

    # -- the Predictor signature
    def prepare(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, prepared: np.ndarray) -> np.ndarray:
        with self._lock:
            self._send(OP_RUN, prepared)
            self._reply()
            (ndim,) = struct.unpack("<I", self._read(4))
            shape = struct.unpack(f"<{ndim}q", self._read(8 * ndim))
            count = int(np.prod(shape))
            return np.frombuffer(self._read(4 * count), dtype=np.float32).reshape(shape)

    def finish(self, out: np.ndarray) -> np.ndarray:
        return out

    def time_calls(self, prepared: np.ndarray, *, warmup: int, min_time: float, min_calls: int,
                   sync=None) -> np.ndarray:
        """Per-call ns of the runner's own loop over ``prepared`` (the bench's timing hook)."""
        with self._lock:
            self._send(OP_TIME, prepared, struct.pack("<QQq", warmup, min_calls, int(min_time * 1e9)))
            self._reply()
            (n,) = struct.unpack("<Q", self._read(8))
            return np.frombuffer(self._read(8 * n), dtype=np.int64).copy()

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        try:
            if proc.poll() is None:
                try:
                    proc.stdin.write(struct.pack("<I", OP_QUIT))
                    proc.stdin.close()
                except (BrokenPipeError, ValueError, OSError):
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if proc.stdout:
                proc.stdout.close()
            self._stderr.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


__all__ = ["OP_QUIT", "OP_RUN", "OP_TIME", "FramedPredictor", "RunnerError"]
