"""`friendrec data fetch NAME`: download a public MUSAE archive from its publisher, check it and
unpack the registry's files under ``settings.datasets_dir``.

Nothing here runs unless a user asks for it. The registry (``feature_repo/datasets.yaml``)
names, for each fetchable dataset, the archive URL, its SHA-256 where known, and the files to take
out of it: member patterns -> target path -> SHA-256.

Guarantees: every extracted file is checked against its SHA-256 before anything is moved into
place; all work happens in one hidden staging folder inside the datasets folder (same file system,
so each move is an atomic rename); on any failure the staging folder and any folder this run
created are removed, and the files already in place are left as they were.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from friendrec.config import FEATURE_REPO_DIR
from friendrec.errors import FriendrecError

log = logging.getLogger(__name__)

REGISTRY_PATH = FEATURE_REPO_DIR / "datasets.yaml"
USER_AGENT = "friendrec-fetch/0.1 (+https://snap.stanford.edu/data/)"
_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class FetchError(FriendrecError):
    """A fetch failed; the message is one line naming the URL, member or file concerned."""


class RegistryError(FetchError):
    """The registry file is malformed (names the file and the field)."""


class UnknownFetchableError(FetchError):
    """The name is not in the registry; the message lists the fetchable names."""


class DownloadError(FetchError):
    """The archive could not be downloaded (HTTP error, network error, truncated body)."""


class ArchiveError(FetchError):
    """The archive is not a readable zip, or lacks (or has ambiguous) registry members."""


class ChecksumMismatchError(FetchError):
    """An archive or an extracted file does not have the registry's SHA-256."""


@dataclass(frozen=True)
class FileSpec:
    """One file taken out of an archive."""

    members: tuple[str, ...]  # fnmatch patterns over the member path, tried in order
    target: str  # relative POSIX path under the datasets folder
    sha256: str


@dataclass(frozen=True)
class DatasetEntry:
    """One fetchable dataset: an archive and the files it provides."""

    name: str
    url: str
    files: tuple[FileSpec, ...]
    sha256: str | None = None  # the archive's digest; None where unknown
    description: str = ""


@dataclass
class FetchResult:
    name: str
    url: str | None  # None when nothing was downloaded
    datasets_dir: Path
    files: list[Path] = field(default_factory=list)
    downloaded: bool = False  # False: every file was already in place with the right digest


# --- registry -------------------------------------------------------------------------------


