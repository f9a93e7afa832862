"""The optimizers: built from their configs (`build_optimizer`, `build_lr_scheduler`), and only what torch.optim
lacks, the course's exact momentum, RMSprop and Adam updates.

The course writes (slides "Descente de gradient avec élan", "RMSprop", "ADAM"), for every weight W with gradient dW:
    momentum: V = b*V + (1-b)*dW;                      W := W - a*V
    RMSprop:  S = b*S + (1-b)*dW^2;                    W := W - a*dW/sqrt(S + eps)
    Adam:     V = b1*V + (1-b1)*dW, S = b2*S + (1-b2)*dW^2;  W := W - a*V/sqrt(S + eps)
all from V = S = 0. torch's RMSprop and Adam put eps outside the square root and Adam corrects the bias, so no
torch.optim setting equals the last two: they are small Optimizer subclasses, one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.optim import SGD, Optimizer

from descent.config import ConfigError


def build_optimizer(config: Mapping[str, Any], parameters: Iterable[torch.Tensor]) -> Optimizer:
    """The optimizer of an `optimizer` config (a `_partial_: true` Hydra config: torch.optim's, or one below) over
    `parameters`. The module that trains never names an optimizer."""
    from hydra.utils import instantiate

    optimizer = instantiate(dict(config))(parameters)
    check_fused_sgd(optimizer)
    return optimizer


def fused_sgd_skips(dtype: torch.dtype) -> bool:
    """Whether this torch's fused CPU SGD leaves parameters of `dtype` as they were (pytorch/pytorch#191763: torch
    2.13's kernel skips bf16 and fp16 in its vectorized blocks): one step over 64 of them, checked."""
    param = torch.ones(64, dtype=dtype)
    param.grad = torch.ones_like(param)
    SGD([param], lr=0.5, fused=True).step()
    return not bool((param == 0.5).all())


def check_fused_sgd(optimizer: Optimizer) -> None:
    """Refuse a fused SGD over bf16 or fp16 parameters on CPU when this torch's kernel would not update them: the
    run would go on, silently untrained."""
    if not isinstance(optimizer, SGD):
        return
    dtypes = {
        param.dtype
        for group in optimizer.param_groups
        if group.get("fused")
        for param in group["params"]
        if param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16)
    }
    for dtype in sorted(dtypes, key=str):
        if fused_sgd_skips(dtype):
            raise ConfigError(
                "optimizer.fused",
                True,
                f"torch {torch.__version__}'s fused SGD on CPU leaves {dtype} parameters unchanged "
                "(pytorch/pytorch#191763), so this run would not train: use optimizer.fused=false, or a float32 "
                "trainer.precision",
            )


def build_lr_scheduler(config: Mapping[str, Any], optimizer: Optimizer) -> dict[str, Any]:
    """Lightning's lr_scheduler dict of a `scheduler` config, its torch scheduler (a `_partial_` config) completed
    with `optimizer`."""
    from hydra.utils import instantiate

    lr_scheduler = dict(config)
    lr_scheduler["scheduler"] = instantiate(lr_scheduler["scheduler"])(optimizer)
    return lr_scheduler


def course_momentum(params: Iterable[torch.Tensor], lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> SGD:
    """The course's momentum as torch SGD: SGD(lr=a*(1-b), momentum=b, dampening=0) is exactly that update.

    Why: torch keeps buf = b*buf + dW and steps lr*buf; with lr = a*(1-b) that is a*V for V = (1-b)*buf.
    torch's `dampening=b` is not the course's form: its first step takes V = dW instead of (1-b)*dW.
    """
    return SGD(params, lr=lr * (1 - momentum), momentum=momentum, dampening=0.0, weight_decay=weight_decay)


def _updates(group: dict, state: dict, names: tuple[str, ...]) -> Iterator[tuple[torch.Tensor, ...]]:
    """(parameter, its gradient plus L2 weight decay, its state buffers...) for each parameter with a gradient."""
    for param in group["params"]:
        if param.grad is None:
            continue
        grad = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad
        yield param, grad, *(state[param].setdefault(name, torch.zeros_like(param)) for name in names)


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
            b = group["alpha"]
            for param, grad, square_avg in _updates(group, self.state, ("square_avg",)):
                square_avg.mul_(b).addcmul_(grad, grad, value=1 - b)
                param.addcdiv_(grad, (square_avg + group["eps"]).sqrt_(), value=-group["lr"])
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
            b1, b2 = group["betas"]
            for param, grad, exp_avg, exp_avg_sq in _updates(group, self.state, ("exp_avg", "exp_avg_sq")):
                exp_avg.lerp_(grad, 1 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                param.addcdiv_(exp_avg, (exp_avg_sq + group["eps"]).sqrt_(), value=-group["lr"])
        return loss
