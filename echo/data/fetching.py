"""Where a data set's raw files are, and fetching them: torchvision's classes or the mirrors of
its `DatasetSpec`, each file checked against its published md5 before it appears."""
from __future__ import annotations

import logging
import shutil
import urllib.request
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


def fetch(url: str, dest: Path, md5: str | None = None, *, timeout: float = 60) -> Path:
    """Download `url` to `dest` through a temporary file, checking the md5 when one is given;
    `dest` appears only complete and verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def download_into(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        if md5 is not None and (got := file_digest(tmp, "md5")) != md5:
            raise DataError(f"{url}: downloaded file has md5 {got}, expected {md5}; the mirror "
                            f"served a different or damaged file")

    atomic_write(dest, download_into)
    return dest


def fetch_all(files: dict[str, str | None], mirrors, dest_dir: Path) -> None:
    """Each file from the first mirror that serves it with the right checksum."""
    for filename, md5 in files.items():
        if _present(dest_dir, filename):
            continue
        errors = []
        for mirror in mirrors:
            try:
                log.info("downloading %s%s", mirror, filename)
                fetch(mirror + filename, dest_dir / filename, md5)
                break
            except (OSError, DataError) as err:   # URLError and timeouts are OSErrors
                errors.append(f"{mirror}: {err}")
        else:
            raise DataError(f"could not download {filename} ({'; '.join(errors)})")


def download(dataset: DatasetSpec | str, root: Path) -> None:
    """Fetch a data set's raw files into `root`: its torchvision class when it has one and
    torchvision imports (whose layout is root/<class>/raw), else its mirrors into the first of
    its search folders."""
    spec = _spec(dataset)
    if spec.torchvision is not None:
        try:
            import torchvision.datasets as tvd    # optional and heavy: imported only here
        except Exception:
            tvd = None
        if tvd is not None:
            dataset_class = getattr(tvd, spec.torchvision)
            try:
                for train in (True, False):
                    dataset_class(str(root), train=train, download=True)
                return
            except Exception as err:
                raise DataError(f"torchvision could not download {spec.name}: {err}") from None
    fetch_all(dict(spec.files), spec.mirrors, root / spec.search_dirs[0])


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
