"""The bench environment block names the CPU's 8-bit path (where every INT8 row was measured)."""

from __future__ import annotations

from mnist_deploy.bench.env import collect_environment
from mnist_deploy.formats.cpu_int8 import PATHS, int8_path


def test_environment_records_the_8_bit_path():
    env = collect_environment(threads=1)
    assert env["cpu_int8_path"] == int8_path()
    assert env["cpu_int8_path"]["path"] in PATHS
