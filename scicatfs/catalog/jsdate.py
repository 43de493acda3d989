"""Which strings JavaScript's ``new Date(text)`` accepts, and the instant it gives them.

scicat-backend-next's v3 filter pipe turns every string value of a `where`
clause that ``new Date()`` can parse into a Date before it reaches MongoDB.
Node's parser (V8) accepts far more than ISO 8601: ``"noprefix-1"``,
``"run 1"``, ``"x-12"`` and ``"abc 2024"`` are all dates. A pid compared
with such a value matches nothing, and a ``like`` pattern that became a Date
is a 400. The client uses this module to keep the bounds of its v3 range
filters from becoming Dates (see :mod:`scicatfs.catalog.paging`); the demo
server uses it to reproduce the conversion, so the client's defences (also
wrapping patterns as ``^(?:…)``) are tested against the same rules.

The approximation, after V8's documented behaviour (ES5 ISO first, then its
"legacy" parser):

- the ES5 form ``YYYY[-MM[-DD]][THH:mm[:ss[.sss]][Z|±HH:mm]]`` (also ``±YYYYYY``);
- otherwise the string is read as tokens: numbers, words (runs of characters
  from ``A`` upwards), signs, other symbols, and parenthesised text, which is
  skipped. Words before the first number are ignored unless a number follows
  them directly; after a number only month names, ``am``/``pm`` and zone
  names (``utc``, ``gmt``, ``z``, ``est``, …) are allowed. ``n:`` starts a
  time, a lone ``-`` after a number separates date parts, ``+``/``-`` after a
  time or ``UTC`` start an offset, a sign or ``)`` after a number is an error;
- up to three date numbers: ``M D Y``, or ``Y M D`` when the first is not a
  day (1-31), missing parts are 1, a two-digit year is 19xx/20xx, the default
  year is 2001; a month name takes the month's place.

Times without a zone are taken as UTC (the server's zone in a container).
Not modelled: V8 continues a half-read ES5 string with the legacy rules
(``"2024-01-01T10:00+0100"``); here such a string gets the legacy rules alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["parse_js_date"]

_ES5 = re.compile(
    r"(?P<year>[+-]\d{6}|\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2}))?)?"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?", re.ASCII)

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
#: Zone words and their offset from UTC in hours.
_ZONES = {"ut": 0, "utc": 0, "z": 0, "gmt": 0, "cdt": -5, "cst": -6, "edt": -4, "est": -5,
          "mdt": -6, "mst": -7, "pdt": -7, "pst": -8}
_MAX_DIGITS = 9          # V8 keeps the first nine digits of a number
_MS_PER_DAY = 86_400_000
_MAX_MS = 8.64e15        # the ECMAScript time range


class _Invalid(Exception):
    """The text is not a date."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str            # "number", "word", "symbol", "space", "other", "end"
    text: str = ""
    value: int = 0       # numbers: the value of their first nine digits


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() and ch.isascii():
            j = i
            while j < len(text) and text[j].isascii() and text[j].isdigit():
                j += 1
            digits = text[i:j].lstrip("0")[:_MAX_DIGITS]
            tokens.append(_Token("number", text[i:j], int(digits or "0")))
        elif ch in ":-+.)":
            j = i + 1
            tokens.append(_Token("symbol", ch))
        elif ch >= "A" and not ch.isspace():
            j = i
            while j < len(text) and text[j] >= "A" and not text[j].isspace():
                j += 1
            tokens.append(_Token("word", text[i:j].lower()))
        elif ch.isspace():
            j = i
            while j < len(text) and text[j].isspace():
                j += 1
            tokens.append(_Token("space"))
        elif ch == "(":
            depth, j = 0, i
            while j < len(text):
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            tokens.append(_Token("other"))
        else:
            j = i + 1
            tokens.append(_Token("other"))
        i = j
    tokens.append(_Token("end"))
    return tokens


