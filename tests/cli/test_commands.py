"""CLI: usage errors exit 2 with a message, --help is instant and lists the commands."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mnist_deploy.cli import FORMAT_NAMES, MODEL_NAMES, cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "-1"], "--epochs"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--model", "resnet"], "'resnet' is not one of"),
        (["train", "--device", "tpu"], "'tpu' is not one of"),
        (["train", "--lr", "abc"], "--lr"),
        (["export", "--parity-images", "0"], "--parity-images"),
        (["export", "--parity-images", "many"], "--parity-images"),
    ],
)
def test_bad_options_are_usage_errors(args, message):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2
    assert message in res.output


def test_negative_lr_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--lr", "-0.1", "--out", str(tmp_path), "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--lr must be a positive number" in res.output


def test_cuda_on_a_cpu_machine_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = CliRunner().invoke(cli, ["train", "--device", "cuda", "--out", str(tmp_path), "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "device 'cuda' requested" in res.output


def test_cli_names_mirror_the_registries():
    from mnist_deploy.formats import exportable
    from mnist_deploy.models import MODELS

    assert tuple(MODELS) == MODEL_NAMES
    assert exportable() == FORMAT_NAMES


def test_help_texts_carry_no_names_from_history_or_frozen_figures():
    for command in ("train", "export", "bench"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "origin" not in text and " ms" not in text and "about 1 s" not in text, command


def test_help_does_not_import_torch():
    code = "import sys; from mnist_deploy.cli import main; sys.argv=['mnist-deploy','--help']\n" \
           "try:\n main()\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train" in out and out.strip().endswith("False False")


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mnist_deploy", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "0.1.0" in out.stdout


def test_bench_threads_are_bounded_by_the_usable_cores(tmp_path, monkeypatch):
    # As for train, serve and predict (issue 18 item 9): an absurd count is one line, before any work.
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    res = CliRunner().invoke(cli, ["bench", "--threads", "100000", "--artifacts", str(tmp_path)])
    assert res.exit_code == 2 and "per usable core" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["bench", "--threads", "8", "--artifacts", str(tmp_path / "none")])
    assert res.exit_code != 0 and "per usable core" not in res.output
