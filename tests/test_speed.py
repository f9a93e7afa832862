"""What the speed work changed must not change what a run means: same metrics, same checkpoints, same callbacks."""

import gc
import re
import sys
import weakref

import pytest
import pytorch_lightning as pl
import torch
from conftest import ENV, ROOT, compose_train
from hydra.utils import instantiate
from pytorch_lightning import callbacks
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.profilers import SimpleProfiler
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import descent.model
from descent.callbacks import EarlyStopping, ModelCheckpoint, PromptRefreshThread, RichProgressBar
from descent.data.datamodule import ImageDataModule
from descent.data.sources import build_source
from descent.data.splits import train_val_test
from descent.model import MLP, Classifier
from descent.overhead import LeanHooks, NoProfiler
from descent.reliability import BackgroundCheckpointIO, GracefulStop
from descent.results import EpochHistory
from descent.train import (
    available_cores,
    build_trainer,
    freeze_heap,
    set_threads,
)


def classifier() -> Classifier:
    return Classifier([2, 2], 3, [8], batch_norm=False, dropout=0.0, activation="relu", optimizer={})


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
    model, resumed = classifier().eval(), classifier().eval()
    batches = [(torch.randn(6, 2, 2), torch.randint(0, 3, (6,))) for _ in range(3)]
    with torch.no_grad():
        for batch in batches:
            model._step(batch, "train")
        resumed.load_state_dict(model.state_dict())
        # without the pending steps the resumed sums would be empty: a NaN loss (0/0) and no accuracy
        got, want = resumed._compute("train"), model._compute("train")
        assert {k: float(v) for k, v in got.items()} == pytest.approx({k: float(v) for k, v in want.items()})


def test_a_checkpoint_mid_way_leaves_the_flushes_where_an_uninterrupted_run_has_them(monkeypatch):
    # flushing at the checkpoint would cut the sums at other steps: float32 rounding then differs in the last bits
    monkeypatch.setattr(descent.model, "METRIC_FLUSH_STEPS", 4)
    torch.manual_seed(0)
    batches = [(torch.randn(64, 2, 2) * 100, torch.randint(0, 3, (64,))) for _ in range(10)]
    straight, before, after = classifier().eval(), classifier().eval(), classifier().eval()
    before.load_state_dict(straight.state_dict())  # the same weights
    with torch.no_grad():
        for batch in batches:
            straight._step(batch, "train")
        for batch in batches[:6]:
            before._step(batch, "train")
        after.load_state_dict(before.state_dict())
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


