"""Named data sets by name: `data=mnist`, `fashion_mnist`, `kmnist` (IDX files) and `cifar10` (the python version's
pickled batches, as torchvision keeps them, or the binary version's records).

Their official files are read where torchvision keeps them under `data.root`, so that an existing torchvision download
is found; absent files are downloaded from the official mirrors and kept only once their published md5 matches. The
files are converted once into a memory-mapped cache as `data=folder` does, with an `official` column (train or test)
in its metadata, then opened as `data=arrays` is. Standard library only: torchvision cannot be a dependency (its
registry build does not import next to the CPU torch). A bad or absent file is a `ConfigError` naming `data.root` and
the file, never a traceback; a download never leaves a file that looks complete but is not. A pickled batch is read by
an unpickler that builds numpy arrays and plain containers only: a file that asks for anything else is refused, and
nothing in it is ever called.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import json
import logging
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from omegaconf import DictConfig

from descent.config import ConfigError

if TYPE_CHECKING:
    from descent.data.sources import Source

log = logging.getLogger("descent")
NUM_CLASSES = 10  # every set here has 10 classes: a label outside 0..9 means a corrupt file
DOWNLOAD_TIMEOUT_S = 30  # seconds a mirror may stay silent before the next one is tried
CHUNK_BYTES = 1 << 24  # read and written at a time: the memory a conversion needs beyond its memmaps
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
CIFAR_PYTHON_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_PIXELS = 3 * 32 * 32  # the red, green and blue planes, each row-major, in both versions
CIFAR_RECORD = 1 + CIFAR_PIXELS  # the binary version: one label byte, then the pixels
# The only globals a CIFAR-10 python batch (a dict of a numpy array and lists) may name when unpickled: numpy's array
# reconstruction as numpy 1 and 2 write it under each pickle protocol, and bytes as Python 3 writes them under
# protocol 2. Anything else (os.system, builtins.eval...) is refused before it is looked up.
PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


@dataclass(frozen=True)
class Named:
    """Where torchvision keeps a set's files under the root, and where they are downloaded from.

    `files` names the train and test files in `folder` (IDX pairs: images, labels). Without `archive`, each file is
    downloaded as `<name>.gz`; with it, the archive is downloaded into the root and `folder` extracted from it.
    `checksums` holds the published md5 of each downloaded name; a mirror is a URL prefix for those names. `kind`
    says how the files are read: `idx`, `cifar-binary` (records) or `cifar-python` (pickled batches); `classes`
    names the labels (None where they are the digits themselves).
    """

    name: str
    folder: str
    files: dict[str, tuple[str, ...]]
    mirrors: tuple[str, ...]
    checksums: dict[str, str]
    image_shape: tuple[int, ...]
    archive: str | None = None
    kind: str = "idx"
    classes: tuple[str, ...] | None = None  # the names of labels 0..9, as the set's authors publish them


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# mirrors and md5s as torchvision's datasets/mnist.py publishes them (MNIST: its S3 mirror first); CIFAR-10's binary
# archive and md5 as its authors' page publishes them (https://www.cs.toronto.edu/~kriz/cifar.html)
NAMED = {
    "mnist": Named(
        "mnist",
        "MNIST/raw",
        IDX_FILES,
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        (28, 28),
    ),
    "fashion_mnist": Named(
        "fashion_mnist",
        "FashionMNIST/raw",
        IDX_FILES,
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        (28, 28),
        classes=FASHION_CLASSES,
    ),
    "kmnist": Named(
        "kmnist",
        "KMNIST/raw",
        IDX_FILES,
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        {
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        (28, 28),
        classes=KMNIST_CLASSES,
    ),
    "cifar10": Named(
        "cifar10",
        "cifar-10-batches-bin",
        CIFAR_FILES,
        ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        (3, 32, 32),
        archive="cifar-10-binary.tar.gz",
        kind="cifar-binary",
        classes=CIFAR_CLASSES,
    ),
}
# torchvision's CIFAR-10: the python version, its archive and md5 as torchvision's datasets/cifar.py publishes them
CIFAR_PYTHON = Named(
    "cifar10",
    "cifar-10-batches-py",
    CIFAR_PYTHON_FILES,
    NAMED["cifar10"].mirrors,
    {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    (3, 32, 32),
    archive="cifar-10-python.tar.gz",
    kind="cifar-python",
    classes=CIFAR_CLASSES,
)


def _bad(root: Path, path: Path, problem: str) -> ConfigError:
    return ConfigError(
        "data.root", str(root), f"{path} is {problem}: delete it (data.download=true fetches it again) or replace it"
    )


def _find(spec: Named, root: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """The train and test files found (an IDX file plain or `.gz`, the plain one first), and the names absent."""
    folder = root / spec.folder
    found: dict[str, list[Path]] = {}
    missing = []
    for official, names in spec.files.items():
        found[official] = []
        for name in names:
            variants = [folder / name] if spec.archive else [folder / name, folder / f"{name}.gz"]
            path = next((variant for variant in variants if variant.is_file()), None)
            if path is None:
                missing.append(name)
            else:
                found[official].append(path)
    return found, missing


def _absent(spec: Named, root: Path, missing: list[str], why: str) -> ConfigError:
    """The one-line error for files absent and not downloaded: which files, where, and how to place them."""
    if spec.archive:
        expected = ", ".join(missing)
        version = "the python version" if spec.kind == "cifar-python" else "the binary version"
        how = f"download {spec.mirrors[0]}{spec.archive} ({version}) and extract it in {root}"
        python = root / CIFAR_PYTHON.folder
        if python.is_dir():
            lacks = ", ".join(_find(CIFAR_PYTHON, root)[1])
            how += f" (torchvision's python version in {python}/ is read instead once it is whole; it lacks {lacks})"
    else:
        expected = ", ".join(f"{name}(.gz)" for name in missing)
        how = f"download them from {' or '.join(spec.mirrors)} into that folder"
    return ConfigError(
        "data.root",
        str(root),
        f"expected {root / spec.folder}/ to hold {expected}: {how}, or run once with network "
        f"and data.download=true ({why})",
    )


def _download(spec: Named, name: str, target: Path) -> list[str]:
    """Fetch `name` into `target` from the first mirror whose copy has the published md5; else each mirror's failure.

    Written under a temporary name and renamed only once verified: no partial or wrong file is ever left."""
    failures = []
    for mirror in spec.mirrors:
        url = f"{mirror}{name}"
        temp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            log.info("data=%s: downloading %s", spec.name, url)
            digest = hashlib.md5(usedforsecurity=False)
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, temp.open("wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() == spec.checksums[name]:
                temp.replace(target)
                return []
            failures.append(f"{url} has md5 {digest.hexdigest()}, not the published {spec.checksums[name]}")
        except (OSError, http.client.HTTPException, ValueError) as error:
            failures.append(f"{url}: {error}".replace("\n", " "))  # the error stays one line
        finally:
            temp.unlink(missing_ok=True)
    return failures


def _extract(spec: Named, root: Path, archive: Path) -> None:
    """Extract the expected files of `folder` from the archive, each through a temporary name.

    Member names are only compared with the expected ones, never used as paths: nothing lands outside `folder`."""
    wanted = {f"{spec.folder}/{name}" for names in spec.files.values() for name in names}
    folder = root / spec.folder
    done = set()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in wanted or not member.isfile():  # links and folders are never followed
                    continue
                target = folder / Path(name).name
                temp = target.with_name(f".{target.name}.{os.getpid()}.part")
                try:
                    with tar.extractfile(member) as source, temp.open("wb") as out:
                        shutil.copyfileobj(source, out, CHUNK_BYTES)
                    temp.replace(target)
                finally:
                    temp.unlink(missing_ok=True)
                done.add(name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise _bad(root, archive, f"not a readable tar.gz archive ({error})") from None
    if done != wanted:
        raise _bad(root, archive, f"not the archive expected: it lacks {', '.join(sorted(wanted - done))}")


def _fetch(spec: Named, root: Path, missing: list[str], download: bool) -> None:
    """Place the missing files: extracted from the set's archive when it is in the root, else downloaded if allowed."""
    if spec.archive and (root / spec.archive).is_file():
        _extract(spec, root, root / spec.archive)
        return
    if not download:
        raise _absent(spec, root, missing, "they are absent and data.download=false")
    if spec.archive:
        downloads = [(spec.archive, root / spec.archive)]
    else:
        downloads = [(f"{name}.gz", root / spec.folder / f"{name}.gz") for name in missing]
    for name, target in downloads:
        failures = _download(spec, name, target)
        if failures:
            raise _absent(spec, root, missing, "the download failed: " + "; ".join(failures))
    if spec.archive:
        _extract(spec, root, root / spec.archive)


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # type: ignore[return-value]


