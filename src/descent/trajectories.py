"""The course's pictures, computed: optimizer paths on an elongated quadratic bowl, and noisy measurements.

The optimizers are built exactly as a run builds them: conf/optimizer/<name>.yaml composed by Hydra and
instantiated with its own learning rate and betas, then stepped on a 2-D parameter. Nothing here trains a network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from descent import CONF_DIR

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "course_rmsprop", "course_adam")
# f(x, y) = (CURVATURE_X x^2 + CURVATURE_Y y^2) / 2: with sgd's lr 0.1, y overshoots (0.1 * 18 > 1: it oscillates)
# while x shrinks by only 2% a step, the course's "oscillations slow convergence"; the start is a few hundred
# steps of adam's lr 0.001 away from the minimum, so every optimizer is seen with its own configured lr.
CURVATURE = (0.2, 18.0)
START = (-0.15, 0.04)
STEPS = 150


def bowl(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    return 0.5 * (CURVATURE[0] * x**2 + CURVATURE[1] * y**2)


def compose_optimizer(name: str) -> torch.optim.Optimizer:
    """`optimizer=<name>` composed through the train config (as `python train.py optimizer=<name>` does), over a
    2-D parameter at START."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"optimizer={name}"])
    point = torch.tensor(START, dtype=torch.float64, requires_grad=True)
    return instantiate(cfg.optimizer)([point])


def path_of(name: str, steps: int = STEPS) -> np.ndarray:
    """The (steps + 1, 2) points the optimizer visits from START on the bowl."""
    optimizer = compose_optimizer(name)
    (point,) = optimizer.param_groups[0]["params"]
    points = [point.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        bowl(point[0], point[1]).backward()
        optimizer.step()
        points.append(point.detach().clone())
    return torch.stack(points).numpy()


def noisy_measurements(n: int = 200, seed: int = 0) -> np.ndarray:
    """A slow seasonal signal plus noise, like the course's daily temperatures."""
    t = np.arange(1, n + 1)
    return 10 + 5 * np.sin(2 * np.pi * t / n) + np.random.default_rng(seed).normal(0, 2, n)


def draw(out: Path) -> Path:
    from descent import plots

    paths = {name: path_of(name) for name in OPTIMIZERS}
    return plots.trajectories(paths, bowl, noisy_measurements(), (0.5, 0.9, 0.98), out)
