"""Named fault points, for the fault-injection tests. A leaf.

``fault_point("train:after-state-dict")`` does nothing unless the environment variable
``MNIST_DEPLOY_FAULT`` names that point, as ``POINT`` or ``POINT:SIGNAL`` (default SIGKILL); then the
process sends itself that signal there. The tests use it to interrupt train and export at exact
places (between two writes, say) and check that the previous artifacts survive whole. One dictionary
lookup when unset.
"""

from __future__ import annotations

import os
import signal

ENV = "MNIST_DEPLOY_FAULT"


def fault_point(name: str) -> None:
    """Kill (or signal) this process here when ``$MNIST_DEPLOY_FAULT`` names ``name``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, sig = spec.rpartition(":") if spec.rsplit(":", 1)[-1].startswith("SIG") else (spec, "", "")
    if point != name:
        return
    os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
