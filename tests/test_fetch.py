"""`friendrec data fetch`: download, verify and lay out MUSAE archives, against a real HTTP server
on loopback (no other network). The registry's digests are those of the real files, so the tests
build entries with the digests of small fake files named like the real archive members."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

from friendrec.data.fetch import (
    REGISTRY_PATH,
    ArchiveError,
    ChecksumMismatchError,
    DatasetEntry,
    DownloadError,
    UnknownFetchableError,
    fetch,
    get_entry,
    load_registry,
)
from friendrec.errors import FriendrecError

SHARED_SUMS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "SHA256SUMS"
LANGS = ["ENGB", "ES", "FR", "PTBR", "RU", "TW"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_content(target: str) -> bytes:
    return f"fake {target}\nid_1,id_2\n0,1\n".encode()


def snap_member(target: str) -> str:
    """The member name SNAP's archives use for a target (twitch.zip, git_web_ml.zip)."""
    parts = target.split("/")
    if parts[0] == "twitch_social":
        return f"twitch/{parts[1]}/musae_{parts[2]}"
    return f"git_web_ml/{parts[1]}"


def mirror_member(target: str) -> str:
    """benedekrozemberczki/datasets' commit archive: <LANG>_*.csv and (older) <LANG>.json."""
    parts = target.split("/")
    name = parts[2].replace("_features.json", ".json")
    return f"datasets-dd4394c/twitch/{parts[1]}/{name}"


def build_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_fake_digests(entry: DatasetEntry, url: str, **changes) -> DatasetEntry:
    files = tuple(
        dataclasses.replace(spec, sha256=sha(fake_content(spec.target))) for spec in entry.files
    )
    return dataclasses.replace(entry, url=url, files=files, **changes)


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("www"))
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(scope="module")
def twitch_zip(server: Server) -> tuple[DatasetEntry, bytes]:
    """The shipped twitch entry (its real member patterns) with fake digests, and a SNAP-style
    archive with a README and macOS resource forks that must not be picked."""
    shipped = get_entry("twitch")
    members = {"twitch/README.txt": b"Twitch Social Networks\n"}
    for spec in shipped.files:
        member = snap_member(spec.target)
        members[member] = fake_content(spec.target)
        folder, base = member.rsplit("/", 1)
        members[f"__MACOSX/{folder}/._{base}"] = b"resource fork"
    data = build_zip(members)
    return with_fake_digests(shipped, server.put("twitch.zip", data)), data


def test_success_lays_out_every_file(server: Server, twitch_zip, tmp_path: Path) -> None:
    entry, _ = twitch_zip
    out = tmp_path / "datasets"
    result = fetch(entry, out, progress=False)
    assert result.downloaded and result.url == entry.url
    expected = {
        f"twitch_social/{lang}/{lang}_{kind}"
        for lang in LANGS
        for kind in ("edges.csv", "features.json", "target.csv")
    }
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == expected  # no archive, no staging folder, no resource forks
    for target in expected:
        assert (out / target).read_bytes() == fake_content(target)
    assert [p.name for p in out.iterdir()] == ["twitch_social"]


def test_mirror_layout_matches_the_same_patterns(server: Server, tmp_path: Path) -> None:
    shipped = get_entry("twitch")
    data = build_zip({mirror_member(s.target): fake_content(s.target) for s in shipped.files})
    entry = with_fake_digests(shipped, "http://127.0.0.1:9/unused.zip")
    out = tmp_path / "datasets"
    result = fetch(entry, out, url=server.put("mirror.zip", data), progress=False)
    assert result.url.endswith("/mirror.zip")
    assert (out / "twitch_social/TW/TW_features.json").read_bytes() == fake_content(
        "twitch_social/TW/TW_features.json"
    )


def test_github_layout(server: Server, tmp_path: Path) -> None:
    shipped = get_entry("github")
    members = {snap_member(s.target): fake_content(s.target) for s in shipped.files}
    members["git_web_ml/citing.txt"] = b"cite\n"
    entry = with_fake_digests(shipped, server.put("git_web_ml.zip", build_zip(members)))
    out = tmp_path / "d"
    fetch(entry, out, progress=False)
    assert sorted(p.name for p in (out / "github_social").iterdir()) == [
        "musae_git_edges.csv",
        "musae_git_features.json",
        "musae_git_target.csv",
    ]


