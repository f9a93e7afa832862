"""`python scripts/bench.py`: seconds per epoch of our run against a plain PyTorch loop, in one process.

Both train the same MLP (conf/model) with Adam (conf/optimizer) on the same digits split (conf/data) at batch sizes
1, 32, 256 and full. Our side is what `python train.py` builds: the config composed from conf/train.yaml and the
model, DataModule and Trainer made by descent.train's own builders, default callbacks and CSV logger included. The
plain side is the loop one writes by hand: shuffle, slice tensors, step; then the validation loss and accuracy.
Between them, "bare Lightning" runs that plain loop's model, optimizer and slices in Lightning's Trainer with
nothing else and Lightning's defaults: what Lightning's own loop costs as it comes, before any metric, log, callback
or checkpoint.
Repeats are interleaved and medians taken, so a machine busy with other work slows both sides alike. It ends with
the start-up time of a 3-epoch `python train.py` next to that of importing torch and Lightning, then the line
`overhead ratio at batch size 32: X.XX`.

It measures and never tunes: no setting of the run it times is changed here.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from descent import CONF_DIR
from descent.callbacks import EpochHistory, GracefulStop
from descent.config import check_batch_size
from descent.data.batches import batch_bounds
from descent.data.datamodule import feature_stats
from descent.data.sources import build_source
from descent.data.splits import train_val_test
from descent.model import MLP
from descent.train import build_datamodule, build_model
from descent.trainer import available_cores, build_trainer, quiet_lightning, set_threads

BATCH_SIZES: tuple[int | str, ...] = (1, 32, 256, "full")
RATIO_GOALS: dict[int | str, float] = {1: 1.7, 32: 1.35, 256: 1.25, "full": 1.25}
STARTUP_GOAL_S = 1.0  # at most this much more than importing torch and pytorch_lightning
STARTUP_EPOCHS = 3


def compose_config(batch_size: int | str, epochs: int, overrides: list[str] = ()) -> DictConfig:
    """conf/train.yaml as `python train.py data.batch_size=B trainer.max_epochs=E [OVERRIDES]` composes it.
    Batch size 1 turns batch norm off: it cannot normalize one sample (the run refuses it)."""
    fixed = [f"data.batch_size={batch_size}", f"trainer.max_epochs={epochs}"]
    if batch_size == 1:
        fixed.append("model.batch_norm=false")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*fixed, *overrides])


class PlainLoop:
    """The hand-written loop: the same MLP and split, the data standardized once and kept in tensors on the device,
    one shuffle per epoch, whole-batch slices, torch.optim.Adam with the config's lr, betas and eps and torch's
    defaults for the rest (or the run's own optimizer with `same_optimizer`); after each epoch the validation
    loss and accuracy, as a user of such a loop would print them."""

    def __init__(self, cfg: DictConfig, data: dict[str, tuple[torch.Tensor, torch.Tensor]], same_optimizer: bool):
        from hydra.utils import instantiate

        torch.manual_seed(cfg.seed)
        (images, labels), (self.val_images, self.val_labels) = data["train"], data["val"]
        self.images, self.labels = images, labels
        model = cfg.model
        self.net = MLP(
            [images.shape[1]],
            int(labels.max()) + 1,
            list(model.hidden_dims),
            model.batch_norm,
            model.dropout,
            model.activation,
        ).to(images.device)
        opt = cfg.optimizer
        self.optimizer = (
            instantiate(opt)(self.net.parameters())
            if same_optimizer
            else torch.optim.Adam(self.net.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
        )
        self.bounds = batch_bounds(len(labels), check_batch_size(cfg.data.batch_size, len(labels), model.batch_norm))
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's training batches: one shuffle (the loop's generator), then whole-batch slices."""
        order = torch.randperm(len(self.labels), generator=self.generator).to(self.labels.device)
        images, labels = self.images[order], self.labels[order]
        for start, end in self.bounds:
            yield images[start:end], labels[start:end]

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """The validation loss and accuracy (a device sync)."""
        logits = self.net(self.val_images)
        loss = F.cross_entropy(logits, self.val_labels)
        return float(loss), float((logits.argmax(1) == self.val_labels).float().mean())

    def epoch(self) -> tuple[float, float]:
        """One training epoch and one validation pass; returns the validation loss and accuracy."""
        self.net.train()
        train_loss = torch.zeros((), device=self.images.device)
        for images, labels in self.batches():
            loss = F.cross_entropy(self.net(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            train_loss += loss.detach() * len(labels)
        self.net.eval()
        return self.validate()


class SliceLoader:
    """The plain loop's batches for a Trainer (validation: one placeholder batch, as PlainLoop.validate reads its
    own tensors)."""

    def __init__(self, loop: PlainLoop, train: bool) -> None:
        self.loop, self.train = loop, train

    def __len__(self) -> int:
        return len(self.loop.bounds) if self.train else 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.loop.batches() if self.train else iter([(self.loop.val_images, self.loop.val_labels)])


class BareLightning(pl.LightningModule):
    """The plain loop inside Lightning's Trainer and nothing else: its net, optimizer, batches and validation, no
    metric, no log, no callback, no checkpoint, no progress bar, and Lightning's defaults for the rest."""

    def __init__(self, loop: PlainLoop) -> None:
        super().__init__()
        self.loop, self.net = loop, loop.net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.loop.validate()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.loop.optimizer


class EpochClock(pl.Callback):
    """Wall-clock marks at each training epoch's start and at the end of training: an epoch lasts from its mark to
    the next one, so it counts its steps, validation, checkpoints, logging and progress bar."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    def epoch_seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.marks, self.marks[1:], strict=False)]


@dataclass
class Case:
    """One batch size: its configs, its plain loops (one per thread count) and the epoch times of each side."""

    batch_size: int | str
    cfg: DictConfig
    overrides: list[str]
    steps: int = 0
    threads: int = 0
    ours: list[float] = field(default_factory=list)
    bare: dict[int, list[float]] = field(default_factory=dict)
    plain: dict[int, list[float]] = field(default_factory=dict)
    loops: dict[int, PlainLoop] = field(default_factory=dict)


def fastest(seconds: dict[int, list[float]]) -> tuple[int, float]:
    """A side's best thread count and its median seconds per epoch (`seconds`: per thread count, as Case keeps them)."""
    return min(((t, statistics.median(s)) for t, s in seconds.items()), key=lambda pair: pair[1])


def time_ours(case: Case, source: Any, split: Any, root: Path, warmup: int, epochs: int) -> None:
    """A fresh run as train.py builds it (warm-up + timed epochs); appends the timed epochs' seconds."""
    cfg = compose_config(case.batch_size, warmup + epochs, case.overrides)
    batch_size = check_batch_size(cfg.data.batch_size, len(split.train), cfg.model.batch_norm)
    pl.seed_everything(cfg.seed, verbose=False)
    run_dir = Path(tempfile.mkdtemp(dir=root))
    model = build_model(cfg, source, split)
    case.threads = set_threads(cfg.threads, batch_size, model, list(source.image_shape))
    datamodule = build_datamodule(cfg, source, split, batch_size)
    clock = EpochClock()
    history, stopper = EpochHistory(run_dir / "metrics.csv"), GracefulStop(run_dir / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, run_dir, history, stopper, extra=(clock,))
    trainer.fit(model, datamodule=datamodule)
    case.steps = len(datamodule.train_dataloader())
    case.ours += clock.epoch_seconds()[warmup:]


def time_plain(case: Case, threads: int, warmup: int, epochs: int) -> None:
    """Timed epochs of the plain loop at a thread count (warm-up epochs only on its first use)."""
    torch.set_num_threads(threads)
    loop = case.loops[threads]
    for _ in range(warmup if threads not in case.plain else 0):
        loop.epoch()
    for _ in range(epochs):
        started = time.perf_counter()
        loop.epoch()
        case.plain.setdefault(threads, []).append(time.perf_counter() - started)


def time_bare(
    case: Case,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    same_optimizer: bool,
    threads: int,
    warmup: int,
    epochs: int,
) -> None:
    """A fresh BareLightning run at a thread count; appends the timed epochs' seconds."""
    torch.set_num_threads(threads)
    loop = PlainLoop(case.cfg, data, same_optimizer)
    clock = EpochClock()
    trainer = pl.Trainer(
        accelerator=case.cfg.trainer.accelerator,
        devices=1,
        max_epochs=warmup + epochs,
        callbacks=[clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(BareLightning(loop), SliceLoader(loop, train=True), SliceLoader(loop, train=False))
    case.bare.setdefault(threads, []).extend(clock.epoch_seconds()[warmup:])


def time_startup(runs: int, root: Path) -> tuple[list[float], list[float]]:
    """Seconds from process start to exit of `python train.py trainer.max_epochs=3` (each into its own folder) and,
    interleaved with them, of a process that only imports torch and pytorch_lightning: the floor of any run."""
    seconds: tuple[list[float], list[float]] = ([], [])
    for index in range(runs):
        folder = root / f"startup_{index}"
        train = [
            sys.executable,
            "-m",
            "descent.train",
            f"trainer.max_epochs={STARTUP_EPOCHS}",
            f"hydra.run.dir={folder}",
        ]
        imports = [sys.executable, "-c", "import torch, pytorch_lightning"]
        for command, times in ((train, seconds[0]), (imports, seconds[1])):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=root)
            times.append(time.perf_counter() - started)
    return seconds


def in_memory(source: Any, split: Any, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each part as (standardized flat images, labels) on `device`, the plain loop's one-time preparation."""
    mean, std = map(torch.from_numpy, feature_stats(source.images, split.train))
    parts = {}
    for part in ("train", "val"):
        indices = getattr(split, part)
        images = torch.as_tensor(source.images[indices], dtype=torch.float32).flatten(1)
        labels = torch.as_tensor(source.labels[indices], dtype=torch.int64)
        parts[part] = (((images - mean) / std).to(device), labels.to(device))
    return parts


def report(
    cases: list[Case], startup: tuple[list[float], list[float]], n_train: int, args: argparse.Namespace, device: str
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    optimizer = "the run's optimizer" if args.same_optimizer else "torch.optim.Adam defaults"
    table = Table(
        title=f"descent against a plain PyTorch loop, {device}: median of {args.repeats} interleaved repeats x "
        f"{args.epochs} epochs (after {args.warmup} warm-up)",
        caption=f"plain: tensor slices, {optimizer}, validation each epoch; bare Lightning: the plain loop's model, "
        "optimizer and slices in Lightning's Trainer as it comes, with no metric, log, callback or checkpoint; ratios: "
        "s/epoch over plain's; (Nt): torch threads; samples/s: training samples per second of epoch; batch 1 runs "
        "without batch norm everywhere",
        box=box.SIMPLE_HEAD,
    )
    columns = (
        "batch",
        "steps",
        "plain\ns/epoch",
        "bare Lightning\ns/epoch",
        "descent\ns/epoch",
        "descent\nsamples/s",
        "bare\nratio",
        "ratio",
        "goal",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for case in cases:
        threads, plain = fastest(case.plain)
        ours, bare = statistics.median(case.ours), fastest(case.bare)[1]
        goal = RATIO_GOALS[case.batch_size]
        table.add_row(
            str(case.batch_size),
            str(case.steps),
            f"{plain:.4f} ({threads}t)",
            f"{bare:.4f}",
            f"{ours:.4f} ({case.threads}t)",
            f"{n_train / ours:,.0f}",
            f"{bare / plain:.2f}",
            f"{ours / plain:.2f}",
            f"[green]<= {goal}[/]" if ours / plain <= goal else f"[red]<= {goal}[/]",
        )
    console = Console(width=max(Console().width, 110))  # 80 columns (a pipe, CI) would fold the figures
    console.print(table)
    if startup[0]:
        train, imports = map(statistics.median, startup)
        verdict = "[green]holds[/]" if train - imports <= STARTUP_GOAL_S else "[red]misses[/]"
        console.print(
            f"start-up, `python train.py trainer.max_epochs={STARTUP_EPOCHS}` from process start to exit: "
            f"{train:.2f} s (median of {', '.join(f'{s:.2f}' for s in startup[0])}); importing torch and "
            f"pytorch_lightning alone: {imports:.2f} s; {train - imports:.2f} s more, goal <= {STARTUP_GOAL_S} s more "
            f"{verdict}"
        )
    case_32 = next(case for case in cases if case.batch_size == 32)
    print(f"overhead ratio at batch size 32: {statistics.median(case_32.ours) / fastest(case_32.plain)[1]:.2f}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per repeat and side (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs before each of our runs (default 1)")
    parser.add_argument("--startup-runs", type=int, default=3, help="3-epoch train.py processes to time (0: skip)")
    parser.add_argument(
        "--same-optimizer",
        action="store_true",
        help="give the plain loop the run's optimizer (fused Adam), not torch's",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sides, as train.py takes them")
    args = parser.parse_args(argv)

    quiet_lightning()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    base = compose_config(32, 1, args.overrides)
    source = build_source(base.data)
    split = train_val_test(source.labels, tuple(base.data.split), base.data.split_seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = in_memory(source, split, device)
    thread_counts = sorted({1, available_cores()})

    cases = [Case(size, compose_config(size, 1, args.overrides), args.overrides) for size in BATCH_SIZES]
    for case in cases:
        case.loops = {threads: PlainLoop(case.cfg, data, args.same_optimizer) for threads in thread_counts}
    with tempfile.TemporaryDirectory(prefix="descent-bench-") as folder:
        root = Path(folder)
        for _ in range(args.repeats):
            for case in cases:
                for threads in thread_counts:
                    time_plain(case, threads, args.warmup, args.epochs)
                    time_bare(case, data, args.same_optimizer, threads, args.warmup, args.epochs)
                time_ours(case, source, split, root, args.warmup, args.epochs)
        startup = time_startup(args.startup_runs, root)
    report(cases, startup, len(split.train), args, str(device))
