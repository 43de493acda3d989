"""Mount options from three sources: command line, config profile, defaults.

A mount is described by one frozen :class:`MountOptions`. It is assembled by
:func:`mount_options` with a fixed precedence, highest first:

1. command-line values that are not ``None`` (``--cache-size 5G``), including
   scicatfs keys given as ``-o key=value`` and split off by :func:`split_fuse_o`;
2. the named profile in ``config.toml`` (:func:`load_profile`);
3. the dataclass defaults.

Every value is validated here, once, so that the layers below never see a
negative TTL or a port of 70000 and the user gets one sentence naming the key
and where it came from instead of a traceback.

The ``mount -t fuse.scicatfs`` / fstab form reaches the program through
libfuse's ``mount.fuse3`` as ``scicatfs SOURCE MOUNTPOINT -o opts``;
:func:`helper_argv_to_cli` rewrites that into the ordinary ``scicatfs mount``
argv (see its docstring and docs/running.md for the mapping).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from scicatfs.sources import SourceRule, parse_rule

__all__ = [
    "ConfigError",
    "LOG_LEVELS",
    "MountOptions",
    "SavedQuery",
    "default_cache_dir",
    "default_config_path",
    "helper_argv_to_cli",
    "load_profile",
    "mount_options",
    "parse_size",
    "split_fuse_o",
]


class ConfigError(ValueError):
    """A configuration value, key or file is unusable; the message says which."""


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/scicatfs``, falling back to ``~/.cache/scicatfs``."""
    return _xdg_dir("XDG_CACHE_HOME", ".cache") / "scicatfs"


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/scicatfs/config.toml``, falling back to ``~/.config/...``."""
    return _xdg_dir("XDG_CONFIG_HOME", ".config") / "scicatfs" / "config.toml"


def _xdg_dir(variable: str, fallback: str) -> Path:
    # The XDG spec says a relative value must be ignored, as if unset.
    value = os.environ.get(variable, "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


@dataclass(frozen=True)
class SavedQuery:
    """One ``[profiles.NAME.views.VIEWNAME]`` table: a catalog filter shown as ``views/VIEWNAME/``.

    ``where`` is the v4 filter language's clause and ``sort`` v4's
    ``{field: "asc"|"desc"}``, both kept as compact JSON text (the mount's
    nodes are hashable values); ``limit`` caps the number of datasets.
    """

    name: str
    where: str
    sort: str = '{"pid":"asc"}'
    limit: int | None = None


@dataclass(frozen=True)
class MountOptions:
    """Everything one mount needs to know, validated (see :func:`mount_options`)."""

    url: str
    mountpoint: Path
    token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    sftp_host: str | None = None
    sftp_port: int | None = None
    sftp_user: str | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    insecure_no_host_key_check: bool = False
    sftp_connections: int = 4
    # --source PREFIX=URL rules, from the profile's [profiles.NAME.sources] table and the
    # command line (a command-line rule replaces the profile's rule for the same prefix)
    sources: tuple[SourceRule, ...] = ()
    http_token_file: Path | None = None  # bearer token for https:// sources (never the catalog's)
    insecure_http: bool = False  # allow http:// sources that are not on this machine
    cache_dir: Path = field(default_factory=default_cache_dir)
    # None: min(10 GiB, 10 % of the cache filesystem), resolved by the mount
    # because only it knows which filesystem the cache ends up on.
    cache_size: int | None = None
    #: A directory on the cluster filesystem that many nodes share as a second tier (cache.shared).
    shared_cache: Path | None = None
    #: Serve Prometheus metrics on 127.0.0.1:PORT (opt-in; needs the ``metrics`` extra).
    metrics_port: int | None = None
    #: Keep a node_exporter textfile (``*.prom``) of the same metrics up to date.
    metrics_textfile: Path | None = None
    record_ttl: float = 60.0
    listing_ttl: float = 30.0
    #: Inodes the kernel holds that stay in memory; the oldest beyond it wait on disk (fs.inodes).
    resident_inodes: int = 50_000
    lookup_timeout: float = 8.0
    #: Seconds a file version that failed verification answers EIO before one verified re-fetch.
    retry_failed: float = 600.0
    xattrs: bool = False
    allow_other: bool = False
    fuse_options: tuple[str, ...] = ()
    foreground: bool = False
    log_level: str = "info"
    #: Append the daemon's log here (default: stderr in the foreground, syslog once detached).
    log_file: Path | None = None
    views: tuple[SavedQuery, ...] = ()


# --------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgtpe]?)(i?b?)\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str) -> int:
    """Parse a byte count such as ``4096``, ``512M``, ``10G``, ``10GiB`` or ``1.5T``.

    Every unit is a power of 1024, whether written ``G``, ``GB`` or ``GiB``, as
    ``du -h``, rclone and sshfs users expect for cache sizes; fractions round
    down to whole bytes. Percentages are not accepted: a share of the cache
    filesystem is what the default (no ``cache_size``) already means.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise ConfigError(
            f"invalid size {text!r}: expected a number of bytes with an optional unit "
            "K, M, G, T, P, E (powers of 1024), e.g. 512M, 10G or 1.5T"
        )
    number, unit = match.group(1), match.group(2).lower()
    # Decimal keeps "1.5T" exact where a float would round.
    return int(Decimal(number) * (1024 ** _SIZE_UNITS[unit]))


