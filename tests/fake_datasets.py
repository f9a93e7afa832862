"""Small fake copies of the named data sets in their official formats: MNIST's family as IDX files (plain or gzipped),
CIFAR-10 as binary batches or as the python version's pickled batches (loose, or in their tar.gz archives), in
torchvision's folder layout."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CIFAR_BATCHES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: 00 00 08 <ndim>, one big-endian uint32 per dimension, then the data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fake_images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 noise with a bright band per class (rows 2k..2k+1 of the last two axes' first rows): learnable."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, size=(len(labels), *shape), dtype=np.uint8)
    for k in range(10):
        images[labels == k, ..., 2 * k : 2 * k + 2, :] += 120
    return images


def balanced_labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.uint8)


def write_idx_set(
    root: Path, folder: str = "MNIST/raw", n_train: int = 600, n_test: int = 200, gz: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """The four official files in `<root>/<folder>/` (gzipped as `.gz` when `gz`); returns what a reader must give
    back: the pooled `images` (N,28,28), `labels` and `official` ("train" then "test")."""
    raw = root / folder
    raw.mkdir(parents=True, exist_ok=True)
    pooled: dict[str, list[np.ndarray]] = {"images": [], "labels": [], "official": []}
    for offset, (official, prefix, n) in enumerate((("train", "train", n_train), ("test", "t10k", n_test))):
        labels = balanced_labels(n, seed + offset)
        images = fake_images(labels, (28, 28), seed + offset)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            content = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (raw / name).write_bytes(content)
        pooled["images"].append(images)
        pooled["labels"].append(labels)
        pooled["official"].append(np.array([official] * n))
    return {key: np.concatenate(arrays) for key, arrays in pooled.items()}


def cifar_records(per_batch: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (labels, images (n,3,32,32)) of each of the six batch files."""
    records = {}
    for offset, name in enumerate([*CIFAR_BATCHES, "test_batch.bin"]):
        labels = balanced_labels(per_batch, seed + offset)
        records[name] = labels, fake_images(labels, (3, 32, 32), seed + offset)
    return records


def pooled_cifar(records: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """What a reader must give back: the batches pooled in order (train first), with their `official` split."""
    return {
        "images": np.concatenate([images for _, images in records.values()]),
        "labels": np.concatenate([labels for labels, _ in records.values()]),
        "official": np.repeat(
            ["train" if name in CIFAR_BATCHES else "test" for name in records],
            [len(labels) for labels, _ in records.values()],
        ),
    }


def cifar_bytes(labels: np.ndarray, images: np.ndarray) -> bytes:
    """Records of 1 label byte + 3072 pixel bytes (red, green, blue planes, each row-major)."""
    return np.concatenate([labels[:, None], images.reshape(len(labels), -1)], axis=1).tobytes()


def write_cifar_set(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """The six batches in `<root>/cifar-10-batches-bin/`; returns the pooled `images`, `labels` and `official`."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    records = cifar_records(per_batch, seed)
    for name, (labels, images) in records.items():
        (folder / name).write_bytes(cifar_bytes(labels, images))
    return pooled_cifar(records)


def write_cifar_archive(
    path: Path, per_batch: int = 20, seed: int = 0, extra: dict[str, bytes] | None = None
) -> dict[str, np.ndarray]:
    """cifar-10-binary.tar.gz as its authors ship it (members `cifar-10-batches-bin/<batch>.bin`), plus `extra`
    members by name (e.g. a path-traversal attempt); returns the pooled arrays as `write_cifar_set` does."""
    records = cifar_records(per_batch, seed)
    members = {f"cifar-10-batches-bin/{name}": cifar_bytes(*arrays) for name, arrays in records.items()}
    members |= {"cifar-10-batches-bin/batches.meta.txt": b"airplane\nautomobile\n"} | (extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return pooled_cifar(records)


def cifar_python_batch(name: str, labels: np.ndarray, images: np.ndarray, protocol: int = 2) -> bytes:
    """A batch of the python version as CIFAR's own are pickled (protocol 2): a dict with bytes keys, `data` uint8
    (N, 3072) (red, green, blue planes, each row-major), `labels` a list of ints, `batch_label` and `filenames`."""
    batch = {
        b"batch_label": f"{name} of the fake set".encode(),
        b"labels": [int(label) for label in labels],
        b"data": images.reshape(len(labels), -1),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=protocol)


def python_batches(per_batch: int, seed: int, protocol: int = 2) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The files of `cifar-10-batches-py/` (six batches and batches.meta) by name, and the pooled arrays."""
    records = cifar_records(per_batch, seed)
    files = {
        name.removesuffix(".bin"): cifar_python_batch(name, *arrays, protocol=protocol)
        for name, arrays in records.items()
    }
    meta = {b"num_cases_per_batch": per_batch, b"label_names": CIFAR_CLASSES, b"num_vis": 3072}
    files["batches.meta"] = pickle.dumps(meta, protocol=protocol)
    return files, pooled_cifar(records)


def write_cifar_python_set(root: Path, per_batch: int = 20, seed: int = 0, protocol: int = 2) -> dict[str, np.ndarray]:
    """torchvision's CIFAR-10 download: the python version's batches in `<root>/cifar-10-batches-py/`; returns the
    pooled `images`, `labels` and `official`."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    files, pooled = python_batches(per_batch, seed, protocol)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return pooled


def write_cifar_python_archive(path: Path, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """cifar-10-python.tar.gz as torchvision downloads it (members `cifar-10-batches-py/<batch>`)."""
    files, pooled = python_batches(per_batch, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return pooled
