"""scripts/trajectories.py: the course's pictures, with the optimizers built from conf/optimizer/*.yaml."""

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from descent.trajectories import CURVATURE, OPTIMIZERS, START, bowl, path_of


def test_trajectories_script_writes_the_picture(tmp_path):
    out = tmp_path / "figures" / "x.png"
    process = run_script("scripts/trajectories.py", "--out", str(out))
    assert process.returncode == 0, process.stderr
    with Image.open(out) as image:
        assert image.width >= 1000 and np.asarray(image.convert("L")).std() > 10


def test_paths_use_the_configured_learning_rate():
    (x0, y0), (x1, y1) = path_of("sgd", steps=1)
    gradient = np.array(CURVATURE) * np.array(START)
    assert (x1, y1) == pytest.approx(np.array([x0, y0]) - 0.1 * gradient)  # conf/optimizer/sgd.yaml: lr 0.1


def test_sgd_oscillates_across_the_steep_direction_and_every_optimizer_descends():
    paths = {name: path_of(name) for name in OPTIMIZERS}
    sign_changes = np.count_nonzero(np.diff(np.sign(paths["sgd"][:20, 1])))
    assert sign_changes >= 10  # the course's zig-zag: each step overshoots the valley
    for name, xy in paths.items():
        assert bowl(*xy[-1]) < 0.05 * bowl(*xy[0]), name
    assert not np.allclose(paths["adam"], paths["course_adam"])  # bias correction and eps placement differ
