"""Benchmarks: the run over runtimes, devices and batch sizes (:mod:`.run`), its checked settings
(:mod:`.config`), the timing loops (:mod:`.timing`), the machine it ran on (:mod:`.env`) and the
table, JSON and plot it writes (:mod:`.report`)."""

from .config import BenchConfig
from .run import default_threads, run_bench

__all__ = ["BenchConfig", "default_threads", "run_bench"]
