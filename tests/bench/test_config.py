"""bench.config: what a bench run is asked for (runtimes, batch sizes, devices, settings), each refused
with a typed InputError before anything is timed."""

from __future__ import annotations

import math

import pytest

from mnist_deploy.bench.config import (
    BENCH_DEVICES,
    DEFAULT_BATCH_SIZES,
    BenchConfig,
    by_runtime,
    parse_batch_sizes,
    parse_runtimes,
    plan_devices,
    unavailable_reason,
)
from mnist_deploy.devices import DEVICE_CHOICES
from mnist_deploy.errors import InputError
from mnist_deploy.formats import FORMATS, MAX_EXPORTED_BATCH, runtime_names


def test_batch_sizes_are_deduplicated_and_sorted():
    assert parse_batch_sizes(None) == DEFAULT_BATCH_SIZES
    assert parse_batch_sizes("256, 1,32,1") == (1, 32, 256)
    assert parse_batch_sizes([8, 2, 8]) == (2, 8)
    assert parse_batch_sizes("+4") == (4,)
    assert parse_batch_sizes(str(MAX_EXPORTED_BATCH)) == (MAX_EXPORTED_BATCH,)


@pytest.mark.parametrize(("value", "message"), [
    ("", "is empty"), (" , ", "is empty"), ("0", "'0' is not a positive integer"),
    ("-3", "'-3' is not a positive integer"), ("1.5", "'1.5' is not a positive integer"),
    ("ten", "'ten' is not a positive integer"), ("1,x", "'x' is not a positive integer"),
    ([True], "is not a positive integer"),
    (str(MAX_EXPORTED_BATCH + 1), f"larger than {MAX_EXPORTED_BATCH}, the exported batch axis's limit"),
])
def test_bad_batch_sizes_are_refused(value, message):
    with pytest.raises(InputError, match=message):
        parse_batch_sizes(value)


def test_runtimes_all_is_every_registered_runtime_and_not_explicit():
    assert parse_runtimes(None) == (runtime_names(), False)
    assert parse_runtimes("all") == (runtime_names(), False)
    assert parse_runtimes(["all"]) == (runtime_names(), False)


def test_runtimes_by_runtime_format_or_alias_in_registry_order():
    names, explicit = parse_runtimes("onnx, eager,torch.export,pt2")
    assert explicit is True
    assert names == tuple(n for n in runtime_names() if n in {"onnxruntime", "pytorch", "torch.export"})
    assert [by_runtime(n).name for n in names] == [FORMATS[f].name for f in FORMATS
                                                   if FORMATS[f].runtime in names]


def test_unknown_runtime_names_the_choices():
    with pytest.raises(InputError, match="unknown runtime 'tensorrt'; choose from .*onnx"):
        parse_runtimes("onnx,tensorrt")


def test_bench_devices_are_not_the_training_devices():
    # Distinct names for distinct meanings: bench runs every device ("all"); train and serve pick one ("auto").
    assert "all" in BENCH_DEVICES and "auto" not in BENCH_DEVICES
    assert "auto" in DEVICE_CHOICES and "all" not in DEVICE_CHOICES


def test_plan_devices():
    assert plan_devices("cpu") == [("cpu", None)]
    assert plan_devices(" CPU ") == [("cpu", None)]
    plan = dict(plan_devices("all"))
    assert list(plan) == ["cpu", "cuda"] and plan["cpu"] is None
    import torch

    if not torch.cuda.is_available():  # no GPU: a reason for skipped rows, not an error
        assert isinstance(plan["cuda"], str) and plan["cuda"]
        assert "--device" not in plan["cuda"]  # train's advice is cut off
    with pytest.raises(InputError, match="unknown device 'tpu'; choose one of cpu, cuda, all"):
        plan_devices("tpu")


def test_unavailable_reason_is_the_registry_entrys():
    assert unavailable_reason("onnx", "cpu") is None
    assert "not tpu" in unavailable_reason("onnxruntime", "tpu")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threads", 0, "--threads must be at least 1"), ("threads", 1.5, "--threads"),
    ("warmup", -1, "--warmup must be 0 or more"), ("min_time", 0, "--min-time must be a positive"),
    ("min_time", math.nan, "--min-time"), ("min_time", math.inf, "--min-time"),
    ("min_calls", 0, "min_calls must be at least 1"),
])
def test_bench_config_validate_refuses_bad_settings(field, value, message):
    BenchConfig().validate()
    with pytest.raises(InputError, match=message):
        BenchConfig(**{field: value}).validate()
