"""Where a data set's raw files are, and fetching them from the mirrors of its `DatasetSpec`,
each file checked against the checksum the spec records before it appears: the sha256 of its
content (`DatasetSpec.sha256`; a .gz file's decompressed bytes, since mirrors re-compress), else
the md5 the mirrors publish (`DatasetSpec.files`). A file with neither is not downloaded."""
from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import urllib.request
import zlib
from pathlib import Path

from ..files import atomic_write, file_digest
from .errors import DataError
from .registry import DatasetSpec, dataset_spec

log = logging.getLogger("echo.data")


def _spec(dataset: DatasetSpec | str) -> DatasetSpec:
    return dataset if isinstance(dataset, DatasetSpec) else dataset_spec(dataset)


def search_dirs(dataset: DatasetSpec | str, root: Path) -> list[Path]:
    """The folders that may hold the data set's files, in the order they are searched."""
    return [root / d for d in _spec(dataset).search_dirs]


def _present(directory: Path, filename: str) -> Path | None:
    """The file, accepting IDX files with or without .gz."""
    for candidate in (directory / filename, directory / filename.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_raw_files(dataset: DatasetSpec | str, root: Path) -> dict[str, Path] | None:
    """{published file name: local path} from the first directory holding all of them, else None."""
    wanted = list(_spec(dataset).files)
    for directory in search_dirs(dataset, root):
        found = {f: _present(directory, f) for f in wanted}
        if all(found.values()):
            return found
    return None


def content_digest(path: str | Path) -> str:
    """sha256 of a file's content: a gzip file's decompressed bytes (the same data compressed
    differently has the same digest), any other file's bytes. A damaged gzip raises DataError."""
    path = Path(path)
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if not gzipped:
        return file_digest(path, "sha256")
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    return digest.hexdigest()


def unverifiable(filename: str, dest_dir: Path) -> DataError:
    """The refusal to download a file whose spec records no checksum."""
    return DataError(f"{filename}: the data spec records no checksum for it, so a download could "
                     f"not be verified and is refused; place the file in {dest_dir}/ yourself "
                     f"(after checking it), or record its sha256 in the data set's DatasetSpec "
                     f"(echo/data/sets/)")


def fetch(url: str, dest: Path, md5: str | None = None, *, sha256: str | None = None,
          timeout: float = 60) -> Path:
    """Download `url` to `dest` through a temporary file and verify it: the sha256 of its
    content (`content_digest`) when given, else its md5; neither given is refused before any
    download. `dest` appears only complete and verified."""
    if sha256 is None and md5 is None:
        raise unverifiable(dest.name, dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def download_into(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        if sha256 is not None:
            try:
                got = content_digest(tmp)
            except DataError as err:
                got = f"unreadable ({str(err).split(' (', 1)[-1].rstrip(')')})"
            if got != sha256:
                raise DataError(f"{url}: the content's sha256 is {got}, the data spec records "
                                f"{sha256}; the mirror served a different or damaged file")
        elif (got := file_digest(tmp, "md5")) != md5:
            raise DataError(f"{url}: downloaded file has md5 {got}, expected {md5}; the mirror "
                            f"served a different or damaged file")

    atomic_write(dest, download_into)
    return dest


def fetch_all(files: dict[str, str | None], mirrors, dest_dir: Path,
              sha256: dict[str, str] | None = None) -> None:
    """Each file from the first mirror that serves it with the right checksum (`sha256`: the
    content's, by file name; else the md5 in `files`). A file with neither is refused before
    anything is downloaded."""
    sha256 = dict(sha256 or {})
    missing = [f for f in files if not _present(dest_dir, f)]
    for filename in missing:
        if files[filename] is None and filename not in sha256:
            raise unverifiable(filename, dest_dir)
    for filename in missing:
        errors = []
        for mirror in mirrors:
            try:
                log.info("downloading %s%s", mirror, filename)
                fetch(mirror + filename, dest_dir / filename, files[filename],
                      sha256=sha256.get(filename))
                break
            except (OSError, DataError) as err:   # URLError and timeouts are OSErrors
                errors.append(f"{mirror}: {err}")
        else:
            raise DataError(f"could not download {filename} ({'; '.join(errors)}); place the "
                            f"canonical file in {dest_dir}/ or try again")


def download(dataset: DatasetSpec | str, root: Path) -> None:
    """Fetch a data set's raw files from its mirrors (the ones torchvision uses, for the sets it
    has) into the first of its search folders, each verified against the spec's checksums."""
    spec = _spec(dataset)
    fetch_all(dict(spec.files), spec.mirrors, root / spec.search_dirs[0], dict(spec.sha256))


def _missing(spec: DatasetSpec, root: Path, why: str, **arguments) -> DataError:
    files = ", ".join(spec.files)
    where = " or ".join(str(d) + "/" for d in search_dirs(spec, root))
    return DataError(f"{spec.name}: raw files not found (root={str(root)!r}); place {files} in "
                     f"{where} (from {spec.mirrors[0]}); {why}", root=str(root), **arguments)


def locate(dataset: DatasetSpec | str, root: Path, download_missing: bool = False
           ) -> dict[str, Path]:
    """The raw files of a data set under `root`, downloading them first when asked and missing."""
    spec = _spec(dataset)
    found = find_raw_files(spec, root)
    if found is not None:
        return found
    if not download_missing:
        raise _missing(spec, root, "downloads are off (download=False)", download=False)
    try:
        download(spec, root)
    except DataError as err:
        raise _missing(spec, root, f"download failed: {err}") from None
    found = find_raw_files(spec, root)
    if found is None:
        raise _missing(spec, root, "the download left no complete set")
    return found