def test_wrong_digest_names_member_and_digests_and_leaves_nothing(
    server: Server, twitch_zip, tmp_path: Path
) -> None:
    entry, _ = twitch_zip
    bad = "0" * 64
    files = list(entry.files)
    victim = next(i for i, s in enumerate(files) if s.target == "twitch_social/RU/RU_target.csv")
    files[victim] = dataclasses.replace(files[victim], sha256=bad)
    entry = dataclasses.replace(entry, files=tuple(files))
    out = tmp_path / "new" / "datasets"  # neither folder exists yet
    with pytest.raises(ChecksumMismatchError) as err:
        fetch(entry, out, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "twitch/RU/musae_RU_target.csv" in message
    assert f"expected {bad}" in message
    assert f"got {sha(fake_content('twitch_social/RU/RU_target.csv'))}" in message
    assert entry.url in message
    assert not (tmp_path / "new").exists()  # folders this run created are gone too


def test_failure_leaves_existing_good_files_untouched(
    server: Server, twitch_zip, tmp_path: Path
) -> None:
    entry, _ = twitch_zip
    out = tmp_path / "datasets"
    good = out / "twitch_social/ENGB/ENGB_edges.csv"
    good.parent.mkdir(parents=True)
    good.write_bytes(fake_content("twitch_social/ENGB/ENGB_edges.csv"))
    other = out / "unrelated.txt"
    other.write_text("keep me")
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in leftovers(out)}
    spec = entry.files[-1]
    broken = dataclasses.replace(
        entry, files=(*entry.files[:-1], dataclasses.replace(spec, sha256="f" * 64))
    )
    with pytest.raises(ChecksumMismatchError):
        fetch(broken, out, progress=False)
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in leftovers(out)}
    assert after == before  # no staging folder, no partial layout, same inodes


def test_http_404_fails_cleanly(server: Server, twitch_zip, tmp_path: Path) -> None:
    entry, _ = twitch_zip
    missing = server.url("no-such-archive.zip")
    out = tmp_path / "datasets"
    out.mkdir()
    with pytest.raises(DownloadError, match=r"no-such-archive\.zip: HTTP 404") as err:
        fetch(entry, out, url=missing, progress=False)
    assert isinstance(err.value, FriendrecError)
    assert leftovers(out) == []


def test_connection_refused_fails_cleanly(twitch_zip, tmp_path: Path) -> None:
    entry, _ = twitch_zip
    with pytest.raises(DownloadError, match=r"^http://127\.0\.0\.1:9/x\.zip: "):
        fetch(entry, tmp_path / "d", url="http://127.0.0.1:9/x.zip", progress=False, timeout=5)
    assert not (tmp_path / "d").exists()


def test_bad_zip_and_missing_member(server: Server, twitch_zip, tmp_path: Path) -> None:
    entry, _ = twitch_zip
    out = tmp_path / "datasets"
    with pytest.raises(ArchiveError, match="not a valid zip archive"):
        fetch(entry, out, url=server.put("junk.zip", b"<html>not a zip</html>"), progress=False)
    members = {snap_member(s.target): fake_content(s.target) for s in entry.files}
    del members["twitch/TW/musae_TW_edges.csv"]
    partial = server.put("partial.zip", build_zip(members))
    with pytest.raises(ArchiveError, match=r"no member matches \['\*\[/_\]TW_edges\.csv'\]"):
        fetch(entry, out, url=partial, progress=False)
    assert not out.exists()


def test_ambiguous_member_is_refused(server: Server, twitch_zip, tmp_path: Path) -> None:
    entry, _ = twitch_zip
    members = {snap_member(s.target): fake_content(s.target) for s in entry.files}
    members["copy/ES/musae_ES_edges.csv"] = b"another"
    url = server.put("ambiguous.zip", build_zip(members))
    with pytest.raises(ArchiveError, match="ambiguous"):
        fetch(entry, tmp_path / "d", url=url, progress=False)
    assert not (tmp_path / "d").exists()