@dataclass(frozen=True)
class _Part:
    """A piece of the pooled arrays: `count` samples of the official split `official`, which `fill` writes."""

    official: str
    count: int
    fill: Callable[[np.ndarray, np.ndarray], None]


def _read_idx(root: Path, path: Path, shape: tuple[int, ...], into: np.ndarray | None = None) -> int:
    """The number of items in an IDX file of items of `shape` (checking its header); with `into`, also its data.

    IDX: magic 00 00 08 <ndim>, one big-endian uint32 per dimension, then the uint8 items, nothing after them."""
    try:
        with _open(path) as stream:
            magic = stream.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
                raise _bad(root, path, "not an IDX file of unsigned bytes (one starts with 00 00 08 <ndim>)")
            if magic[3] != 1 + len(shape):
                raise _bad(root, path, f"an IDX file of {magic[3]} dimensions, not {1 + len(shape)}")
            header = stream.read(4 * magic[3])
            if len(header) < 4 * magic[3]:
                raise _bad(root, path, "truncated inside its IDX header")
            dims = struct.unpack(f">{magic[3]}I", header)
            if dims[1:] != shape:
                raise _bad(root, path, f"an IDX file of shape {dims}, not (N, {', '.join(map(str, shape))})")
            if into is None:
                return dims[0]
            buffer, filled = memoryview(into.reshape(-1)), 0
            while filled < len(buffer) and (got := stream.readinto(buffer[filled : filled + CHUNK_BYTES])):
                filled += got
            if filled < len(buffer):
                raise _bad(root, path, f"truncated: {filled} bytes of data where its header announces {len(buffer)}")
            if stream.read(1):
                raise _bad(root, path, "longer than its IDX header announces")
            return dims[0]
    except (OSError, EOFError, zlib.error) as error:
        raise _bad(root, path, f"unreadable ({error})") from None


