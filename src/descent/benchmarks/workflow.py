"""`python scripts/bench.py --workflow`: the course's optimizer comparison as a user waits for it, each side timed from
process start to exit, interleaved in one run:

(a) descent, one job per training: `python train.py -m experiment=optimizers replicates=1 seed=1,2,3
    callbacks.early_stopping=null` (12 jobs);
(b) descent, the replicates at once: `python train.py -m optimizer=sgd,momentum,rmsprop,adam replicates=5
    callbacks.early_stopping=null` (20 trainings in 4 jobs);
(c) a hand-written PyTorch loop in one process doing the same trainings one after another, for the 12 trainings of
    (a) and for the 20 of (b): the same split, MLP and optimizers (the course's settings, fused Adam as the configs
    have it), 20 epochs of batch 32, validation each epoch, the best epoch's weights tested. It reads the data and the
    split from files written beforehand and imports torch and numpy only: the least a plain script does.

It prints each time, then the ratios (a)/(c12) and (b)/(c20) against their goals (<= 1.3 and <= 1.0). It measures
and never tunes. The hand loop runs as `python -m descent.benchmarks.workflow SPEC.json` (its module imports nothing
heavy at the top, so that this process pays what a plain script pays).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
GOALS = {"a": 1.3, "b": 1.0}


def hand_network(hidden: list[int], classes: int, dropout: float) -> nn.Sequential:
    """[Linear (no bias) -> BatchNorm1d -> ReLU -> Dropout] per hidden layer, then Linear: descent's MLP by hand."""
    layers: list[nn.Module] = []
    width = 64
    for size in hidden:
        layers += [nn.Linear(width, size, bias=False), nn.BatchNorm1d(size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, classes))


def hand_optimizer(name: str, settings: dict[str, Any], parameters: Any) -> torch.optim.Optimizer:
    """The course's optimizers as a plain script writes them; momentum is V = bV + (1-b)dW, W -= aV."""
    if name == "momentum":
        b = settings["momentum"]
        return torch.optim.SGD(parameters, lr=settings["lr"] * (1 - b), momentum=b)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=settings["lr"])
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=settings["lr"], alpha=settings["alpha"], eps=settings["eps"])
    betas = tuple(settings["betas"])
    return torch.optim.Adam(parameters, lr=settings["lr"], betas=betas, eps=settings["eps"], fused=settings["fused"])