# ----------------------------------------------------- field kinds, coercion

_PATH_FIELDS = frozenset(
    {"mountpoint", "token_file", "password_file", "identity_file", "known_hosts", "cache_dir", "http_token_file",
     "shared_cache", "metrics_textfile", "log_file"}
)
_STR_FIELDS = frozenset({"url", "username", "sftp_host", "sftp_user", "log_level"})
_INT_FIELDS = frozenset({"sftp_port", "sftp_connections", "metrics_port", "resident_inodes"})
_FLOAT_FIELDS = frozenset({"record_ttl", "listing_ttl", "lookup_timeout", "retry_failed"})
_BOOL_FIELDS = frozenset({"insecure_no_host_key_check", "insecure_http", "xattrs", "allow_other", "foreground"})
_FIELDS = frozenset(f.name for f in dataclasses.fields(MountOptions))

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _key(name: str) -> str:
    """Accept ``cache-size`` and ``cache_size`` alike."""
    return name.strip().replace("-", "_")


def _coerce(name: str, value: object, where: str, *, from_text: bool) -> object:
    """Turn ``value`` into the type of field ``name``, or explain what is wrong.

    ``from_text`` allows strings for every kind (command line, ``-o``); a TOML
    profile has real types, so there a string port or a quoted boolean is an
    error rather than a guess.
    """

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{name} {where}: expected {expected}, got {value!r}")

    text = value if isinstance(value, str) and from_text else None
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        if text is not None and text.strip().lower() in _TRUE | _FALSE:
            return text.strip().lower() in _TRUE
        raise wrong("true or false")
    if name in _INT_FIELDS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and text.strip().lstrip("+-").isdigit():
            return int(text)
        raise wrong("a whole number")
    if name in _FLOAT_FIELDS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
        raise wrong("a number of seconds")
    if name == "cache_size":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ConfigError as exc:
                raise ConfigError(f"cache_size {where}: {exc}") from None
        raise wrong('a size such as "10G" or a number of bytes')
    if name == "sources":
        # Kept as "PREFIX=URL" texts until _validate, which knows insecure_http.
        if isinstance(value, str) and from_text:
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and from_text:
            return tuple(value)
        if isinstance(value, Mapping) and not from_text and all(isinstance(v, str) for v in value.values()):
            return tuple(f"{prefix}={url}" for prefix, url in value.items())
        raise wrong("a table of PREFIX = URL" if not from_text else "PREFIX=URL")
    if name == "fuse_options":
        if isinstance(value, str) and from_text:
            return tuple(_split_commas(value))
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise wrong("a list of FUSE option strings")
    if name == "views":
        if from_text:
            raise ConfigError(f"views {where}: saved queries are tables in a profile, "
                              "[profiles.NAME.views.VIEWNAME] with where = {{...}}")
        return _saved_queries(value, where)
    if name in _PATH_FIELDS:
        if isinstance(value, (str, os.PathLike)) and str(value).strip():
            return Path(value).expanduser()
        raise wrong("a path")
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise wrong("a non-empty string")


