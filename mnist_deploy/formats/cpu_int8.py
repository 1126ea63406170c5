"""The CPU's 8-bit matrix-product path, read at run time: which instructions ONNX Runtime's and
OpenVINO's INT8 kernels will use here, and whether they can saturate.

- ``VNNI``: AVX-512 VNNI, AVX-VNNI or AMX-INT8 (``vpdpbusd``: u8 x s8 products summed into int32, exact);
- ``AVX512``: AVX-512BW without VNNI, and ``AVX2``, and ``SSE4.1`` (``vpmaddubsw``: pairs of u8 x s8
  products summed into a saturating int16, then ``vpmaddwd``): an 8-bit weight model may saturate;
- ``ARM-dotprod``: AArch64 with ``sdot``/``udot`` (exact); ``ARM``: NEON widening multiplies (exact);
- ``other``: anything else (no x86 SIMD flags, another architecture).

Read from ``/proc/cpuinfo`` (Linux); elsewhere from what the platform says, else ``other``. Never assumed.
"""

from __future__ import annotations

import platform

PATHS = ("VNNI", "AVX512", "AVX2", "SSE4.1", "ARM-dotprod", "ARM", "other")
SATURATING = ("AVX512", "AVX2", "SSE4.1")  # u8 x s8 through vpmaddubsw
_X86 = (("VNNI", ("avx512_vnni", "avx_vnni", "amx_int8")), ("AVX512", ("avx512bw",)), ("AVX2", ("avx2",)),
        ("SSE4.1", ("sse4_1",)))


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """(machine, the CPU's feature flags) from ``/proc/cpuinfo`` text (read when not given)."""
    machine = platform.machine().lower()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break  # every core lists the same set
    return machine, flags


def int8_path(cpuinfo: str | None = None, machine: str | None = None) -> dict:
    """``{"path": one of PATHS, "saturating": bool, "detail": the flags that decided it}``."""
    found_machine, flags = cpu_flags(cpuinfo)
    machine = (machine or found_machine).lower()
    if machine in ("aarch64", "arm64") or "asimd" in flags:
        if "asimddp" in flags:
            return {"path": "ARM-dotprod", "saturating": False, "detail": "asimddp"}
        return {"path": "ARM", "saturating": False, "detail": "neon, no dot product"}
    for name, needed in _X86:
        hit = [f for f in needed if f in flags]
        if hit:
            return {"path": name, "saturating": name in SATURATING, "detail": ", ".join(hit)}
    return {"path": "other", "saturating": False, "detail": f"{machine or 'unknown machine'}, no known 8-bit flags"}


def describe(entry: dict | None) -> str:
    """``VNNI (avx512_vnni)`` or ``AVX2 (avx2; u8 x s8 pairs saturate at int16)``."""
    if not entry:
        return "unknown (not recorded)"
    note = "; u8 x s8 pairs saturate at int16" if entry.get("saturating") else ""
    return f"{entry.get('path', '?')} ({entry.get('detail', '')}{note})"


__all__ = ["PATHS", "SATURATING", "cpu_flags", "describe", "int8_path"]
