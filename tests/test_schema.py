"""The config fails closed: in every group, a misspelt key and a missing one are each refused with one line that names
them, before any data is read."""

from __future__ import annotations

import pytest
from conftest import compose_train
from omegaconf import OmegaConf, open_dict

from descent.config import ConfigError, validate, validate_eval

# (group, a key the group has, a misspelling of it, the overrides that select the group)
GROUPS = [
    ("", "seed", "sed", []),
    ("cv", "folds", "fols", []),
    ("target", "val_acc", "val_ac", []),
    ("compare", "alpha", "alfa", []),
    ("data", "batch_size", "batchsize", []),
    ("data", "images", "image", ["data=arrays"]),
    ("data", "root", "roots", ["data=mnist"]),
    ("data.stream", "prefetch", "prefech", ["data=synthetic"]),
    ("model", "hidden_dims", "hiden_dims", []),
    ("model", "channels", "chanels", ["model=cnn"]),
    ("optimizer", "lr", "lrr", []),
    ("optimizer", "momentum", "momentun", ["optimizer=momentum"]),
    ("scheduler", "scheduler", "schedular", ["scheduler=step"]),
    ("scheduler.scheduler", "step_size", "step_sizes", ["scheduler=step"]),
    ("trainer", "max_epochs", "max_epoch", []),
    ("callbacks.early_stopping", "patience", "patiance", []),
    ("callbacks.model_checkpoint", "monitor", "monitr", []),
    ("callbacks.last_checkpoint", "train_time_interval", "train_time_intervall", []),
    ("logger.csv", "name", "nam", []),
    ("paths", "log_dir", "logdir", []),
]
# keys whose absence the target's own default covers (Lightning's and torch's): leaving them out is allowed
OPTIONAL = {
    ("optimizer", "momentum"),
    ("callbacks.early_stopping", "patience"),
    ("callbacks.model_checkpoint", "monitor"),
    ("callbacks.last_checkpoint", "train_time_interval"),
    ("logger.csv", "name"),
}


def node(cfg, prefix: str):
    return OmegaConf.select(cfg, prefix) if prefix else cfg


@pytest.mark.parametrize(("group", "key", "typo", "overrides"), GROUPS)
def test_a_misspelt_key_is_refused_naming_it_and_the_nearest_key(group, key, typo, overrides):
    cfg = compose_train(*overrides)
    target = node(cfg, group)
    with open_dict(target):
        target[typo] = target[key]
        del target[key]
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    named = f"{group}.{typo}" if group else typo
    missing = f"{group}.{key}" if group else key
    assert error.value.key in (named, missing)  # the typo, or the key it hides (each one line naming it)
    if error.value.key == named:
        assert f"did you mean {key}?" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("group", "key", "typo", "overrides"), [g for g in GROUPS if g[:2] not in OPTIONAL])
def test_a_missing_key_is_refused_naming_it(group, key, typo, overrides):
    cfg = compose_train(*overrides)
    target = node(cfg, group)
    with open_dict(target):
        del target[key]
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.key == (f"{group}.{key}" if group else key)
    assert str(error.value).startswith(f"{error.value.key} is missing: ")


def test_an_argument_descent_passes_itself_is_refused_in_a_config():
    cfg = compose_train()
    with open_dict(cfg):
        cfg.trainer.callbacks = []
    with pytest.raises(ConfigError, match=r"^trainer.callbacks=\[\] is not allowed: set by descent itself"):
        validate(cfg)


def test_an_unknown_target_is_refused_naming_it():
    cfg = compose_train("optimizer._target_=torch.optim.Adamm")
    with pytest.raises(ConfigError, match=r"^optimizer._target_='torch.optim.Adamm' is not allowed: expected an"):
        validate(cfg)


def test_any_torch_optimizer_takes_exactly_its_own_arguments():
    validate(compose_train("optimizer._target_=torch.optim.NAdam", "~optimizer.fused"))
    with pytest.raises(ConfigError, match=r"^optimizer.fused=True is not allowed: torch.optim.NAdam has no such key"):
        validate(compose_train("optimizer._target_=torch.optim.NAdam"))


def test_the_eval_config_fails_closed_too():
    from hydra import compose, initialize_config_dir

    from descent import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", ["ckpt_path=x.ckpt", "+trainer.max_epoch=1"])
    with pytest.raises(ConfigError, match=r"^trainer.max_epoch=1 is not allowed: pytorch_lightning.Trainer has no"):
        validate_eval(cfg)