_SAVED_QUERY_KEYS = frozenset({"where", "sort", "limit"})


def _saved_queries(value: object, where: str) -> tuple[SavedQuery, ...]:
    """The ``views`` table of a profile: one saved query per sub-table, in name order."""
    if not isinstance(value, dict):
        raise ConfigError(f"views {where}: expected [profiles.NAME.views.VIEWNAME] tables")
    queries = []
    for name, table in sorted(value.items()):
        here = f"view {name!r} {where}"
        encoded = name.encode("utf-8", "surrogatepass")
        if name in ("", ".", "..", ".scicat") or "/" in name or "\0" in name or len(encoded) > 255:
            raise ConfigError(f"{here}: the name must be usable as a directory name (no '/', not .scicat)")
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: expected a table with where = {{...}}")
        unknown = sorted(set(table) - _SAVED_QUERY_KEYS)
        if unknown:
            raise ConfigError(f"{here}: unknown key {unknown[0]!r} (known: limit, sort, where)")
        clause = table.get("where")
        if not isinstance(clause, dict) or not clause:
            raise ConfigError(f"{here}: where must be a non-empty table in the catalog's v4 filter "
                              'language, e.g. where = { keywords = "calibration" }')
        _check_saved_where(clause, here)
        sort = table.get("sort", {"pid": "asc"})
        if (not isinstance(sort, dict) or not sort
                or not all(isinstance(direction, str) and direction in ("asc", "desc") for direction in sort.values())):
            raise ConfigError(f'{here}: sort must be a table of field = "asc" or "desc"')
        limit = table.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ConfigError(f"{here}: limit must be a whole number larger than zero")
        queries.append(SavedQuery(name, _json_text(clause, here), _json_text(sort, here), limit))
    return tuple(queries)


#: Dataset fields the catalog stores as dates (backend-next's dataset schema and its timestamps).
_DATE_FIELDS = frozenset({"creationTime", "startTime", "endTime", "createdAt", "updatedAt"})
#: LoopBack's operators, which v4 refuses ("Property where.x.gt should not exist in the filter object").
_LOOPBACK_OPERATORS = frozenset({"gt", "gte", "lt", "lte", "inq", "nin", "neq", "like", "ilike", "between"})


def _check_saved_where(clause: Mapping[str, object], where: str) -> None:
    """Refuse the two mistakes a saved query's ``where`` makes silently or far from here.

    The v4 API hands ``where`` to MongoDB as written: a date field compared
    with a string matches nothing (the view would just stay empty), and a
    LoopBack operator is a 400 at the first listing (the view would be EIO).
    Both were seen on a live backend (docs/scicat-facts.md).
    """
    for name, condition in clause.items():
        if name in ("$and", "$or", "$nor") and isinstance(condition, list):
            for part in condition:
                if isinstance(part, dict):
                    _check_saved_where(part, where)
            continue
        if not isinstance(condition, dict):
            operands: list[object] = [condition]
        else:
            loopback = sorted(set(condition) & _LOOPBACK_OPERATORS)
            if loopback:
                raise ConfigError(f"{where}: {name}.{loopback[0]} is LoopBack's filter language, which the "
                                  f"catalog's v4 API refuses; write ${loopback[0]} (MongoDB's) instead")
            operands = [item for value in condition.values()
                        for item in (value if isinstance(value, list) else [value])]
        if name in _DATE_FIELDS and any(isinstance(operand, str) for operand in operands):
            raise ConfigError(f"{where}: {name} is a date in the catalog and its v4 API sends strings "
                              "unconverted, so a date given as a string matches nothing; select by "
                              "another field (docs/running.md)")


