"""What keeps a run fast must not change what it means: the same metrics, checkpoints and callbacks."""

import gc
import math
import re
import sys
import weakref

import pytest
import pytorch_lightning as pl
import torch
from conftest import ENV, ROOT, compose_train
from hydra.utils import instantiate
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.profilers import SimpleProfiler
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import descent.model
from descent.callbacks import EpochHistory, GracefulStop
from descent.checkpoints import BackgroundCheckpointIO
from descent.data.datamodule import ImageDataModule
from descent.data.sources import build_source
from descent.data.splits import train_val_test
from descent.model import MLP, Classifier
from descent.trainer import NoProfiler, available_cores, build_trainer, freeze_heap, set_threads

MLP_CONFIG = {
    "_target_": "descent.model.MLP",
    "hidden_dims": [8],
    "batch_norm": False,
    "dropout": 0.0,
    "activation": "relu",
}


def classifier() -> Classifier:
    return Classifier([2, 2], 3, MLP_CONFIG, optimizer={})


def resumed_from(model: Classifier) -> Classifier:
    """A new Classifier loaded from `model`'s checkpoint contents, as a resume loads them."""
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    resumed = classifier().eval()
    resumed.load_state_dict(checkpoint["state_dict"])
    resumed.on_load_checkpoint(checkpoint)
    return resumed


@pytest.mark.parametrize("flush_steps", [1, 3, 256])
def test_metrics_fed_in_batches_equal_metrics_updated_every_step(monkeypatch, flush_steps):
    monkeypatch.setattr(descent.model, "METRIC_FLUSH_STEPS", flush_steps)
    torch.manual_seed(0)
    model = classifier().eval()
    loss, acc, f1 = (
        MeanMetric(nan_strategy="ignore"),
        MulticlassAccuracy(3, average="micro"),
        MulticlassF1Score(3, average="macro"),
    )
    with torch.no_grad():
        for size in (5, 7, 1, 3, 8, 2, 6):  # uneven batches: the epoch loss is a mean over samples, not batches
            images, labels = torch.randn(size, 2, 2), torch.randint(0, 3, (size,))
            step_loss = model._step((images, labels), "val")
            predictions = model(images).argmax(1)
            loss.update(step_loss, size)
            acc.update(predictions, labels)
            f1.update(predictions, labels)
        values = model._compute("val")
    assert values["val/loss"] == pytest.approx(loss.compute().item(), rel=1e-6)
    assert values["val/acc"] == pytest.approx(acc.compute().item())
    assert values["val/f1"] == pytest.approx(f1.compute().item())


def test_a_mid_epoch_checkpoint_holds_the_steps_torchmetrics_has_not_seen_yet():
    torch.manual_seed(0)
    model = classifier().eval()
    batches = [(torch.randn(6, 2, 2), torch.randint(0, 3, (6,))) for _ in range(3)]
    with torch.no_grad():
        for batch in batches:
            model._step(batch, "train")
        resumed = resumed_from(model)
        # without the pending steps the resumed sums would be empty: a NaN loss (0/0) and no accuracy
        got, want = resumed._compute("train"), model._compute("train")
        assert {k: float(v) for k, v in got.items()} == pytest.approx({k: float(v) for k, v in want.items()})


def test_a_checkpoint_mid_way_leaves_the_flushes_where_an_uninterrupted_run_has_them(monkeypatch):
    # flushing at the checkpoint would cut the sums at other steps: float32 rounding then differs in the last bits
    monkeypatch.setattr(descent.model, "METRIC_FLUSH_STEPS", 4)
    torch.manual_seed(0)
    batches = [(torch.randn(64, 2, 2) * 100, torch.randint(0, 3, (64,))) for _ in range(10)]
    straight, before = classifier().eval(), classifier().eval()
    before.load_state_dict(straight.state_dict())  # the same weights
    with torch.no_grad():
        for batch in batches:
            straight._step(batch, "train")
        for batch in batches[:6]:
            before._step(batch, "train")
        after = resumed_from(before)
        assert len(after._pending["train"]) == 2  # steps 5 and 6 wait for the flush at step 8, as they did before
        for batch in batches[6:]:
            after._step(batch, "train")
        assert before._compute("train")  # the saved model goes on its own way: nothing shared with the resumed one
        got, want = after._compute("train"), straight._compute("train")
    assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in want.items()}  # exact, not approx


