"""FusedAdam and OneCycle against torch.optim.Adam(fused=True) and OneCycleLR: bitwise the same run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mnist_deploy.train.optim import FusedAdam, OneCycle


def _model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


@pytest.mark.parametrize(("schedule", "total"), [("onecycle", 40), ("onecycle", 7), ("constant", 25)])
def test_bitwise_equal_to_torch_optim(schedule, total):
    ours, ref = _model(0), _model(0)
    opt = FusedAdam(ours.parameters(), lr=3e-3)
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


def test_no_compiler_stack_import():
    code = ("import sys, torch; from mnist_deploy.optim import FusedAdam, OneCycle; "
            "m = torch.nn.Linear(4, 2); o = FusedAdam(m.parameters()); s = OneCycle(o, 1e-2, 10); "
            "m(torch.randn(3, 4)).sum().backward(); o.step(); s.step(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
