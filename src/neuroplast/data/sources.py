"""Where dataset files come from: official URLs, checksums, the cache folder, and local copies.

A file is accepted when the sha256 of its bytes matches the official download, or, for
distributions that recompress the same content (Debian's `dataset-fashion-mnist`), when the
sha256 of its decompressed content matches. A cached file that fails the check is reported and
left in place: nothing in the cache is ever overwritten silently.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class DataError(RuntimeError):
    """A dataset cannot be found, downloaded or read. The message names the file or the remedy."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str  # of the file exactly as served by `url`
    content_sha256: str | None = None  # of the decompressed bytes (gz files), if known


@dataclass(frozen=True)
class Source:
    dataset: str
    base_urls: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    system_dirs: tuple[str, ...] = field(default=())  # read-only copies installed by the OS


MNIST = Source(
    dataset="mnist",
    base_urls=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    files=(
        RemoteFile("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        RemoteFile("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        RemoteFile("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
)

FASHION_MNIST = Source(
    dataset="fashion-mnist",
    base_urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files=(
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

CIFAR10 = Source(
    dataset="cifar10",
    base_urls=("https://www.cs.toronto.edu/~kriz/",),
    files=(RemoteFile("cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),),
)

SOURCES = {s.dataset: s for s in (MNIST, FASHION_MNIST, CIFAR10)}


def data_root() -> Path:
    """The cache folder: `$NEUROPLAST_DATA` if set, else `~/.cache/neuroplast`."""
    env = os.environ.get("NEUROPLAST_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuroplast"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(path: Path, expected: RemoteFile) -> bytes:
    """Return the file's bytes if they match `expected`; raise `DataError` naming the file if not."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    if sha256_of(raw) == expected.sha256:
        return raw
    if expected.content_sha256 is not None and path.suffix == ".gz":
        try:
            content = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is truncated or not a valid gzip file ({exc}); delete it and try again") from exc
        if sha256_of(content) == expected.content_sha256:
            return raw
    raise DataError(
        f"{path} does not match the official {expected.name} (sha256 mismatch: truncated or corrupt); "
        "delete it and try again"
    )


def candidate_dirs(source: Source) -> list[Path]:
    return [data_root() / source.dataset, *map(Path, source.system_dirs)]


def find_local(source: Source) -> Path | None:
    """The first folder that holds every file of `source` (not yet verified), or None."""
    for folder in candidate_dirs(source):
        if all((folder / f.name).is_file() for f in source.files):
            return folder
    return None


def _not_found_message(source: Source, reason: str) -> str:
    files = ", ".join(f.name for f in source.files)
    ways = [
        f"connect to the internet: neuroplast downloads {source.base_urls[0]} into {data_root() / source.dataset}",
        f"set NEUROPLAST_DATA to a folder holding {source.dataset}/ with {files}",
    ]
    if source.dataset == "fashion-mnist":
        ways.append("install Debian's package: apt-get install dataset-fashion-mnist")
    else:
        ways.append(
            f"copy {files} into the default cache folder {Path.home() / '.cache' / 'neuroplast' / source.dataset}"
        )
    return f"{source.dataset} not found ({reason}); provide it one of three ways: " + "; ".join(
        f"({i}) {w}" for i, w in enumerate(ways, 1)
    )


def _download(url: str, dest: Path, progress: bool) -> None:
    """Download to a temporary file beside `dest`; the caller renames it once it is verified."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        if progress:
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()) as bar:
                task = bar.add_task(f"download {dest.name.removesuffix('.part')}", total=total or None)
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.advance(task, len(chunk))
        else:
            shutil.copyfileobj(response, out, 1 << 20)


def _download_verified(source: Source, f: RemoteFile, path: Path, progress: bool) -> bytes:
    """Try each mirror in turn; a file lands at `path` only once its checksum matches."""
    errors = []
    for base in source.base_urls:
        fd, tmp = tempfile.mkstemp(prefix=f.name, suffix=".part", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            _download(base + f.name, tmp_path, progress)
            raw = verify(tmp_path, f)
            os.replace(tmp_path, path)
            return raw
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
            errors.append(f"{base + f.name}: {getattr(exc, 'reason', None) or exc}")
        except DataError as exc:  # a mirror served bad bytes: try the next one
            errors.append(f"{base + f.name}: {exc}")
        finally:
            tmp_path.unlink(missing_ok=True)
    raise DataError(_not_found_message(source, "download failed: " + "; ".join(errors)))


def fetch(source: Source, download: bool = True, progress: bool = True) -> dict[str, bytes]:
    """Verified bytes of every file of `source`, from a local copy or (if allowed) a download."""
    folder = find_local(source)
    if folder is not None:
        return {f.name: verify(folder / f.name, f) for f in source.files}
    if not download:
        raise DataError(_not_found_message(source, "no local copy, downloads disabled"))
    target = data_root() / source.dataset
    target.mkdir(parents=True, exist_ok=True)
    result = {}
    for f in source.files:
        path = target / f.name
        if path.exists():  # some files cached earlier: check them, never replace them
            result[f.name] = verify(path, f)
            continue
        result[f.name] = _download_verified(source, f, path, progress)
    return result
