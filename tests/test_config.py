"""Configuration: sizes, profiles, precedence, ``-o`` splitting, the mount.fuse3 form."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scicatfs.config import (
    ConfigError,
    MountOptions,
    SavedQuery,
    default_cache_dir,
    default_config_path,
    helper_argv_to_cli,
    load_profile,
    mount_options,
    parse_size,
    split_fuse_o,
)
from tests.support.requirements import missing_program, skip_or_fail

DOCS = Path(__file__).resolve().parents[1] / "docs" / "running.md"
GiB = 1024**3


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("512M", 512 * 1024**2),
        ("10G", 10 * GiB),
        ("10GiB", 10 * GiB),
        ("10gb", 10 * GiB),
        ("10 G", 10 * GiB),
        ("1.5T", 1536 * GiB),
        ("100B", 100),
        ("1k", 1024),
        (".5K", 512),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "10X", "10%", "1e9", "ten", "10 G B", "10iB", "nan"])
def test_bad_sizes_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------- defaults


def test_xdg_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "k"))
    assert default_cache_dir() == tmp_path / "c" / "scicatfs"
    assert default_config_path() == tmp_path / "k" / "scicatfs" / "config.toml"
    # Unset or relative values are ignored, as the XDG spec asks.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "scicatfs"
    assert default_config_path() == tmp_path / "home" / ".config" / "scicatfs" / "config.toml"


def test_minimal_options_take_the_defaults(tmp_path: Path) -> None:
    options = mount_options({"url": "https://scicat.example.org", "mountpoint": str(tmp_path)})
    assert options == MountOptions(url="https://scicat.example.org", mountpoint=tmp_path)
    assert options.sftp_connections == 4
    assert options.cache_size is None
    assert (options.record_ttl, options.listing_ttl) == (60.0, 30.0)
    assert options.log_level == "info"
    assert options.fuse_options == ()


# ------------------------------------------------------------- profiles


def test_ess_example_profile_from_the_docs_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile shown in docs/running.md is real TOML with only known keys."""
    monkeypatch.setenv("HOME", str(tmp_path))
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert blocks, "docs/running.md lost its example config"
    config = write_config(tmp_path, blocks[0])
    options = mount_options({"mountpoint": str(tmp_path / "mnt")}, profile="ess", config_path=config)
    assert options.url == "https://scicat.ess.eu/api/v3"
    assert options.sftp_host == "login.esss.dk"
    assert options.token_file == tmp_path / ".config" / "scicatfs" / "ess.token"
    assert options.cache_size == 50 * GiB
    demo = mount_options({"mountpoint": str(tmp_path / "mnt")}, profile="demo", config_path=config)
    assert (demo.sftp_port, demo.insecure_no_host_key_check) == (2222, True)


FSTAB_DOCS = [DOCS, DOCS.parents[1] / "systemd" / "README.md"]


@pytest.mark.parametrize("doc", FSTAB_DOCS, ids=lambda p: p.name)
def test_fstab_lines_in_the_docs_map_to_valid_options(doc: Path) -> None:
    """Each documented fstab line is what mount.fuse3 would hand over, minus bookkeeping."""
    fields = (line.split() for line in doc.read_text().splitlines())
    lines = [f for f in fields if len(f) >= 4 and f[1].startswith("/") and f[2] == "fuse.scicatfs"]
    assert lines, f"{doc.name} lost its fstab example"
    for source, where, _, opts, *_ in lines:
        cli = helper_argv_to_cli([source, where, "-o", opts])
        assert "x-systemd" not in " ".join(cli) and "_netdev" not in " ".join(cli)
        scicat, fuse = split_fuse_o([cli[cli.index("-o") + 1]])
        assert fuse == [], f"{doc.name}: {fuse} are no scicatfs options"
        if "--url" in cli:
            options = mount_options({"url": cli[cli.index("--url") + 1], "mountpoint": where, **scicat})
            assert options.sftp_host == "login.esss.dk"
        else:
            assert cli[cli.index("--profile") + 1] == source and "config" in scicat


