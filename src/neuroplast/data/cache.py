"""A cache of decoded dataset files, so that a second load skips the checksum and the gunzip.

The arrays decoded from a source folder (e.g. the four IDX gz files of Fashion-MNIST) are kept
in `data_root()/<dataset>/decoded.npz` with a key and checksums:

- the key names each source file's folder, size, modification time and the official sha256 it
  was verified against: a source file that changed (or a new release's checksum) makes the
  cache stale, and it is rebuilt from the verified source;
- the CRC-32 the zip format keeps of each member (the arrays and the key), which `zipfile`
  checks as it reads: a cache file that is corrupt, truncated or not a cache at all is rebuilt,
  never trusted.

Standardisation statistics are cached beside the arrays per reduction setting (torch version,
CPU instruction set, threads), because a float reduction's rounding depends on them: a cached
load gives exactly the tensors a fresh decode gives in the same process.

The file is written to a temporary name and renamed into place, so concurrent loads (the worker
processes of a study) never see half a cache; a folder that cannot be written is not an error.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from neuroplast.data.sources import Source, data_root

CACHE_NAME = "decoded.npz"
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
FORMAT = 1  # bump when the cached content changes meaning

Arrays = tuple[np.ndarray, ...]
Stats = dict[str, list[list[float]]]  # reduction setting -> [channel means, channel stds]


def source_key(source: Source, folder: Path) -> dict:
    """What the cached arrays were decoded from: each file's size, mtime and expected sha256."""
    files = {}
    for f in source.files:
        status = (folder / f.name).stat()
        files[f.name] = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha256": f.sha256}
    return {"format": FORMAT, "dataset": source.dataset, "folder": str(folder.resolve()), "files": files}


class DecodedCache:
    """The cached decoded arrays of `source` as found in `folder`."""

    def __init__(self, source: Source, folder: Path):
        self.path = data_root() / source.dataset / CACHE_NAME
        self.key = source_key(source, folder)

    def read(self) -> tuple[Arrays, Stats] | None:
        """The cached arrays and statistics if the file is whole (every member's CRC-32 holds) and
        matches the key, else None."""
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                arrays = tuple(stored[name] for name in ARRAY_NAMES)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if not isinstance(meta, dict) or meta.get("key") != self.key:
            return None
        stats = meta.get("stats")
        return arrays, stats if isinstance(stats, dict) else {}

    def write(self, arrays: Arrays, stats: Stats) -> None:
        """Store `arrays` and `stats` atomically; a folder that cannot be written is skipped."""
        meta = {"key": self.key, "stats": stats}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=CACHE_NAME, suffix=".part", dir=self.path.parent)
        except OSError:
            return
        try:
            with os.fdopen(fd, "wb") as out:
                np.savez(out, meta=np.array(json.dumps(meta)), **dict(zip(ARRAY_NAMES, arrays)))
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