def _month_of(word: str) -> int | None:
    """Any word starting with a month's first three letters names that month."""
    return _MONTHS.index(word[:3]) + 1 if len(word) >= 3 and word[:3] in _MONTHS else None


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date; day may overflow its month."""
    year += (month - 1) // 12
    month = (month - 1) % 12 + 1
    shifted = year - (month <= 2)
    era = shifted // 400
    year_of_era = shifted - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468 + day - 1


def _epoch_ms(year: int, month: int, day: int, hour: int, minute: int, second: int, ms: int,
              offset_minutes: int) -> float:
    days = _days_from_civil(year, month, day)
    moment = days * _MS_PER_DAY + ((hour * 60 + minute - offset_minutes) * 60 + second) * 1000 + ms
    if abs(moment) > _MAX_MS:
        raise _Invalid
    return float(moment)


def _es5(match: re.Match[str]) -> float:
    year = int(match["year"])
    if match["year"] == "-000000":
        raise _Invalid
    month, day = int(match["month"] or 1), int(match["day"] or 1)
    hour, minute, second = (int(match[name] or 0) for name in ("hour", "minute", "second"))
    ms = int((match["fraction"] or "0")[:3].ljust(3, "0"))
    if not (1 <= month <= 12 and 1 <= day <= 31 and minute < 60 and second < 60):
        raise _Invalid
    if hour > 24 or (hour == 24 and (minute or second or ms)):
        raise _Invalid
    offset = 0
    zone = match["zone"]
    if zone and zone != "Z":
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise _Invalid
        offset = (hours * 60 + minutes) * (-1 if zone[0] == "-" else 1)
    return _epoch_ms(year, month, day, hour, minute, second, ms, offset)


class _Legacy:
    """V8's fallback grammar, one token at a time."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.at = 0
        self.day: list[int] = []
        self.named_month: int | None = None
        self.time: list[int] = []
        self.hour_offset: int | None = None       # 0 for am, 12 for pm
        self.zone_sign: int | None = None
        self.zone_hour: int | None = None
        self.zone_minute: int | None = None

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def next(self) -> _Token:
        token = self.tokens[self.at]
        self.at += token.kind != "end"
        return token

    def skip(self, symbol: str) -> bool:
        if self.peek().kind == "symbol" and self.peek().text == symbol:
            self.next()
            return True
        return False

    def time_expects(self, n: int) -> bool:
        return ((len(self.time) in (1, 2) and 0 <= n < 60) or (len(self.time) == 3 and 0 <= n < 1000))

    def add_time(self, n: int, final: bool = False) -> None:
        if len(self.time) >= 4:
            raise _Invalid
        self.time.append(n)
        if final:
            self.time += [0] * (4 - len(self.time))

    def zone_is_utc(self) -> bool:
        return self.zone_hour == 0 and self.zone_minute == 0

    def parse(self) -> float:
        read_number = False
        while (token := self.next()).kind != "end":
            if token.kind == "number":
                read_number = True
                self.number(token)
            elif token.kind == "word":
                self.word(token.text, read_number)
            elif token.kind == "symbol" and token.text in "+-" and (self.zone_is_utc() or self.time):
                read_number = True
                self.offset(-1 if token.text == "-" else 1)
            elif token.kind == "symbol" and token.text in "+-)" and read_number:
                raise _Invalid
        return self.result()

    def number(self, token: _Token) -> None:
        n = token.value
        if self.skip(":"):
            if self.skip(":"):
                if self.time:
                    raise _Invalid
                self.add_time(n)
                self.add_time(0)
            else:
                self.add_time(n)
                self.skip(".")
        elif self.skip(".") and self.time_expects(n):
            self.add_time(n)
            if self.peek().kind != "number":
                raise _Invalid
            fraction = self.next().text
            self.add_time(int(fraction[:3].ljust(3, "0")), final=True)
        elif self.zone_hour is not None and self.zone_minute is None and 0 <= n < 60:
            self.zone_minute = n
        elif self.time_expects(n):
            self.add_time(n, final=True)
            after = self.peek()
            if not (after.kind in ("end", "space") or (after.kind == "word" and after.text == "z")
                    or (after.kind == "symbol" and after.text in "+-")):
                raise _Invalid
        else:
            if len(self.day) == 3:
                raise _Invalid
            self.day.append(n)
            self.skip("-")

    def word(self, word: str, read_number: bool) -> None:
        month = _month_of(word)
        if word in ("am", "pm") and self.time:
            self.hour_offset = 0 if word == "am" else 12
        elif month is not None:
            self.named_month = month
            self.skip("-")
        elif word in _ZONES and read_number:
            offset = _ZONES[word]
            self.zone_sign, self.zone_hour, self.zone_minute = (-1 if offset < 0 else 1), abs(offset), 0
        elif read_number or self.peek().kind == "number":
            raise _Invalid        # garbage after a number, or glued to the first one

    def offset(self, sign: int) -> None:
        self.zone_sign = sign
        n, length = 0, 0
        if self.peek().kind == "number":
            token = self.next()
            n, length = token.value, len(token.text)
        if self.peek().kind == "symbol" and self.peek().text == ":":
            self.zone_hour, self.zone_minute = n, None
        elif length in (1, 2):
            self.zone_hour, self.zone_minute = n, 0
        elif length in (3, 4):
            self.zone_hour, self.zone_minute = n // 100, n % 100
        else:
            raise _Invalid

    def result(self) -> float:
        if not self.day:
            raise _Invalid
        first, second, third = self.day + [1] * (3 - len(self.day))
        if self.named_month is None:
            if not 1 <= first <= 31:
                year, month, day = first, second, third
            else:
                month, day, year = first, second, third
        else:
            month = self.named_month
            year, day = (first, second) if not 1 <= first <= 31 else (second, first)
        if 0 <= year <= 49:
            year += 2000
        elif 50 <= year <= 99:
            year += 1900
        if not (1 <= month <= 12 and 1 <= day <= 31):
            raise _Invalid
        hour, minute, second_, ms = self.time + [0] * (4 - len(self.time))
        if self.hour_offset is not None:
            if not 0 <= hour <= 12:
                raise _Invalid
            hour = hour % 12 + self.hour_offset
        if not (0 <= minute < 60 and 0 <= second_ < 60 and 0 <= ms < 1000):
            raise _Invalid
        if not (0 <= hour < 24 or (hour == 24 and not (minute or second_ or ms))):
            raise _Invalid
        offset = 0
        if self.zone_sign is not None:
            offset = self.zone_sign * ((self.zone_hour or 0) * 60 + (self.zone_minute or 0))
        return _epoch_ms(year, month, day, hour, minute, second_, ms, offset)


def parse_js_date(text: str) -> float | None:
    """Milliseconds since the epoch that ``new Date(text).getTime()`` gives, or None for NaN."""
    match = _ES5.fullmatch(text)
    try:
        return _es5(match) if match else _Legacy(_tokens(text)).parse()
    except _Invalid:
        return None