def test_profile_values_are_typed_and_paths_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = write_config(
        tmp_path,
        """
        [profiles.lab]
        url = "http://127.0.0.1:3000/api/v3"
        sftp-port = 2222
        cache_size = "1.5G"
        record_ttl = 5
        identity_file = "~/.ssh/id_lab"
        known-hosts = "known_hosts"
        xattrs = true
        fuse_options = ["auto_unmount"]
        """,
    )
    assert load_profile("lab", config) == {
        "url": "http://127.0.0.1:3000/api/v3",
        "sftp_port": 2222,
        "cache_size": 1536 * 1024**2,
        "record_ttl": 5.0,
        "identity_file": tmp_path / "home" / ".ssh" / "id_lab",
        "known_hosts": tmp_path / "known_hosts",  # relative to the config file
        "xattrs": True,
        "fuse_options": ("auto_unmount",),
    }


def test_default_config_path_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "scicatfs").mkdir()
    (tmp_path / "scicatfs" / "config.toml").write_text('[profiles.p]\nurl = "https://a.example"\n')
    assert load_profile("p") == {"url": "https://a.example"}


def test_precedence_cli_over_profile_over_defaults(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
        [profiles.p]
        url = "https://profile.example/api/v3"
        sftp_host = "profile-host"
        cache_size = "10G"
        listing_ttl = 99
        """,
    )
    options = mount_options(
        {
            "mountpoint": str(tmp_path),
            "sftp_host": "cli-host",
            "cache-size": "2G",
            "url": None,  # not given on the command line: the profile's stays
            "command": "mount",  # argparse bookkeeping is ignored
        },
        profile="p",
        config_path=config,
    )
    assert options.url == "https://profile.example/api/v3"
    assert options.sftp_host == "cli-host"
    assert options.cache_size == 2 * GiB
    assert options.listing_ttl == 99.0
    assert options.record_ttl == 60.0  # default


def test_profile_and_config_may_come_inside_the_cli_mapping(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[profiles.p]\nurl = "https://p.example"\n')
    scicat, _ = split_fuse_o([f"profile=p,config={config}"])
    options = mount_options({"mountpoint": str(tmp_path), **scicat})
    assert options.url == "https://p.example"


def test_unknown_key_names_key_profile_and_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[profiles.ess]\nurl = "https://x.example"\nsftp_hots = "h"\n')
    with pytest.raises(ConfigError) as info:
        load_profile("ess", config)
    message = str(info.value)
    assert "sftp_hots" in message and "'ess'" in message and str(config) in message


def test_missing_profile_lists_the_available_ones(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[profiles.ess]\nurl = "https://a"\n[profiles.psi]\nurl = "https://b"\n')
    with pytest.raises(ConfigError, match=r"no profile 'maxiv'.*available: ess, psi"):
        load_profile("maxiv", config)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('url = "https://a"\n', "unknown top-level key 'url'"),
        ("[profiles.p]\nurl = \n", "not valid TOML"),
        ('[profiles.p]\nsftp_port = "22"\n', r"sftp_port in profile 'p'.*expected a whole number"),
        ("[profiles.p]\nsftp_port = true\n", "expected a whole number"),
        ('[profiles.p]\nxattrs = "yes"\n', "expected true or false"),
        ("[profiles.p]\ncache_size = 1.5\n", "cache_size"),
        ('[profiles.p]\ncache_size = "ten gigs"\n', r"cache_size in profile 'p'.*invalid size 'ten gigs'"),
        ("[profiles.p]\nurl = 3\n", "expected a non-empty string"),
        ('[profiles.p]\nfuse_options = "auto_unmount"\n', "list of FUSE option strings"),
        ('[profiles.p]\ncache-size = "1G"\ncache_size = "2G"\n', "given twice"),
        ('[profiles.p]\nviews = "mine"\n', r"views in profile 'p'.*VIEWNAME"),
        ('[profiles.p.views.v]\nwhere = "ownerGroup"\n', r"view 'v' in profile 'p'.*where must be a non-empty table"),
        ("[profiles.p.views.v]\nwhere = {}\n", "where must be a non-empty table"),
        ('[profiles.p.views.v]\nwhere = { a = 1 }\nsort = { pid = "up" }\n', 'sort must be a table of field = "asc"'),
        ("[profiles.p.views.v]\nwhere = { a = 1 }\nlimit = 0\n", "limit must be a whole number larger than zero"),
        ("[profiles.p.views.v]\nwhere = { a = 1 }\norder = 1\n", "unknown key 'order'"),
        ("[profiles.p.views.v]\nwhere = { t = 2024-01-01 }\n", "dates and times cannot be sent"),
        ('[profiles.p.views.v]\nwhere = { creationTime = { "$gte" = "2024-01-01" } }\n',
         r"view 'v' in profile 'p'.*creationTime is a date in the catalog.*matches nothing"),
        ('[profiles.p.views.v]\nwhere = { "$or" = [ { endTime = "2024" }, { a = 1 } ] }\n', "endTime is a date"),
        ('[profiles.p.views.v]\nwhere = { pid = { gt = "x" } }\n', r"pid\.gt is LoopBack's .* write \$gt"),
        ('[profiles.p.views.".scicat"]\nwhere = { a = 1 }\n', "usable as a directory name"),
    ],
)
def test_bad_profiles_are_config_errors(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_profile("p", write_config(tmp_path, body))


def test_saved_queries_from_the_docs_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    [example] = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)[:1]
    options = mount_options({"mountpoint": str(tmp_path / "mnt")}, profile="ess", config_path=write_config(tmp_path, example))
    assert options.views == (SavedQuery("calibration", '{"keywords":"calibration"}', '{"creationTime":"desc"}', 500),)
    with pytest.raises(ConfigError, match="saved queries are tables in a profile"):
        mount_options({"url": "https://a", "mountpoint": str(tmp_path), "views": "x"})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile("p", tmp_path / "nope.toml")


# ----------------------------------------------------------- validation


def _options(tmp_path: Path, **cli: object) -> MountOptions:
    return mount_options({"url": "https://scicat.example.org", "mountpoint": str(tmp_path), **cli})


@pytest.mark.parametrize(
    ("cli", "match"),
    [
        ({"url": "ftp://scicat.example.org"}, "http:// or https://"),
        ({"url": "scicat.example.org"}, "http:// or https://"),
        ({"url": "https://"}, "name a host"),
        ({"url": "https://host:99999/api"}, "invalid port"),
        ({"sftp_port": "0"}, "outside 1-65535"),
        ({"sftp_port": 65536}, "outside 1-65535"),
        ({"sftp_port": "twenty-two"}, "expected a whole number"),
        ({"sftp_connections": 0}, "between 1 and 64"),
        ({"metrics_port": "0"}, "metrics_port 0 is outside 1-65535"),
        ({"metrics_port": "http"}, "expected a whole number"),
        ({"shared_cache": ""}, "expected a path"),
        ({"cache_size": "0"}, "larger than zero"),
        ({"cache_size": "lots"}, "invalid size"),
        ({"record_ttl": "-1"}, "record_ttl"),
        ({"listing_ttl": "nan"}, "listing_ttl"),
        ({"lookup_timeout": "0"}, "lookup_timeout 0.0 must be a number of seconds > 0"),
        ({"lookup_timeout": "inf"}, "lookup_timeout"),
        ({"log_level": "chatty"}, "not one of debug, info"),
        ({"xattrs": "maybe"}, "true or false"),
        ({"token_file": "/t", "username": "u"}, "exclude each other"),
        ({"password_file": "/p"}, "needs a username"),
        ({"identity_file": ""}, "expected a path"),
    ],
)
def test_invalid_values_are_config_errors(tmp_path: Path, cli: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _options(tmp_path, **cli)


def test_missing_url_and_mountpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no url given"):
        mount_options({"mountpoint": str(tmp_path)})
    with pytest.raises(ConfigError, match="no mountpoint given"):
        mount_options({"url": "https://a.example"})


def test_text_values_are_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    options = _options(
        tmp_path,
        mountpoint="mnt",
        sftp_port="2222",
        record_ttl="0",
        lookup_timeout="2.5",
        xattrs="yes",
        allow_other=True,
        log_level="WARN",
        token_file="~/token",
        fuse_options="auto_unmount,max_read=131072",
    )
    assert options.mountpoint == tmp_path / "mnt"  # absolute: the daemon leaves the cwd
    assert options.sftp_port == 2222
    assert options.record_ttl == 0.0
    assert options.lookup_timeout == 2.5
    assert options.xattrs is True and options.allow_other is True
    assert options.log_level == "warning"
    assert options.token_file == tmp_path / "token"
    assert options.fuse_options == ("auto_unmount", "max_read=131072")


# ------------------------------------------------------------------- -o


def test_split_fuse_o_sorts_scicatfs_keys_from_fuse_options() -> None:
    scicat, fuse = split_fuse_o(
        ["token_file=/x,sftp_host=h,ro,allow_other,xattrs", "auto_unmount,cache-size=5G,xattrs=no,max_read=65536"]
    )
    assert scicat == {
        "token_file": "/x",
        "sftp_host": "h",
        "allow_other": True,
        "xattrs": "no",  # later values win; mount_options converts the text
        "cache_size": "5G",
    }
    assert fuse == ["auto_unmount", "max_read=65536"]


def test_split_fuse_o_drops_mount_bookkeeping_and_keeps_restrictive_flags() -> None:
    scicat, fuse = split_fuse_o(
        ["rw,ro,defaults,dev,suid,exec,auto,noauto,user,users,nouser,_netdev,nofail,"
         "x-systemd.automount,comment=x,user=bob,nodev,nosuid,noexec,noatime"]
    )
    assert scicat == {}
    assert fuse == ["nodev", "nosuid", "noexec", "noatime"]


def test_split_fuse_o_escaped_commas_and_profile() -> None:
    scicat, fuse = split_fuse_o([r"token_file=/a\,b,fsname=x\\y,profile=ess,config=/etc/s.toml"])
    assert scicat == {"token_file": "/a,b", "profile": "ess", "config": "/etc/s.toml"}
    assert fuse == ["fsname=x\\y"]


@pytest.mark.parametrize(("values", "match"), [(["token_file"], "needs a value"), (["fuse_options=a"], "directly")])
def test_split_fuse_o_errors(values: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_fuse_o(values)


def test_o_values_flow_into_mount_options(tmp_path: Path) -> None:
    scicat, fuse = split_fuse_o(["sftp_port=2200,xattrs,auto_unmount"])
    options = _options(tmp_path, **scicat, fuse_options=tuple(fuse))
    assert (options.sftp_port, options.xattrs, options.fuse_options) == (2200, True, ("auto_unmount",))


def test_shared_cache_and_metrics_from_o_and_profile(tmp_path: Path) -> None:
    scicat, fuse = split_fuse_o(["shared_cache=/cluster/scicatfs,metrics-port=9478,metrics_textfile=m.prom"])
    options = _options(tmp_path, **scicat)
    assert not fuse
    assert (options.shared_cache, options.metrics_port) == (Path("/cluster/scicatfs"), 9478)
    assert options.metrics_textfile == Path.cwd() / "m.prom"
    config = write_config(tmp_path, '''
        [profiles.node]
        url = "http://127.0.0.1:3000/api/v3"
        shared_cache = "shared"
        metrics_port = 9100
        ''')  # fmt: skip
    assert load_profile("node", config) == {
        "url": "http://127.0.0.1:3000/api/v3", "shared_cache": tmp_path / "shared", "metrics_port": 9100,
    }


# ---------------------------------------------------------- mount.fuse3


def test_helper_argv_with_url_source() -> None:
    argv = ["https://scicat.ess.eu/api/v3", "/mnt/scicat", "-o", "ro,token_file=/etc/t,sftp_host=login.esss.dk,dev,suid"]
    assert helper_argv_to_cli(argv) == [
        "mount", "/mnt/scicat", "--url", "https://scicat.ess.eu/api/v3",
        "-o", "token_file=/etc/t,sftp_host=login.esss.dk",
    ]


def test_helper_argv_with_profile_source_and_old_style_prefix() -> None:
    assert helper_argv_to_cli(["scicatfs#ess", "/mnt/s", "-o", "dev,suid"]) == ["mount", "/mnt/s", "--profile", "ess"]
    assert helper_argv_to_cli(["", "/mnt/s", "-oprofile=ess,xattrs"]) == [
        "mount", "/mnt/s", "--profile", "ess", "-o", "xattrs"
    ]
    assert helper_argv_to_cli(["https://a.example", "/m", "-o", "profile=p,url=https://a.example"]) == [
        "mount", "/m", "--profile", "p", "--url", "https://a.example"
    ]


def test_helper_argv_keeps_escaped_commas() -> None:
    cli = helper_argv_to_cli(["https://a.example", "/m", "-o", r"token_file=/a\,b,nodev"])
    assert cli[-1] == r"token_file=/a\,b,nodev"
    assert split_fuse_o([cli[-1]]) == ({"token_file": "/a,b"}, ["nodev"])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["/mnt"], "exactly SOURCE and MOUNTPOINT"),
        (["a", "b", "c"], "exactly SOURCE and MOUNTPOINT"),
        (["https://a", "/m", "-o"], "-o needs a value"),
        (["https://a", "/m", "--foreground"], "unexpected option '--foreground'"),
        (["https://a", "/m", "-o", "url=https://b"], "two catalog URLs"),
        (["ess", "/m", "-o", "profile=psi"], "two profiles"),
    ],
)
def test_helper_argv_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        helper_argv_to_cli(argv)


RECORDER = """#!{python}
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def test_real_mount_fuse3_argv_shapes(tmp_path: Path) -> None:
    """Run libfuse's own mount.fuse3 with a recording ``scicatfs`` first in PATH.

    The recorder stands in for the program only to capture the exact argv
    shapes mount.fuse3 produces; helper_argv_to_cli must turn each into the
    ordinary command line.
    """
    skip_or_fail(missing_program("mount.fuse3", "fuse3"))
    log = tmp_path / "argv.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "scicatfs"
    recorder.write_text(RECORDER.format(python=sys.executable, log=str(log)))
    recorder.chmod(0o755)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    calls = [
        ["https://scicat.ess.eu/api/v3", str(mnt), "-t", "fuse.scicatfs",
         "-o", "ro,noauto,_netdev,user,nofail,token_file=/etc/scicat/token,sftp_host=login.esss.dk,"
               "cache_size=50G,allow_other,x-systemd.automount"],
        ["scicatfs#ess", str(mnt), "-o", "ro,auto,users,xattrs"],
        ["scicatfs#", str(mnt), "-o", "profile=ess,nodev,nosuid"],
    ]
    for call in calls:
        subprocess.run(["mount.fuse3", *call], env=env, check=True, timeout=30)
    recorded = [json.loads(line) for line in log.read_text().splitlines()]
    assert [helper_argv_to_cli(argv) for argv in recorded] == [
        ["mount", str(mnt), "--url", "https://scicat.ess.eu/api/v3",
         "-o", "token_file=/etc/scicat/token,sftp_host=login.esss.dk,cache_size=50G,allow_other"],
        ["mount", str(mnt), "--profile", "ess", "-o", "xattrs"],
        ["mount", str(mnt), "--profile", "ess", "-o", "nodev,nosuid"],
    ]
