"""Bad values are refused before training, by name, with what is allowed."""

import pytest
from conftest import compose_train

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
