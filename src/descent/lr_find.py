"""`lr_find=true`: Lightning's learning-rate finder (`Tuner.lr_find`) before fit, on the training split only; the run
then trains with its suggestion. Writes `lr_find.png` and `lr_find.csv` (lr, loss) in the run folder.

The search trains a model of its own with a Trainer of its own (no logger, no callback, no val loader), both thrown
away; the RNG states are put back afterwards, so that the run's model, its optimizer and its batches start exactly as
in a run given the suggested lr by hand. Learning rates are in the config's own terms, `optimizer.lr`: torch's lr of
a param group may be a multiple of it (optimizer=momentum builds torch's SGD with lr = a*(1-b)), and the search's
range and results are converted by that factor.
"""

from __future__ import annotations

import csv
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from descent.checkpoints import rng_states, set_rng_states
from descent.config import ConfigError
from descent.optim import build_optimizer

log = logging.getLogger("descent")
MIN_LR, MAX_LR, STEPS = 1e-8, 1.0, 100  # Lightning's default search, in optimizer.lr's terms
SKIP_BEGIN, SKIP_END = 10, 1  # steps left out of the suggestion at each end, as Lightning's suggestion() does


def steepest_fall(lrs: list[float], losses: list[float]) -> float | None:
    """The lr where the loss falls fastest, Lightning's rule, with the slope taken against log10(lr), the axis the
    search steps evenly on. Lightning 2.6's suggestion() takes it against the lr itself, which favours the smallest
    lrs, where the steps are tiny (its issue 21141). None when fewer than 2 finite losses remain."""
    lr, loss = torch.tensor(lrs[SKIP_BEGIN:-SKIP_END]), torch.tensor(losses[SKIP_BEGIN:-SKIP_END])
    finite = torch.isfinite(loss)
    if int(finite.sum()) < 2:
        return None
    slopes = torch.gradient(loss[finite], spacing=[torch.log10(lr[finite])])[0]
    return float(lr[finite][slopes.argmin()])


def torch_lr_per_unit(optimizer: dict[str, Any]) -> float:
    """torch's lr for `optimizer.lr` = 1: 1 for torch's optimizers and the course's RMSprop and Adam, 1-b for the
    course's momentum. Read from the optimizer the config builds, so that any config is converted by its own rule."""
    probe = torch.zeros(1, requires_grad=True)
    return build_optimizer(optimizer, [probe]).param_groups[0]["lr"] / optimizer["lr"]


def find_lr(cfg: DictConfig, source: Any, split: Any, datamodule: Any, run_dir: Path) -> dict[str, float]:
    """Search the lr on the training split, set `cfg.optimizer.lr` (and the run's .hydra/config.yaml) to the
    suggestion, write the plot and the table; return results.json's `lr_find`."""
    from hydra.utils import instantiate
    from pytorch_lightning.tuner import Tuner

    from descent import plots
    from descent.train import build_model
    from descent.trainer import set_threads

    saved = rng_states()
    model = build_model(cfg, source, split)
    set_threads(cfg.threads, datamodule.batch_size, model, list(source.image_shape))
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        profiler=None,
        max_epochs=-1,  # the search's steps bound it, whatever the epochs they take
        default_root_dir=str(run_dir),  # Lightning's finder keeps its temporary checkpoint there
    )
    if trainer.world_size > 1:
        allowed = "expected false with several devices: find the lr on one device, then give it as optimizer.lr"
        raise ConfigError("lr_find", True, allowed)
    datamodule.trainer = trainer  # the training part goes on the device once, for the search and the run
    datamodule.setup("fit")
    unit = torch_lr_per_unit(OmegaConf.to_container(cfg.optimizer, resolve=True))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`")
            warnings.filterwarnings("ignore", message=r".*`weights_only` was not set")  # its own temporary checkpoint
            finder = Tuner(trainer).lr_find(
                model,
                train_dataloaders=datamodule.train_dataloader(),  # no val loader: the search never sees val nor test
                min_lr=MIN_LR * unit,
                max_lr=MAX_LR * unit,
                num_training=STEPS,
                update_attr=False,
            )
    finally:
        set_rng_states(saved)  # the run's model is built next, from the same RNG states as without the search
    lrs = [lr / unit for lr in finder.results["lr"]] if finder is not None else []
    losses = finder.results["loss"] if finder is not None else []
    suggested = steepest_fall(lrs, losses)
    if suggested is None:
        allowed = (
            "expected false here: the search made too few steps to suggest an lr (limit_train_batches, max_steps or "
            "a loss that diverged at once); give optimizer.lr instead"
        )
        raise ConfigError("lr_find", True, allowed)
    with open(run_dir / "lr_find.csv", "w", newline="") as file:
        csv.writer(file).writerows([("lr", "loss"), *zip(lrs, losses, strict=True)])
    found = {"suggested": suggested, "min_lr": lrs[0], "max_lr": lrs[-1]}
    cfg.optimizer.lr = found["suggested"]
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if hydra_config.is_file():  # the run's config says the lr it trains with
        written = OmegaConf.load(hydra_config)
        written.optimizer.lr = found["suggested"]
        OmegaConf.save(written, hydra_config)
    optimizer = cfg.optimizer["_target_"].rsplit(".", 1)[-1]
    title = f"learning-rate finder: {optimizer}, {len(lrs)} steps on the training split"
    plots.lr_find(lrs, losses, found["suggested"], SKIP_BEGIN, run_dir / "lr_find.png", title)
    log.info(
        "lr_find: optimizer.lr=%.4g suggested (searched %.3g to %.3g in %d steps on the training split) -> %s",
        found["suggested"],
        found["min_lr"],
        found["max_lr"],
        len(lrs),
        run_dir / "lr_find.png",
    )
    return found


def resumed(cfg: DictConfig, run_dir: Path) -> dict[str, float] | None:
    """results.json's `lr_find` for a resumed run, which does not search again (its config's lr is the suggestion):
    read from the lr_find.csv beside the checkpoint's run, copied with the plot into a new run folder."""
    searched = Path(cfg.ckpt_path).resolve().parent.parent
    if not (searched / "lr_find.csv").is_file():
        return None
    if searched != run_dir.resolve():
        for name in ("lr_find.csv", "lr_find.png"):
            if (searched / name).is_file():
                shutil.copy2(searched / name, run_dir / name)
    with open(searched / "lr_find.csv", newline="") as file:
        lrs = [float(row["lr"]) for row in csv.DictReader(file)]
    return {"suggested": cfg.optimizer.lr, "min_lr": lrs[0], "max_lr": lrs[-1]}
