"""`python eval.py ckpt_path=PATH`: the test metrics of a saved checkpoint, on the test split of the run that made it.

The checkpoint is loaded with `torch.load(weights_only=True)`: its hyperparameters are plain containers. The run's
data config comes from its `.hydra/config.yaml`, its split from its `split.npz`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from descent import CONF_DIR
from descent.config import ConfigError, exit_on_config_error, validate_eval
from descent.results import write_results
from descent.trainer import quiet_lightning, set_threads, unset_empty_variables

log = logging.getLogger("descent")


def find_run(ckpt_path: Path) -> tuple[Path, Path]:
    """The run folder holding split.npz (`<run>/checkpoints/x.ckpt`) and the nearest `.hydra/config.yaml` above it
    (a cross-validation fold's config is its parent run's)."""
    run_dir = ckpt_path.resolve().parent.parent
    for folder in (run_dir, *run_dir.parents):
        if (folder / ".hydra" / "config.yaml").is_file() and (run_dir / "split.npz").is_file():
            return run_dir, folder / ".hydra" / "config.yaml"
    allowed = (
        "expected a checkpoint inside a run folder: <run>/checkpoints/*.ckpt, with <run>/split.npz and the run's "
        ".hydra/config.yaml"
    )
    raise ConfigError("ckpt_path", str(ckpt_path), allowed)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the model and the run's test split, and test the checkpoint."""
    from hydra.utils import instantiate

    from descent.callbacks import FinishWandbOnError
    from descent.data.datamodule import ImageDataModule
    from descent.data.sources import build_source
    from descent.data.splits import Split
    from descent.loggers import build_loggers, close_loggers
    from descent.model import Classifier
    from descent.plots import confusion_matrix

    validate_eval(cfg)
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError("ckpt_path", str(ckpt_path), "expected an existing checkpoint file (.ckpt)")
    run_dir, config_path = find_run(ckpt_path)
    run_cfg = OmegaConf.load(config_path)
    split = Split.load(run_dir / "split.npz")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = Classifier(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    set_threads(cfg.threads, run_cfg.data.eval_batch_size, model, list(checkpoint["hyper_parameters"]["input_shape"]))
    source = build_source(run_cfg.data)
    datamodule = ImageDataModule(
        source, split, 1, run_cfg.data.eval_batch_size, run_cfg.seed, stream=run_cfg.data.get("stream")
    )
    eval_dir = Path(HydraConfig.get().runtime.output_dir)
    run_cfg.logger = cfg.logger
    # grouped with the run (or the CV run, for a fold's checkpoint) whose config it reads
    loggers = build_loggers(run_cfg, eval_dir, group=config_path.parent.parent.name, job_type="eval")
    trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[FinishWandbOnError()],
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    tested = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    results = {
        "status": "ok",
        "error": None,
        "ckpt_path": str(ckpt_path.resolve()),
        "run_dir": str(run_dir),
        "epoch": checkpoint.get("epoch"),
        "metrics": {key: float(value) for key, value in tested.items()},
        "n_test": len(split.test),
    }
    close_loggers(loggers, results, confusion_matrix(model.confusion.numpy(), eval_dir / "confusion_matrix.png"))
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    """Print the checkpoint's test metrics and write them to results.json in the eval's own run folder."""
    from rich.console import Console

    from descent.tables import rich_table

    unset_empty_variables()
    quiet_lightning()
    results = evaluate(cfg)
    write_results(Path(HydraConfig.get().runtime.output_dir), results)
    rows = [[key, f"{value:.6f}"] for key, value in sorted(results["metrics"].items())]
    Console().print(rich_table("test metrics", ["metric", "value"], rows, caption=results["ckpt_path"]))


if __name__ == "__main__":
    main()
