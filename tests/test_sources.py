"""The data sources: the user's arrays, a folder of images, synthetic data; and each bad file refused by name."""

import json

import numpy as np
import pytest
from data_files import labelled_people, write_arrays, write_png_folder
from omegaconf import OmegaConf
from PIL import Image

from descent.config import ConfigError
from descent.data.sources import load_arrays, load_folder, load_synthetic


def arrays_cfg(paths, metadata=True):
    return OmegaConf.create(
        {
            "images": str(paths["images"]),
            "labels": str(paths["labels"]),
            "metadata": str(paths["metadata"]) if metadata else None,
        }
    )


@pytest.fixture
def paths(tmp_path):
    return write_arrays(tmp_path / "arrays", labelled_people(n_subjects=20))


def test_arrays_are_memory_mapped_with_their_metadata(paths):
    source = load_arrays(arrays_cfg(paths))
    assert isinstance(source.images, np.memmap) and source.images.shape == (200, 6, 6)
    assert source.labels.dtype == np.int64 and source.num_classes == 3
    assert list(source.metadata.columns) == ["sex", "subject"] and source.column("sex")[0] in ("F", "M")


def test_channel_first_images_of_any_numeric_dtype_are_accepted(tmp_path, paths):
    np.save(tmp_path / "rgb.npy", np.zeros((200, 3, 4, 4), dtype=np.float16))
    source = load_arrays(OmegaConf.create({"images": str(tmp_path / "rgb.npy"), "labels": str(paths["labels"])}))
    assert source.image_shape == (3, 4, 4) and source.metadata is None


def test_an_unknown_metadata_column_is_refused_naming_the_known_ones(paths):
    with pytest.raises(ConfigError, match=r"'age'.*\['label', 'sex', 'subject'\]"):
        load_arrays(arrays_cfg(paths)).column("age")


def refused(cfg, *fragments):
    with pytest.raises(ConfigError) as error:
        load_arrays(cfg)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_a_missing_file_is_refused_naming_its_key_and_path(paths, tmp_path):
    refused(
        OmegaConf.create({"images": str(tmp_path / "nope.npy"), "labels": str(paths["labels"])}),
        "data.images=",
        "nope.npy",
        "no such file",
    )
    refused(OmegaConf.create({"images": None, "labels": str(paths["labels"])}), "data.images=None")


def test_a_corrupt_npy_is_refused(paths):
    paths["images"].write_bytes(b"\x93NUMPY garbage")
    refused(arrays_cfg(paths), "data.images=", "images.npy", "corrupt")
    paths["images"].write_bytes(b"not an array at all")
    refused(arrays_cfg(paths), "data.images=", "corrupt")


def test_a_truncated_npy_is_refused(paths):
    content = paths["images"].read_bytes()
    paths["images"].write_bytes(content[: len(content) // 2])
    refused(arrays_cfg(paths), "data.images=", "corrupt")


def test_images_and_labels_of_different_lengths_are_refused(paths):
    np.save(paths["labels"], np.zeros(150, dtype=np.int64))
    refused(arrays_cfg(paths), "data.labels=", "150 labels", "200 images")


def test_non_integer_labels_are_refused(paths):
    np.save(paths["labels"], np.zeros(200, dtype=np.float32))
    refused(arrays_cfg(paths), "data.labels=", "integer class labels", "float32")


def test_metadata_of_another_length_is_refused(paths):
    paths["metadata"].write_text("sex\nF\nM\n")
    refused(arrays_cfg(paths), "data.metadata=", "2 rows", "200 images")


def folder_cfg(root, cache, size=8):
    return OmegaConf.create({"root": str(root), "image_size": size, "cache_dir": str(cache)})


def test_a_folder_of_grey_pngs_becomes_a_cached_memory_mapped_array(tmp_path, monkeypatch):
    root = write_png_folder(tmp_path / "pngs")
    source = load_folder(folder_cfg(root, tmp_path / "cache"))
    assert isinstance(source.images, np.memmap) and source.images.shape == (24, 8, 8)
    assert np.array_equal(np.bincount(source.labels), [12, 12])  # dark = 0, light = 1: sorted folder names
    assert source.images[source.labels == 0].mean() < 100 < source.images[source.labels == 1].mean()

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr(Image, "open", no_decoding)
    again = load_folder(folder_cfg(root, tmp_path / "cache"))
    assert np.array_equal(np.asarray(again.images), np.asarray(source.images))


def test_a_folder_with_an_rgb_image_is_kept_in_colour(tmp_path):
    root = write_png_folder(tmp_path / "pngs", rgb_class="light")
    source = load_folder(folder_cfg(root, tmp_path / "cache", size=5))
    assert source.images.shape == (24, 3, 5, 5)


def test_a_changed_folder_is_converted_again(tmp_path):
    root = write_png_folder(tmp_path / "pngs")
    load_folder(folder_cfg(root, tmp_path / "cache"))
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(root / "dark" / "new.png")
    assert len(load_folder(folder_cfg(root, tmp_path / "cache")).labels) == 25


def test_a_corrupt_image_is_refused_with_its_path(tmp_path):
    root = write_png_folder(tmp_path / "pngs")
    (root / "light" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match=r"data\.root=.*cannot read the image .*light/broken\.png"):
        load_folder(folder_cfg(root, tmp_path / "cache"))


def test_a_missing_root_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root=.*one sub-folder of images per class"):
        load_folder(folder_cfg(tmp_path / "nope", tmp_path / "cache"))


def synthetic_cfg(folder, n=1000, chunk=300):
    return OmegaConf.create(
        {
            "dir": str(folder),
            "n_samples": n,
            "image_size": 7,
            "num_classes": 4,
            "generator_seed": 0,
            "chunk_size": chunk,
        }
    )


def test_synthetic_data_is_written_in_chunks_and_is_a_function_of_its_keys(tmp_path):
    source = load_synthetic(synthetic_cfg(tmp_path / "a", chunk=300))
    assert isinstance(source.images, np.memmap) and source.images.shape == (1000, 7, 7)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["n_samples"] == 1000
    assert set(np.unique(source.labels)) == {0, 1, 2, 3}
    same = load_synthetic(synthetic_cfg(tmp_path / "b", chunk=300))
    assert np.array_equal(np.asarray(source.images), np.asarray(same.images))
    rewritten = load_synthetic(synthetic_cfg(tmp_path / "a", n=500, chunk=300))  # other keys: written again
    assert rewritten.images.shape == (500, 7, 7)


def test_synthetic_classes_differ_by_their_pattern_not_only_by_noise(tmp_path):
    source = load_synthetic(synthetic_cfg(tmp_path / "a"))
    images = np.asarray(source.images, dtype=np.float64).reshape(1000, -1)
    means = np.stack([images[source.labels == c].mean(axis=0) for c in range(4)])
    assert np.abs(means[0] - means[1]).max() > 20  # the noise alone leaves class means ~5 apart at most