def test_lightnings_hook_name_is_set_without_nn_module_checks(monkeypatch):
    model, probe = classifier(), torch.nn.Linear(1, 1)
    seen = []
    checked = torch.nn.Module.__setattr__

    def recording(self, name, value):
        seen.append(name)
        checked(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", recording)
    model._current_fx_name = "training_step"
    model.probe = probe  # anything else still goes through nn.Module (a submodule is registered)
    assert model._current_fx_name == "training_step" and "probe" in model._modules
    assert seen == ["probe"]


def test_batches_already_on_the_device_are_not_moved_again():
    cfg = compose_train("data=synthetic")
    source = build_source(cfg.data)
    datamodule = ImageDataModule(source, train_val_test(source.labels, (0.6, 0.2, 0.2), 0), 8, 16, 0)
    on_device = (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert datamodule.transfer_batch_to_device(on_device, torch.device("cpu"), 0) is on_device
    moved = datamodule.transfer_batch_to_device(on_device, torch.device("meta"), 0)  # elsewhere: Lightning moves it
    assert [part.device.type for part in moved] == ["meta", "meta"]


class OneBatch(pl.LightningModule):
    """Classifier's gradient clipping in a Trainer, on one fixed batch, with plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Classifier([2, 2], 3, [8], batch_norm=False, dropout=0.0, activation="relu", optimizer={})

    def training_step(self, batch, batch_idx):
        return self.model.training_step(batch, batch_idx)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.model.configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


@pytest.mark.parametrize("clip", [None, 1e-6])
def test_gradient_clipping_still_clips_when_asked(clip):
    torch.manual_seed(0)
    module = OneBatch()
    before = [p.detach().clone() for p in module.parameters()]
    batch = torch.utils.data.TensorDataset(torch.randn(16, 2, 2), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(max_steps=1, gradient_clip_val=clip, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module.model.trainer = trainer
    trainer.fit(module, torch.utils.data.DataLoader(batch, batch_size=16))
    moved = sum(float((p.detach() - b).norm()) for p, b in zip(module.parameters(), before, strict=True))
    # one SGD step of lr 1: without clipping the weights move by the gradient's norm; clipped, by at most 1e-6 each
    assert moved < 1e-5 if clip else moved > 1e-2


@pytest.mark.parametrize(
    ("ours", "lightnings", "settings"),
    [
        (ModelCheckpoint, callbacks.ModelCheckpoint, {"monitor": "val/acc", "mode": "max"}),
        (ModelCheckpoint, callbacks.ModelCheckpoint, {"monitor": None}),
        (EarlyStopping, callbacks.EarlyStopping, {"monitor": "val/loss"}),
    ],
)
def test_callbacks_build_their_state_key_once_and_keep_lightnings(monkeypatch, ours, lightnings, settings):
    built = []
    generate = lightnings._generate_state_key
    monkeypatch.setattr(lightnings, "_generate_state_key", lambda self, **kw: built.append(kw) or generate(self, **kw))
    callback = ours(**settings)
    keys = {callback.state_key for _ in range(5)}  # Lightning reads it at every hook call
    assert keys == {lightnings(**settings).state_key}  # checkpoints of either class load into the other
    assert len(built) == 2  # ours once, Lightning's once


class BarProbe(pl.Callback):
    """After the bar's own hooks: how many times its training task was updated, and where it ended each epoch."""

    def __init__(self, bar: RichProgressBar) -> None:
        self.bar, self.updates, self.ends = bar, 0, []
        update = bar._update

        def counted(task, current, *args, **kwargs):
            self.updates += task == bar.train_progress_bar_id
            update(task, current, *args, **kwargs)

        bar._update = counted

    def on_train_epoch_end(self, trainer, pl_module):
        task = next(t for t in self.bar.progress.tasks if t.id == self.bar.train_progress_bar_id)
        self.ends.append((task.completed, task.total, task.speed is not None and task.speed > 0))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_bar_updates_its_task_once_per_redraw_and_ends_each_epoch_complete_with_its_speed():
    bar = RichProgressBar(refresh_rate=1)  # one redraw a second: 2 x 300 tiny steps fit in a few of them
    probe = BarProbe(bar)
    data = torch.utils.data.TensorDataset(torch.zeros(300, 2))
    trainer = pl.Trainer(max_epochs=2, callbacks=[bar, probe], logger=False, enable_checkpointing=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=1))
    assert probe.ends == [(300, 300, True), (300, 300, True)]  # complete, with a speed (it/s) measured
    assert 4 <= probe.updates < 20  # Lightning's bar: 600, one per batch


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


@pytest.mark.parametrize("bar", [RichProgressBar, callbacks.RichProgressBar])
def test_the_bar_is_drawn_by_its_refresh_thread_not_at_every_epoch(monkeypatch, bar):
    import threading

    from rich.live import Live

    drawn = []
    draw = Live.refresh

    def counted(self):
        drawn.append(threading.current_thread() is threading.main_thread())
        draw(self)

    monkeypatch.setattr(Live, "refresh", counted)
    data = torch.utils.data.TensorDataset(torch.zeros(10, 2))
    trainer = pl.Trainer(max_epochs=5, callbacks=[bar(refresh_rate=1)], logger=False, enable_checkpointing=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=1))
    # rich draws at once when Lightning adds or resets a task (twice an epoch); ours leaves it to the refresh thread,
    # and the training thread only draws the last frame when the bar stops
    if bar is RichProgressBar:
        assert sum(drawn) <= 2
    else:
        assert sum(drawn) >= 5  # the same check sees Lightning's draws, at least one an epoch


class FakeLive:
    """What a refresh thread uses of rich's Live: its lock and refresh()."""

    def __init__(self) -> None:
        import threading

        self._lock, self.refreshes = threading.RLock(), 0

    def refresh(self) -> None:
        self.refreshes += 1


