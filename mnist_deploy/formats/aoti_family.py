"""AOTInductor and the C++ runtimes.

``aoti``: ``torch.export`` then ``torch._inductor.aoti_compile_and_package`` into one ``.pt2`` package
(the compiled shared library with the weights inside, a dynamic batch dimension), loaded in Python with
``aoti_load_package``. The package is machine code for the CPU that compiled it (inductor compiles
with ``-march=native`` and picks a vector ISA): the compiler, its flags, the ISA and the CPU flags the
code may use are recorded in the package's metadata and in the manifest entry, and a package is
refused, in one line, on a CPU that lacks any of those flags (read from ``/proc/cpuinfo``).

``torchscript-cpp`` and ``aoti-cpp``: files run by the C++ runner (``native/``, :mod:`.native`), where a
C++ service would run them, gated on parity in C++ and timed by the runner's own loop.
``torchscript-cpp`` is a byte-for-byte copy of the file ``torchscript`` just proved (or made afresh when
exported alone). ``aoti-cpp`` is its own compile, the latency build (:data:`AOTI_CPP_CONFIGS`).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

from ..errors import ExportError, IntegrityError, RuntimeUnavailable
from .base import ExportContext, Format, NoOptions, Predictor, first_line, quiet
from .copies import copy_or_export
from .torch_family import TorchPredictor, TorchScriptOptions, _export_torchscript

TORCH = ("torch",)
METADATA_PREFIX = "mnist_deploy."
# What each package is compiled with; recorded in its manifest entry and its own metadata.
# aoti: inductor's defaults. Its GEMMs call ATen's addmm (MKL), threaded by torch at run time: the build
# for batches of hundreds. At batch 1 each addmm costs ~1 us of dispatch and MKL set-up besides the work.
AOTI_CONFIGS: dict = {}
# aoti-cpp: the latency build, for a C++ service answering one request at a time. Inductor's own C++ GEMM
# template (max_autotune with the CPP backend: the weights packed at compile time, bias and ReLU fused,
# no ATen call), with single-threaded kernels (cpp.threads=1: a kernel compiled for 2 threads opens an
# OpenMP region per layer, and at batch 1 its barriers cost more than the work), and cache blocks of
# 1 x 4 x 32 register blocks (M x N x K): at M=1 each register block is a chain of dependent FMAs, and
# short K blocks let the CPU overlap the 4 chains of one K block. docs/native.md has the numbers.
# Batches of hundreds run slower than with AOTI_CONFIGS (one thread; a kernel made for small M).
AOTI_CPP_CONFIGS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP", "cpp.threads": 1,
                    "cpp.gemm_cache_blocking": "1,4,32"}
# x86 instruction-set extensions as /proc/cpuinfo spells them: what -march=native may emit code for.
X86_ISA_FLAGS = frozenset("""
    sse sse2 ssse3 sse4_1 sse4_2 sse4a popcnt abm lzcnt bmi1 bmi2 adx aes pclmulqdq vpclmulqdq vaes gfni sha_ni
    avx avx2 fma fma4 f16c movbe xsave xsaveopt xsavec xsaves rdrand rdseed clflushopt clwb cx16 lahf_lm
    avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg
    avx512_vpopcntdq avx512_bf16 avx512_fp16 avx_vnni avx_vnni_int8 avx_ifma amx_tile amx_bf16 amx_int8
    amx_fp16 movdiri movdir64b serialize waitpkg
