"""The Lightning loggers of `logger.*` (csv, tensorboard, wandb), all writing under the run folder.

W&B gets the run's identity here: its name from the overrides, its group (the sweep or the CV run), its job type,
tags and the resolved config; after the run, the best epoch's summary, the confusion matrix and `finish()` with the
run's exit code, so that two runs of one process never merge. Without credentials it runs offline, never prompts.
Imported only once a run trains (it loads Lightning). It must never read, print or store an API key: wandb finds it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from descent.compare import setting_of
from descent.config import typed_unless_secret
from descent.results import status_of

log = logging.getLogger("descent")


def _hydra_runtime() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def wandb_mode(configured: str | None) -> str | None:
    """`logger.wandb.mode`, else WANDB_MODE (None: wandb reads it), else `offline` when no credentials are found.

    wandb.init with no credentials and no terminal raises instead of running offline, hence the check."""
    if configured or os.environ.get("WANDB_MODE"):
        return configured
    import wandb

    if wandb.login(prompt=False, verify=False):
        return None
    log.info("W&B: no credentials found (WANDB_API_KEY, ~/.netrc, `wandb login`): running offline")
    return "offline"


def _wandb_identity(cfg: DictConfig, run_dir: Path, group: str | None, job_type: str) -> dict[str, Any]:
    """name (the overrides but the logger's), group, job_type, tags and config for wandb.init, from the Hydra job
    when there is one."""
    hydra_cfg = _hydra_runtime()
    typed = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False) if hydra_cfg else []  # as typed
    overrides = [o for o in typed if not o.startswith("logger")]
    name = " ".join(overrides) or "defaults"
    if job_type != "train":
        name = f"{name} {run_dir.name}"
    if group is None and hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        group = Path(hydra_cfg.sweep.dir).name
    optimizer = hydra_cfg.runtime.choices.get("optimizer") if hydra_cfg else None
    optimizer = optimizer or str(cfg.optimizer.get("_target_", "")).rsplit(".", 1)[-1]
    tags = [f"optimizer={optimizer}", f"batch_size={cfg.data.batch_size}", *typed_unless_secret(cfg.get("tags") or [])]
    config = typed_unless_secret(cfg) if hydra_cfg is not None else OmegaConf.to_container(cfg, resolve=False)
    config["setting"] = " ".join(setting_of(typed)) or "(defaults)"  # replicates of one setting share it
    return {"name": name, "group": group, "job_type": job_type, "tags": tags, "config": config}


def build_loggers(cfg: DictConfig, run_dir: Path, group: str | None, job_type: str) -> list[Any]:
    """The Lightning loggers of `cfg.logger`, each writing under the run folder. `group` gathers the runs of one
    cross-validation or sweep (a sweep's jobs default to the sweep folder's name), `job_type` says what this run is
    (train, fold, eval)."""
    from hydra.utils import instantiate

    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if not logger_cfg:
            continue
        extra: dict[str, Any] = {"save_dir": str(run_dir)}
        if name == "wandb":
            identity = _wandb_identity(cfg, run_dir, group, job_type)
            identity["tags"] = [*identity["tags"], *typed_unless_secret(logger_cfg.get("tags") or [])]
            extra |= identity | {"mode": wandb_mode(logger_cfg.get("mode"))}
            # a resume (or a requeued job) goes on in the W&B run it left, also into a new folder
            resumed = previous_wandb_run(Path(cfg.ckpt_path).resolve().parent.parent) if cfg.get("ckpt_path") else None
            if resumed is not None:
                extra |= {"id": resumed, "resume": "allow"}
                log.info("W&B: resuming run %s", resumed)
        # completed as a partial: `config` (a plain dict with _target_ keys) must reach wandb.init as it is
        loggers.append(instantiate(logger_cfg, _partial_=True)(**extra))
    return loggers


def previous_wandb_run(run_dir: Path) -> str | None:
    """The id of the newest W&B run in the run folder (`wandb/run-<time>-<id>` or `offline-run-<time>-<id>`)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda path: path.name.split("run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def logs_images(loggers: list[Any]) -> bool:
    """Whether one of the loggers takes the run's figures (W&B: the confusion matrix)."""
    return any(isinstance(logger, WandbLogger) for logger in loggers)


def close_loggers(loggers: list[Any], results: dict[str, Any], confusion_png: Path | None) -> None:
    """Give W&B the best epoch's summary and the confusion matrix, then finish the run with the run's exit code
    (0 for ok or diverged, 1 otherwise) and say how to upload an offline run."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = logger.experiment
        if confusion_png is not None and confusion_png.is_file():
            run.log({"test/confusion_matrix": wandb.Image(str(confusion_png))})
        summary = {f"best/{key}": value for key, value in results.get("metrics", {}).items()}
        summary |= {key: results.get(key) for key in ("status", "best_epoch", "epochs", "steps")}
        run.summary.update(summary)
        finish_wandb(exit_code=0 if status_of(results).finished else 1)


def finish_wandb(exit_code: int) -> None:
    """Finish this process's W&B run, if one is open (so the next run of the process starts a new one); print how
    to upload it if it ran offline."""
    import wandb

    run = wandb.run
    if run is None:
        return
    offline, sync_dir = run.settings.mode in ("offline", "dryrun"), run.settings.sync_dir
    run.finish(exit_code=exit_code)
    if offline:
        log.info("W&B run saved offline; upload it with: wandb sync %s", sync_dir)


def log_table(wandb_cfg: DictConfig, folder: Path, name: str, columns: list[str], data: list[list[Any]]) -> None:
    """A table (a sweep's settings) as a W&B table, in a W&B run of its own (job_type `name`, grouped with the
    sweep's runs by the folder's name), offline without credentials as a run is."""
    import wandb

    wandb.init(
        project=wandb_cfg.get("project"),
        entity=wandb_cfg.get("entity"),
        mode=wandb_mode(wandb_cfg.get("mode")),
        dir=str(folder),
        group=folder.name,
        job_type=name,
        name=f"{name} {folder.name}",
    )
    wandb.log({name: wandb.Table(columns=columns, data=data)})
    finish_wandb(exit_code=0)