def test_archive_digest_is_checked_when_known(server: Server, twitch_zip, tmp_path: Path) -> None:
    entry, data = twitch_zip
    with pytest.raises(
        ChecksumMismatchError, match=f"archive sha256 mismatch: expected {'a' * 64}"
    ):
        fetch(dataclasses.replace(entry, sha256="a" * 64), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    fetch(dataclasses.replace(entry, sha256=sha(data)), tmp_path / "b", progress=False)
    assert (tmp_path / "b/twitch_social/TW/TW_edges.csv").is_file()


def test_second_run_does_nothing_unless_forced(server: Server, twitch_zip, tmp_path: Path) -> None:
    entry, _ = twitch_zip
    out = tmp_path / "datasets"
    assert fetch(entry, out, progress=False).downloaded
    served = len(server.requests)
    again = fetch(entry, out, progress=False)
    assert not again.downloaded and again.url is None
    assert len(server.requests) == served  # nothing was downloaded
    assert fetch(entry, out, force=True, progress=False).downloaded
    assert len(server.requests) == served + 1
    # a damaged file is noticed and replaced
    damaged = out / "twitch_social/FR/FR_edges.csv"
    damaged.write_bytes(b"damaged")
    assert fetch(entry, out, progress=False).downloaded
    assert damaged.read_bytes() == fake_content("twitch_social/FR/FR_edges.csv")
    assert not [p for p in leftovers(out) if p.name.startswith(".fetch-")]


def test_unknown_name_lists_fetchable_names() -> None:
    with pytest.raises(UnknownFetchableError, match=r"fetchable names are \['github', 'twitch'\]"):
        get_entry("reddit")


# --- the CLI, as a user runs it --------------------------------------------------------------


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FRIENDREC_WORKDIR": str(tmp_path / "work"), "COLUMNS": "200"}
    env.pop("FRIENDREC_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "friendrec", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_fetch_with_url_and_registry(server: Server, twitch_zip, tmp_path: Path) -> None:
    entry, _ = twitch_zip
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        yaml.safe_dump(
            {
                "datasets": {
                    "twitch": {
                        "url": "http://127.0.0.1:9/unreachable.zip",
                        "sha256": None,
                        "files": [
                            {"member": list(s.members), "target": s.target, "sha256": s.sha256}
                            for s in entry.files
                        ],
                    }
                }
            }
        )
    )
    out = tmp_path / "datasets"
    args = ["data", "fetch", "twitch", "--datasets-dir", str(out), "--registry", str(registry)]
    first = run_cli(*args, "--url", entry.url, tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["status"] == "downloaded" and summary["url"] == entry.url
    assert len(summary["files"]) == 18 and "twitch_social/TW/TW_target.csv" in summary["files"]
    assert (out / "twitch_social/PTBR/PTBR_features.json").is_file()

    second = run_cli(*args, tmp_path=tmp_path)  # registry URL unreachable: must not be asked
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["status"] == "already present"

    broken = run_cli(*args, "--force", tmp_path=tmp_path)
    assert broken.returncode == 2
    assert "unreachable.zip" in broken.stderr and "Traceback" not in broken.stderr
    assert (out / "twitch_social/PTBR/PTBR_features.json").is_file()


def test_cli_unknown_name_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_cli("data", "fetch", "reddit", "--datasets-dir", str(tmp_path), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "unknown fetchable dataset 'reddit'" in proc.stderr
    assert "['github', 'twitch']" in proc.stderr and "Traceback" not in proc.stderr


# --- the shipped registry --------------------------------------------------------------------


def test_shipped_registry_covers_exactly_the_reference_files() -> None:
    registry = load_registry()
    assert sorted(registry) == ["github", "twitch"]
    assert registry["twitch"].url.endswith("dd4394c41c929dfd93688458be1a4f113e4f9e39.zip")
    assert registry["github"].url == "https://snap.stanford.edu/data/git_web_ml.zip"
    shipped = {spec.target: spec.sha256 for e in registry.values() for spec in e.files}
    expected_targets = {
        f"twitch_social/{lang}/{lang}_{kind}"
        for lang in LANGS
        for kind in ("edges.csv", "features.json", "target.csv")
    } | {f"github_social/musae_git_{kind}" for kind in ("edges.csv", "features.json", "target.csv")}
    assert set(shipped) == expected_targets
    assert len(set(shipped.values())) == len(shipped)  # one distinct digest per file
    if SHARED_SUMS.is_file():  # the reference copies: compare digest by digest
        sums = {}
        for line in SHARED_SUMS.read_text().splitlines():
            digest, path = line.split(maxsplit=1)
            sums[path.strip().removeprefix("./")] = digest
        assert shipped == sums
    # every target's member patterns find its member in SNAP's layout, and only that one
    for entry in registry.values():
        names = [snap_member(spec.target) for spec in entry.files]
        for spec in entry.files:
            hits = [n for n in names if any(fnmatchcase(n, p) for p in spec.members)]
            assert hits == [snap_member(spec.target)], spec
    assert REGISTRY_PATH.name == "datasets.yaml"
