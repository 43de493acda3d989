"""Nodes as short byte strings and back: the keys of the inode table's spilled tier.

A node is a frozen dataclass whose fields are str, int, float, bool, None,
tuples of those, or further frozen dataclasses (a :class:`FileSpec`, the
``home`` of a link). :class:`NodeCodec` writes a node as a class tag and
then, if its fields are all strings without NUL (a dataset, a PID level, a
directory), ``0xff`` and the strings joined by NUL; otherwise each field as
a type byte and its content, strings and tuples with their length in front,
nested nodes the same way. So:

* equal values give equal bytes (nothing depends on object identity or
  interning, as pickle's memo does), so the key of a node finds its row;
* a dataset directory costs 3 bytes more than its PID (pickle: 65 more, and
  five times the time);
* keys of one class share their first byte, so a whole class is one key
  range, and keys of consecutive PIDs are consecutive, so the rows of a
  listing land at the end of the key index.

Class tags are given in the order classes are first met, which is why a
codec and its keys live exactly as long as one mount: nothing here is meant
to be read by another process.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["NodeCodec"]

_STR, _INT, _FLOAT, _NONE, _TRUE, _FALSE, _TUPLE = (bytes((code,)) for code in b"sifnTFu")
_DOUBLE = struct.Struct("<d")
#: After a class tag: the fields follow as strings joined by NUL (a type byte is never 0xff).
_STRINGS = b"\xff"
#: The types written as themselves (every other one is a class with a tag).
_VALUES = frozenset({str, int, float, bool, tuple, type(None)})
#: Class tags are the bytes below this; the type bytes above are letters.
_CLASSES = 0x40


def _length(n: int) -> bytes:
    """``n`` as a varint (one byte below 128, which is every length of a PID or file name part)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


class NodeCodec:
    """Encodes hashable values (see the module docstring) as bytes that compare equal when they do."""

    def __init__(self) -> None:
        self._tags: dict[type, tuple[bytes, Callable[[Any], tuple[Any, ...]], int]] = {}
        self._classes: list[tuple[type, int]] = []  # by tag: the class and its number of fields

    def encode(self, value: Hashable) -> bytes:
        """The key of ``value``; TypeError for a value of a type not described above.

        The joined strings run once for every dataset a listing spills,
        twice as fast as field by field. Only a whole key is written so (the
        joined strings do not say where they end); nodes inside a node are
        written field by field.
        """
        kind = type(value)
        known = self._tags.get(kind)
        if known is None and kind not in _VALUES:
            self.tag(kind)
            known = self._tags[kind]
        if known is not None:
            tag, fields, count = known
            try:
                text = "\0".join(fields(value))
            except TypeError:  # not all strings
                pass
            else:
                if text.count("\0") == count - 1:
                    return tag + _STRINGS + text.encode("utf-8", "surrogatepass")
        out: list[bytes] = []
        self._write(value, out)
        return b"".join(out)

    def tag(self, cls: type) -> bytes:
        """The first byte of every key of a ``cls`` (a key range: ``tag <= key < tag + 1``)."""
        known = self._tags.get(cls)
        if known is None:
            if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
                raise TypeError(f"{cls.__name__} is not a frozen dataclass")
            if len(self._classes) >= _CLASSES:
                raise TypeError(f"more than {_CLASSES} node classes")
            names = [field.name for field in dataclasses.fields(cls)]
            fields: Callable[[Any], tuple[Any, ...]]
            if len(names) > 1:
                fields = operator.attrgetter(*names)
            elif names:
                one = operator.attrgetter(names[0])
                fields = lambda value: (one(value),)  # noqa: E731
            else:
                fields = lambda value: ()  # noqa: E731
            known = self._tags[cls] = (bytes((len(self._classes),)), fields, len(names))
            self._classes.append((cls, len(names)))
        return known[0]

    def _write(self, value: Any, out: list[bytes]) -> None:
        kind = type(value)
        if kind is str:
            data = value.encode("utf-8", "surrogatepass")
            out.append(_STR + _length(len(data)) + data)
        elif kind is tuple:
            out.append(_TUPLE + _length(len(value)))
            for item in value:
                self._write(item, out)
        elif value is None:
            out.append(_NONE)
        elif kind is bool:
            out.append(_TRUE if value else _FALSE)
        elif kind is int:
            data = str(value).encode()
            out.append(_INT + _length(len(data)) + data)
        elif kind is float:
            out.append(_FLOAT + _DOUBLE.pack(value + 0.0))  # -0.0 == 0.0: one key for both
        else:
            tag = self.tag(kind)
            fields = self._tags[kind][1]
            out.append(tag)
            for field in fields(value):
                self._write(field, out)

    def decode(self, key: bytes) -> Any:
        """The value ``key`` was made from (by this codec)."""
        if key[1:2] == _STRINGS:
            return self._classes[key[0]][0](*key[2:].decode("utf-8", "surrogatepass").split("\0"))
        value, end = self._read(key, 0)
        if end != len(key):
            raise ValueError(f"{len(key) - end} bytes after the value in key {key!r}")
        return value

    def _read(self, key: bytes, at: int) -> tuple[Any, int]:
        code = key[at]
        at += 1
        if code >= _CLASSES:
            return _READERS[code](self, key, at)
        cls, count = self._classes[code]
        values = []
        for _ in range(count):
            value, at = self._read(key, at)
            values.append(value)
        return cls(*values), at


def _read_length(key: bytes, at: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        byte = key[at]
        at += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return n, at
        shift += 7


def _read_str(codec: NodeCodec, key: bytes, at: int) -> tuple[str, int]:
    n, at = _read_length(key, at)
    return key[at:at + n].decode("utf-8", "surrogatepass"), at + n


def _read_int(codec: NodeCodec, key: bytes, at: int) -> tuple[int, int]:
    n, at = _read_length(key, at)
    return int(key[at:at + n]), at + n


def _read_float(codec: NodeCodec, key: bytes, at: int) -> tuple[float, int]:
    return _DOUBLE.unpack_from(key, at)[0], at + _DOUBLE.size


def _read_tuple(codec: NodeCodec, key: bytes, at: int) -> tuple[tuple[Any, ...], int]:
    n, at = _read_length(key, at)
    items = []
    for _ in range(n):
        item, at = codec._read(key, at)
        items.append(item)
    return tuple(items), at


_READERS: dict[int, Callable[[NodeCodec, bytes, int], tuple[Any, int]]] = {
    _STR[0]: _read_str,
    _INT[0]: _read_int,
    _FLOAT[0]: _read_float,
    _TUPLE[0]: _read_tuple,
    _NONE[0]: lambda codec, key, at: (None, at),
    _TRUE[0]: lambda codec, key, at: (True, at),
    _FALSE[0]: lambda codec, key, at: (False, at),
}
