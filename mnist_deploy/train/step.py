"""How one training step is run: through autograd (any model, DDP), or hand-fused for the MLP.

Both steppers train on one epoch's shuffled copy of the data (``begin_epoch``) a row range at a
time (``step(a, e)``), update with :class:`.optim.FusedAdam` and write each row's logits into the
epoch's ``logits`` buffer, so the epoch's loss and accuracy are computed from it in a few calls
instead of six small tensor calls per step.

Why a fused MLP step: a step of the default MLP at batch 64 is little arithmetic (two 64x784x128
matrix products) wrapped in several times as much framework work: module calls, the autograd graph
and engine, loss modules, one optimizer call per parameter (the measured split, with its command and
machine, is in the docs, not here, so it cannot go stale in a docstring). :class:`FusedMLPStep` writes the
forward, the backward (the derivative of softmax cross-entropy is ``(softmax(z) - onehot(y)) / B``;
through a ReLU the gradient passes where the activation is positive) and one Adam call over all
parameters held in one flat tensor: 18 tensor calls and no autograd. Same model, same loss, same
optimizer and schedule; the numbers differ from autograd's only in float rounding order
(``tests/train/test_step.py`` checks gradients and a whole epoch against the autograd step).
"""

from __future__ import annotations

from .optim import FusedAdam

STEPS = ("auto", "fused", "autograd")


def fused_supported(model, world_size: int, distributed: bool = False) -> str | None:
    """None if :class:`FusedMLPStep` can train ``model``; otherwise why not. ``distributed``: the
    process is in a process group (under torchrun, of any size), where the step must be DDP's."""
    from ..models import MLP

    if world_size == 1 and not distributed and not isinstance(model, MLP):
        return f"--step fused trains the mlp only, not {type(model).__name__.lower()}"
    if world_size > 1 or distributed:
        return "--step fused runs in one process; under torchrun the step is DDP's autograd step"
    return None


def check_training_data(x, y, *, features: int = 784, classes: int = 10) -> None:
    """Raise :class:`DataError` (one line) unless ``x`` is float (N, features) and ``y`` integer (N,)
    labels in 0..classes-1: what the steps index and scatter with. Bad labels, 27x27 images and
    mismatched lengths gave tracebacks from deep in a step (or CUDA asserts) before."""
    import torch

    from ..errors import DataError

    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError("training data: images and labels must be tensors")
    if not x.is_floating_point() or x.ndim != 2 or x.shape[1] != features:
        raise DataError(f"training data: images are {x.dtype} {tuple(x.shape)}; expected float rows of "
                        f"{features} pixels (28x28)")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.ndim != 1:
        raise DataError(f"training data: labels are {y.dtype} {tuple(y.shape)}; expected one integer per image")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"training data: {x.shape[0]} images but {y.shape[0]} labels")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            raise DataError(f"training data: labels range over {lo}..{hi}; expected 0..{classes - 1}")


class _EpochData:
    """One epoch's rows in the epoch's order, copied once, so each step's batch is a contiguous view."""

    def __init__(self, device) -> None:
        self.device = device
        self.x = self.y = self.logits = None

    def load(self, x, y, order) -> None:
        import torch

        check_training_data(x, y)
        if y.dtype != torch.int64:
            y = y.long()  # what cross-entropy and scatter take
        n = order.shape[0]
        if self.x is None or self.x.shape[0] != n:
            self.x = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=self.device)
            self.y = torch.empty(n, dtype=y.dtype, device=self.device)
            self.logits = torch.empty((n, 10), dtype=torch.float32, device=self.device)
        torch.index_select(x, 0, order, out=self.x)
        torch.index_select(y, 0, order, out=self.y)


