"""Data sources: labelled images as arrays, read from where they live. A source never splits nor batches.

Every source gives `images` (N, ...) of any numeric dtype, possibly memory-mapped, `labels` (N,) int64 and an
optional `metadata` table of N rows (one column per attribute, for stratification and groups). Files are opened
memory-mapped and never read whole into memory: `folder` and `synthetic` write `.npy` files first, then open them
as `arrays` does. A bad file is refused with a `ConfigError` naming its key and path, never a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig

from descent.config import ConfigError, Rule, Schema, is_bool, is_int, is_str, null_or, positive_int
from descent.data.named import load_named

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("descent")
# Pillow modes that hold one channel: such images are kept grey, (N, H, W); any other mode is converted to RGB
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass
class Source:
    """Labelled images, in the order the split indices refer to."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    metadata: pd.DataFrame | None = None
    class_names: list[str] | None = None  # what label i means, when the source knows (folder names); else None

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def official_test(self) -> np.ndarray:
        """The indices of the data set's official test set (`data.official_test=true`), from its `official` column."""
        if self.metadata is None or "official" not in self.metadata.columns:
            allowed = "expected false: only the named data sets (mnist, fashion_mnist, kmnist, cifar10) have one"
            raise ConfigError("data.official_test", True, allowed)
        return np.flatnonzero(self.metadata["official"].to_numpy() == "test")

    def column(self, name: str) -> np.ndarray:
        """`label` or a metadata column, as an array of N values."""
        if name == "label":
            return self.labels
        if self.metadata is None or name not in self.metadata.columns:
            known = ["label", *([] if self.metadata is None else list(self.metadata.columns))]
            raise ConfigError("data.stratify_by/group_by", name, f"expected one of the columns {known}")
        return self.metadata[name].to_numpy()


def load_digits() -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), nothing downloaded."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return Source("digits", bunch.images.astype(np.float32), bunch.target.astype(np.int64))


def _existing_file(key: str, path: str | None, kind: str) -> Path:
    if not path:
        raise ConfigError(key, path, f"expected the path of a {kind} file")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(key, path, f"no such file: expected an existing {kind} file")
    return file


def open_npy(key: str, path: str | None) -> np.ndarray:
    """A `.npy` file, memory-mapped (only its header is read here)."""
    file = _existing_file(key, path, ".npy")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ConfigError(key, path, f"expected a readable .npy file, this one is corrupt ({error})") from None
    if not isinstance(array, np.ndarray):
        raise ConfigError(key, path, "expected a .npy file holding one array (np.save), not an .npz archive")
    return array