def _json_text(value: object, where: str) -> str:
    """``value`` as compact JSON; TOML dates and times have no JSON form and are refused."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except TypeError:
        raise ConfigError(f"{where}: dates and times cannot be sent to the catalog as they are; "
                          'write them as strings ("2024-01-01T00:00:00Z")') from None


# ------------------------------------------------------------------ profiles


def load_profile(name: str, path: Path | None = None) -> dict[str, object]:
    """Read profile ``name`` from ``[profiles.NAME]`` in the TOML config file.

    Keys are :class:`MountOptions` field names (``cache-size`` and
    ``cache_size`` both work); values carry their TOML types, except sizes,
    which may be strings (``cache_size = "10G"``). Paths get ``~`` expanded
    and relative ones are taken relative to the config file's directory, so a
    profile means the same thing whatever the current directory is. Returns
    the typed values, keyed by field name.
    """
    path = default_config_path() if path is None else Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"profile {name!r}: config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None

    unexpected = sorted(set(document) - {"profiles"})
    if unexpected:
        raise ConfigError(
            f"config file {path}: unknown top-level key {unexpected[0]!r}; "
            "profiles go in [profiles.NAME] tables"
        )
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"config file {path}: 'profiles' must be a table of [profiles.NAME] tables")
    table = profiles.get(name)
    if not isinstance(table, dict):
        available = ", ".join(sorted(k for k, v in profiles.items() if isinstance(v, dict)))
        raise ConfigError(
            f"no profile {name!r} in {path}; available: {available or 'none'}"
        )

    values: dict[str, object] = {}
    where = f"in profile {name!r} of {path}"
    for raw_key, value in table.items():
        key = _key(raw_key)
        if key not in _FIELDS:
            raise ConfigError(f"unknown key {raw_key!r} {where}")
        if key in values:
            raise ConfigError(f"key {key!r} given twice {where}")
        coerced = _coerce(key, value, where, from_text=False)
        if isinstance(coerced, Path) and not coerced.is_absolute():
            coerced = path.parent / coerced
        values[key] = coerced
    return values


# ------------------------------------------------------- -o and mount.fuse3

# Options that mount(8) / mount.fuse3 add or keep for their own bookkeeping and
# that mean nothing to a read-only network filesystem: scicatfs is always ro,
# and dev/suid/exec are what not asking for nodev/nosuid/noexec means anyway
# (mount.fuse3 appends "dev,suid" for root). The restrictive forms
# (nodev, nosuid, noexec, noatime, ...) are real kernel flags and pass through.
_DROPPED = frozenset(
    {
        "rw", "ro", "defaults", "dev", "suid", "exec", "auto", "noauto",
        "user", "nouser", "users", "owner", "group", "_netdev", "nofail",
    }
)
_DROPPED_PREFIXES = ("x-", "comment=", "user=", "uhelper=", "helper=")

# scicatfs keys that -o accepts besides the MountOptions fields, so that an
# fstab line can name a profile and the file it is in.
_EXTRA_O_KEYS = frozenset({"profile", "config"})


def _split_commas(text: str) -> list[str]:
    """Split an ``-o`` string at commas, honouring libfuse's ``\\,`` escape."""
    items: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, "\\"))
        elif char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item for item in (i.strip() for i in items) if item]


def _escape(item: str) -> str:
    return item.replace("\\", "\\\\").replace(",", "\\,")


def _dropped(option: str) -> bool:
    return option in _DROPPED or option.startswith(_DROPPED_PREFIXES)