def _check_sha(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _SHA256_RE.match(value.lower()):
        raise RegistryError(f"{where}: expected a SHA-256 (64 hex digits), got {value!r}")
    return value.lower()


def _check_target(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{where}: expected a relative path, got {value!r}")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value or path.as_posix() != value:
        raise RegistryError(f"{where}: target must be a plain relative path, got {value!r}")
    return value


def parse_entry(name: str, raw: Any, where: str = "registry") -> DatasetEntry:
    """One registry mapping (``url``, ``sha256``, ``files``) -> a :class:`DatasetEntry`."""
    where = f"{where}: datasets.{name}"
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: expected a mapping")
    url = raw.get("url")
    if not isinstance(url, str) or not url:
        raise RegistryError(f"{where}.url: expected a URL, got {url!r}")
    files_raw = raw.get("files")
    if not isinstance(files_raw, list) or not files_raw:
        raise RegistryError(f"{where}.files: expected a non-empty list")
    files: list[FileSpec] = []
    for i, item in enumerate(files_raw):
        at = f"{where}.files[{i}]"
        if not isinstance(item, dict):
            raise RegistryError(f"{at}: expected a mapping with member, target, sha256")
        members = item.get("member")
        if isinstance(members, str):
            members = [members]
        if (
            not isinstance(members, list)
            or not members
            or not all(isinstance(m, str) and m for m in members)
        ):
            raise RegistryError(f"{at}.member: expected a pattern or a list of patterns")
        files.append(
            FileSpec(
                members=tuple(members),
                target=_check_target(item.get("target"), f"{at}.target"),
                sha256=_check_sha(item.get("sha256"), f"{at}.sha256") or "",
            )
        )
    targets = [f.target for f in files]
    dupes = sorted({t for t in targets if targets.count(t) > 1})
    if dupes:
        raise RegistryError(f"{where}.files: duplicate targets {dupes}")
    return DatasetEntry(
        name=name,
        url=url,
        files=tuple(files),
        sha256=_check_sha(raw.get("sha256"), f"{where}.sha256", optional=True),
        description=str(raw.get("description") or ""),
    )


def load_registry(path: Path | str | None = None) -> dict[str, DatasetEntry]:
    """The registry file (default: the shipped one) -> name -> entry."""
    path = Path(path) if path is not None else REGISTRY_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from None
    datasets = raw.get("datasets") if isinstance(raw, dict) else None
    if not isinstance(datasets, dict) or not datasets:
        raise RegistryError(f"{path}: expected a non-empty 'datasets' mapping")
    return {str(name): parse_entry(str(name), item, str(path)) for name, item in datasets.items()}


def get_entry(name: str, registry: Path | str | None = None) -> DatasetEntry:
    entries = load_registry(registry)
    if name not in entries:
        raise UnknownFetchableError(
            f"unknown fetchable dataset {name!r}: fetchable names are {sorted(entries)}"
        )
    return entries[name]


# --- checks ---------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_states(entry: DatasetEntry, datasets_dir: Path) -> dict[str, str]:
    """target -> ``ok``, ``missing`` or ``mismatch`` for the files already on disk."""
    states: dict[str, str] = {}
    for spec in entry.files:
        path = datasets_dir / spec.target
        if not path.is_file():
            states[spec.target] = "missing"
        else:
            states[spec.target] = "ok" if sha256_of(path) == spec.sha256 else "mismatch"
    return states


# --- the fetch ------------------------------------------------------------------------------


def fetch(
    entry: DatasetEntry,
    datasets_dir: Path | str,
    *,
    url: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> FetchResult:
    """Download ``entry``'s archive (or ``url``, a mirror), verify it and lay out its files under
    ``datasets_dir``. Does nothing when every file is already there with its digest, unless
    ``force``. Raises a :class:`FetchError` and leaves nothing behind on any failure."""
    datasets_dir = Path(datasets_dir).expanduser().resolve()
    targets = [datasets_dir / spec.target for spec in entry.files]
    if not force and datasets_dir.is_dir():
        states = file_states(entry, datasets_dir)
        if all(state == "ok" for state in states.values()):
            log.info("%s: all %d files already in %s", entry.name, len(targets), datasets_dir)
            return FetchResult(entry.name, None, datasets_dir, targets, downloaded=False)
        for target, state in states.items():
            if state == "mismatch":
                log.warning("%s: %s has the wrong digest; it will be replaced", entry.name, target)

    source = url or entry.url
    with _created_dirs() as created:
        _makedirs(datasets_dir, created)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".fetch-{entry.name}-", dir=datasets_dir))
        except OSError as exc:
            raise FetchError(f"cannot write to {datasets_dir}: {exc.strerror or exc}") from None
        try:
            archive = staging / "archive.part"
            digest = _download(source, archive, timeout=timeout, progress=progress)
            if entry.sha256 is None:
                log.info("%s: no archive digest in the registry (sha256 %s)", source, digest)
            elif url is not None and url != entry.url:
                log.info(
                    "%s: mirror; archive digest not compared (sha256 %s), file digests are",
                    source,
                    digest,
                )
            elif digest != entry.sha256:
                raise ChecksumMismatchError(
                    f"{source}: archive sha256 mismatch: expected {entry.sha256}, got {digest}"
                )
            staged = _extract(entry, source, archive, staging / "files")
            archive.unlink()
            _install(staged, datasets_dir, created)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: %d files in place under %s", entry.name, len(targets), datasets_dir)
    return FetchResult(entry.name, source, datasets_dir, targets, downloaded=True)


@contextmanager
def _created_dirs() -> Iterator[list[Path]]:
    """Collects the folders a fetch creates; on failure removes them again (deepest first, only
    where empty, so nothing that was there before, or that another process put there, goes)."""
    created: list[Path] = []
    try:
        yield created
    except BaseException:
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with suppress(OSError):
                path.rmdir()
        raise


def _makedirs(path: Path, created: list[Path]) -> None:
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise FetchError(f"cannot create {folder}: {exc.strerror or exc}") from None
        created.append(folder)


def _download(url: str, dest: Path, *, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``dest``; return the body's SHA-256."""
    log.info("downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, dest.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with _progress_bar(total if progress else None, url) as advance:
                while True:
                    block = response.read(_CHUNK)
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    advance(len(block))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: {exc.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeout, reset, short
        raise DownloadError(f"{url}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
    if total is not None and received != total:
        raise DownloadError(f"{url}: truncated download: {received} of {total} bytes")
    log.info("downloaded %s (%d bytes, sha256 %s)", url, received, digest.hexdigest())
    return digest.hexdigest()


@contextmanager
def _progress_bar(total: int | None, url: str) -> Iterator[Any]:
    """A rich progress bar on stderr when the size is known (and asked for); else a no-op."""
    if total is None:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(PurePosixPath(url).name, total=total)
        yield lambda n: bar.advance(task, n)


def _archive_members(archive: zipfile.ZipFile) -> list[str]:
    """Regular files, without macOS resource forks (``__MACOSX/``, ``._name``)."""
    names = []
    for info in archive.infolist():
        name = info.filename
        if info.is_dir() or name.startswith("__MACOSX/") or PurePosixPath(name).name[:2] == "._":
            continue
        names.append(name)
    return names


def _match(spec: FileSpec, members: list[str], url: str) -> str:
    for pattern in spec.members:
        found = [m for m in members if fnmatch.fnmatchcase(m, pattern)]
        if len(found) == 1:
            return found[0]
        if found:
            raise ArchiveError(
                f"{url}: member pattern {pattern!r} (for {spec.target}) is ambiguous: {found}"
            )
    raise ArchiveError(
        f"{url}: no member matches {list(spec.members)} (for {spec.target}); "
        f"the archive has {len(members)} files"
    )


def _extract(
    entry: DatasetEntry, url: str, archive_path: Path, out_dir: Path
) -> list[tuple[str, Path]]:
    """Extract the registry's members into ``out_dir/<target>``, each checked by SHA-256;
    returns (target, staged file) pairs."""
    staged: list[tuple[str, Path]] = []
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = _archive_members(archive)
            chosen = [(spec, _match(spec, members, url)) for spec in entry.files]
            for spec, member in chosen:
                dest = out_dir / spec.target
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with archive.open(member) as src, dest.open("wb") as out:
                    for block in iter(lambda src=src: src.read(_CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                got = digest.hexdigest()
                if got != spec.sha256:
                    raise ChecksumMismatchError(
                        f"{url}: member {member} -> {spec.target}: sha256 mismatch: "
                        f"expected {spec.sha256}, got {got}"
                    )
                log.debug("%s: %s -> %s ok", url, member, spec.target)
                staged.append((spec.target, dest))
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{url}: not a valid zip archive: {exc}") from None
    except (zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise ArchiveError(f"{url}: cannot read the archive: {exc}") from None
    return staged


def _install(staged: list[tuple[str, Path]], datasets_dir: Path, created: list[Path]) -> None:
    """Move verified files into place, each with an atomic rename (same file system). Should a
    rename fail midway, the files this run added are taken out again; files it replaced were
    replaced by verified copies with the registry's digest."""
    added: list[Path] = []
    try:
        for target, src in staged:
            dest = datasets_dir / target
            _makedirs(dest.parent, created)
            existed = dest.exists()
            os.replace(src, dest)
            if not existed:
                added.append(dest)
    except (OSError, FetchError) as exc:
        for path in added:
            path.unlink(missing_ok=True)
        raise FetchError(f"cannot move files into {datasets_dir}: {exc}") from None