""".split())
ARM_ISA_FLAGS = frozenset("asimd fphp asimdhp asimddp asimdfhm sve sve2 bf16 i8mm svebf16 svei8mm".split())
# gcc's -m flags whose /proc/cpuinfo name differs from the flag without its "-m"
_GCC_TO_CPUINFO = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
                   "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
                   "avx512vpopcntdq": "avx512_vpopcntdq", "avxvnni": "avx_vnni", "amx-tile": "amx_tile",
                   "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "amx-fp16": "amx_fp16", "sse4.1": "sse4_1",
                   "sse4.2": "sse4_2", "sha": "sha_ni", "pclmul": "pclmulqdq", "rdrnd": "rdrand"}


# ---------------------------------------------------------------------------------------------
# The CPU, the compiler, the target.


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm); empty if unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _flag_to_cpuinfo(flag: str) -> str | None:
    """``-mavx512vnni`` -> ``avx512_vnni``; None for a flag that is not an ISA extension (-march=...)."""
    if not flag.startswith("-m") or "=" in flag:
        return None
    name = flag[2:]
    return _GCC_TO_CPUINFO.get(name, name.replace("-", "_").replace(".", "_"))


def build_target() -> dict:
    """What an AOTI compile here targets: compiler, flags, vector ISA and the CPU flags its code may use."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = get_cpp_compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = version.splitlines()[0] if version else ""
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    isa = cpu_vec_isa.pick_vec_isa()
    arch_flags = [f for f in dict.fromkeys(isa.build_arch_flags().split()) if f]
    march = inductor_config.cpp.march
    machine = platform.machine()
    native = march is None and machine in ("x86_64", "AMD64", "aarch64", "arm64")
    flags = ([f"-march={march}"] if march else ["-march=native"] if native else []) + arch_flags
    try:  # the kernels' optimisation flags as inductor builds them (-O3 -ffast-math ...); a private helper
        from torch._inductor.cpp_builder import _get_optimization_cflags

        flags = list(dict.fromkeys(["-" + f for f in _get_optimization_cflags(compiler)[0]] + flags))
    except Exception:  # noqa: BLE001  (moved or changed: the march and ISA flags above still say the target)
        pass
    required = {f for f in map(_flag_to_cpuinfo, arch_flags) if f}
    if native:  # -march=native may use every extension this CPU has
        required |= cpu_flags() & (X86_ISA_FLAGS | ARM_ISA_FLAGS)
    return {"compiler": compiler, "compiler_version": version, "flags": flags, "target_isa": str(isa) or "scalar",
            "machine": machine, "required_cpu_flags": sorted(required)}


def check_cpu(path: Path, required: list[str] | tuple[str, ...], isa: str = "") -> None:
    """Refuse a package whose code needs CPU flags this CPU lacks (it would die of SIGILL)."""
    have = cpu_flags()
    if not required:
        return
    if not have:
        raise RuntimeUnavailable(f"{path}: compiled for {isa or 'a specific CPU'}, and this machine's CPU flags "
                                 "cannot be read (/proc/cpuinfo) to check it can run it")
    missing = sorted(set(required) - have)
    if missing:
        raise RuntimeUnavailable(f"{path}: compiled for {isa or 'another CPU'}; this CPU lacks "
                                 f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; "
                                 "re-export it on this machine (mnist-deploy export --format aoti)")


def package_metadata(path: Path) -> dict[str, str]:
    """The metadata AOTInductor wrote into the package (ours under ``mnist_deploy.``), read without loading it."""
    out: dict[str, str] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("wrapper_metadata.json"):
                    out.update(json.loads(zf.read(name)))
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise IntegrityError(f"{path}: not a readable AOTInductor package ({first_line(exc)})") from None
    return out


def _check_package_cpu(path: Path) -> None:
    meta = package_metadata(path)
    required = meta.get(METADATA_PREFIX + "required_cpu_flags", "").split()
    check_cpu(path, required, meta.get(METADATA_PREFIX + "target_isa", meta.get("AOTI_CPU_ISA", "")))