def split_fuse_o(values: Iterable[str]) -> tuple[dict[str, str | bool | list[str]], list[str]]:
    """Sort ``-o`` values into scicatfs keys and options for FUSE.

    ``["token_file=/x,sftp_host=h,ro,allow_other,xattrs,auto_unmount"]`` gives
    ``({"token_file": "/x", "sftp_host": "h", "allow_other": True,
    "xattrs": True}, ["auto_unmount"])``. A key is scicatfs's when it names a
    :class:`MountOptions` field (``-`` or ``_``) or is ``profile`` or
    ``config`` (the config file); a bare flag is ``True`` and ``flag=no``
    is allowed. Mount-table bookkeeping
    (``rw``, ``ro``, ``defaults``, ``dev``, ``suid``, ``exec``, ``_netdev``,
    ``noauto``, ``nofail``, ``user``, ``x-*``, ``comment=``) is dropped;
    everything else goes to FUSE unchanged, in order, where an unknown option
    fails the mount with FUSE's own message. Later values win, except
    ``source=PREFIX=URL``, which may repeat and gives the list ``"sources"``.
    """
    scicat: dict[str, str | bool | list[str]] = {}
    fuse: list[str] = []
    sources: list[str] = []
    for value in values:
        for option in _split_commas(value):
            name, sep, argument = option.partition("=")
            key = _key(name)
            if key == "source":  # repeatable, like --source
                if not argument.strip():
                    raise ConfigError("-o source needs a rule: source=PREFIX=URL")
                sources.append(argument)
            elif key in _FIELDS or key in _EXTRA_O_KEYS:
                if key == "fuse_options":
                    raise ConfigError("-o fuse_options is not a thing: give FUSE options to -o directly")
                if not sep and key not in _BOOL_FIELDS:
                    raise ConfigError(f"-o {name} needs a value: {name}=...")
                scicat[key] = argument if sep else True
            elif not _dropped(option):
                fuse.append(option)
    if sources:
        scicat["sources"] = sources
    return scicat, fuse


def _take(options: list[str], key: str) -> tuple[str | None, list[str]]:
    """Remove every ``key=value`` from ``options``; return the last value and the rest."""
    value: str | None = None
    rest: list[str] = []
    for option in options:
        name, _, argument = option.partition("=")
        if _key(name) == key:
            value = argument
        else:
            rest.append(option)
    return value, rest


def helper_argv_to_cli(argv: list[str]) -> list[str]:
    """Rewrite the mount-helper call into an ordinary ``scicatfs mount`` argv.

    ``mount -t fuse.scicatfs SOURCE /mnt -o opts`` and the matching fstab line
    make mount(8) run libfuse's ``mount.fuse3``, which strips ``_netdev``,
    ``noauto``, ``nofail``, ``user(s)``, ``setuid=`` and ``x-*`` (mount(8)
    already drops most of them), may append ``dev,suid``, and runs
    ``scicatfs SOURCE MOUNTPOINT -o opts`` through ``/bin/sh`` with a fixed
    PATH. ``argv`` is that call without the program name.

    SOURCE is the catalog URL when it contains ``://``; otherwise it names a
    profile (``mount -t fuse.scicatfs ess /mnt/scicat``); empty (``scicatfs#``
    with nothing after it) means neither. An old-style ``scicatfs#`` prefix
    is removed. The result is ``["mount", MOUNTPOINT, "--url", URL |
    "--profile", NAME, "-o", REST]``: every other option stays in ``-o``,
    with mount bookkeeping dropped, so the normal parser maps it through
    :func:`split_fuse_o` exactly as for ``scicatfs mount -o ...``.
    """
    positionals: list[str] = []
    o_values: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "-o":
            value = next(items, None)
            if value is None:
                raise ConfigError("-o needs a value")
            o_values.append(value)
        elif item.startswith("-o"):
            o_values.append(item[2:])
        elif item.startswith("-") and item != "-":
            raise ConfigError(
                f"unexpected option {item!r} in mount-helper form; "
                "expected: scicatfs SOURCE MOUNTPOINT [-o key=value,...]"
            )
        else:
            positionals.append(item)
    if len(positionals) != 2:
        raise ConfigError(
            "mount-helper form expects exactly SOURCE and MOUNTPOINT "
            f"(got {len(positionals)} arguments): scicatfs SOURCE MOUNTPOINT [-o key=value,...]"
        )
    source, mountpoint = positionals
    source = source.removeprefix("scicatfs#")

    options = [o for value in o_values for o in _split_commas(value) if not _dropped(o)]
    profile, options = _take(options, "profile")
    url, options = _take(options, "url")

    if "://" in source:
        if url is not None and url != source:
            raise ConfigError(f"two catalog URLs: source {source!r} and -o url={url!r}")
        url = source
    elif source:
        if profile is not None and profile != source:
            raise ConfigError(f"two profiles: source {source!r} and -o profile={profile!r}")
        profile = source

    cli = ["mount", mountpoint]
    if profile:
        cli += ["--profile", profile]
    if url:
        cli += ["--url", url]
    if options:
        cli += ["-o", ",".join(_escape(o) for o in options)]
    return cli


