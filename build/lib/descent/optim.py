"""Only what torch.optim lacks: the course's exact momentum, RMSprop and Adam updates.

The course writes (slides "Descente de gradient avec élan", "RMSprop", "ADAM"), for every weight W with gradient dW:
    momentum: V = b*V + (1-b)*dW;                      W := W - a*V
    RMSprop:  S = b*S + (1-b)*dW^2;                    W := W - a*dW/sqrt(S + eps)
    Adam:     V = b1*V + (1-b1)*dW, S = b2*S + (1-b2)*dW^2;  W := W - a*V/sqrt(S + eps)
all from V = S = 0. torch's RMSprop and Adam put eps outside the square root and Adam corrects the bias, so no
torch.optim setting equals the last two: they are small Optimizer subclasses using torch's foreach kernels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import SGD, Optimizer


def course_momentum(params: Iterable[torch.Tensor], lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> SGD:
    """The course's momentum as torch SGD: SGD(lr=a*(1-b), momentum=b, dampening=0) is exactly that update.

    Why: torch keeps buf = b*buf + dW and steps lr*buf; with lr = a*(1-b) that is a*V for V = (1-b)*buf.
    torch's `dampening=b` is not the course's form: its first step takes V = dW instead of (1-b)*dW.
    """
    return SGD(params, lr=lr * (1 - momentum), momentum=momentum, dampening=0.0, weight_decay=weight_decay)


def _grads(group: dict, state: dict, names: tuple[str, ...]) -> tuple[list, list, list[list]]:
    """Parameters with a gradient, their gradients (plus L2 weight decay) and their state buffers."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    if group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    buffers = []
    for name in names:
        buffers.append([state[p].setdefault(name, torch.zeros_like(p)) for p in params])
    return params, grads, buffers


class CourseRMSprop(Optimizer):
    """RMSprop as the slide writes it: S = b*S + (1-b)*dW^2; W := W - a*dW/sqrt(S + eps). `alpha` is b."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        alpha: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params, grads, (square_avg,) = _grads(group, self.state, ("square_avg",))
            if not params:
                continue
            b = group["alpha"]
            torch._foreach_mul_(square_avg, b)
            torch._foreach_addcmul_(square_avg, grads, grads, value=1 - b)
            denom = torch._foreach_add(square_avg, group["eps"])
            torch._foreach_sqrt_(denom)
            torch._foreach_addcdiv_(params, grads, denom, value=-group["lr"])
        return loss


class CourseAdam(Optimizer):
    """Adam as the slide writes it, without bias correction and with eps inside the square root."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params, grads, (exp_avg, exp_avg_sq) = _grads(group, self.state, ("exp_avg", "exp_avg_sq"))
            if not params:
                continue
            b1, b2 = group["betas"]
            torch._foreach_lerp_(exp_avg, grads, 1 - b1)
            torch._foreach_mul_(exp_avg_sq, b2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)
            denom = torch._foreach_add(exp_avg_sq, group["eps"])
            torch._foreach_sqrt_(denom)
            torch._foreach_addcdiv_(params, exp_avg, denom, value=-group["lr"])
        return loss
