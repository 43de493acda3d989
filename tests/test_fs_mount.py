"""The mounted demo catalog seen through ordinary tools and Python.

Every test runs against a real mount (``scicatfs mount`` subprocess), the
project's catalog server and a real OpenSSH sshd; file bytes are compared with
``Catalog.content``, i.e. with what the file server holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy
import pytest

from scicatfs.cache.store import BlobStore
from scicatfs.fs.views import top_level_views
from tests.support.mounts import Mount
from tests.support.requirements import needs_root, skip_or_fail

#: The root's own directories, listed before the PID tree.
VIEWS = [".scicat", *top_level_views()]

THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
OCTARINE = "20.500.12269/0b9a6b7e-3c61-4d8e-9f0e-5a1d2c3b4e5f"
BRIGHTNESS = "20.500.12269/BRIGHTNESS/V200053"
FRAMES = "thaumometer-frames-0042"
PUBLIC = "20.500.12269/c4d5e6f7-0000-4000-8000-5ca1ab1e0001"
FORBIDDEN = "20.500.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701"
LIBRARY = "20.500.12269/e1f2a3b4-0000-4000-8000-11b4a4a7e7ad"
VISIBLE = [THAUM, OCTARINE, BRIGHTNESS, FRAMES, PUBLIC, LIBRARY]
TIMEOUT = 60
T = TypeVar("T")


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run([str(c) for c in command], capture_output=True, timeout=TIMEOUT, cwd=cwd)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def eventually(produce: Callable[[], T], accept: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Call ``produce`` until ``accept`` likes the result; return the last result either way."""
    deadline = time.monotonic() + timeout
    value = produce()
    while not accept(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = produce()
    return value


def catalog_files(mount: Mount, pids: list[str] = VISIBLE) -> dict[str, bytes]:
    """Mount-relative path -> bytes, for every data file of ``pids``."""
    return {
        f"{pid}/{entry['path']}": mount.catalog.content(pid, entry["path"])
        for pid in pids
        for entry in mount.catalog.files(pid)
    }


def is_generated(relative: str) -> bool:
    """metadata.json / .scicat/ that scicatfs adds (not data files)."""
    if relative.startswith(".scicat/"):
        return True
    for dataset in VISIBLE:
        if relative.startswith(dataset + "/"):
            inner = relative[len(dataset) + 1:]
            return inner.startswith(".scicat/") or (inner == "metadata.json" and dataset != LIBRARY)
    return False


def test_root_and_prefix_listings(mounted: Mount) -> None:
    assert sorted(os.listdir(mounted.path)) == sorted([*VIEWS, "20.500.12269", FRAMES])
    assert sorted(os.listdir(mounted.path / "20.500.12269")) == sorted(
        [
            "0b9a6b7e-3c61-4d8e-9f0e-5a1d2c3b4e5f",
            "72fe3ff6-105b-4c7f-b9d0-073b67c90ec3",
            "BRIGHTNESS",
            "c4d5e6f7-0000-4000-8000-5ca1ab1e0001",
            "e1f2a3b4-0000-4000-8000-11b4a4a7e7ad",
        ]
    )
    assert os.listdir(mounted.path / "20.500.12269" / "BRIGHTNESS") == ["V200053"]


def test_dataset_layout(mounted: Mount) -> None:
    thaum = mounted.dataset(THAUM)
    assert sorted(os.listdir(thaum)) == [".scicat", "flux.dat", "logs", "metadata.json"]
    assert sorted(os.listdir(thaum / ".scicat")) == ["files.json", "metadata.json"]
    assert os.listdir(thaum / "logs") == ["measurement.log"]


def test_every_file_through_os_walk_and_open(mounted: Mount) -> None:
    seen: dict[str, bytes] = {}
    for directory, _, files in os.walk(mounted.path):
        for name in files:
            path = Path(directory) / name
            relative = str(path.relative_to(mounted.path))
            if not is_generated(relative):
                seen[relative] = path.read_bytes()
    expected = catalog_files(mounted)
    assert sorted(seen) == sorted(expected)
    for relative, data in expected.items():
        assert seen[relative] == data, relative


def test_stat_shows_catalog_sizes_times_and_read_only_modes(mounted: Mount) -> None:
    thaum = mounted.dataset(THAUM)
    for entry in mounted.catalog.files(THAUM):
        info = os.stat(thaum / entry["path"])
        assert info.st_size == entry["size"]
        assert info.st_mtime == datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
        assert stat.S_IMODE(info.st_mode) == 0o444 and stat.S_ISREG(info.st_mode)
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    directory = os.stat(thaum)
    assert stat.S_ISDIR(directory.st_mode) and stat.S_IMODE(directory.st_mode) == 0o555
    created = mounted.catalog.dataset(THAUM)["creationTime"]
    assert directory.st_mtime == datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    assert stat.S_IMODE(os.stat(mounted.path).st_mode) == 0o555


def test_st_blocks_follow_cached_bytes(make_mount) -> None:  # type: ignore[no-untyped-def]
    first = make_mount()
    frame = first.dataset(FRAMES) / "frame_small.raw"
    assert os.stat(frame).st_blocks == 0  # nothing cached yet
    frame.read_bytes()
    eventually(lambda: _files_json(first.dataset(FRAMES)), lambda files: files["frame_small.raw"]["cached"] == 1024)
    first.unmount()
    # The kernel trusts attributes for the TTL; a new mount on the same cache shows the change.
    second = make_mount(cache_dir=first.cache_dir)
    assert os.stat(second.dataset(FRAMES) / "frame_small.raw").st_blocks == 1024 // 512


def test_a_verified_file_is_read_without_the_fetcher(make_mount) -> None:  # type: ignore[no-untyped-def]
    """After a remount, a file cached whole and verified is served by plain preads of its blob."""
    first = make_mount()
    name = "frame_big.raw"
    expected = first.catalog.content(FRAMES, name)
    assert (first.dataset(FRAMES) / name).read_bytes() == expected

    def complete() -> bool:
        with BlobStore(first.cache_dir, 1 << 30) as store:
            info = store.where(FRAMES, name)
            return info is not None and info.complete

    assert eventually(complete, bool)
    first.unmount()
    second = make_mount(cache_dir=first.cache_dir)  # a new inode: nothing in the page cache
    path = second.dataset(FRAMES) / name
    with open(path, "rb") as file:
        assert file.read(4096) == expected[:4096]
        file.seek(len(expected) - 5)
        assert file.read() == expected[-5:]
    assert path.read_bytes() == expected
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[4 * 1024 * 1024 - 3:4 * 1024 * 1024 + 5] == expected[4 * 1024 * 1024 - 3:4 * 1024 * 1024 + 5]
    status = json.loads((second.path / ".scicat" / "status.json").read_text())
    assert status["cache"]["reads_from_cache"] == status["cache"]["reads_fetched"] == 0
    assert status["transfer"]["bytes_read"] == 0


def test_lookup_of_deep_path_without_listing(mounted: Mount) -> None:
    frame = mounted.dataset(BRIGHTNESS) / "frames" / "frame_0002.raw"
    assert frame.read_bytes() == mounted.catalog.content(BRIGHTNESS, "frames/frame_0002.raw")


def test_cat_and_sha256sum(mounted: Mount) -> None:
    assert run("cat", mounted.dataset(THAUM) / "flux.dat").stdout == mounted.catalog.content(THAUM, "flux.dat")
    files = sorted(catalog_files(mounted, [OCTARINE, BRIGHTNESS, FRAMES]).items())
    output = run("sha256sum", *(mounted.path / relative for relative, _ in files)).stdout.decode()
    digests = [line.split()[0] for line in output.splitlines()]
    assert digests == [hashlib.sha256(data).hexdigest() for _, data in files]


def test_ls_lR_and_find(mounted: Mount) -> None:
    listing = run("ls", "-lR", mounted.path).stdout.decode()
    for relative in catalog_files(mounted):
        assert Path(relative).name in listing
    found = run("find", mounted.path, "-type", "f").stdout.decode().splitlines()
    data = {str(Path(p).relative_to(mounted.path)) for p in found}
    data = {p for p in data if not is_generated(p)}
    assert data == set(catalog_files(mounted))


def test_cp_rsync_tar(mounted: Mount, tmp_path: Path) -> None:
    source = mounted.dataset(OCTARINE)
    expected = catalog_files(mounted, [OCTARINE])

    run("cp", "-r", source, tmp_path / "cp")
    run("rsync", "-a", f"{source}/", tmp_path / "rsync")
    for relative, data in expected.items():
        inner = relative[len(OCTARINE) + 1:]
        assert (tmp_path / "cp" / inner).read_bytes() == data
        assert (tmp_path / "rsync" / inner).read_bytes() == data
        assert os.stat(tmp_path / "rsync" / inner).st_mtime == os.stat(source / inner).st_mtime

    archive = tmp_path / "octarine.tar"
    run("tar", "cf", archive, "-C", source, ".")
    listed = run("tar", "tf", archive).stdout.decode().split()
    assert {f"./{r[len(OCTARINE) + 1:]}" for r in expected} <= set(listed)
    with tarfile.open(archive) as tar:
        for relative, data in expected.items():
            member = tar.extractfile(f"./{relative[len(OCTARINE) + 1:]}")
            assert member is not None and member.read() == data


def test_du_sb_counts_apparent_sizes(mounted: Mount) -> None:
    dataset = mounted.dataset(OCTARINE)
    output = run("du", "-sb", "--exclude=.scicat", dataset).stdout.decode()
    record = (dataset / "metadata.json").stat().st_size
    assert int(output.split()[0]) == sum(len(d) for d in catalog_files(mounted, [OCTARINE]).values()) + record


def test_metadata_json_is_the_record(mounted: Mount) -> None:
    text = (mounted.dataset(OCTARINE) / "metadata.json").read_text()
    assert text.endswith("}\n")
    record = json.loads(text)
    assert record["pid"] == OCTARINE
    assert "origdatablocks" not in record
    assert "sample name" in record["scientificMetadata"]  # URL-encoded key decoded
    assert (mounted.dataset(OCTARINE) / ".scicat" / "metadata.json").read_text() == text
    assert json.loads((mounted.dataset(THAUM) / "metadata.json").read_text())["datasetName"] == "Thaum flux"


def test_data_file_named_metadata_json_keeps_its_name(mounted: Mount) -> None:
    library = mounted.dataset(LIBRARY)
    assert (library / "metadata.json").read_bytes() == mounted.catalog.content(LIBRARY, "metadata.json")
    assert json.loads((library / ".scicat" / "metadata.json").read_text())["pid"] == LIBRARY


def test_files_json_lists_remote_paths_and_cached_bytes(make_mount) -> None:  # type: ignore[no-untyped-def]
    mounted = make_mount()
    dataset = mounted.dataset(THAUM)
    (dataset / "flux.dat").read_bytes()
    # The reader gets its bytes before the chunk is written to the cache: wait for the write.
    files = eventually(lambda: _files_json(dataset), lambda files: files["flux.dat"]["cached"] == 20)
    assert files["flux.dat"] == {
        "path": "flux.dat", "remote_path": "/hex/ps/thaum/flux.dat", "size": 20, "checksum": None, "cached": 20,
        "source": "sftp://127.0.0.1/hex/ps/thaum/flux.dat",  # --sftp-host of the test's sshd
    }
    assert files["logs/measurement.log"]["cached"] == 0
    octarine = json.loads((mounted.dataset(OCTARINE) / ".scicat" / "files.json").read_text())
    assert octarine["files"][0]["checksum"] == "md5:3a83dadedccd8a0702f2cd50b8db1e5f"


def _files_json(dataset: Path) -> dict[str, dict]:
    document = json.loads((dataset / ".scicat" / "files.json").read_text())
    return {entry["path"]: entry for entry in document["files"]}


def test_numpy_loadtxt(mounted: Mount) -> None:
    values = numpy.loadtxt(mounted.dataset(THAUM) / "flux.dat")
    assert values.tolist() == [5, 4, 9, 11, 15, 12, 7, 6, 1]


def test_mmap_reads_across_chunks(mounted: Mount) -> None:
    path = mounted.dataset(FRAMES) / "frame_big.raw"
    expected = mounted.catalog.content(FRAMES, "frame_big.raw")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert len(mapped) == len(expected) == 9 * 1024 * 1024 + 1
        for offset in (0, 4 * 1024 * 1024 - 3, 8 * 1024 * 1024 + 17, len(expected) - 5):
            assert mapped[offset:offset + 4096] == expected[offset:offset + 4096]
    shared = numpy.memmap(path, dtype=numpy.uint8, mode="r")
    assert hashlib.sha256(shared.tobytes()).hexdigest() == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize(
    "operation",
    [
        lambda d: open(d / "flux.dat", "r+b"),
        lambda d: open(d / "new.txt", "w"),
        lambda d: os.mkdir(d / "newdir"),
        lambda d: os.unlink(d / "flux.dat"),
        lambda d: os.rmdir(d / "logs"),
        lambda d: os.rename(d / "flux.dat", d / "moved.dat"),
        lambda d: os.chmod(d / "flux.dat", 0o644),
        lambda d: os.truncate(d / "flux.dat", 0),
        lambda d: os.symlink("flux.dat", d / "link"),
        lambda d: os.link(d / "flux.dat", d / "hardlink"),
        lambda d: os.utime(d / "flux.dat", (0, 0)),
        lambda d: os.setxattr(d / "flux.dat", "user.test", b"x"),
    ],
    ids=["open-rw", "create", "mkdir", "unlink", "rmdir", "rename", "chmod", "truncate",
         "symlink", "link", "utime", "setxattr"],
)
def test_writes_are_refused_with_erofs(mounted: Mount, operation) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as raised:
        operation(mounted.dataset(THAUM))
    assert raised.value.errno == errno.EROFS


@pytest.mark.allow_log(r"WARNING scicatfs\.fs\.errors: lookup pid='20\.500\.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701': dataset '20\.500\.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701' exists but the credentials in use \(login as 'stibbons'\) may")
def test_forbidden_dataset_is_eacces_and_not_listed(mounted: Mount) -> None:
    assert FORBIDDEN.split("/")[1] not in os.listdir(mounted.path / "20.500.12269")
    with pytest.raises(PermissionError):
        os.stat(mounted.dataset(FORBIDDEN))
    assert "may not read it" in mounted.log_text()


def test_unknown_names_are_enoent_and_cached(mounted: Mount) -> None:
    for missing in ("no-such-pid", "20.500.12269/no-such-uuid", f"{THAUM}/no-such-file", f"{THAUM}/logs/nope"):
        with pytest.raises(FileNotFoundError):
            os.stat(mounted.path / missing)
    mounted.server.reset_requests()
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path / "no-such-pid")
    assert mounted.server.requests == []  # the kernel's negative entry answered


