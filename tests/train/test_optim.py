"""FusedAdam and OneCycle against torch.optim.Adam(fused=True) and OneCycleLR: bitwise the same run,
with the private ``torch._fused_adam_`` and with the public fallback a torch without it gets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mnist_deploy.train import optim
from mnist_deploy.train.optim import FusedAdam, OneCycle

BACKENDS = {"private": optim.FUSED_KERNEL, "torch.optim": None}  # None: what a torch without the op gets


def _model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("schedule", "total"), [("onecycle", 40), ("onecycle", 7), ("constant", 25)])
def test_bitwise_equal_to_torch_optim(schedule, total, backend):
    ours, ref = _model(0), _model(0)
    opt = FusedAdam(ours.parameters(), lr=3e-3, kernel=BACKENDS[backend])
    assert opt.backend == backend
    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3, fused=True)
    sched = ref_sched = None
    if schedule == "onecycle":
        sched = OneCycle(opt, max_lr=9e-3, total_steps=total, pct_start=0.15)
        ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=9e-3, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(1)
    for _ in range(total):
        x, y = torch.randn(8, 20, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        for m, o, s in ((ours, opt, sched), (ref, ref_opt, ref_sched)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            if s is not None:
                s.step()
        assert opt.lr == ref_opt.param_groups[0]["lr"]
        assert opt.betas == ref_opt.param_groups[0]["betas"]
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_this_torch_has_the_private_kernel():
    # The pin (torch<2.14) is the range it was tested on; a torch inside it without the op is news.
    assert optim.FUSED_KERNEL is torch._fused_adam_


def test_a_torch_without_the_private_op_falls_back_to_the_public_api_at_import():
    # Simulate its absence while the module is imported: the check at import selects torch.optim.Adam,
    # and a OneCycle run through it is still bitwise torch.optim's own. (torch.optim itself still finds
    # the op afterwards, as a torch that moved it would: its public API moves with it.)
    code = ("import torch; saved = torch._fused_adam_; del torch._fused_adam_\n"
            "from mnist_deploy.train.optim import FUSED_KERNEL, FusedAdam, OneCycle\n"
            "torch._fused_adam_ = saved\n"
            "assert FUSED_KERNEL is None\n"
            "def model():\n"
            "    torch.manual_seed(0)\n"
            "    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))\n"
            "ours, ref = model(), model()\n"
            "opt = FusedAdam(ours.parameters(), lr=3e-3); s = OneCycle(opt, 9e-3, 12, pct_start=0.15)\n"
            "ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3, fused=True)\n"
            "ref_s = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=9e-3, total_steps=12, pct_start=0.15)\n"
            "g = torch.Generator().manual_seed(1)\n"
            "for _ in range(12):\n"
            "    x, y = torch.randn(8, 20, generator=g), torch.randint(0, 10, (8,), generator=g)\n"
            "    for m, o, sc in ((ours, opt, s), (ref, ref_opt, ref_s)):\n"
            "        o.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); o.step(); sc.step()\n"
            "print(opt.backend, all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.optim", "True"]


def test_no_compiler_stack_import():
    code = ("import sys, torch; from mnist_deploy.train.optim import FusedAdam, OneCycle; "
            "m = torch.nn.Linear(4, 2); o = FusedAdam(m.parameters()); s = OneCycle(o, 1e-2, 10); "
            "m(torch.randn(3, 4)).sum().backward(); o.step(); s.step(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
