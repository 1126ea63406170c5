"""models: the origin MLP's exact shape, the CNN, strict state_dict loading, FLOP counts."""

from __future__ import annotations

import pytest
import torch

from mnist_deploy.errors import CheckpointError
from mnist_deploy.models import MODELS, build_model, flops_per_example, load_state_dict_checked


def test_mlp_is_the_origin_network():
    shapes = {k: tuple(v.shape) for k, v in build_model("mlp").state_dict().items()}
    assert shapes == {
        "fc1.weight": (128, 784), "fc1.bias": (128,),
        "fc2.weight": (64, 128), "fc2.bias": (64,),
        "fc3.weight": (10, 64), "fc3.bias": (10,),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_models_map_a_batch_to_ten_logits(name):
    model = build_model(name).eval()
    x = torch.randn(3, *MODELS[name].input_shape)
    assert model(x).shape == (3, 10)
    assert model(x.reshape(3, 784)).shape == (3, 10)  # both take flat or image-shaped input


def test_flops():
    assert flops_per_example(build_model("mlp"), (784,)) == 2 * (784 * 128 + 128 * 64 + 64 * 10)
    assert flops_per_example(build_model("cnn"), (1, 28, 28)) > 1_000_000


def test_state_dict_mismatches_are_named():
    sd = build_model("mlp").state_dict()
    sd.pop("fc3.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["fc1.weight"] = torch.zeros(128, 783)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_checked(build_model("mlp"), sd, "ckpt.pth")
    msg = str(err.value)
    assert "missing fc3.bias" in msg and "unexpected extra.weight" in msg and "fc1.weight (128, 783)" in msg


def test_cnn_state_dict_into_mlp_is_refused():
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_state_dict_checked(build_model("mlp"), build_model("cnn").state_dict())
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_state_dict_checked(build_model("mlp"), [1, 2, 3])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(value):
    sd = build_model("mlp").state_dict()
    sd["fc2.bias"] = torch.full_like(sd["fc2.bias"], value)
    sd["fc1.weight"][3, 5] = value
    with pytest.raises(CheckpointError, match=r"ckpt.pth: non-finite weights \(NaN or inf\) in "
                                              r"fc1.weight \(1 of 100,352\), fc2.bias \(64 of 64\)"):
        load_state_dict_checked(build_model("mlp"), sd, "ckpt.pth")


@pytest.mark.integration
def test_cli_evaluate_refuses_an_all_nan_state_dict(trained_mlp, copy_artifacts, mnist_dir):
    """An all-NaN state_dict used to be evaluated (10% accuracy, every digit a 0) with no warning."""
    import json

    from click.testing import CliRunner

    from mnist_deploy.artifacts.manifest import artifact_entry
    from mnist_deploy.cli import cli

    folder = copy_artifacts(trained_mlp)
    sd_path = folder / "mnist_model_state_dict.pth"
    sd = torch.load(sd_path, weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, sd_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["state_dict"] = artifact_entry(sd_path, format="state_dict")  # a consistent set
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["evaluate", "--artifacts", str(folder), "--data-dir", str(mnist_dir),
                                      "--no-download"])
    assert result.exit_code == 2, result.output
    assert "non-finite weights (NaN or inf) in fc1.weight (100,352 of 100,352)" in result.output
    assert "Traceback" not in result.output
