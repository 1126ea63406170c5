"""Adam and the one-cycle schedule without ``torch.optim``. A leaf.

Why not ``torch.optim.Adam``: constructing any ``torch.optim.Optimizer`` imports torch's compiler stack
(``torch._dynamo``, through the ``_disable_dynamo`` wrapper on ``add_param_group``): a large share
of a short training process for a 100k-parameter MLP (the figures, with their command and machine,
belong in the docs, not in a docstring). These two classes
drive the very kernel ``torch.optim.Adam(fused=True)`` runs (``torch._fused_adam_``) with the very
numbers ``OneCycleLR`` computes, so a run is bitwise what the ``torch.optim`` pair gives
(``tests/train/test_optim.py`` checks both against ``torch.optim``).

``torch._fused_adam_`` is private: it is looked up once, when this module is imported
(:data:`FUSED_KERNEL`). A torch without it gets the public ``torch.optim.Adam(fused=True)`` (foreach
where fused is not supported for the device), driven with the same lr and betas; slower to start,
same arithmetic.
"""

from __future__ import annotations

import math

import torch  # whoever trains has imported it already; the feature check below needs it


def _private_kernel():
    """``torch._fused_adam_`` when this torch has it (a private op: checked, never assumed), else None."""
    kernel = getattr(torch, "_fused_adam_", None)
    return kernel if callable(kernel) else None


FUSED_KERNEL = _private_kernel()  # None: FusedAdam falls back to torch.optim.Adam (public API)


class FusedAdam:
    """Adam (no weight decay, no amsgrad) on one device, one fused kernel call per step.

    ``kernel`` is the private ``torch._fused_adam_`` (default: :data:`FUSED_KERNEL`, found at import);
    when it is None every step goes through the public ``torch.optim.Adam`` instead (``backend``
    says which: ``"private"`` or ``"torch.optim"``).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 *, kernel=FUSED_KERNEL):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.kernel = kernel
        self.backend = "private" if kernel is not None else "torch.optim"
        self._public = None if kernel is not None else _public_adam(self.params, lr, betas, eps)
        if self._public is not None:
            return
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # torch.optim.Adam(fused=True) keeps the step count as a float32 tensor on the parameter's device.
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        if self._public is not None:
            group = self._public.param_groups[0]
            group["lr"], group["betas"] = self.lr, self.betas  # what OneCycle set for this step
            self._public.step()
            return
        with torch.no_grad():
            live = [i for i, p in enumerate(self.params) if p.grad is not None]
            if not live:
                return
            steps = [self.steps[i] for i in live]
            torch._foreach_add_(steps, 1)
            self.kernel(
                [self.params[i] for i in live], [self.params[i].grad for i in live],
                [self.exp_avgs[i] for i in live], [self.exp_avg_sqs[i] for i in live], [], steps,
                amsgrad=False, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0,
                eps=self.eps, maximize=False, grad_scale=None, found_inf=None,
            )


def _public_adam(params, lr: float, betas: tuple[float, float], eps: float):
    """``torch.optim.Adam`` on ``params``: fused (the same kernel), or foreach where torch refuses fused
    for their device."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except RuntimeError:  # "`fused=True` requires all the params to be floating point Tensors of supported devices"
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


class OneCycle:
    """``torch.optim.lr_scheduler.OneCycleLR``'s default two-phase cosine schedule, for :class:`FusedAdam`.

    Sets the optimizer's lr and beta1 (momentum cycles inversely, 0.95 -> 0.85 -> 0.95) for step 0 at
    construction and for the next step on each :meth:`step`, as ``OneCycleLR`` does.
    """

    def __init__(self, opt: FusedAdam, max_lr: float, total_steps: int, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, base_momentum: float = 0.85,
                 max_momentum: float = 0.95):
        self.opt, self.total_steps = opt, total_steps
        self.initial_lr = max_lr / div_factor
        self.max_lr, self.min_lr = max_lr, self.initial_lr / final_div_factor
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        self.phase1_end = float(pct_start * total_steps) - 1
        self.step_num = 0
        self._apply()

    @staticmethod
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def _apply(self) -> None:
        k = self.step_num
        if k <= self.phase1_end:
            pct = k / self.phase1_end if self.phase1_end > 0 else 1.0  # torch divides by zero here
            lr = self._cos(self.initial_lr, self.max_lr, pct)
            mom = self._cos(self.max_momentum, self.base_momentum, pct)
        else:
            pct = (k - self.phase1_end) / (self.total_steps - 1 - self.phase1_end)
            lr = self._cos(self.max_lr, self.min_lr, pct)
            mom = self._cos(self.base_momentum, self.max_momentum, pct)
        self.opt.lr = lr
        self.opt.betas = (mom, self.opt.betas[1])

    def step(self) -> None:
        self.step_num += 1
        if self.step_num <= self.total_steps:  # OneCycleLR also computes the rate after the last step
            self._apply()
