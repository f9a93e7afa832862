"""The named data sets (MNIST, Fashion-MNIST, KMNIST, CIFAR-10): official files read back exactly, bad ones refused by
name, downloads verified, the converted cache reused. Never needs a network: downloads come from 127.0.0.1."""

import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import pickle
import socket
import threading

import numpy as np
import pytest
from conftest import compose_train, results_of
from fake_datasets import (
    cifar_python_batch,
    idx_bytes,
    write_cifar_archive,
    write_cifar_python_archive,
    write_cifar_python_set,
    write_cifar_set,
    write_idx_set,
)

from descent.config import ConfigError
from descent.data import named
from descent.data.sources import build_source
from descent.data.splits import make_splits

IDX_FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw", "kmnist": "KMNIST/raw"}
IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def load(name, root, cache, download=False):
    """The source through the real config group file, as train.py builds it."""
    cfg = compose_train(
        f"data={name}", f"data.root={root}", f"data.cache_dir={cache}", f"data.download={str(download).lower()}"
    )
    return build_source(cfg.data)


def refused(name, root, cache, *fragments, download=False):
    with pytest.raises(ConfigError) as error:
        load(name, root, cache, download)
    message = str(error.value)
    assert "\n" not in message and message.startswith("data.root=")
    for fragment in fragments:
        assert str(fragment) in message
    return message


def assert_same(source, expected):
    assert np.array_equal(np.asarray(source.images), expected["images"])
    assert np.array_equal(source.labels, expected["labels"].astype(np.int64))
    assert list(source.metadata["official"]) == list(expected["official"])


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("name", list(IDX_FOLDERS))
def test_idx_files_are_read_back_exactly_train_first_then_test(name, gz, root, cache):
    expected = write_idx_set(root, IDX_FOLDERS[name], gz=gz)
    source = load(name, root, cache)
    assert source.name == name and isinstance(source.images, np.memmap)
    assert source.images.dtype == np.uint8 and source.images.shape == (800, 28, 28)
    assert source.labels.dtype == np.int64 and source.num_classes == 10
    assert_same(source, expected)
    assert list(source.metadata["official"]).count("test") == 200


def test_cifar_batches_are_read_back_channel_first(root, cache):
    expected = write_cifar_set(root, per_batch=20)
    source = load("cifar10", root, cache)
    assert source.images.shape == (120, 3, 32, 32) and source.image_shape == (3, 32, 32)
    assert_same(source, expected)
    record = (root / "cifar-10-batches-bin" / "data_batch_2.bin").read_bytes()[3 * 3073 : 4 * 3073]  # its 4th record
    channel, row, column = 2, 5, 7  # blue plane: byte 1 + 2*1024 + 5*32 + 7 of the record
    assert source.labels[23] == record[0]
    assert source.images[23, channel, row, column] == record[1 + channel * 1024 + row * 32 + column]


def test_the_official_column_stratifies_like_any_metadata_column(root, cache):
    write_idx_set(root)
    source = load("mnist", root, cache)
    columns = {"label": source.column("label"), "official": source.column("official")}
    split = make_splits(len(source.labels), columns, (0.6, 0.2, 0.2), 0, 0, None)[0]
    assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(800))
    assert (source.column("official")[split.test] == "test").sum() == 40


def corrupt(path, content):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: b"\x00\x00\x09\x03" + c[4:], "not an IDX file of unsigned bytes"),
        (lambda c: c[:3] + b"\x02" + c[4:], "an IDX file of 2 dimensions, not 3"),
        (lambda c: c[:8] + (27).to_bytes(4, "big") + c[12:], "an IDX file of shape (600, 27, 28)"),
        (lambda c: c[:10], "truncated inside its IDX header"),
        (lambda c: c[:-5], "truncated"),
        (lambda c: c + b"\x00", "longer than its IDX header announces"),
        (lambda c: b"", "not an IDX file"),
    ],
    ids=["magic", "ndim", "dims", "header", "data", "trailing", "empty"],
)
def test_a_corrupt_or_truncated_idx_file_is_one_error_naming_it(root, cache, damage, message):
    write_idx_set(root)
    images = root / "MNIST/raw/train-images-idx3-ubyte"
    corrupt(images, damage(images.read_bytes()))
    refused("mnist", root, cache, images, message)
    assert not any(cache.glob("*"))


def test_corrupt_gzip_files_and_bad_labels_are_refused_by_name(root, cache):
    write_idx_set(root, gz=True)
    labels = root / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    corrupt(labels, gzip.compress(idx_bytes(np.full(200, 12, dtype=np.uint8))))
    refused("mnist", root, cache, labels, "labels 0..9", "the label 12")
    corrupt(labels, gzip.compress(idx_bytes(np.zeros(150, dtype=np.uint8))))
    refused("mnist", root, cache, labels, "150 labels", "200 images")
    write_idx_set(root, gz=True)
    images = root / "MNIST/raw/train-images-idx3-ubyte.gz"
    corrupt(images, images.read_bytes()[:-100])
    refused("mnist", root, cache, images, "unreadable")
    corrupt(images, b"not gzip at all")
    refused("mnist", root, cache, images, "unreadable")


