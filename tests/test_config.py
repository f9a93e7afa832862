"""Bad values are refused before training, by name, with what is allowed."""

import math
import re
from pathlib import Path

import pytest
from conftest import compose_train
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from descent.config import ConfigError, check_batch_size, validate

BAD = [
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("optimizer.lr=nan", "optimizer.lr"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=-4", "data.batch_size"),
    ("data.batch_size=half", "data.batch_size"),
    ("data.batch_size=2.5", "data.batch_size"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=-0.1", "model.dropout"),
    ("model.dropout=true", "model.dropout"),
    ("data.split=[0.6,0.2,0.3]", "data.split"),
    ("data.split=[0.8,0.2]", "data.split"),
    ("data.split=[1.0,0.0,0.0]", "data.split"),
    ("model.hidden_dims=[256,0]", "model.hidden_dims"),
    ("model.activation=swish", "model.activation"),
    ("model.batch_norm=maybe", "model.batch_norm"),
    ("optimizer=momentum optimizer.momentum=1.0", "optimizer.momentum"),
    ("optimizer=adam optimizer.betas=[0.9]", "optimizer.betas"),
    ("optimizer=adam optimizer.betas=[0.9,1.5]", "optimizer.betas"),
    ("optimizer=adam optimizer.eps=0", "optimizer.eps"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("seed=-1", "seed"),
    ("threads=0", "threads"),
    ("cv.folds=1", "cv.folds"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD)
def test_a_bad_value_is_refused_naming_its_key(overrides, key):
    cfg = compose_train(*overrides.split())
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}=")
    assert "expected" in str(error.value)


def test_the_defaults_are_valid():
    validate(compose_train())


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam", "adamw", "course_rmsprop", "course_adam"])
def test_every_optimizer_default_is_valid(name):
    validate(compose_train(f"optimizer={name}"))


def test_batch_size_larger_than_the_training_split_is_refused():
    with pytest.raises(ConfigError, match=r"data.batch_size=5000 .*at most the training split's 1077"):
        check_batch_size(5000, 1077, batch_norm=True)


def test_batch_norm_with_batches_of_one_sample_suggests_turning_it_off():
    with pytest.raises(ConfigError, match=r"model\.batch_norm=false"):
        check_batch_size(1, 1077, batch_norm=True)
    assert check_batch_size(1, 1077, batch_norm=False) == 1
    assert check_batch_size("full", 1077, batch_norm=True) == 1077


MORE_BAD = [
    ("seed=4294967296", "seed"),
    ("seed=1.5", "seed"),
    ("seed=true", "seed"),
    ("ckpt_path=5", "ckpt_path"),
    ("threads=-1", "threads"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("data.split=[0.6,0.2,nan]", "data.split"),
    ("data.split=[0.6,0.2,0.1,0.1]", "data.split"),
    ("data.stratify_by=label", "data.stratify_by"),
    ("model.hidden_dims=''", "model.hidden_dims"),
    ("model.hidden_dims=[16.5]", "model.hidden_dims"),
    ("model.hidden_dims=16", "model.hidden_dims"),
    ("model.dropout=nan", "model.dropout"),
    ("optimizer.lr=true", "optimizer.lr"),
    ("optimizer.lr=[0.1]", "optimizer.lr"),
    ("optimizer.lr=-inf", "optimizer.lr"),
    ("optimizer=adam optimizer.betas=[0.9,nan]", "optimizer.betas"),
    ("optimizer=adam optimizer.betas=[0.9,0.98,0.99]", "optimizer.betas"),
    ("optimizer=adam optimizer.eps=inf", "optimizer.eps"),
    ("optimizer=adam +optimizer.amsgrad=maybe", "optimizer.amsgrad"),
    ("optimizer=sgd +optimizer.nesterov=1", "optimizer.nesterov"),
    ("optimizer=sgd +optimizer.dampening=-0.5", "optimizer.dampening"),
    ("optimizer=rmsprop optimizer.alpha=1", "optimizer.alpha"),
    ("optimizer.weight_decay=nan", "optimizer.weight_decay"),
    ("scheduler=cosine trainer.max_epochs=-3", "trainer.max_epochs"),
    ("scheduler=step scheduler.scheduler.step_size=0", "scheduler.scheduler.step_size"),
    ("scheduler=step scheduler.scheduler.gamma=-0.5", "scheduler.scheduler.gamma"),
    ("scheduler=plateau scheduler.scheduler.factor=1.0", "scheduler.scheduler.factor"),
    ("scheduler=plateau scheduler.scheduler.patience=-1", "scheduler.scheduler.patience"),
    ("scheduler=plateau scheduler.scheduler.mode=up", "scheduler.scheduler.mode"),
    ("scheduler=plateau scheduler.interval=batch", "scheduler.interval"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs"),
    ("trainer.min_epochs=-1", "trainer.min_epochs"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=[]", "trainer.devices"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("+trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("+trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch"),
    ("+trainer.val_check_interval=1.5", "trainer.val_check_interval"),
    ("+trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("+trainer.limit_train_batches=0", "trainer.limit_train_batches"),
    ("+trainer.limit_val_batches=-1", "trainer.limit_val_batches"),
    ("+trainer.limit_test_batches=1.5", "trainer.limit_test_batches"),
    ("+trainer.limit_val_batches=0", "trainer.limit_val_batches"),  # while callbacks monitor val metrics
    ("+trainer.overfit_batches=-0.5", "trainer.overfit_batches"),
    ("+trainer.fast_dev_run=-1", "trainer.fast_dev_run"),
    ("+trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.max_epochs=-1", "trainer.max_epochs"),  # no limit without max_steps or max_time
    ("+trainer.max_time=5", "trainer.max_time"),
    ("+trainer.gradient_clip_algorithm=l2", "trainer.gradient_clip_algorithm"),
    ("+trainer.barebones=true", "trainer.barebones"),
    ("+trainer.detect_anomaly=maybe", "trainer.detect_anomaly"),
    ("+trainer.precision=bf16-mixed +trainer.gradient_clip_val=1", "trainer.gradient_clip_val"),  # Adam's fused step
    ("+trainer.deterministic=yes", "trainer.deterministic"),
    ("callbacks.early_stopping.patience=-2", "callbacks.early_stopping.patience"),
    ("+callbacks.early_stopping.min_delta=-0.1", "callbacks.early_stopping.min_delta"),
    ("callbacks.model_checkpoint.mode=best", "callbacks.model_checkpoint.mode"),
]


@pytest.mark.parametrize(("overrides", "key"), MORE_BAD)
def test_a_bad_type_or_range_is_refused_naming_its_key(overrides, key):
    cfg = compose_train(*overrides.split())
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}=") and "expected" in str(error.value)


@pytest.mark.parametrize(
    ("override", "instead"),
    [
        ("+trainer.enable_checkpointing=false", "callbacks.model_checkpoint=null callbacks.last_checkpoint=null"),
        ("+trainer.enable_progress_bar=false", "callbacks.progress_bar=null"),
        ("+trainer.logger=false", "logger=csv, tensorboard, wandb, a list, or none"),
        ("+trainer.default_root_dir=x", "hydra.run.dir"),
    ],
)
def test_a_trainer_argument_descent_passes_is_refused_saying_what_to_set_instead(override, instead):
    with pytest.raises(ConfigError, match="set by descent itself") as error:
        validate(compose_train(override))
    assert instead in str(error.value)


def test_every_hydra_entry_and_compose_names_version_base_1_3():
    root = Path(__file__).resolve().parents[1]
    sources = [*(root / "src").rglob("*.py"), *(root / "scripts").rglob("*.py"), *(root / "tests").rglob("*.py")]
    calls = [
        line
        for path in sources
        for line in path.read_text().splitlines()
        if re.search(r"@hydra\.main\(|initialize(_config_dir|_config_module)?\(", line) and "re.search" not in line
    ]
    assert calls and all('version_base="1.3"' in line for line in calls), calls
    assert '"hydra-core>=1.3.6,<1.4"' in (root / "pyproject.toml").read_text()  # the instantiate advisory's fix


@pytest.mark.parametrize("name", ["cosine", "step", "plateau"])
def test_every_scheduler_default_is_valid(name):
    validate(compose_train(f"scheduler={name}"))


# Property-based: one composed config, values set through OmegaConf (composing per example would be slow).
CFG = compose_train("optimizer=adam")
SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**40), 2**40),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)


def _accepted(key: str, value: object) -> bool:
    cfg = CFG.copy()
    OmegaConf.update(cfg, key, value, force_add=True)
    try:
        validate(cfg)
    except ConfigError as error:
        assert error.key == key
        return False
    return True


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@given(SCALARS)
def test_a_learning_rate_is_accepted_exactly_when_finite_and_positive(value):
    assert _accepted("optimizer.lr", value) == (_number(value) and value > 0)


@given(SCALARS)
def test_a_dropout_is_accepted_exactly_when_a_probability_below_one(value):
    assert _accepted("model.dropout", value) == (_number(value) and 0 <= value < 1)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4))
def test_betas_are_accepted_exactly_when_two_values_in_the_unit_interval(values):
    assert _accepted("optimizer.betas", values) == (len(values) == 2 and all(0 <= b < 1 for b in values))


@given(st.lists(st.floats(0, 1), min_size=1, max_size=5))
def test_split_fractions_are_accepted_exactly_when_three_positive_summing_to_one(values):
    expected = len(values) == 3 and all(0 < f < 1 for f in values) and abs(sum(values) - 1) < 1e-6
    assert _accepted("data.split", values) == expected


@given(SCALARS)
def test_a_seed_is_accepted_exactly_when_an_int_numpy_can_take(value):
    expected = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**32 - 1
    assert _accepted("seed", value) == expected