def test_a_resolved_prefix_and_dataset_are_answered_from_memory_within_their_ttl(mounted: Mount) -> None:
    """A second path to the same prefix and dataset (here through /.scicat/pid, which the
    kernel looks up afresh) costs no catalog request: the prefix is known, the record cached."""
    relative = Path(*THAUM.split("/")) / "flux.dat"
    os.stat(mounted.path / relative)
    mounted.server.reset_requests()
    assert os.stat(mounted.path / ".scicat" / "pid" / relative).st_size == len(
        mounted.catalog.content(THAUM, "flux.dat")
    )
    assert mounted.server.requests == []


def test_unknown_top_level_name_costs_at_most_two_small_requests(mounted: Mount) -> None:
    mounted.server.reset_requests()
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path / "never-a-pid")
    assert len(mounted.server.requests) <= 2, mounted.server.requests


def test_status_json_at_the_root(mounted: Mount) -> None:
    assert os.listdir(mounted.path / ".scicat") == ["status.json", "pid"]
    (mounted.dataset(THAUM) / "flux.dat").read_bytes()
    status = json.loads((mounted.path / ".scicat" / "status.json").read_text())
    assert status["mountpoint"] == str(mounted.path) and status["process"] == mounted.process.pid
    assert status["catalog"]["url"].startswith(mounted.server.url)
    result = subprocess.run([sys.executable, "-m", "scicatfs", "status", str(mounted.path)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and f"at {mounted.path}" in result.stdout, result.stderr


def test_mount_table_and_statfs(mounted: Mount) -> None:
    line = next(l for l in Path("/proc/self/mounts").read_text().splitlines() if l.split()[1] == str(mounted.path))
    source, _, fstype, options = line.split()[:4]
    assert fstype == "fuse.scicatfs"
    assert source == f"scicat:127.0.0.1:{mounted.server.port}"
    assert "ro" in options.split(",")
    info = os.statvfs(mounted.path)
    assert info.f_flag & os.ST_RDONLY
    assert info.f_namemax == 255


def test_anonymous_mount_shows_published_data_only(make_mount) -> None:  # type: ignore[no-untyped-def]
    mount = make_mount(user=None)
    assert sorted(os.listdir(mount.path)) == sorted([*VIEWS, "20.500.12269"])
    assert os.listdir(mount.path / "20.500.12269") == [PUBLIC.split("/")[1]]
    assert (mount.dataset(PUBLIC) / "census.csv").read_bytes() == mount.catalog.content(PUBLIC, "census.csv")
    with pytest.raises(FileNotFoundError):  # anonymous callers cannot tell "private" from "missing"
        os.stat(mount.dataset(THAUM))


def test_xattrs_off_by_default(mounted: Mount) -> None:
    with pytest.raises(OSError) as raised:
        os.getxattr(mounted.dataset(THAUM) / "flux.dat", "user.scicat.pid")
    assert raised.value.errno == errno.EOPNOTSUPP


def test_getfattr_with_xattrs(make_mount) -> None:  # type: ignore[no-untyped-def]
    mount = make_mount(args=["-o", "xattrs"])
    path = mount.dataset(OCTARINE) / "README.txt"
    path.read_bytes()
    output = eventually(lambda: run("getfattr", "-d", path).stdout.decode(), lambda text: 'cached="58"' in text)
    assert f'user.scicat.pid="{OCTARINE}"' in output
    assert 'user.scicat.remote_path="/hex/ps/octarine/README.txt"' in output
    assert 'user.scicat.checksum="md5:3a83dadedccd8a0702f2cd50b8db1e5f"' in output
    assert 'user.scicat.cached="58"' in output
    assert os.getxattr(mount.dataset(THAUM), "user.scicat.remote_path") == b"/hex/ps/thaum"
    with pytest.raises(OSError) as raised:
        os.getxattr(path, "user.other")
    assert raised.value.errno == errno.ENODATA


def _cat_as_nobody(mount: Mount, relative: str) -> subprocess.CompletedProcess[bytes]:
    """``cat`` run as user nobody from inside the mount (entered as root, then privileges dropped)."""

    def enter_and_drop() -> None:
        os.chdir(mount.path)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    return subprocess.run(["cat", relative], capture_output=True, timeout=TIMEOUT, preexec_fn=enter_and_drop)


def test_mount_is_private_to_its_user(mounted: Mount) -> None:
    skip_or_fail(needs_root("to act as another user"))
    result = _cat_as_nobody(mounted, f"{THAUM}/flux.dat")
    assert result.returncode != 0 and b"Permission denied" in result.stderr


def test_allow_other_lets_others_read_with_default_permissions(make_mount) -> None:  # type: ignore[no-untyped-def]
    skip_or_fail(needs_root("to act as another user"))
    mount = make_mount(args=["--allow-other"])
    options = next(
        line.split()[3] for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[1] == str(mount.path)
    ).split(",")
    assert "allow_other" in options and "default_permissions" in options
    result = _cat_as_nobody(mount, f"{THAUM}/flux.dat")
    assert result.returncode == 0, result.stderr
    assert result.stdout == mount.catalog.content(THAUM, "flux.dat")


def test_dot_entries_name_the_directory_and_its_parent(mounted: Mount) -> None:
    for directory in (mounted.path, mounted.path / "20.500.12269", mounted.dataset(THAUM), mounted.dataset(THAUM) / "logs"):
        output = run("ls", "-ai", directory).stdout.decode().split()
        numbers = dict(zip(output[1::2], map(int, output[::2])))
        assert numbers["."] == os.stat(directory).st_ino
        if directory != mounted.path:  # the root's ".." is outside the mount
            assert numbers[".."] == os.stat(directory.parent).st_ino


def test_df_shows_the_cache(make_mount) -> None:  # type: ignore[no-untyped-def]
    mount = make_mount(args=["--cache-size", "64M"])
    info = os.statvfs(mount.path)
    assert info.f_blocks * info.f_frsize == 64 * 1024 * 1024
    assert info.f_bfree == info.f_blocks  # nothing cached yet
    (mount.dataset(FRAMES) / "frame_big.raw").read_bytes()
    used = eventually(lambda: os.statvfs(mount.path), lambda i: (i.f_blocks - i.f_bfree) * i.f_frsize >= 9 * 1024 * 1024)
    assert (used.f_blocks - used.f_bfree) * used.f_frsize >= 9 * 1024 * 1024
