"""The fused MLP step against the autograd step: same gradients, same updates, same training run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from mnist_deploy.cli import cli
from mnist_deploy.errors import InputError
from mnist_deploy.models import build_model
from mnist_deploy.train.loop import TrainConfig, train
from mnist_deploy.train.step import AutogradStep, FusedMLPStep, make_step


def _pair(hidden1: int, hidden2: int, seed: int = 0):
    torch.manual_seed(seed)
    a = build_model("mlp", {"hidden1": hidden1, "hidden2": hidden2})
    b = build_model("mlp", {"hidden1": hidden1, "hidden2": hidden2})
    b.load_state_dict(a.state_dict())
    return a, b


def _data(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize(("hidden", "rows"), [((128, 64), 64), ((128, 64), 37), ((32, 16), 64)])
def test_fused_gradients_are_autograds(hidden, rows):
    fused_model, ref = _pair(*hidden)
    x, y = _data(rows)
    step = FusedMLPStep(fused_model, lr=0.0, device=torch.device("cpu"))  # lr 0: weights stay put
    step.begin_epoch(x, y, torch.arange(rows))
    step.step(0, rows)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    for (name, p), g in zip(ref.named_parameters(), step.g, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # and the logits the step wrote are the model's
    torch.testing.assert_close(step.data.logits, ref(x).detach(), rtol=1e-5, atol=1e-6)


def test_fused_steps_track_autograd_steps():
    fused_model, ref_model = _pair(128, 64)
    x, y = _data(640)
    order = torch.randperm(640, generator=torch.Generator().manual_seed(2))
    fused = FusedMLPStep(fused_model, lr=3e-3, device=torch.device("cpu"))
    ref = AutogradStep(ref_model, ref_model, lr=3e-3, device=torch.device("cpu"))
    for s in (fused, ref):
        s.begin_epoch(x, y, order)
        for a in range(0, 640, 64):
            s.step(a, a + 64)
    fused.finish()
    torch.testing.assert_close(fused.data.logits, ref.data.logits, rtol=1e-4, atol=1e-5)
    for p, q in zip(fused_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        assert p.untyped_storage().nbytes() == p.numel() * 4  # own storage again, not the flat tensor


def test_auto_picks_fused_for_the_mlp_only():
    cpu = torch.device("cpu")
    mlp, cnn = build_model("mlp", {}), build_model("cnn", {})
    assert isinstance(make_step("auto", mlp, mlp, 1e-3, cpu, 1), FusedMLPStep)
    assert isinstance(make_step("autograd", mlp, mlp, 1e-3, cpu, 1), AutogradStep)
    assert isinstance(make_step("auto", cnn, cnn, 1e-3, cpu, 1), AutogradStep)
    assert isinstance(make_step("auto", mlp, mlp, 1e-3, cpu, 2), AutogradStep)


def test_fused_training_matches_autograd_training(tmp_path, mnist_dir, cache_dir):
    runs = {}
    for step in ("fused", "autograd"):
        cfg = TrainConfig(epochs=1, subset=3000, step=step)
        runs[step] = train(cfg, data_dir=mnist_dir, cache_dir=cache_dir, out=tmp_path / step, allow_download=False)
    fused, ref = runs["fused"], runs["autograd"]
    assert (fused["step"], ref["step"]) == ("fused-mlp", "autograd")
    assert fused["history"][0]["train_loss"] == pytest.approx(ref["history"][0]["train_loss"], rel=1e-4)
    assert abs(fused["accuracy"] - ref["accuracy"]) <= 0.002
    a = torch.load(tmp_path / "fused" / "mnist_model_state_dict.pth", weights_only=True)
    b = torch.load(tmp_path / "autograd" / "mnist_model_state_dict.pth", weights_only=True)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    manifest = json.loads((tmp_path / "fused" / "manifest.json").read_text())
    assert manifest["training"]["step"] == "fused"


def test_fused_refused_for_the_cnn(tmp_path, mnist_dir, cache_dir):
    res = CliRunner().invoke(cli, ["train", "--model", "cnn", "--step", "fused", "--subset", "64", "--epochs", "1",
                                   "--data-dir", str(mnist_dir), "--cache-dir", str(cache_dir), "--no-download",
                                   "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code != 0
    assert "--step fused trains the mlp only" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_in_a_process_group_of_one_the_step_is_ddps():
    cpu = torch.device("cpu")
    mlp = build_model("mlp", {})
    assert isinstance(make_step("auto", mlp, mlp, 1e-3, cpu, 1, distributed=True), AutogradStep)
    with pytest.raises(InputError, match="under torchrun the step is DDP's"):
        make_step("fused", mlp, mlp, 1e-3, cpu, 1, distributed=True)


def test_fused_under_torchrun_of_one_process_is_refused_before_launching(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--nproc-per-node", "1", "--step", "fused", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "under torchrun the step is DDP's" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["fused", "autograd-mlp", "autograd-cnn"])
@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x, torch.where(y == 3, 10, y)), "labels range over 0..10; expected 0..9"),
    (lambda x, y: (x, torch.where(y == 3, -1, y)), "labels range over -1..9"),
    (lambda x, y: (x, y.float()), "labels are torch.float32"),
    (lambda x, y: (x.reshape(-1, 28, 28)[:, :27, :27].reshape(-1, 729), y), "images are torch.float32 (64, 729)"),
    (lambda x, y: (x, y[:-1]), "64 images but 63 labels"),
], ids=["label-10", "label-minus-1", "float-labels", "27x27", "lengths-differ"])
def test_bad_training_data_is_one_line_not_a_traceback(kind, bad, message):
    # Issue 18: these gave tracebacks from inside the step (train_step.py:125, :135, :52).
    from mnist_deploy.errors import DataError

    cpu = torch.device("cpu")
    model = build_model("cnn" if kind == "autograd-cnn" else "mlp", {})
    step = make_step("fused" if kind == "fused" else "autograd", model, model, 1e-3, cpu, 1)
    x, y = bad(*_data(64))
    with pytest.raises(DataError, match=re.escape(message)) as info:
        step.begin_epoch(x, y, torch.arange(min(len(x), len(y))))
        step.step(0, 32)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_narrower_label_dtypes_train_as_int64():
    model = build_model("mlp", {})
    step = make_step("fused", model, model, 1e-3, torch.device("cpu"), 1)
    x, y = _data(64)
    step.begin_epoch(x, y.to(torch.uint8), torch.arange(64))
    step.step(0, 64)
    assert step.data.y.dtype == torch.int64 and torch.equal(step.data.y, y)