# -------------------------------------------------------------- assembling


def mount_options(
    cli: Mapping[str, object],
    profile: str | None = None,
    config_path: Path | None = None,
) -> MountOptions:
    """Merge command line, profile and defaults into validated :class:`MountOptions`.

    ``cli`` maps field names (``-`` or ``_``) to values; ``None`` means "not
    given". Keys that are not fields are ignored so that ``vars(args)`` can
    be passed as is, except ``profile`` and ``config`` (or ``config_path``),
    which stand in for the parameters when those are ``None``. Scalars from the
    command line replace the profile's; so does ``fuse_options`` as a whole;
    ``sources`` rules are added to the profile's (the later rule for a prefix wins).
    """
    given = {_key(k): v for k, v in cli.items() if v is not None}
    if profile is None and "profile" in given:
        profile = str(given["profile"])
    if config_path is None:
        config = given.get("config_path", given.get("config"))
        config_path = None if config is None else Path(str(config))

    values: dict[str, object] = {}
    if profile is not None:
        values.update(load_profile(profile, config_path))
    for key, value in given.items():
        if key in _FIELDS:
            coerced = _coerce(key, value, "on the command line", from_text=True)
            if key == "sources":  # added to the profile's; the later rule for a prefix wins
                coerced = (*values.get("sources", ()), *coerced)  # type: ignore[misc]
            values[key] = coerced

    for required, hint in (("url", "--url URL"), ("mountpoint", "a MOUNTPOINT")):
        if required not in values:
            origin = f" or {required} in the profile" if profile else ""
            raise ConfigError(f"no {required} given: pass {hint}{origin}")
    _validate(values)
    for key in _PATH_FIELDS & values.keys():
        values[key] = Path(os.path.abspath(values[key]))  # the daemon leaves the cwd
    return MountOptions(**values)  # type: ignore[arg-type]


def _validate(values: dict[str, object]) -> None:
    url = str(values["url"])
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"catalog URL {url!r} must start with http:// or https:// and name a host")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"catalog URL {url!r} has an invalid port") from None

    for name in ("sftp_port", "metrics_port"):
        port = values.get(name)
        if port is not None and not 1 <= port <= 65535:  # type: ignore[operator]
            raise ConfigError(f"{name} {port} is outside 1-65535")
    connections = values.get("sftp_connections", 1)
    if not 1 <= connections <= 64:  # type: ignore[operator]
        raise ConfigError(f"sftp_connections {connections} must be between 1 and 64")
    resident = values.get("resident_inodes", 1)
    if resident < 1:  # type: ignore[operator]
        raise ConfigError(f"resident_inodes {resident} must be at least 1")
    size = values.get("cache_size")
    if size is not None and size <= 0:  # type: ignore[operator]
        raise ConfigError(f"cache_size {size} must be larger than zero")
    for ttl in ("record_ttl", "listing_ttl", "retry_failed"):
        seconds = values.get(ttl, 0.0)
        if not (math.isfinite(seconds) and seconds >= 0):  # type: ignore[arg-type]
            raise ConfigError(f"{ttl} {seconds} must be a number of seconds >= 0")
    lookup_timeout = values.get("lookup_timeout", 1.0)
    if not (math.isfinite(lookup_timeout) and lookup_timeout > 0):  # type: ignore[arg-type]
        raise ConfigError(f"lookup_timeout {lookup_timeout} must be a number of seconds > 0")
    level = str(values.get("log_level", "info")).lower()
    if level == "warn":
        level = "warning"
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level {values['log_level']!r} is not one of {', '.join(LOG_LEVELS)}")
    values["log_level"] = level
    if values.get("token_file") is not None and values.get("username") is not None:
        raise ConfigError("token_file and username exclude each other: log in with one or the other")
    if values.get("password_file") is not None and values.get("username") is None:
        raise ConfigError("password_file needs a username")
    insecure_http = bool(values.get("insecure_http", False))
    try:
        values["sources"] = tuple(
            parse_rule(text, insecure_http=insecure_http) for text in values.get("sources", ())  # type: ignore[attr-defined]
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
