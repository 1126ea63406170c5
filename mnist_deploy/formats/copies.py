"""Formats that run another format's file in another runtime (``Format.copy_of``): torchscript-cpp runs
the TorchScript file in the C++ runner, onnx-node and the onnxruntime-web entries run the ONNX file in Node
and in Chromium. Each is gated on the very bytes its source just passed in the same export run."""

from __future__ import annotations

import shutil
from pathlib import Path

from .base import ExportContext


def copy_or_export(source: str, export):
    """An exporter that copies the file ``source`` proved in this export run (noted as ``copy_of``), or
    writes it afresh with ``export`` when ``source`` was not exported in this run."""

    def write(model, path: Path, options, ctx: ExportContext) -> None:
        passed = ctx.passed.get(source)
        if passed is not None and Path(passed).is_file():
            shutil.copyfile(passed, path)
            ctx.notes["copy_of"] = source
        else:
            export(model, path, options, ctx)

    return write
