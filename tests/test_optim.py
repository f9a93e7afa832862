"""Each optimizer config, instantiated as train.py does, against the slide's (or torch's documented) update."""

import math

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate

from descent.config import ConfigError
from descent.optim import build_optimizer, fused_sgd_skips

STEPS = 30
A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)  # the third gradient entry is always exactly 0


def gradient(w: torch.Tensor) -> torch.Tensor:
    return A @ w - B


def run_config(name: str) -> tuple[list[torch.Tensor], dict]:
    cfg = compose_train(f"optimizer={name}")
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    optimizer = instantiate(cfg.optimizer)([w])
    path = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        w.grad = gradient(w.detach())
        optimizer.step()
        path.append(w.detach().clone())
    return path, dict(cfg.optimizer)


def reference(update) -> list[torch.Tensor]:
    w, state, path = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), {}, []
    for t in range(1, STEPS + 1):
        w = update(w, gradient(w), state, t)
        path.append(w.clone())
    return path


def assert_same_path(path, expected):
    for step, (got, want) in enumerate(zip(path, expected, strict=True)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), f"step {step}: {got} != {want}"


def test_sgd_is_w_minus_a_dw():
    path, cfg = run_config("sgd")
    assert_same_path(path, reference(lambda w, g, s, t: w - cfg["lr"] * g))


def test_momentum_is_the_course_form_from_v_zero():
    path, cfg = run_config("momentum")
    a, b = cfg["lr"], cfg["momentum"]
    assert b == 0.9

    def update(w, g, state, t):
        state["v"] = b * state.get("v", torch.zeros_like(w)) + (1 - b) * g
        return w - a * state["v"]

    assert_same_path(path, reference(update))


def test_torch_dampening_would_not_be_the_course_form():
    """Why momentum.yaml does not use SGD(dampening=b): its first step takes V = dW, not (1-b)*dW."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9, dampening=0.9)
    w.grad = gradient(w.detach())
    optimizer.step()
    course_first_step = torch.ones(3, dtype=torch.float64) - 0.1 * 0.1 * gradient(torch.ones(3, dtype=torch.float64))
    assert not torch.allclose(w.detach(), course_first_step)


def rmsprop(cfg, eps_inside: bool):
    a, b, eps = cfg["lr"], cfg["alpha"], cfg["eps"]

    def update(w, g, state, t):
        state["s"] = b * state.get("s", torch.zeros_like(w)) + (1 - b) * g**2
        denom = torch.sqrt(state["s"] + eps) if eps_inside else torch.sqrt(state["s"]) + eps
        return w - a * g / denom

    return update


def test_torch_rmsprop_is_the_slide_with_eps_outside_the_root():
    path, cfg = run_config("rmsprop")
    assert_same_path(path, reference(rmsprop(cfg, eps_inside=False)))


def test_course_rmsprop_is_the_slide_exactly():
    path, cfg = run_config("course_rmsprop")
    assert_same_path(path, reference(rmsprop(cfg, eps_inside=True)))
    assert all(math.isfinite(v) for w in path for v in w.tolist())  # a zero gradient entry gives no NaN


def adam(cfg, course: bool, decoupled_decay: float = 0.0):
    a, (b1, b2), eps = cfg["lr"], cfg["betas"], cfg["eps"]

    def update(w, g, state, t):
        w = w * (1 - a * decoupled_decay)
        state["v"] = b1 * state.get("v", torch.zeros_like(w)) + (1 - b1) * g
        state["s"] = b2 * state.get("s", torch.zeros_like(w)) + (1 - b2) * g**2
        if course:
            return w - a * state["v"] / torch.sqrt(state["s"] + eps)
        v_hat, s_hat = state["v"] / (1 - b1**t), state["s"] / (1 - b2**t)
        return w - a * v_hat / (torch.sqrt(s_hat) + eps)

    return update


def test_adam_uses_the_course_hyperparameters_with_bias_correction():
    path, cfg = run_config("adam")
    assert list(cfg["betas"]) == [0.9, 0.98] and cfg["eps"] == 1e-8
    assert_same_path(path, reference(adam(cfg, course=False)))


def test_course_adam_is_the_slide_exactly_without_bias_correction():
    path, cfg = run_config("course_adam")
    assert_same_path(path, reference(adam(cfg, course=True)))
    torch_path, _ = run_config("adam")
    assert not torch.allclose(path[0], torch_path[0])


def test_adamw_decays_weights_apart_from_the_gradient():
    path, cfg = run_config("adamw")
    assert cfg["weight_decay"] > 0
    assert_same_path(path, reference(adam(cfg, course=False, decoupled_decay=cfg["weight_decay"])))


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam", "adamw", "course_rmsprop", "course_adam"])
def test_every_optimizer_config_is_partial_and_returns_a_torch_optimizer(name):
    cfg = compose_train(f"optimizer={name}")
    assert cfg.optimizer._partial_ is True
    assert isinstance(instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))]), torch.optim.Optimizer)


SKIPS_BF16 = fused_sgd_skips(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fused_sgd_over_float32_or_float64_parameters_is_built(dtype):
    parameter = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
    assert build_optimizer(compose_train("optimizer=sgd", "+optimizer.fused=true").optimizer, [parameter])


@pytest.mark.skipif(not SKIPS_BF16, reason="this torch's fused CPU SGD updates bf16 parameters")
def test_a_fused_sgd_that_would_leave_bf16_parameters_unchanged_is_refused_naming_the_key():
    parameter = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    config = compose_train("optimizer=sgd", "+optimizer.fused=true").optimizer
    with pytest.raises(ConfigError, match=r"^optimizer.fused=True is not allowed: .*pytorch/pytorch#191763"):
        build_optimizer(config, [parameter])
    unfused = build_optimizer(compose_train("optimizer=sgd").optimizer, [parameter])  # what the message offers
    parameter.grad = torch.ones_like(parameter)
    unfused.step()
    assert bool((parameter != 0).all())