def open_arrays(
    name: str, images_path: str | None, labels_path: str | None, metadata_path: str | None = None
) -> Source:
    """Images (N,H,W) or (N,C,H,W) of any numeric dtype, memory-mapped; N integer labels >= 0; optional metadata."""
    images = open_npy("data.images", images_path)
    if images.ndim not in (3, 4) or not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
        raise ConfigError(
            "data.images",
            images_path,
            f"expected numbers of shape (N,H,W) or (N,C,H,W), got {images.dtype} of shape {images.shape}",
        )
    raw_labels = open_npy("data.labels", labels_path)
    if raw_labels.ndim != 1 or not np.issubdtype(raw_labels.dtype, np.integer):
        raise ConfigError(
            "data.labels",
            labels_path,
            f"expected a 1-D array of integer class labels, got {raw_labels.dtype} of shape {raw_labels.shape}",
        )
    if len(raw_labels) != len(images):
        raise ConfigError(
            "data.labels",
            labels_path,
            f"it holds {len(raw_labels)} labels but data.images holds {len(images)} images: expected one label per "
            "image",
        )
    labels = np.asarray(raw_labels, dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise ConfigError("data.labels", labels_path, f"expected labels >= 0 (0..C-1), found {labels.min()}")
    return Source(name, images, labels, _read_metadata(metadata_path, len(labels)))


def _read_metadata(path: str | None, rows: int) -> pd.DataFrame | None:
    if not path:
        return None
    import pandas as pd

    file = _existing_file("data.metadata", path, ".csv")
    try:
        metadata = pd.read_csv(file)
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise ConfigError("data.metadata", path, f"expected a readable .csv file with a header row ({error})") from None
    if len(metadata) != rows:
        raise ConfigError(
            "data.metadata", path, f"it has {len(metadata)} rows but there are {rows} images: expected one row each"
        )
    return metadata


def load_arrays(cfg: DictConfig) -> Source:
    """`data=arrays`: the user's own `.npy` images and labels, and an optional `.csv` of attributes."""
    return open_arrays("arrays", cfg.images, cfg.labels, cfg.get("metadata"))


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _image_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names (sorted sub-folders) and every (image file, label) under them, in a fixed order."""
    if not root.is_dir():
        raise ConfigError("data.root", str(root), "expected a folder with one sub-folder of images per class")
    classes = sorted(child.name for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError("data.root", str(root), f"expected at least 2 class sub-folders, found {classes}")
    files = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not found:
            raise ConfigError("data.root", str(root), f"the class folder {root / name} holds no image file")
        files += [(path, label) for path in found]
    return classes, files


def decode_image(path: Path, grey: bool, height: int, width: int) -> np.ndarray:
    """One image file as data=folder reads it: decoded by Pillow, grey (H, W) or RGB (3, H, W) uint8, resized
    bilinearly. Pillow's errors (an unreadable file) reach the caller, which names the file."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L" if grey else "RGB").resize((width, height), Image.BILINEAR))
    return pixels if grey else pixels.transpose(2, 0, 1)


def _unreadable(root: Path, path: Path, error: Exception) -> ConfigError:
    return ConfigError("data.root", str(root), f"cannot read the image {path} ({error}); remove or replace it")


def load_folder(cfg: DictConfig) -> Source:
    """`data=folder`: one sub-folder of images per class, decoded with Pillow once into a memory-mapped cache.

    The cache (`data.cache_dir`/folder-<hash>/: images.npy, labels.npy, manifest.json) is keyed by the root, the
    image size and every file's name, size and modification time: a changed folder is converted again.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(cfg.root).expanduser().resolve() if cfg.root else None
    if root is None:
        raise ConfigError("data.root", cfg.root, "expected a folder with one sub-folder of images per class")
    classes, files = _image_files(root)
    size = int(cfg.image_size)
    listing = [(str(path.relative_to(root)), path.stat().st_size, path.stat().st_mtime_ns) for path, _ in files]
    key = hashlib.sha256(json.dumps([str(root), size, listing]).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser() / f"folder-{key}"
    manifest = {"root": str(root), "image_size": size, "classes": classes, "count": len(files), "key": key}
    if _read_manifest(cache) != manifest:
        modes = []
        for path, _ in files:
            try:
                with Image.open(path) as image:
                    modes.append(image.mode)
            except (UnidentifiedImageError, OSError) as error:
                raise _unreadable(root, path, error) from None
        grey = all(mode in GREY_MODES for mode in modes)
        shape = (len(files), size, size) if grey else (len(files), 3, size, size)
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        images = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        for index, (path, _) in enumerate(files):
            try:
                images[index] = decode_image(path, grey, size, size)
            except (UnidentifiedImageError, OSError, ValueError) as error:
                raise _unreadable(root, path, error) from None
        images.flush()
        del images
        np.save(partial / "labels.npy", np.array([label for _, label in files], dtype=np.int64))
        _write_manifest(partial, manifest)
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
        log.info("data=folder: %d images of %s converted once into %s", len(files), root, cache)
    source = open_arrays("folder", str(cache / "images.npy"), str(cache / "labels.npy"))
    return dataclasses.replace(source, class_names=classes)


def synthetic_patterns(num_classes: int, size: int) -> np.ndarray:
    """One grating per class, (C, size, size) uint8 in [0, 64): three stripes across the image, each class at its
    own angle (180/C degrees apart). Under the noise below no single pixel tells the class; the whole image does."""
    grid = np.arange(size) / size
    angles = np.pi * np.arange(num_classes) / num_classes
    phase = np.cos(angles)[:, None, None] * grid[None, :, None] + np.sin(angles)[:, None, None] * grid[None, None, :]
    return np.round(31.5 + 31.5 * np.cos(2 * np.pi * 3 * phase)).astype(np.uint8)


def load_synthetic(cfg: DictConfig) -> Source:
    """`data=synthetic`: `data.n_samples` learnable images (a class's grating plus uniform noise in [0, 192)),
    written to `data.dir` one chunk at a time (memory: one chunk), reused while the keys match its manifest."""
    folder = Path(cfg.dir).expanduser()
    manifest = {
        "n_samples": int(cfg.n_samples),
        "image_size": int(cfg.image_size),
        "num_classes": int(cfg.num_classes),
        "generator_seed": int(cfg.generator_seed),
        "chunk_size": int(cfg.chunk_size),  # each chunk draws from (generator_seed, its start)
    }
    if _read_manifest(folder) != manifest:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").unlink(missing_ok=True)
        n, size, num_classes = manifest["n_samples"], manifest["image_size"], manifest["num_classes"]
        patterns = synthetic_patterns(num_classes, size)
        # written under other names, then renamed: a process still mapping the old files keeps reading them whole
        images = np.lib.format.open_memmap(folder / "images.partial", mode="w+", dtype=np.uint8, shape=(n, size, size))
        labels = np.lib.format.open_memmap(folder / "labels.partial", mode="w+", dtype=np.int64, shape=(n,))
        for start in range(0, n, manifest["chunk_size"]):
            end = min(start + manifest["chunk_size"], n)
            rng = np.random.default_rng([manifest["generator_seed"], start])  # a chunk depends on its start only
            labels[start:end] = rng.integers(0, num_classes, size=end - start)
            noise = rng.integers(0, 192, size=(end - start, size, size), dtype=np.uint8)
            np.add(noise, patterns[labels[start:end]], out=images[start:end])
        images.flush()
        labels.flush()
        del images, labels
        for name in ("images", "labels"):
            (folder / f"{name}.partial").replace(folder / f"{name}.npy")
        _write_manifest(folder, manifest)
        log.info("data=synthetic: %d images of %dx%d written to %s", n, size, size, folder)
    return open_arrays("synthetic", str(folder / "images.npy"), str(folder / "labels.npy"))


SOURCES: dict[str, Any] = {
    "digits": lambda cfg: load_digits(),
    "arrays": load_arrays,
    "folder": load_folder,
    "synthetic": load_synthetic,
    "mnist": load_named,
    "fashion_mnist": load_named,
    "kmnist": load_named,
    "cifar10": load_named,
}

# The keys of each source's `data` config beside the common ones (descent.config.DATA); memory-mapped sources stream
STREAMED: Schema = {"stream": Rule(lambda v: isinstance(v, DictConfig), "expected the data.stream settings")}
CACHE: Schema = {"cache_dir": Rule(is_str, "expected a folder for the converted arrays")}
SCHEMAS: dict[str, Schema] = {
    "digits": {},
    "arrays": {
        "images": Rule(null_or(is_str), "expected the path of a .npy file of images"),
        "labels": Rule(null_or(is_str), "expected the path of a .npy file of labels"),
        "metadata": Rule(null_or(is_str), "expected null or the path of a .csv file of attributes"),
        **STREAMED,
    },
    "folder": {
        "root": Rule(null_or(is_str), "expected a folder with one sub-folder of images per class"),
        "image_size": Rule(positive_int, "expected a positive int (images are image_size x image_size)"),
        **CACHE,
        **STREAMED,
    },
    "synthetic": {
        "n_samples": Rule(positive_int, "expected a positive int"),
        "image_size": Rule(positive_int, "expected a positive int (images are image_size x image_size)"),
        "num_classes": Rule(lambda v: is_int(v) and v >= 2, "expected an int >= 2"),
        "generator_seed": Rule(lambda v: is_int(v) and v >= 0, "expected an int >= 0"),
        "chunk_size": Rule(positive_int, "expected a positive int"),
        "dir": Rule(is_str, "expected a folder"),
        **STREAMED,
    },
}
NAMED: Schema = {
    "root": Rule(is_str, "expected the folder holding the data set's files (torchvision's layout)"),
    "download": Rule(is_bool, "expected true or false"),
    "official_test": Rule(is_bool, "expected true (the official test set is the test split) or false (pooled)"),
    **CACHE,
    **STREAMED,
}
SCHEMAS |= dict.fromkeys(("mnist", "fashion_mnist", "kmnist", "cifar10"), NAMED)


def build_source(cfg: DictConfig) -> Source:
    """The source named by `data.name`."""
    if cfg.name not in SOURCES:
        raise ConfigError("data.name", cfg.name, f"expected one of {sorted(SOURCES)}")
    return SOURCES[cfg.name](cfg)