class AutogradStep:
    """The generic step: ``net(x)``, cross-entropy, ``backward()``, Adam. Any model; DDP when wrapped."""

    name = "autograd"

    def __init__(self, net, model, lr: float, device) -> None:
        import torch

        self.net, self.model = net, model
        self.opt = FusedAdam(model.parameters(), lr=lr)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.data = _EpochData(device)

    def begin_epoch(self, x, y, order) -> None:
        self.net.train()
        self.data.load(x, y, order)

    def step(self, a: int, e: int) -> None:
        import torch

        d = self.data
        logits = self.net(d.x[a:e])
        loss = self.loss_fn(logits, d.y[a:e])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            d.logits[a:e] = logits

    def finish(self) -> None:
        pass


class FusedMLPStep:
    """The MLP's step as explicit tensor calls, parameters and gradients in one flat tensor each."""

    name = "fused-mlp"

    def __init__(self, model, lr: float, device) -> None:
        import torch

        self.model = model
        params = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias, model.fc3.weight,
                  model.fc3.bias]
        if len(list(model.parameters())) != len(params):
            raise TypeError("FusedMLPStep: the MLP has parameters this step does not know")
        with torch.no_grad():
            self.flat = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in params]))
        self.flat.grad = torch.zeros_like(self.flat)
        views, grads, offset = [], [], 0
        for p in params:  # the module's parameters become views into the flat tensor
            k = p.numel()
            views.append(self.flat.data[offset : offset + k].view_as(p))
            grads.append(self.flat.grad[offset : offset + k].view_as(p))
            p.data = views[-1]
            offset += k
        self.w = views
        self.g = grads
        self.opt = FusedAdam([self.flat], lr=lr)
        self.data = _EpochData(device)
        self.onehot = None
        self._threshold_backward = torch.ops.aten.threshold_backward

    def begin_epoch(self, x, y, order) -> None:
        import torch

        self.model.train()
        self.data.load(x, y, order)
        if self.onehot is None or self.onehot.shape[0] != order.shape[0]:
            self.onehot = torch.empty((order.shape[0], 10), dtype=torch.float32, device=self.data.device)
        self.onehot.zero_().scatter_(1, self.data.y.unsqueeze(1), 1.0)

    def step(self, a: int, e: int) -> None:
        import torch

        w1, b1, w2, b2, w3, b3 = self.w
        g1, gb1, g2, gb2, g3, gb3 = self.g
        relu_grad = self._threshold_backward
        x = self.data.x[a:e]
        with torch.no_grad():
            h1 = torch.addmm(b1, x, w1.t()).relu_()
            h2 = torch.addmm(b2, h1, w2.t()).relu_()
            z = torch.addmm(b3, h2, w3.t(), out=self.data.logits[a:e])
            dz = torch.softmax(z, 1).sub_(self.onehot[a:e]).div_(e - a)  # d mean CE / d logits
            torch.mm(dz.t(), h2, out=g3)
            torch.sum(dz, 0, out=gb3)
            dh2 = relu_grad(torch.mm(dz, w3), h2, 0)
            torch.mm(dh2.t(), h1, out=g2)
            torch.sum(dh2, 0, out=gb2)
            dh1 = relu_grad(torch.mm(dh2, w2), h1, 0)
            torch.mm(dh1.t(), x, out=g1)
            torch.sum(dh1, 0, out=gb1)
        self.opt.step()

    def finish(self) -> None:
        """Give each parameter its own storage again (a state_dict of views would save the flat tensor)."""
        for p, v in zip(self.model.parameters(), self.w, strict=True):
            p.data = v.clone()


def make_step(choice: str, net, model, lr: float, device, world_size: int, distributed: bool = False):
    """The stepper for ``--step``: ``auto`` is fused where it applies, autograd elsewhere."""
    from ..errors import InputError

    why_not = fused_supported(model, world_size, distributed)
    if choice == "fused" and why_not:
        raise InputError(why_not)
    if choice == "autograd" or why_not:
        return AutogradStep(net, model, lr, device)
    return FusedMLPStep(model, lr, device)