def test_metric_states_travel_in_checkpoints_only_while_they_hold_partial_sums(monkeypatch):
    monkeypatch.setattr(descent.model, "METRIC_FLUSH_STEPS", 2)
    model = classifier().eval()
    with torch.no_grad():
        for _ in range(3):
            model._step((torch.randn(4, 2, 2), torch.randint(0, 3, (4,))), "train")
        mid_epoch = model.state_dict()
        model._compute("train")  # the epoch's end: computed and reset
    assert {"train_metrics.loss.mean_value", "train_metrics.acc.tp"} <= set(mid_epoch)
    assert not any("metrics." in key for key in model.state_dict())
    assert not any(key.startswith(("val_metrics", "test_metrics")) for key in mid_epoch)


def test_a_nan_loss_still_shows_in_the_epoch_loss():
    model = classifier().eval()
    with torch.no_grad():
        model._step((torch.randn(4, 2, 2), torch.zeros(4, dtype=torch.long)), "train")
        model._step((torch.full((4, 2, 2), float("nan")), torch.zeros(4, dtype=torch.long)), "train")
    assert torch.isnan(model._compute("train")["train/loss"])


def test_checkpoints_are_written_in_the_background_by_the_atomic_writer(tmp_path):
    trainer = build_trainer(compose_train(), tmp_path, EpochHistory(tmp_path / "m.csv"), GracefulStop(tmp_path / "l"))
    assert type(trainer.strategy.checkpoint_io) is BackgroundCheckpointIO


def test_a_users_trainer_keeps_its_progress_bar(tmp_path):
    trainer = build_trainer(compose_train(), tmp_path, EpochHistory(tmp_path / "m.csv"), GracefulStop(tmp_path / "l"))
    bars = [callback for callback in trainer.callbacks if isinstance(callback, ProgressBar)]
    assert len(bars) == 1 and bars[0].is_enabled and bars[0].refresh_rate > 0


def test_no_profiler_costs_nothing_by_default_and_a_chosen_one_is_kept(tmp_path):
    def profiler(*overrides: str):
        cfg = compose_train(*overrides)
        return build_trainer(cfg, tmp_path, EpochHistory(tmp_path / "m.csv"), GracefulStop(tmp_path / "l")).profiler

    assert type(profiler()) is NoProfiler
    with profiler().profile("a hook") as inside:  # what Lightning does around each hook call
        assert inside is None
    assert type(profiler("trainer.profiler=simple")) is SimpleProfiler


