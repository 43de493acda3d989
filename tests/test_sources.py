"""Source rules (``--source PREFIX=URL``), their config forms, and the specs the stack builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scicatfs.cache.store import blob_key
from scicatfs.catalog.models import DataFile, Dataset
from scicatfs.config import ConfigError, helper_argv_to_cli, mount_options, split_fuse_o
from scicatfs.sources import SourceRules, parse_rule
from scicatfs.stack import FileSpecs, transfers
from scicatfs.transfer.base import split

URL = "http://127.0.0.1:3000"


def options(**values: object):  # type: ignore[no-untyped-def]
    return mount_options({"url": URL, "mountpoint": "/mnt", **values})


def dataset(folder: str, host: str | None = "files.example.org", path: str = "a/b.dat") -> tuple[Dataset, DataFile]:
    datafile = DataFile(path, f"{folder}/{path}", 3, 0.0, None)
    return Dataset("p/1", {}, folder, host, 0.0, (datafile,)), datafile


def test_longest_prefix_wins_on_whole_components() -> None:
    rules = SourceRules(
        parse_rule(text)
        for text in ("/=https://web.example.org/all", "/ess/data=file:///ess/data", "/ess/data/big=sftp://login/big")
    )
    assert rules.locate("/ess/data/x/y.h5") == "file:///ess/data/x/y.h5"
    assert rules.locate("/ess/data/big/f") == "sftp://login/big/f"
    assert rules.locate("/ess/database/f") == "https://web.example.org/all/ess/database/f"
    assert rules.locate("/ess/data") == "file:///ess/data"
    assert SourceRules([parse_rule("/ess=file:///x")]).locate("/other/f") is None


def test_paths_are_quoted_in_urls() -> None:
    rule = parse_rule("/d=file:///mnt/d")
    assert rule.locate("/d/a b/#1?.txt") == "file:///mnt/d/a%20b/%231%3F.txt"


@pytest.mark.parametrize(
    "text, message",
    [
        ("ess/data=file:///x", "absolute path"),
        ("/a/../b=file:///x", "'..'"),
        ("/a", "PREFIX=URL"),
        ("/a=ftp://host/x", "scheme must be one of"),
        ("/a=sftp://user:secret@host/x", "no passwords"),
        ("/a=file://otherhost/x", "this machine only"),
        ("/a=http://files.example.org/x", "--insecure-http"),
        ("/a=https://host/x?sig=1", "no ?query"),
        ("/a=https:///x", "names no host"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")) as raised:
        options(sources=[text])
    assert "secret" not in str(raised.value)


def test_plain_http_elsewhere_needs_the_insecure_flag() -> None:
    assert options(sources=["/a=http://127.0.0.1:8080/x"]).sources[0].url == "http://127.0.0.1:8080/x"
    assert options(sources=["/a=http://files.example.org/x"], insecure_http="yes").sources[0].prefix == "/a"


def test_profile_table_command_line_and_o_forms(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[profiles.ess]\nurl = "http://127.0.0.1:3000"\n'
        '[profiles.ess.sources]\n"/ess/data" = "file:///ess/data"\n"/ess/raw" = "sftp://login.ess.eu/ess/raw"\n'
    )
    helper = helper_argv_to_cli(["ess", "/mnt", "-o", "source=/ess/raw=file:///raw,xattrs,source=/x=file:///y"])
    assert helper == ["mount", "/mnt", "--profile", "ess", "-o", "source=/ess/raw=file:///raw,xattrs,source=/x=file:///y"]
    scicat, fuse = split_fuse_o([helper[-1] + ",auto_unmount"])
    assert scicat == {"xattrs": True, "sources": ["/ess/raw=file:///raw", "/x=file:///y"]} and fuse == ["auto_unmount"]
    merged = mount_options({"mountpoint": "/mnt", "sources": scicat["sources"]}, profile="ess", config_path=config)
    rules = SourceRules(merged.sources)
    assert rules.locate("/ess/data/f") == "file:///ess/data/f"  # from the profile
    assert rules.locate("/ess/raw/f") == "file:///raw/f"  # the command line replaced the profile's rule
    assert rules.locate("/x/f") == "file:///y/f"
    config.write_text('[profiles.bad]\nurl = "http://127.0.0.1:3000"\nsources = "/=file:///"\n')
    with pytest.raises(ConfigError, match="a table of PREFIX = URL"):
        mount_options({"mountpoint": "/mnt"}, profile="bad", config_path=config)


def test_the_sftp_host_rule_lives_in_one_place() -> None:
    """No rule: --sftp-host, else the dataset's sourceFolderHost, else the settings' default host."""
    with_host, file = dataset("/data/set")
    assert FileSpecs(options())(with_host, file).source == "sftp://files.example.org/data/set/a/b.dat"
    assert FileSpecs(options(sftp_host="login"))(with_host, file).source == "sftp://login/data/set/a/b.dat"
    without, file = dataset("/data/set", host=None)
    assert FileSpecs(options())(without, file).source == "sftp:///data/set/a/b.dat"


def test_a_catalog_host_cannot_smuggle_a_user_port_or_path_into_the_url() -> None:
    hostile, file = dataset("/data/set", host="root@evil.example:2222/etc")
    url = FileSpecs(options())(hostile, file).source
    assert url == "sftp://root%40evil.example%3A2222%2Fetc/data/set/a/b.dat"
    assert split(url).path == "/data/set/a/b.dat" and "@" not in split(url).netloc
    ipv6, file = dataset("/d", host="::1")
    assert FileSpecs(options())(ipv6, file).source == "sftp://%3A%3A1/d/a/b.dat"


def test_blob_keys_without_a_checksum_follow_the_source() -> None:
    data, file = dataset("/ess/data/set")
    local = FileSpecs(options(sources=["/ess/data=file:///ess/data"]))(data, file)
    remote = FileSpecs(options())(data, file)
    assert local.source == "file:///ess/data/set/a/b.dat"
    assert blob_key(local) != blob_key(remote)
    assert blob_key(local) == blob_key(FileSpecs(options(sources=["/ess/data=file:///ess/data"]))(data, file))


def test_only_the_schemes_in_use_get_a_transfer() -> None:
    everything_local = transfers(options(sources=["/=file:///"]), FileSpecs(options(sources=["/=file:///"])))
    assert everything_local.schemes == {"file"}  # no SFTP thread, no sshd needed
    mixed = options(sources=["/web=https://h/x"])
    assert transfers(mixed, FileSpecs(mixed)).schemes == {"sftp", "https"}


def test_commands_other_than_mount_do_not_import_fuse() -> None:
    code = (
        "import sys\n"
        "import scicatfs.cli, scicatfs.stack, scicatfs.commands.prefetch, scicatfs.commands.cache,"
        " scicatfs.commands.status\n"
        "from scicatfs.cli import main\n"
        "assert main(['cache', 'status', '--cache-dir', sys.argv[1]]) == 0\n"
        "print('pyfuse3' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent/cache"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
    mount = subprocess.run(
        [sys.executable, "-c", "import sys, scicatfs.mount; print('pyfuse3' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert mount.stdout.strip() == "True"  # the check itself can see an import