def _checked_labels(root: Path, path: Path, raw: np.ndarray) -> np.ndarray:
    if len(raw) and raw.max() >= NUM_CLASSES:
        raise _bad(root, path, f"not a file of labels 0..{NUM_CLASSES - 1}: it holds the label {raw.max()}")
    return raw


def _idx_part(spec: Named, root: Path, official: str, images_path: Path, labels_path: Path) -> _Part:
    """N images and N labels, both headers checked now; `fill` copies the pixels and labels."""
    count = _read_idx(root, images_path, spec.image_shape)
    labels_count = _read_idx(root, labels_path, ())
    if labels_count != count:
        raise _bad(root, labels_path, f"a file of {labels_count} labels where {images_path.name} holds {count} images")

    def fill(images: np.ndarray, labels: np.ndarray) -> None:
        _read_idx(root, images_path, spec.image_shape, into=images)
        raw = np.empty(len(labels), dtype=np.uint8)
        _read_idx(root, labels_path, (), into=raw)
        labels[:] = _checked_labels(root, labels_path, raw)

    return _Part(official, count, fill)


def _cifar_part(spec: Named, root: Path, official: str, path: Path) -> _Part:
    """A CIFAR-10 binary batch of whole records (its size checked now); `fill` copies them a chunk at a time."""
    size = path.stat().st_size
    if size == 0 or size % CIFAR_RECORD:
        raise _bad(root, path, f"not a CIFAR-10 binary batch: {size} bytes are not whole {CIFAR_RECORD}-byte records")
    per_chunk = max(1, CHUNK_BYTES // CIFAR_RECORD)

    def fill(images: np.ndarray, labels: np.ndarray) -> None:
        try:
            with path.open("rb") as stream:
                for start in range(0, len(labels), per_chunk):
                    n = min(per_chunk, len(labels) - start)
                    records = np.frombuffer(stream.read(n * CIFAR_RECORD), dtype=np.uint8)
                    if len(records) < n * CIFAR_RECORD:
                        raise _bad(root, path, "truncated while it was read")
                    records = records.reshape(n, CIFAR_RECORD)
                    labels[start : start + n] = _checked_labels(root, path, records[:, 0])
                    images[start : start + n] = records[:, 1:].reshape(n, *spec.image_shape)
        except OSError as error:
            raise _bad(root, path, f"unreadable ({error})") from None

    return _Part(official, size // CIFAR_RECORD, fill)


class _Refused(pickle.UnpicklingError):
    """A pickle that names a global outside PICKLE_GLOBALS."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a global outside PICKLE_GLOBALS is refused, never looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PICKLE_GLOBALS:
            raise _Refused(f"its pickle asks for {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def _python_batch(root: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (N, 3072) and labels (N,) of a CIFAR-10 python batch: a pickled dict with `data` (uint8) and
    `labels` (a list of ints), its keys bytes as CIFAR's own Python 2 pickles give them, or str."""
    try:
        with path.open("rb") as stream:
            batch = _BatchUnpickler(stream, encoding="bytes").load()
    except _Refused as error:
        raise _bad(root, path, f"refused: {error}") from None
    except Exception as error:  # a damaged pickle can fail in any way; none of it is run
        raise _bad(root, path, f"not a readable CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise _bad(root, path, f"not a CIFAR-10 python batch (a pickled {type(batch).__name__}, not a dict)")
    data, labels = (batch.get(key.encode(), batch.get(key)) for key in ("data", "labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        shown = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad(root, path, f"not a CIFAR-10 python batch: its data is {shown}, not uint8 (N, {CIFAR_PIXELS})")
    labels = np.asarray(labels if labels is not None else [])
    if labels.shape != (len(data),) or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
        raise _bad(root, path, f"not a CIFAR-10 python batch: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise _bad(root, path, f"not a file of labels 0..{NUM_CLASSES - 1}: it holds the label {labels.min()}")
    return data, _checked_labels(root, path, labels)


def _cifar_python_part(spec: Named, root: Path, official: str, path: Path) -> _Part:
    """A CIFAR-10 python batch, checked whole now; `fill` reads it again (one batch in memory at a time)."""
    count = len(_python_batch(root, path)[1])

    def fill(images: np.ndarray, labels: np.ndarray) -> None:
        data, labels[:] = _python_batch(root, path)  # the pixels, and the labels copied into place
        images[:] = data.reshape(len(data), *spec.image_shape)

    return _Part(official, count, fill)


def _cifar_version(root: Path) -> Named:
    """torchvision's python version when its six batches (or its archive, to extract) are in the root, else the
    binary version."""
    if not _find(CIFAR_PYTHON, root)[1] or (root / CIFAR_PYTHON.archive).is_file():
        return CIFAR_PYTHON
    return NAMED["cifar10"]


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _convert(spec: Named, parts: list[_Part], cache: Path, manifest: dict[str, Any]) -> None:
    """Write images.npy, labels.npy, metadata.csv (`official`) and manifest.json into `cache`, one part at a time.

    Written into a folder of this process's own, renamed when complete: a failed conversion leaves no cache."""
    total = sum(part.count for part in parts)
    partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        images = np.lib.format.open_memmap(
            partial / "images.npy", mode="w+", dtype=np.uint8, shape=(total, *spec.image_shape)
        )
        labels = np.lib.format.open_memmap(partial / "labels.npy", mode="w+", dtype=np.int64, shape=(total,))
        start = 0
        for part in parts:
            part.fill(images[start : start + part.count], labels[start : start + part.count])
            start += part.count
        images.flush()
        labels.flush()
        del images, labels
        (partial / "metadata.csv").write_text("official\n" + "".join(f"{p.official}\n" * p.count for p in parts))
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if _manifest(cache) != manifest:  # a leftover without its manifest; a complete one another run just wrote stays
            shutil.rmtree(cache, ignore_errors=True)
        try:
            partial.rename(cache)
        except OSError:
            if _manifest(cache) != manifest:  # unless another run converted the same files meanwhile
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_named(cfg: DictConfig) -> Source:
    """`data=mnist|fashion_mnist|kmnist|cifar10`: the official train and test files pooled (train first), found in
    or downloaded to torchvision's layout under `data.root`, converted once into `data.cache_dir`.

    The cache (`<cache_dir>/<name>-<hash>/`) is keyed by the root and every file's name, size and modification
    time: a changed file is converted again, an unchanged one never."""
    from descent.data.sources import open_arrays  # here, not at the top: sources imports this module

    spec = NAMED[cfg.name]
    if not cfg.root:
        raise ConfigError("data.root", cfg.root, f"expected the folder that holds (or is to hold) {spec.folder}/")
    if not isinstance(cfg.download, bool):
        raise ConfigError("data.download", cfg.download, "expected true (fetch absent files) or false")
    root = Path(cfg.root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError("data.root", cfg.root, f"expected a folder that holds (or is to hold) {spec.folder}/")
    if spec.name == "cifar10":
        spec = _cifar_version(root)
    found, missing = _find(spec, root)
    if missing:
        _fetch(spec, root, missing, cfg.download)
        found, missing = _find(spec, root)
        if missing:
            raise _absent(spec, root, missing, "they were not found after the download")
    listing = [
        [str(path.relative_to(root)), path.stat().st_size, path.stat().st_mtime_ns]
        for paths in found.values()
        for path in paths
    ]
    key = hashlib.sha256(json.dumps([spec.name, str(root), listing]).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser() / f"{spec.name}-{key}"
    manifest = {"name": spec.name, "root": str(root), "files": listing, "key": key}
    if _manifest(cache) != manifest:
        if spec.kind == "idx":
            parts = [_idx_part(spec, root, official, *paths) for official, paths in found.items()]
        else:
            part = _cifar_python_part if spec.kind == "cifar-python" else _cifar_part
            parts = [part(spec, root, official, path) for official, paths in found.items() for path in paths]
        try:
            _convert(spec, parts, cache, manifest)
        except OSError as error:
            raise ConfigError(
                "data.cache_dir", cfg.cache_dir, f"expected a folder that can be written ({error})"
            ) from None
        log.info("data=%s: %d images of %s converted once into %s", spec.name, sum(p.count for p in parts), root, cache)
    source = open_arrays(spec.name, str(cache / "images.npy"), str(cache / "labels.npy"), str(cache / "metadata.csv"))
    return dataclasses.replace(source, class_names=list(spec.classes) if spec.classes else None)