def test_a_cifar_batch_of_partial_records_is_refused_by_name(root, cache):
    write_cifar_set(root, per_batch=4)
    batch = root / "cifar-10-batches-bin/data_batch_3.bin"
    corrupt(batch, batch.read_bytes()[:-1])
    refused("cifar10", root, cache, batch, "whole 3073-byte records")


def test_absent_files_without_download_name_the_root_the_files_and_how_to_place_them(root, cache):
    message = refused("mnist", root, cache, root, "MNIST/raw/", *IDX_NAMES, "(.gz)", "data.download=true")
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message
    write_idx_set(root)
    (root / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    message = refused("mnist", root, cache, "t10k-labels-idx1-ubyte(.gz)")
    assert "train-images" not in message
    write_idx_set(root, "KMNIST/raw")
    refused("fashion_mnist", root, cache, "FashionMNIST/raw/", "fashion-mnist.s3-website")


def test_absent_cifar_batches_point_at_the_binary_version_and_what_the_python_one_lacks(root, cache):
    (root / "cifar-10-batches-py").mkdir(parents=True)
    expected = ["cifar-10-batches-bin/", "test_batch.bin", "cifar-10-binary.tar.gz", "torchvision's python version"]
    refused("cifar10", root, cache, *expected, "it lacks data_batch_1, ")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL], ids=["cifars-own-protocol", "highest-protocol"])
def test_torchvisions_python_batches_are_read_back_exactly(root, cache, protocol):
    expected = write_cifar_python_set(root, per_batch=20, protocol=protocol)
    source = load("cifar10", root, cache)
    assert source.images.shape == (120, 3, 32, 32) and source.images.dtype == np.uint8
    assert_same(source, expected)


def test_the_python_version_is_preferred_to_the_binary_one_when_both_are_there(root, cache):
    write_cifar_set(root, per_batch=10, seed=0)
    expected = write_cifar_python_set(root, per_batch=12, seed=5)
    assert_same(load("cifar10", root, cache), expected)


def test_torchvisions_python_archive_in_the_root_is_extracted(root, cache):
    expected = write_cifar_python_archive(root / "cifar-10-python.tar.gz", per_batch=10)
    assert_same(load("cifar10", root, cache), expected)
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()


