"""Data loading: exact on-disk formats written by the test, checksums, errors, batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroplast.data import BatchIterator, DataError, datasets, load_dataset, parse_idx, read_cifar10_tarball, sources
from neuroplast.data import cache as cache_module
from neuroplast.data.cache import CACHE_NAME
from neuroplast.data.datasets import is_available_offline, load_idx_folder
from neuroplast.data.sources import FASHION_MNIST, MNIST, RemoteFile, Source, fetch


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: two zero bytes, type code 0x08 (uint8), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, n_train=12, n_test=6, seed=0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )
    folder.mkdir(parents=True, exist_ok=True)
    for f, array in zip(MNIST.files, arrays):
        (folder / f.name).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def test_idx_roundtrip_exact_format(tmp_path):
    written = write_idx_folder(tmp_path)
    loaded = load_idx_folder(tmp_path, MNIST, check=False)
    for a, b in zip(written, loaded):
        np.testing.assert_array_equal(a, b)


def test_idx_rejects_bad_magic_and_truncation():
    good = idx_bytes(np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x02" + good[2:], "f.idx")
    with pytest.raises(DataError, match="f.idx is truncated"):
        parse_idx(good[:-1], "f.idx")


def test_truncated_gzip_names_the_file(tmp_path):
    write_idx_folder(tmp_path)
    victim = tmp_path / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:50])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_idx_folder(tmp_path, MNIST, check=False)


def test_checksum_mismatch_in_cache_is_reported_and_file_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPLAST_DATA", str(tmp_path))
    write_idx_folder(tmp_path / "mnist")
    victim = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    before = victim.read_bytes()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*sha256 mismatch"):
        load_dataset("mnist", download=False, progress=False)
    assert victim.read_bytes() == before  # nothing overwritten


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist", "cifar10"])
def test_not_found_offline_names_three_ways(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("NEUROPLAST_DATA", str(tmp_path))
    source = sources.SOURCES[dataset]
    no_system_copy = Source(dataset, source.base_urls, source.files, system_dirs=())

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        fetch(no_system_copy, download=True, progress=False)
    message = str(err.value)
    ways = message.split("(1) ")[1]
    assert "(2) set NEUROPLAST_DATA" in ways and "(3) " in ways and "network unreachable" in message
    third = ways.split("(3) ")[1]
    assert ("dataset-fashion-mnist" in third) == (dataset == "fashion-mnist")
    assert "\n" not in message
    assert not any(tmp_path.rglob("*.part")), "a failed download must not leave files behind"


def test_download_is_verified_before_it_lands(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPLAST_DATA", str(tmp_path))
    payload = b"hello dataset"
    good = Source("toy", ("https://example.invalid/",), (RemoteFile("a.bin", hashlib.sha256(payload).hexdigest()),))
    bad = Source("toy2", ("https://example.invalid/",), (RemoteFile("a.bin", "0" * 64),))

    def fake_download(url, dest, progress):
        Path(dest).write_bytes(payload)

    monkeypatch.setattr(sources, "_download", fake_download)
    assert fetch(good, progress=False) == {"a.bin": payload}
    assert (tmp_path / "toy" / "a.bin").read_bytes() == payload
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch(bad, progress=False)
    assert not (tmp_path / "toy2" / "a.bin").exists()


def test_a_bad_mirror_falls_back_to_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPLAST_DATA", str(tmp_path))
    payload = b"the real bytes"
    source = Source(
        "toy",
        ("https://bad.invalid/", "https://good.invalid/"),
        (RemoteFile("a.bin", hashlib.sha256(payload).hexdigest()),),
    )

    def fake_download(url, dest, progress):
        Path(dest).write_bytes(b"tampered" if "bad" in url else payload)

    monkeypatch.setattr(sources, "_download", fake_download)
    assert fetch(source, progress=False) == {"a.bin": payload}


def test_recompressed_copy_accepted_by_content_hash(tmp_path):
    content = b"same content, other gzip header"
    entry = RemoteFile("x.gz", "f" * 64, hashlib.sha256(content).hexdigest())
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(content, mtime=123))
    assert sources.verify(path, entry) == path.read_bytes()


def cifar_tarball(n_per_batch=4, seed=0) -> tuple[bytes, list[np.ndarray]]:
    """A tiny tarball in the exact layout of the official cifar-10-python.tar.gz."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    batches = []
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, n_per_batch).tolist()
            batches.append((data, labels))
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": []})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue(), batches


