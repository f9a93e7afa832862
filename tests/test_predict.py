"""predict.py: a checkpoint's class predictions for new images, from a .npy or a folder of image files."""

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, results_of, run_script
from data_files import write_png_folder
from PIL import Image
from sklearn.datasets import load_digits

from descent.config import ConfigError
from descent.predict import load_checkpoint, predictions_table, read_images


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short digits run: its folder, and the images and labels of its test split."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    process = run_script("train.py", *FAST, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    digits = load_digits()
    test = np.load(run_dir / "split.npz")["test"]
    return run_dir, digits.images[test], digits.target[test]


def predicted(tmp_path, ckpt, images):
    """Run predict.py from tmp_path into its default run folder; returns (process, predictions table or None)."""
    process = run_script("predict.py", f"ckpt_path={ckpt}", f"images={images}", cwd=tmp_path)
    found = list((tmp_path / "logs" / "predict" / "runs").glob("*/predictions.csv"))
    return process, pd.read_csv(found[0]) if found else None


def test_predictions_match_the_labels_as_often_as_the_test_accuracy_says(digits_run, tmp_path):
    run_dir, images, labels = digits_run
    np.save(tmp_path / "test.npy", images)
    process, table = predicted(tmp_path, run_dir / "checkpoints" / "best.ckpt", tmp_path / "test.npy")
    assert process.returncode == 0, process.stderr
    assert list(table.columns) == ["index", "prediction", *[f"p_{k}" for k in range(10)]]
    assert table["index"].tolist() == list(range(len(labels)))
    probabilities = table.filter(like="p_").to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (table["prediction"] == probabilities.argmax(axis=1)).all()
    test_acc = results_of(run_dir)["metrics"]["test/acc"]
    assert (table["prediction"] == labels).mean() == pytest.approx(test_acc, abs=1e-6)  # the whole test split
    assert abs((table["prediction"][:50] == labels[:50]).mean() - test_acc) <= 0.1  # 50 of them


def test_a_shape_that_does_not_fit_the_checkpoint_is_refused_naming_both(digits_run, tmp_path):
    run_dir, _, _ = digits_run
    np.save(tmp_path / "big.npy", np.zeros((5, 28, 28), dtype=np.float32))
    process, table = predicted(tmp_path, run_dir / "checkpoints" / "best.ckpt", tmp_path / "big.npy")
    output = process.stdout + process.stderr
    assert process.returncode == 2 and "Traceback" not in output and table is None
    (line,) = [line for line in output.splitlines() if "images=" in line]
    assert "(28, 28)" in line and "(8, 8)" in line


@pytest.mark.parametrize(
    "script, overrides, message",
    [
        ("predict.py", ["ckpt_path=x.ckpt"], "images is missing"),
        ("eval.py", [], "ckpt_path is missing"),
    ],
)
def test_a_missing_key_or_file_is_one_line(tmp_path, script, overrides, message):
    process = run_script(script, *overrides, cwd=tmp_path)
    output = process.stdout + process.stderr
    assert process.returncode == 2 and message in output and "Traceback" not in output


def test_a_folder_run_predicts_image_files_by_name_with_its_class_names(tmp_path):
    root = write_png_folder(tmp_path / "pngs")
    run_dir = tmp_path / "run"
    data = ["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4"]
    process = run_script("train.py", *FAST, *data, "trainer.max_epochs=5", f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    process, table = predicted(tmp_path, run_dir / "checkpoints" / "best.ckpt", root / "light")
    assert process.returncode == 0, process.stderr
    assert list(table.columns) == ["file", "prediction", "p_dark", "p_light"]
    assert table["file"].tolist() == sorted(path.name for path in (root / "light").iterdir())
    assert (table["prediction"] == "light").mean() > 0.8


def test_image_files_are_decoded_as_data_folder_decodes_them(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 17, size=(3, 8, 8), dtype=np.uint8)  # digits' 0..16
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "3_rgb_twice_as_big.png")
    images, names = read_images(str(tmp_path), (8, 8))
    assert names == ["0.png", "1.png", "2.png", "3_rgb_twice_as_big.png"]
    assert images.shape == (4, 8, 8) and np.array_equal(images[:3], pixels) and not images[3].any()


def test_grey_images_with_a_channel_axis_fit_a_grey_checkpoint_and_colour_ones_do_not(tmp_path):
    np.save(tmp_path / "grey.npy", np.zeros((4, 1, 8, 8)))
    assert read_images(str(tmp_path / "grey.npy"), (8, 8))[0].shape == (4, 1, 8, 8)
    np.save(tmp_path / "rgb.npy", np.zeros((4, 3, 8, 8)))
    with pytest.raises(ConfigError, match=r"images of shape \(3, 8, 8\) but the checkpoint takes \(8, 8\)"):
        read_images(str(tmp_path / "rgb.npy"), (8, 8))


def test_predictions_are_named_by_class_when_the_run_knew_the_names():
    probabilities = np.array([[0.2, 0.8], [0.9, 0.1]])
    table = predictions_table(probabilities, ["a.png", "b.png"], ["cat", "dog"])
    expected = {"file": ["a.png", "b.png"], "prediction": ["dog", "cat"], "p_cat": [0.2, 0.9], "p_dog": [0.8, 0.1]}
    assert table.to_dict("list") == expected


def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path='nowhere.ckpt' is not allowed: expected an existing"):
        load_checkpoint("nowhere.ckpt")
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"x.ckpt' is not allowed: expected a checkpoint written by train.py"):
        load_checkpoint(str(tmp_path / "x.ckpt"))