def test_the_refresh_thread_draws_when_asked_and_ends_as_soon_as_it_is_stopped():
    live = FakeLive()
    thread = PromptRefreshThread(live, 100)
    thread.start()
    thread.refresh_cond = True  # the bar's soft_refresh
    for _ in range(1000):
        if live.refreshes:
            break
        thread.join(0.01)
    assert live.refreshes == 1 and not thread.refresh_cond
    thread.stop()
    thread.join(10)
    assert not thread.is_alive()
    paused = PromptRefreshThread(FakeLive(), 1e-6)  # a pause of 1e6 s between redraws
    paused.start()
    paused.stop()
    paused.join(10)  # Lightning's thread would sleep out its pause here
    assert not paused.is_alive()


def test_the_bar_runs_on_a_refresh_thread_that_is_gone_when_fit_and_test_end():
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(bar.progress.live._refresh_thread)

        on_test_batch_end = on_train_batch_end

    bar = RichProgressBar(refresh_rate=1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, callbacks=[bar, Spy()], logger=False, enable_checkpointing=False,
                         enable_model_summary=False)  # fmt: skip
    module = Tiny()
    module.test_step = lambda batch, batch_idx: None
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    assert len(seen) == 4 and all(type(thread) is PromptRefreshThread for thread in seen)
    assert not any(thread.is_alive() for thread in seen)  # stopped and joined by the bar, which waited for nothing


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
    small = MLP(64, 10, [256, 256], batch_norm=True, dropout=0.0, activation="relu")  # ~84k multiply-adds a sample
    wide = MLP(784, 10, [1024, 1024], batch_norm=True, dropout=0.0, activation="relu")  # ~1.9M
    before = torch.get_num_threads()
    try:
        assert set_threads("auto", 32, small) == 1 == torch.get_num_threads()
        assert set_threads("auto", 64, small) == 1
        assert set_threads("auto", 256, small) == available_cores() == torch.get_num_threads()
        assert set_threads("auto", 1077, small) == available_cores()
        assert set_threads("auto", 32, wide) == available_cores()  # the same batch, 20 times the work
        assert set_threads(3, 32, small) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_configs_use_the_fused_kernel(name):
    optimizer = instantiate(compose_train(f"optimizer={name}").optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("floor", [False, True])
def test_the_bench_floor_is_bare_lightning_with_our_runs_cuts(monkeypatch, floor):
    from descent.benchmarks.loop import Case, compose_config, in_memory, time_bare

    seen = {}
    fit = pl.Trainer.fit

    def spy(self, module, *args, **kwargs):
        seen.update(profiler=type(self.profiler), module=module)
        return fit(self, module, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", spy)
    case = Case("full", compose_config("full", 1), [])
    source = build_source(case.cfg.data)
    data = in_memory(source, train_val_test(source.labels, (0.6, 0.2, 0.2), 0), torch.device("cpu"))
    time_bare(case, data, False, 1, 0, 2, floor=floor)
    assert len((case.floor if floor else case.bare)[1]) == 2 and not (case.bare if floor else case.floor)
    assert (seen["profiler"] is NoProfiler) == floor and isinstance(seen["module"], LeanHooks) == floor
    batch = (torch.zeros(2, 3), torch.zeros(2))
    if floor:  # batches on the device stay as they are, as ImageDataModule leaves them for our run
        assert seen["module"].transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch


@pytest.mark.slow
def test_bench_prints_the_table_and_ends_with_the_ratio_line():
    import subprocess

    process = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--epochs", "1", "--repeats", "1", "--warmup", "0",
         "--startup-runs", "0"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    lines = process.stdout.strip().splitlines()
    assert re.fullmatch(r"overhead ratio at batch size 32: \d+\.\d\d", lines[-1])
    for size in ("1", "32", "256", "full"):
        row = rf" +{size} +\d+ +\d\.\d+ \(\dt\) +\d\.\d+ +\d\.\d+ \(\dt\) +[\d,]+( +\d+\.\d\d){{3}} +<= "
        assert any(re.match(row, line) for line in lines), process.stdout  # plain, bare, descent; bare, floor, ratio
