"""Models compiled for one input shape each, next to a runtime's dynamic-shape model, in a small LRU.

OpenVINO's CPU plugin fuses less when a dimension is dynamic: the INT8 IR's input FakeQuantize runs as a
generic node at a dynamic batch size and inside a fused Snippets subgraph at a static one (0.5-0.6 ms
against 0.05 ms of a 1 ms call at batch 1024 on a 2-core EPYC; docs/int8.md). A compile costs
25-35 ms there, about 30 calls at batch 1024 or thousands at batch 1, so the policy is about when to pay it:

- a shape gets its own compile on its ``min_calls``-th call (2 by default): one-off shapes (the last
  chunk of a parity pass, a bench's cold-start call) stay on the dynamic model;
- at most ``capacity`` compiled shapes are kept; when all are taken, a new shape replaces the least
  recently used one only if that one has not been called in the last ``idle_calls`` calls, and at
  most once per ``idle_calls`` calls. A server's dynamic batcher sends many batch sizes: a steady mix
  of more sizes than ``capacity`` then settles (the first to be called twice keep theirs, the rest run
  on the dynamic model) instead of recompiling on every call, and whatever the mix, compiles cost at
  most one compile per ``idle_calls`` calls once the slots are full (30 ms / 1,024: 30 us a call);
- a shape whose compile failed is not tried again (the dynamic model answers it, or says why not).

Not thread-safe, like the single infer request each predictor holds: callers serialize their calls.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..errors import first_line

CAPACITY = 8  # compiled shapes kept per predictor
MIN_CALLS = 2  # a shape's call on which it gets its own compile
IDLE_CALLS = 1024  # a cached shape unused this long may be replaced, at most once per as many calls
_MAX_TRACKED = 4096  # shapes counted while not compiled; the count restarts beyond (a bound, not a policy)


class StaticShapes:
    """``get(shape)`` returns the model compiled for ``shape`` (compiling it when the policy says so),
    or None: run the dynamic model. ``models`` holds what is compiled now, least recently used first."""

    def __init__(self, compile_fn: Callable[[tuple[int, ...]], Any], *, capacity: int = CAPACITY,
                 min_calls: int = MIN_CALLS, idle_calls: int = IDLE_CALLS) -> None:
        self._compile = compile_fn
        self.capacity = max(0, int(capacity))
        self.min_calls = max(1, int(min_calls))
        self.idle_calls = int(idle_calls)
        self.models: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.compiles = 0  # every compile so far, replacements included
        self.compile_ms: list[float] = []  # what each took
        self.failed: dict[tuple[int, ...], str] = {}
        self._last: dict[tuple[int, ...], int] = {}  # compiled shape -> the call number of its last call
        self._seen: dict[tuple[int, ...], int] = {}  # shape not compiled -> its calls so far
        self._calls = 0
        self._last_compile = 0  # the call number of the last compile

    def describe(self) -> str:
        if self.capacity == 0:
            return "dynamic"
        return (f"static per batch size (compiled on a size's call {self.min_calls}, {self.capacity} kept, "
                "LRU), dynamic otherwise")

    def get(self, shape: tuple[int, ...]) -> Any | None:
        self._calls += 1
        model = self.models.get(shape)
        if model is not None:
            self.models.move_to_end(shape)
            self._last[shape] = self._calls
            return model
        if self.capacity == 0 or shape in self.failed or not shape or shape[0] < 1:
            return None
        seen = self._seen.get(shape, 0) + 1
        if seen < self.min_calls or not self._make_room():
            if len(self._seen) >= _MAX_TRACKED and shape not in self._seen:
                self._seen.clear()
            self._seen[shape] = seen
            return None
        self._seen.pop(shape, None)
        t0 = time.perf_counter_ns()
        try:
            model = self._compile(shape)
        except Exception as exc:  # the dynamic model still answers this shape (or raises its own error)
            self.failed[shape] = f"{type(exc).__name__}: {first_line(exc)}"
            return None
        self.compile_ms.append((time.perf_counter_ns() - t0) / 1e6)
        self.compiles += 1
        self._last_compile = self._calls
        self.models[shape] = model
        self._last[shape] = self._calls
        return model

    def _make_room(self) -> bool:
        """True when a new shape may be compiled: a free slot, or a least recently used one gone idle and
        no compile within the last ``idle_calls`` calls."""
        if len(self.models) < self.capacity:
            return True
        oldest = next(iter(self.models))
        if min(self._calls - self._last[oldest], self._calls - self._last_compile) <= self.idle_calls:
            return False
        del self.models[oldest], self._last[oldest]
        return True


__all__ = ["CAPACITY", "IDLE_CALLS", "MIN_CALLS", "StaticShapes"]