def test_cifar10_tarball_format():
    raw, batches = cifar_tarball()
    x_train, y_train, x_test, y_test = read_cifar10_tarball(raw, "cifar-10-python.tar.gz")
    assert x_train.shape == (20, 3, 32, 32) and x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(x_train[4].reshape(-1), batches[1][0][0])  # first image of batch 2
    assert y_test.tolist() == batches[5][1]
    with pytest.raises(DataError, match="cifar-10-python.tar.gz is truncated"):
        read_cifar10_tarball(raw[: len(raw) // 2], "cifar-10-python.tar.gz")


def test_digits_is_offline_normalised_and_fixed():
    a = load_dataset("digits", flatten=True)
    b = load_dataset("digits", flatten=True)
    assert is_available_offline("digits")
    assert a.x_train.shape[1] == 64 and a.num_classes == 10 and a.image_shape == (1, 8, 8)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-2
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="unknown dataset 'foo'; choose from: digits, mnist, fashion-mnist, cifar10"):
        load_dataset("foo")


def test_batch_iterator_covers_every_sample_once_and_is_seeded():
    x = torch.arange(103).float().unsqueeze(1)
    y = torch.arange(103)
    batches = list(BatchIterator(x, y, 10, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 11 and len(batches[-1][0]) == 3
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in batches)
    again = list(BatchIterator(x, y, 10, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))


@pytest.mark.skipif(not is_available_offline("fashion-mnist"), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_verifies_and_loads():
    data = load_dataset("fashion-mnist", flatten=True, download=False, progress=False)
    assert data.x_train.shape == (60000, 784) and data.x_test.shape == (10000, 784)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10


def toy_fashion_mnist(root: Path, seed: int = 0) -> tuple[Source, tuple[np.ndarray, ...]]:
    """Small IDX gz files in `root/fashion-mnist` and a Source whose checksums are theirs."""
    arrays = write_idx_folder(root / "fashion-mnist", seed=seed)
    files = tuple(
        RemoteFile(f.name, hashlib.sha256((root / "fashion-mnist" / f.name).read_bytes()).hexdigest())
        for f in FASHION_MNIST.files
    )
    return Source("fashion-mnist", FASHION_MNIST.base_urls, files), arrays


@pytest.fixture
def toy_source(tmp_path, monkeypatch):
    """Fashion-MNIST replaced by small files written here; counts the decodes of the source."""
    monkeypatch.setenv("NEUROPLAST_DATA", str(tmp_path))
    source, arrays = toy_fashion_mnist(tmp_path)
    monkeypatch.setattr(datasets, "FASHION_MNIST", source)
    decodes = []
    decode = datasets.load_idx_folder

    def counting(folder, source, check=True):
        decodes.append(folder)
        return decode(folder, source, check)

    monkeypatch.setattr(datasets, "load_idx_folder", counting)
    return tmp_path, arrays, decodes


def load_toy() -> datasets.Dataset:
    return load_dataset("fashion-mnist", download=False, progress=False)


def test_second_load_reads_the_cache(toy_source):
    root, arrays, decodes = toy_source
    first = load_toy()
    assert len(decodes) == 1 and (root / "fashion-mnist" / CACHE_NAME).is_file()
    second = load_toy()
    assert len(decodes) == 1  # neither checksummed nor decoded again
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert torch.equal(second.y_train, torch.as_tensor(arrays[1], dtype=torch.int64))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "not a zip"])
def test_a_corrupt_cache_is_rebuilt(toy_source, damage):
    root, _, decodes = toy_source
    first = load_toy()
    cache = root / "fashion-mnist" / CACHE_NAME
    data = bytearray(cache.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF  # inside x_train: only the member's CRC-32 can tell
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data = bytearray(b"not a cache")
    cache.write_bytes(bytes(data))
    second = load_toy()
    assert len(decodes) == 2 and torch.equal(first.x_train, second.x_train)
    load_toy()
    assert len(decodes) == 2  # the rebuilt cache is used


def test_a_stale_cache_is_rebuilt_from_the_verified_source(toy_source, monkeypatch):
    root, _, decodes = toy_source
    load_toy()
    source, arrays = toy_fashion_mnist(root, seed=1)  # new files (new sizes or mtimes, new checksums)
    monkeypatch.setattr(datasets, "FASHION_MNIST", source)
    changed = load_toy()
    assert len(decodes) == 2
    assert torch.equal(changed.y_test, torch.as_tensor(arrays[3], dtype=torch.int64))
    victim = root / "fashion-mnist" / source.files[0].name
    victim.write_bytes(gzip.compress(idx_bytes(np.zeros((12, 28, 28), np.uint8))))  # not the verified file
    with pytest.raises(DataError, match="does not match the official train-images-idx3-ubyte.gz"):
        load_toy()


def test_cache_skips_a_folder_it_cannot_write(toy_source, monkeypatch):
    _, _, decodes = toy_source
    monkeypatch.setattr(cache_module.tempfile, "mkstemp", lambda **kwargs: (_ for _ in ()).throw(PermissionError()))
    load_toy()
    load_toy()
    assert len(decodes) == 2  # no cache, no error


def test_validation_split_holds_out_the_last_training_samples_and_drops_the_test_set():
    from neuroplast.data import validation_split

    data = load_dataset("digits", flatten=True)
    data.extras.update(
        train_masks=torch.arange(len(data.y_train)), test_masks=torch.zeros(3), informative=torch.ones(2)
    )
    split = validation_split(data, 300)
    n = len(data.y_train)
    assert torch.equal(split.x_train, data.x_train[: n - 300]) and torch.equal(split.y_train, data.y_train[: n - 300])
    assert torch.equal(split.x_test, data.x_train[n - 300 :]) and torch.equal(split.y_test, data.y_train[n - 300 :])
    assert torch.equal(split.extras["train_masks"], torch.arange(n - 300))
    assert torch.equal(split.extras["test_masks"], torch.arange(n - 300, n))  # the held-out rows, not the test set's
    assert torch.equal(split.extras["informative"], data.extras["informative"])
    for bad in (0, n):
        with pytest.raises(ValueError, match=f"validation {bad} must be between 1 and {n - 1}"):
            validation_split(data, bad)
