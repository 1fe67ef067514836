"""Image classification datasets held in memory as tensors.

`load_dataset(name)` returns a `Dataset`: normalised float32 train/test tensors of shape
(N, C, H, W) (or (N, C*H*W) with `flatten=True`, for MLPs) and int64 labels. These sets are
small, so everything lives in memory and batches are slices, not per-sample Python objects.
Generated sets ("articulated") add per-sample targets beyond the label in `Dataset.extras`.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from neuroplast.data.articulated import load_articulated
from neuroplast.data.cache import Arrays, DecodedCache
from neuroplast.data.dataset import STANDARDIZE, Dataset, to_dataset
from neuroplast.data.sources import CIFAR10, FASHION_MNIST, MNIST, DataError, Source, fetch, find_local, verify
from neuroplast.data.synthetic import make_synthetic, with_noise_features

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "articulated", "synthetic", "fashion-mnist-noise")

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file (the MNIST format): magic 0x0000TTDD, DD big-endian uint32 dims, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{name} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated (header incomplete)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{name} is truncated or corrupt: {len(data) - header} data bytes, expected {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx_gz(raw: bytes, name: str) -> np.ndarray:
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{name} is truncated or not a valid gzip file ({exc})") from exc
    return parse_idx(data, name)


def load_idx_folder(folder: Path, source: Source = FASHION_MNIST, check: bool = True) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from the four IDX gz files in `folder`.

    `check=False` skips the checksum (for files a user or a test made in the same format).
    """
    arrays = []
    for f in source.files:
        path = folder / f.name
        raw = verify(path, f) if check else _read(path)
        arrays.append(read_idx_gz(raw, str(path)))
    x_train, y_train, x_test, y_test = arrays
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match")
    return x_train, y_train, x_test, y_test


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc


def read_cifar10_tarball(raw: bytes, name: str) -> tuple[np.ndarray, ...]:
    """Decode the official `cifar-10-python.tar.gz` (pickled batches) into uint8 arrays, NCHW."""
    members = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] + ["cifar-10-batches-py/test_batch"]
    batches = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            for member in members:
                handle = tar.extractfile(member)
                if handle is None:
                    raise DataError(f"{name}: {member} is not a file")
                # The tarball's checksum is verified before we unpickle it.
                batches[member] = pickle.load(handle, encoding="bytes")
    except (tarfile.TarError, EOFError, OSError, KeyError, pickle.UnpicklingError) as exc:
        raise DataError(f"{name} is truncated or corrupt ({exc})") from exc

    def unpack(batch: dict) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[b"labels"], dtype=np.int64)
        return x, y

    train = [unpack(batches[m]) for m in members[:5]]
    x_test, y_test = unpack(batches[members[5]])
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test


def _digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target
    )
    return x_train / 16.0, y_train, x_test / 16.0, y_test


def _load_files(
    name: str,
    source: Source,
    decode: Callable[[Path], Arrays],
    flatten: bool,
    download: bool,
    progress: bool,
    standardize: str = "channel",
) -> Dataset:
    """A dataset made of `source`'s files: decoded once (verified), then read from its cache."""
    folder = find_local(source)
    origin = str(folder) if folder else "download"
    if folder is None:
        fetch(source, download=download, progress=progress)
        folder = find_local(source)
    cache = DecodedCache(source, folder)
    cached = cache.read()
    arrays, stats = cached if cached is not None else (decode(folder), {})
    known = set(stats)
    dataset = to_dataset(name, arrays, origin, flatten, stats, standardize)
    if cached is None or set(stats) != known:
        cache.write(arrays, stats)
    return dataset


def _cifar10_folder(folder: Path) -> Arrays:
    (f,) = CIFAR10.files
    return read_cifar10_tarball(verify(folder / f.name, f), f.name)


def load_dataset(
    name: str,
    flatten: bool = False,
    download: bool = True,
    progress: bool = True,
    articulated: dict | None = None,
    synthetic: dict | None = None,
    standardize: str = "channel",
) -> Dataset:
    """Load a dataset by name: one of `DATASETS`. `articulated`: keyword arguments of
    `load_articulated` (size, families, split, train, test, seed, cache, progress).
    `synthetic`: options of the generated feature-selection sets (`data/synthetic.py`):
    `make_synthetic`'s for "synthetic", `with_noise_features`'s for "fashion-mnist-noise".
    `standardize`: images with per-channel ("channel") or per-pixel ("feature") statistics of the
    training set; the generated tabular sets (synthetic, fashion-mnist-noise) are always per feature."""
    if standardize not in STANDARDIZE:
        raise DataError(f"unknown standardize {standardize!r}; choose from: {', '.join(STANDARDIZE)}")
    if name == "digits":
        return to_dataset(name, _digits(), "scikit-learn (embedded 8x8 digits)", flatten, standardize=standardize)
    if name in ("mnist", "fashion-mnist"):
        source = MNIST if name == "mnist" else FASHION_MNIST
        decode = partial(load_idx_folder, source=source)
        return _load_files(name, source, decode, flatten, download, progress, standardize)
    if name == "cifar10":
        return _load_files(name, CIFAR10, _cifar10_folder, flatten, download, progress, standardize)
    if name == "articulated":
        return _articulated(flatten, progress, articulated or {})
    if name == "synthetic":
        return make_synthetic(**(synthetic or {}))
    if name == "fashion-mnist-noise":
        images = load_dataset("fashion-mnist", flatten=True, download=download, progress=progress)
        return with_noise_features(images, **(synthetic or {}))
    raise DataError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")


def _articulated(flatten: bool, progress: bool, options: dict) -> Dataset:
    import inspect

    valid = [p for p in inspect.signature(load_articulated).parameters if p != "flatten"]
    for key in options:
        if key not in valid:
            raise DataError(f"unknown articulated option {key!r}; choose from: {', '.join(valid)}")
    return load_articulated(flatten=flatten, **{"progress": progress, **options})


def is_available_offline(name: str) -> bool:
    """True if `name` can be loaded without a download (files present, not yet verified)."""
    sources = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST, "cifar10": CIFAR10}
    if name == "fashion-mnist-noise":
        return find_local(FASHION_MNIST) is not None
    return name in ("digits", "articulated", "synthetic") or (name in sources and find_local(sources[name]) is not None)