def test_batches_already_on_the_device_are_not_moved_again():
    cfg = compose_train("data=synthetic")
    source = build_source(cfg.data)
    datamodule = ImageDataModule(source, train_val_test(source.labels, (0.6, 0.2, 0.2), 0), 8, 16, 0)
    on_device = (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert datamodule.transfer_batch_to_device(on_device, torch.device("cpu"), 0) is on_device
    moved = datamodule.transfer_batch_to_device(on_device, torch.device("meta"), 0)  # elsewhere: Lightning moves it
    assert [part.device.type for part in moved] == ["meta", "meta"]


def test_the_epoch_rows_travel_packed_and_come_back_as_they_were(tmp_path):
    history = EpochHistory(tmp_path / "metrics.csv")
    history.rows = [
        {"epoch": 0, "step": 34, "time_s": 0.5, "train/loss": 0.7, "val/acc": 0.9, "lr": 0.001},
        {"epoch": 1, "step": 68, "time_s": 1.0, "train/loss": float("nan"), "lr": 0.001},  # diverged, no val/acc
    ]
    first = history.state_dict()
    history.rows.append({"epoch": 2, "step": 102, "time_s": 1.5, "train/loss": 0.5, "val/acc": 0.95, "lr": 0.0005})
    state = history.state_dict()
    assert isinstance(state["values"], torch.Tensor) and state["values"].shape == (3, len(state["columns"]))
    assert torch.allclose(state["values"][:2], first["values"], equal_nan=True)  # the rows packed before are kept
    resumed = EpochHistory(tmp_path / "other.csv")
    resumed.load_state_dict(torch.load(save_and_read(state, tmp_path), weights_only=True))
    assert [list(row) for row in resumed.rows] == [list(row) for row in history.rows]  # same keys, same order
    assert [type(row["epoch"]) for row in resumed.rows] == [int, int, int]
    for got, want in zip(resumed.rows, history.rows, strict=True):
        assert got == pytest.approx(want, nan_ok=True)


def save_and_read(state: dict, folder) -> str:
    path = folder / "state.pt"
    torch.save(state, path)
    return str(path)


def test_epoch_rows_saved_as_dicts_by_an_earlier_version_still_load(tmp_path):
    rows = [{"epoch": 0, "step": 34, "time_s": 0.5, "val/acc": 0.9, "lr": 0.001}]
    history = EpochHistory(tmp_path / "metrics.csv")
    history.load_state_dict({"rows": rows, "elapsed": 0.5, "lr": 0.001})
    assert history.rows == rows and history.state_dict()["values"].shape == (1, len(history.state_dict()["columns"]))


class Node:
    def __init__(self, next_node: "Node | None" = None) -> None:
        self.next = next_node


def test_a_later_job_collects_what_the_previous_one_left_before_freezing():
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        cycle = Node()
        cycle.next = Node(cycle)  # garbage only a collection can free
        alive = weakref.ref(cycle.next)
        del cycle
        freeze_heap()  # the next job of a sweep
        assert alive() is None
    finally:
        gc.unfreeze()


def test_threads_auto_follow_the_work_of_a_step_and_an_int_overrides_them():
    small = MLP([64], 10, [256, 256], batch_norm=True, dropout=0.0, activation="relu")  # ~84k multiply-adds a sample
    wide = MLP([784], 10, [1024, 1024], batch_norm=True, dropout=0.0, activation="relu")  # ~1.9M
    before = torch.get_num_threads()
    try:
        assert set_threads("auto", 32, small, [64]) == 1 == torch.get_num_threads()
        assert set_threads("auto", 64, small, [64]) == 1
        assert set_threads("auto", 256, small, [64]) == available_cores() == torch.get_num_threads()
        assert set_threads("auto", 1077, small, [64]) == available_cores()
        assert set_threads("auto", 32, wide, [784]) == available_cores()  # the same batch, 20 times the work
        assert set_threads(3, 32, small, [64]) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_configs_use_the_fused_kernel(name):
    optimizer = instantiate(compose_train(f"optimizer={name}").optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["fused"] is True


@pytest.mark.slow
def test_bench_prints_the_table_and_ends_with_the_ratio_line():
    import subprocess

    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--epochs", "1", "--repeats", "1", "--warmup", "0"]
    process = subprocess.run(
        [*command, "--startup-runs", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert process.returncode == 0, process.stderr
    lines = process.stdout.strip().splitlines()
    assert re.fullmatch(r"overhead ratio at batch size 32: \d+\.\d\d", lines[-1])
    for size in ("1", "32", "256", "full"):
        row = rf" +{size} +\d+ +\d\.\d+ \(\dt\) +\d\.\d+ +\d\.\d+ \(\dt\) +[\d,]+( +\d+\.\d\d){{2}} +<= "
        assert any(re.match(row, line) for line in lines), process.stdout  # plain, bare, descent; bare ratio, ratio


@pytest.mark.parametrize(("optimizer", "reads"), [("adam", 3), ("sgd", 34)])
def test_the_divergence_flag_is_read_on_the_host_only_every_16_batches_when_the_step_skips_on_the_device(
    tmp_path, monkeypatch, optimizer, reads
):
    from descent.train import build_datamodule, build_model

    cfg = compose_train(f"optimizer={optimizer}", "trainer.max_epochs=1", "logger=none", "callbacks.progress_bar=null")
    source = build_source(cfg.data)
    split = train_val_test(source.labels, tuple(cfg.data.split), cfg.data.split_seed)
    model = build_model(cfg, source, split)
    counted = []
    read = Classifier.read_divergence
    monkeypatch.setattr(Classifier, "read_divergence", lambda self: counted.append(1) or read(self))
    trainer = build_trainer(cfg, tmp_path, EpochHistory(tmp_path / "m.csv"), GracefulStop(tmp_path / "l"))
    torch.set_num_threads(1)
    trainer.fit(model, datamodule=build_datamodule(cfg, source, split, cfg.data.batch_size))
    assert trainer.num_training_batches == 34
    # fused Adam: at batches 16, 32 and the epoch's last; SGD as configured (not fused) on CPU: every batch
    assert len(counted) == reads and model.diverged_at is None


def fitted(tmp_path, *overrides: str, extra=()) -> tuple[Classifier, list[torch.Tensor], int]:
    """A one-epoch fit in this process (`extra`: callbacks first): the model, its optimizer's state tensors after fit,
    its global step."""
    from descent.train import build_datamodule, build_model

    tmp_path.mkdir()
    cfg = compose_train(*overrides, "trainer.max_epochs=1", "logger=none", "callbacks.progress_bar=null")
    source = build_source(cfg.data)
    split = train_val_test(source.labels, tuple(cfg.data.split), cfg.data.split_seed)
    torch.manual_seed(0)
    model = build_model(cfg, source, split)
    trainer = build_trainer(cfg, tmp_path, EpochHistory(tmp_path / "m.csv"), GracefulStop(tmp_path / "l"), extra=extra)
    torch.set_num_threads(1)
    trainer.fit(model, datamodule=build_datamodule(cfg, source, split, cfg.data.batch_size))
    optimizer = trainer.optimizers[0]
    state = [v for p in model.net.parameters() for v in optimizer.state[p].values()]
    return model, state, trainer.global_step


def test_on_an_accelerator_an_optimizer_that_cannot_skip_has_its_state_put_back_without_a_read_per_step(
    tmp_path, monkeypatch
):
    # RMSprop at lr 1e30 (no fused kernel): its first step sends the weights to ~1e30, the loss of step 1 is not
    # finite. On CPU the flag is read at once and step 1 not taken; on an accelerator (here: CPU told it is one)
    # every step from step 1 on is put back from the state held on the device, and the flag is read at batch 16
    diverging = ("optimizer=rmsprop", "optimizer.lr=1e30")
    read_at_once, state_at_once, _ = fitted(tmp_path / "cpu", *diverging)
    assert not read_at_once.holds_state and read_at_once.diverged_at == 1
    reads = []
    read = Classifier.read_divergence
    monkeypatch.setattr(Classifier, "read_divergence", lambda self: reads.append(1) or read(self))
    monkeypatch.setattr(descent.model, "reads_every_step", lambda device: False)
    held, state_held, global_step = fitted(tmp_path / "accelerator", *diverging)
    assert held.holds_state and held.diverged_at == 1 and global_step == 16 and len(reads) == 1
    # weights, batch norm's statistics and RMSprop's state (its step count too) as the run that read at once
    assert held.state_dict().keys() == read_at_once.state_dict().keys()
    for key, tensor in read_at_once.state_dict().items():  # bit for bit, NaN where NaN (step 1's batch norm)
        torch.testing.assert_close(held.state_dict()[key], tensor, rtol=0, atol=0, equal_nan=True, msg=key)
    assert len(state_held) == len(state_at_once) > 0
    for mine, theirs in zip(state_held, state_at_once, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)


class NanBatch(pl.Callback):
    """Turns the inputs of training batch `index` (of the first epoch) to NaN: its loss is not finite."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.index:
            batch[0][:] = math.nan


def test_with_accumulated_batches_a_non_finite_batch_ending_a_window_leaves_its_step_unmade_on_every_path(
    tmp_path, monkeypatch
):
    # two batches a step: batch 2 is finite, batch 3 (the last of step 1's window) is not. Step 1 must not be made
    # from batch 2's gradient alone: the run ends with the weights and RMSprop's state of step 0, on CPU (the flag
    # read at once) as on an accelerator (here: CPU told it is one; the state held and put back)
    accumulating = ("optimizer=rmsprop", "+trainer.accumulate_grad_batches=2")
    one_step, one_step_state, _ = fitted(tmp_path / "one_step", *accumulating, "+trainer.max_steps=1")
    read_at_once, state_at_once, _ = fitted(tmp_path / "cpu", *accumulating, extra=(NanBatch(3),))
    monkeypatch.setattr(descent.model, "reads_every_step", lambda device: False)
    held, state_held, _ = fitted(tmp_path / "accelerator", *accumulating, extra=(NanBatch(3),))
    assert not read_at_once.holds_state and held.holds_state and read_at_once.diverged_at == held.diverged_at == 1
    for model, state in ((read_at_once, state_at_once), (held, state_held)):
        for (name, mine), theirs in zip(model.net.named_parameters(), one_step.net.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
        assert len(state) == len(one_step_state) > 0
        for mine, theirs in zip(state, one_step_state, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
