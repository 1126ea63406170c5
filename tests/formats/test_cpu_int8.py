"""The CPU's 8-bit path, read from the flags /proc/cpuinfo lists (never assumed)."""

from __future__ import annotations

import pytest

from mnist_deploy.formats.cpu_int8 import PATHS, SATURATING, cpu_flags, describe, int8_path

X86 = "processor\t: 0\nvendor_id\t: X\nflags\t\t: fpu sse sse2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm {extra}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(("cpuinfo", "machine", "path", "saturating"), [
    (X86.format(extra="ssse3 sse4_1 avx avx2 avx512f avx512bw avx512_vnni"), "x86_64", "VNNI", False),
    (X86.format(extra="sse4_1 avx2 avx_vnni"), "x86_64", "VNNI", False),  # AVX-VNNI (Alder Lake and later)
    (X86.format(extra="sse4_1 avx2 avx512f avx512bw"), "x86_64", "AVX512", True),  # Skylake-SP: no VNNI
    (X86.format(extra="sse4_1 avx avx2 fma"), "x86_64", "AVX2", True),  # the AMD EPYC of issue 17
    (X86.format(extra="ssse3 sse4_1"), "x86_64", "SSE4.1", True),
    (X86.format(extra=""), "x86_64", "other", False),
    (ARM.format(extra="asimddp sve"), "aarch64", "ARM-dotprod", False),
    (ARM.format(extra=""), "aarch64", "ARM", False),
    ("", "riscv64", "other", False),
])
def test_paths_from_flags(cpuinfo, machine, path, saturating):
    found = int8_path(cpuinfo, machine)
    assert found["path"] == path and found["saturating"] is saturating
    assert found["path"] in PATHS
    assert (path in SATURATING) is saturating
    assert found["path"] in describe(found)


def test_this_machine_is_read_not_assumed():
    """Whatever this CPU is, the answer follows from its own flags."""
    machine, flags = cpu_flags()
    found = int8_path()
    assert found["path"] in PATHS
    if machine in ("x86_64", "amd64"):
        vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
        assert (found["path"] == "VNNI") is vnni
        assert found["saturating"] is (not vnni and bool({"avx512bw", "avx2", "sse4_1"} & flags))


def test_describe_unrecorded():
    assert describe(None) == "unknown (not recorded)"
    assert "saturate" in describe({"path": "AVX2", "saturating": True, "detail": "avx2"})
