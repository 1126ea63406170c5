"""The fault-point switch the fault-injection tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from mnist_deploy.faults import fault_point; fault_point('train:after-state-dict'); print('passed')"


@pytest.mark.parametrize(("spec", "code"), [
    ("train:after-state-dict", -9),
    ("train:after-state-dict:SIGTERM", -15),
    ("train:before-manifest", 0),
    ("", 0),
])
def test_fault_point_signals_only_the_named_point(spec, code):
    env = {**os.environ, "MNIST_DEPLOY_FAULT": spec}
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == code
    assert ("passed" in r.stdout) == (code == 0)