class Payload:
    """Unpickled by a plain pickle.load, it would call eval and write a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


def test_a_pickled_batch_asking_for_anything_but_numpy_arrays_is_refused_and_never_run(tmp_path, root, cache):
    write_cifar_python_set(root, per_batch=4)
    batch = root / "cifar-10-batches-py/data_batch_2"
    marker = tmp_path / "ran"
    corrupt(batch, pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2))
    refused("cifar10", root, cache, batch, "refused", "__builtin__.eval", "never holds")
    assert not marker.exists() and not any(cache.glob("*"))


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda good: good[: len(good) // 2], "not a readable CIFAR-10 python batch"),
        (lambda good: b"", "not a readable CIFAR-10 python batch"),
        (lambda good: pickle.dumps([1, 2, 3], protocol=2), "a pickled list, not a dict"),
        (
            lambda good: cifar_python_batch("x", np.zeros(4, np.uint8), np.zeros((4, 3, 32, 31), np.uint8)),
            "not uint8 (N, 3072)",
        ),
        (
            lambda good: pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, protocol=2),
            "4 images but labels of shape (2,)",
        ),
        (lambda good: cifar_python_batch("x", np.full(4, 11, np.uint8), np.zeros((4, 3072), np.uint8)), "the label 11"),
    ],
    ids=["truncated", "empty", "not-a-dict", "pixels", "labels", "label-range"],
)
def test_a_damaged_python_batch_is_refused_by_name(root, cache, content, message):
    write_cifar_python_set(root, per_batch=4)
    batch = root / "cifar-10-batches-py/test_batch"
    corrupt(batch, content(batch.read_bytes()))
    refused("cifar10", root, cache, batch, message)
    assert not any(cache.glob("*"))


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server over tmp_path/served: its URL prefix, ending with '/'."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/"


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def use_mirrors(monkeypatch, name, mirrors, checksums):
    spec = dataclasses.replace(named.NAMED[name], mirrors=tuple(mirrors), checksums=checksums)
    monkeypatch.setitem(named.NAMED, name, spec)


def test_a_download_lands_verified_in_torchvisions_layout(tmp_path, root, cache, mirror, monkeypatch):
    served, url = mirror
    expected = write_idx_set(served, "", gz=True)
    use_mirrors(monkeypatch, "mnist", [closed_port_url(), url], {f"{n}.gz": md5(served / f"{n}.gz") for n in IDX_NAMES})
    assert_same(load("mnist", root, cache, download=True), expected)  # the dead first mirror is skipped
    raw = root / "MNIST/raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)
    assert all((raw / f"{n}.gz").read_bytes() == (served / f"{n}.gz").read_bytes() for n in IDX_NAMES)


def test_a_checksum_mismatch_is_refused_and_leaves_no_file(root, cache, mirror, monkeypatch):
    served, url = mirror
    write_idx_set(served, "", gz=True)
    use_mirrors(monkeypatch, "mnist", [url], {f"{n}.gz": "0" * 32 for n in IDX_NAMES})
    refused("mnist", root, cache, "download failed", "not the published " + "0" * 32, download=True)
    assert not any(path.is_file() for path in root.rglob("*"))


def test_an_offline_download_is_one_line_saying_what_to_place_where(root, cache, monkeypatch):
    use_mirrors(monkeypatch, "kmnist", [closed_port_url()], named.NAMED["kmnist"].checksums)
    refused("kmnist", root, cache, root, "KMNIST/raw/", "download failed", "data.download=true", download=True)
    assert not any(path.is_file() for path in root.rglob("*"))


def test_cifars_archive_is_downloaded_verified_and_extracted_safely(tmp_path, root, cache, mirror, monkeypatch):
    served, url = mirror
    escapes = {"../escaped.bin": b"x", "cifar-10-batches-bin/../../escaped2.bin": b"x", "/tmp/escaped3.bin": b"x"}
    expected = write_cifar_archive(served / "cifar-10-binary.tar.gz", per_batch=10, extra=escapes)
    use_mirrors(monkeypatch, "cifar10", [url], {"cifar-10-binary.tar.gz": md5(served / "cifar-10-binary.tar.gz")})
    assert_same(load("cifar10", root, cache, download=True), expected)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]
    assert sorted(p.name for p in (root / "cifar-10-batches-bin").iterdir()) == sorted(
        [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    )
    assert not list(tmp_path.rglob("escaped*")) and not os.path.exists("/tmp/escaped3.bin")


def test_cifars_archive_already_in_the_root_is_extracted_without_a_download(root, cache):
    expected = write_cifar_archive(root / "cifar-10-binary.tar.gz", per_batch=10)
    assert_same(load("cifar10", root, cache, download=False), expected)


def test_the_cache_is_reused_when_unchanged_and_rebuilt_when_a_file_changes(root, cache, monkeypatch):
    write_idx_set(root, "FashionMNIST/raw")
    conversions = []
    convert = named._convert
    monkeypatch.setattr(named, "_convert", lambda *args: (conversions.append(args[2]), convert(*args)))
    first = load("fashion_mnist", root, cache)
    second = load("fashion_mnist", root, cache)
    assert len(conversions) == 1 and second.images.filename == first.images.filename
    assert (conversions[0] / "manifest.json").is_file() and (conversions[0] / "metadata.csv").is_file()
    expected = write_idx_set(root, "FashionMNIST/raw", seed=7)  # same names and sizes, other content and mtimes
    labels = root / "FashionMNIST/raw/train-labels-idx1-ubyte"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    assert_same(load("fashion_mnist", root, cache), expected)
    assert len(conversions) == 2 and conversions[1] != conversions[0]
    assert not list(cache.glob("*.partial*"))


@pytest.mark.parametrize(
    "name, write",
    [
        ("mnist", lambda root: write_idx_set(root, "MNIST/raw", gz=True)),
        ("fashion_mnist", lambda root: write_idx_set(root, "FashionMNIST/raw")),
        ("cifar10", lambda root: write_cifar_set(root, per_batch=100, seed=3)),
        ("cifar10", lambda root: write_cifar_python_set(root, per_batch=100, seed=3)),
    ],
    ids=["mnist", "fashion_mnist", "cifar10-binary", "cifar10-python"],
)
def test_a_run_trains_on_a_named_set_by_name(train, tmp_path, name, write):
    root = tmp_path / "data"
    n = len(write(root)["labels"])
    process, run_dir = train(f"data={name}", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}")
    assert process.returncode == 0, process.stderr[-2000:]
    results = results_of(run_dir)
    assert results["status"] == "ok" and results["n_train"] + results["n_val"] + results["n_test"] == n


def test_an_absent_root_offline_stops_with_one_line_and_no_traceback(train, tmp_path):
    process, _ = train("data=mnist", f"data.root={tmp_path / 'nowhere'}", "data.download=false")
    output = process.stdout + process.stderr
    assert process.returncode == 2 and "Traceback" not in output
    lines = [line for line in output.splitlines() if "data.root=" in line]
    assert len(lines) == 1 and "MNIST/raw/" in lines[0] and "train-images-idx3-ubyte(.gz)" in lines[0]