def hand_training(spec: dict[str, Any], data: dict[str, torch.Tensor], name: str, seed: int) -> float:
    """One training of the hand loop; returns the test accuracy of its best validation epoch."""
    torch.manual_seed(seed)
    net = hand_network(spec["hidden"], spec["classes"], spec["dropout"])
    optimizer = hand_optimizer(name, spec["optimizers"][name], net.parameters())
    shuffle = torch.Generator().manual_seed(seed)
    x, y, batch = data["train_x"], data["train_y"], spec["batch_size"]
    best_acc, best_state = -1.0, None
    for _ in range(spec["epochs"]):
        net.train()
        order = torch.randperm(len(y), generator=shuffle)
        for start in range(0, len(y), batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(net(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(data["val_x"]).argmax(1) == data["val_y"]).float().mean())
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    with torch.no_grad():
        return float((net(data["test_x"]).argmax(1) == data["test_y"]).float().mean())


def hand_loop(spec_path: Path) -> None:
    """The hand loop's process: every (optimizer, seed) training of the spec, one after another."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(1)  # the plain loop's best at batch 32 on these cores
    images = torch.from_numpy(np.load(spec["images"])).flatten(1)
    labels = torch.from_numpy(np.load(spec["labels"]))
    split = np.load(spec["split"])
    train = torch.from_numpy(split["train"])
    mean, std = images[train].mean(0), images[train].std(0)
    images = (images - mean) / torch.where(std > 0, std, 1.0)
    data = {}
    for part in ("train", "val", "test"):
        index = torch.from_numpy(split[part])
        data[f"{part}_x"], data[f"{part}_y"] = images[index], labels[index]
    accuracies = [hand_training(spec, data, name, seed) for name in spec["names"] for seed in spec["seeds"]]
    print(f"hand loop: {len(accuracies)} trainings, mean test/acc {statistics.mean(accuracies):.4f}")


def prepare(folder: Path, names: list[str], epochs: int) -> dict[str, Any]:
    """The data, split and settings the hand loop reads: descent's own, from its configs (digits, data.split_seed)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from descent import CONF_DIR
    from descent.data.sources import build_source
    from descent.data.splits import make_splits

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train")
        optimizers = {
            name: OmegaConf.to_container(compose(config_name="train", overrides=[f"optimizer={name}"]).optimizer)
            for name in names
        }
    source = build_source(cfg.data)
    split = make_splits(len(source.labels), {"label": source.labels}, tuple(cfg.data.split), cfg.data.split_seed)[0]
    np.save(folder / "images.npy", np.asarray(source.images, dtype=np.float32))
    np.save(folder / "labels.npy", np.asarray(source.labels, dtype=np.int64))
    split.save(folder / "split.npz")
    return {
        "images": str(folder / "images.npy"),
        "labels": str(folder / "labels.npy"),
        "split": str(folder / "split.npz"),
        "hidden": list(cfg.model.hidden_dims),
        "dropout": cfg.model.dropout,
        "classes": source.num_classes,
        "batch_size": cfg.data.batch_size,
        "epochs": epochs,
        "names": names,
        "optimizers": optimizers,
    }


def training_seconds(sweep_dir: Path) -> float:
    """The seconds a sweep folder's jobs spent training (each run's last metrics.csv time_s; replicates trained at
    once share one clock, counted once): the rest of the wall time is start-up and fixed costs."""
    total = 0.0
    for job in (folder for folder in sweep_dir.iterdir() if folder.name.isdigit()):
        run = job / "replicate_0" if (job / "replicate_0").is_dir() else job
        with open(run / "metrics.csv") as file:
            total += float(list(csv.DictReader(file))[-1]["time_s"])
    return total


def timed(command: list[str]) -> float:
    """Wall seconds of a command from process start to exit; its output is dropped, a failure raises."""
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return seconds


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py --workflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs a training (default 20)")
    parser.add_argument("--seeds", type=int, default=3, help="(a): seeds 1..N, one job each (default 3)")
    parser.add_argument("--replicates", type=int, default=5, help="(b): replicates a job (default 5)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="the settings (default: the course's 4)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats, medians taken (default 2)")
    args = parser.parse_args(argv)

    names = args.optimizers.split(",")
    seeds_a = list(range(1, args.seeds + 1))
    seeds_b = list(range(42, 42 + args.replicates))  # replicates=k: seeds seed..seed+k-1, seed 42 by default
    epochs = [f"trainer.max_epochs={args.epochs}", "callbacks.early_stopping=null"]
    optimizers = f"optimizer={','.join(names)}"
    command_a = ["-m", "experiment=optimizers", "replicates=1", f"seed={','.join(map(str, seeds_a))}"]
    command_a += [] if names == list(OPTIMIZERS) else [optimizers]
    command_b = ["-m", optimizers, f"replicates={args.replicates}"]
    seconds: dict[str, list[float]] = {"a": [], "b": [], "c_a": [], "c_b": [], "train_a": [], "train_b": []}
    with tempfile.TemporaryDirectory(prefix="descent-workflow-") as tmp:
        folder = Path(tmp)
        spec = prepare(folder, names, args.epochs)
        specs = {}
        for side, seeds in (("c_a", seeds_a), ("c_b", seeds_b)):
            specs[side] = folder / f"{side}.json"
            specs[side].write_text(json.dumps({**spec, "seeds": seeds}))
        for repeat in range(args.repeats):
            for side, overrides in (("a", command_a), ("b", command_b)):
                sweep_dir = folder / f"{side}{repeat}"
                command = [sys.executable, "-m", "descent.train", *overrides, *epochs, f"hydra.sweep.dir={sweep_dir}"]
                seconds[side].append(timed(command))
                seconds[f"train_{side}"].append(training_seconds(sweep_dir))
            for side in ("c_a", "c_b"):
                seconds[side].append(timed([sys.executable, "-m", "descent.benchmarks.workflow", str(specs[side])]))
    report(seconds, command_a, command_b, len(names) * len(seeds_a), len(names) * len(seeds_b), args)


def report(
    seconds: dict[str, list[float]],
    command_a: list[str],
    command_b: list[str],
    trainings_a: int,
    trainings_b: int,
    args: argparse.Namespace,
) -> None:
    """Each side's median seconds, then one line per ratio with its goal and whether it holds."""
    median = {side: statistics.median(values) for side, values in seconds.items()}
    epochs = f"{args.epochs} epochs a training, median of {args.repeats} interleaved repeats, process start to exit"
    print(f"the course's optimizer comparison ({epochs}):")
    for side, command in (("a", command_a), ("b", command_b)):
        training = median[f"train_{side}"]
        print(
            f"({side}) python train.py {' '.join(command)} callbacks.early_stopping=null: {median[side]:.1f} s, of "
            f"which training {training:.1f} s and the rest (start-up, each job's set-up, test, files) "
            f"{median[side] - training:.1f} s"
        )
    print(f"(c{trainings_a}) hand-written loop, {trainings_a} trainings in one process: {median['c_a']:.1f} s")
    print(f"(c{trainings_b}) hand-written loop, {trainings_b} trainings in one process: {median['c_b']:.1f} s")
    for side, plain, trainings in (("a", "c_a", trainings_a), ("b", "c_b", trainings_b)):
        ratio, goal = median[side] / median[plain], GOALS[side]
        verdict = "holds" if ratio <= goal else "misses"
        print(f"ratio ({side})/(c{trainings}): {ratio:.2f} (goal <= {goal}: {verdict})")


if __name__ == "__main__":
    hand_loop(Path(sys.argv[1]))