def _aoti_available(device: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return f"AOTInductor packages are built and run here on Linux only, not {sys.platform}"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except ImportError:
        return "this torch has no AOTInductor (torch._inductor.cpp_builder)"
    except Exception as exc:  # inductor raises its own InvalidCxxCompiler
        return f"AOTInductor needs a C++ compiler: {first_line(exc)}"
    return None


# ---------------------------------------------------------------------------------------------
# aoti: the package, in Python.


def _aoti_exporter(inductor_configs: dict):
    """An exporter compiling the package with ``inductor_configs`` (recorded with the target)."""

    def export(model, path: Path, options, ctx: ExportContext) -> None:
        _export_aoti(model, path, ctx, inductor_configs)

    return export


def _export_aoti(model, path: Path, ctx: ExportContext, inductor_configs: dict) -> None:
    import torch

    target = {**build_target(), "inductor_configs": dict(inductor_configs)}
    metadata = {**{k: str(v) for k, v in ctx.metadata.items()},
                METADATA_PREFIX + "required_cpu_flags": " ".join(target["required_cpu_flags"]),
                METADATA_PREFIX + "target_isa": target["target_isa"],
                METADATA_PREFIX + "flags": " ".join(target["flags"]),
                METADATA_PREFIX + "compiler": f"{target['compiler']} ({target['compiler_version']})",
                METADATA_PREFIX + "inductor_configs": json.dumps(inductor_configs, sort_keys=True)}
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with quiet():
        try:
            program = torch.export.export(model, (ctx.example,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as exc:
            raise ExportError(f"torch.export failed: {first_line(exc)}") from None
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path),
                inductor_configs={**inductor_configs, "aot_inductor.metadata": metadata})
        except OSError:
            raise
        except Exception as exc:  # inductor raises CppCompileError, InvalidCxxCompiler...
            raise ExportError(f"AOTInductor compile failed: {first_line(exc)}") from None
    ctx.notes.update({"aoti": target})


def inductor_configs_of(path: Path) -> dict:
    """The inductor configs a package was compiled with (empty: inductor's defaults, or an older package)."""
    text = package_metadata(path).get(METADATA_PREFIX + "inductor_configs", "")
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def _load_aoti(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    import torch

    _check_package_cpu(path)
    with quiet():
        compiled = torch._inductor.aoti_load_package(str(path))
    return TorchPredictor(compiled, "aotinductor", device, threads)


def _verify_aoti(path: Path, entry: dict) -> None:
    """verify's extra checks: the package names the recorded state_dict and target, and this CPU runs it."""
    meta = package_metadata(path)
    if meta.get("source_state_dict_sha256") != entry.get("source_state_dict_sha256"):
        raise IntegrityError(f"{path}: its metadata names another source state_dict "
                             f"({str(meta.get('source_state_dict_sha256'))[:12]}...)")
    recorded = (entry.get("aoti") or {}).get("required_cpu_flags")
    packaged = meta.get(METADATA_PREFIX + "required_cpu_flags", "").split()
    if recorded is not None and sorted(recorded) != sorted(packaged):
        raise IntegrityError(f"{path}: the package's target CPU flags are not the ones the manifest recorded")
    _check_package_cpu(path)


# ---------------------------------------------------------------------------------------------
# torchscript-cpp and aoti-cpp: the same files, run by the C++ runner.


def _native_available(device: str) -> str | None:
    from .native import unavailable

    return unavailable()


def _native_exporter(export):
    """``export``, then the runner built now (once), so that a build failure fails this export in one line."""

    def write(model, path: Path, options, ctx: ExportContext) -> None:
        from .native import ensure_runner

        export(model, path, options, ctx)
        ensure_runner()

    return write


def _native_loader(kind: str, runtime: str):
    def load(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
        from .native import NativePredictor

        note = ""
        if kind == "aoti":
            _check_package_cpu(path)
            configs = inductor_configs_of(path)
            if configs.get("cpp.threads") == 1:
                note = ("latency build: inductor's C++ GEMM template, kernels compiled single-threaded "
                        "(cpp.threads=1); ATen ops, if any, use the runner's threads")
        return NativePredictor(path, kind, runtime, threads, note=note)

    return load


AOTI = Format(
    "aoti", "aotinductor",
    "AOTInductor package (torch.export + aoti_compile_and_package), machine code for this CPU; run in Python",
    files=("mnist_model_aoti.pt2",), load=_load_aoti, export=_aoti_exporter(AOTI_CONFIGS), devices=("cpu",),
    packages=TORCH,
    available=_aoti_available, check=_verify_aoti, aliases=("aotinductor",),
)
TORCHSCRIPT_CPP = Format(
    "torchscript-cpp", "torchscript-cpp",
    "The TorchScript file run from C++ (torch::jit::load in the mnist_runner process)",
    files=("mnist_model_torchscript_cpp.pt",), load=_native_loader("torchscript", "torchscript-cpp"),
    export=_native_exporter(copy_or_export("torchscript", _export_torchscript)), options=TorchScriptOptions, devices=("cpu",),
    packages=TORCH, available=_native_available,
)
AOTI_CPP = Format(
    "aoti-cpp", "aoti-cpp",
    "An AOTInductor package compiled for batch-1 latency, run from C++ (AOTIModelPackageLoader in mnist_runner)",
    files=("mnist_model_aoti_cpp.pt2",), load=_native_loader("aoti", "aoti-cpp"),
    export=_native_exporter(_aoti_exporter(AOTI_CPP_CONFIGS)), options=NoOptions, devices=("cpu",), packages=TORCH,
    available=lambda device: _aoti_available(device) or _native_available(device), check=_verify_aoti,
)
