"""Split a JSON array file into its elements' bytes without loading the file whole.

A small scanner finds where each top-level element ends (tracking strings, escapes and nesting);
each element is then parsed on its own by orjson. Memory is one element plus one read chunk, so a
multi-GB array streams like a JSON Lines file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO, Literal

_STRUCT = re.compile(rb'["\[\]{},]')
# The rest of a string body; stops at the closing quote, or before a backslash split by the chunk edge.
# Used with match() only, which cannot fail here: nothing backtracks, so no possessive quantifiers
# (Python 3.11+) are needed.
_STR_BODY = re.compile(rb'(?:[^"\\]+|\\.)*', re.S)
_QUOTE, _BACKSLASH, _COMMA = ord('"'), ord("\\"), ord(",")
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")
_BOM = b"\xef\xbb\xbf"

Piece = tuple[int, Literal["row", "big", "bad"], "bytes | int | str"]


def split_array(f: BinaryIO, limit: int, chunk_size: int = 1 << 20) -> Iterator[Piece]:
    """Yield (row number from 1, kind, value): ("row", element bytes), ("big", element size) for an
    element over `limit` bytes (its bytes are dropped as they are scanned), or ("bad", reason) for
    structural damage: an empty element, a missing ']', data after the array."""
    buf = bytearray(f.read(chunk_size))
    if buf.startswith(_BOM):
        del buf[:3]
    pos = len(buf) - len(buf.lstrip())
    if pos == len(buf) or buf[pos] != ord("["):
        yield 1, "bad", "file is not a JSON array (it does not start with '[')"
        return
    pos += 1
    start = pos  # where the current element begins in buf
    dropped = 0  # bytes of the current element already discarded because it is over the limit
    row, depth, in_str, need_more, eof = 1, 0, False, False, False
    while True:
        if pos >= len(buf) or need_more:
            if eof:
                if in_str or depth > 0:
                    yield row, "bad", "file ends inside this row (missing closing quote, '}' or ']')"
                    return
                # The last element is complete; only the array's ']' is missing (the file may be cut).
                if dropped:
                    yield row, "big", dropped + len(buf) - start
                    row += 1
                elif buf[start:].strip():
                    yield row, "row", bytes(buf[start:])
                    row += 1
                yield row, "bad", "file ends before the closing ']' of the array (is it cut short?)"
                return
            del buf[:start]
            pos -= start
            start = 0
            data = f.read(chunk_size)
            eof = not data
            buf.extend(data)
            need_more = False
            continue
        if in_str:
            pos = _STR_BODY.match(buf, pos).end()  # type: ignore[union-attr]
            if pos < len(buf):
                if buf[pos] == _QUOTE:
                    in_str = False
                    pos += 1
                else:  # a backslash whose escaped byte is in the next chunk
                    need_more = True
        else:
            m = _STRUCT.search(buf, pos)
            if m is None:
                pos = len(buf)
            else:
                c = buf[m.start()]
                pos = m.end()
                if c == _QUOTE:
                    in_str = True
                elif c in _OPEN:
                    depth += 1
                elif c in _CLOSE and depth > 0:
                    depth -= 1
                elif (c == _COMMA and depth == 0) or c in _CLOSE:
                    closed = c != _COMMA
                    elem = buf[start : m.start()]
                    if dropped:
                        yield row, "big", dropped + len(elem)
                    elif elem.strip():
                        yield row, "row", bytes(elem)
                    elif not (closed and row == 1):  # "[]" is an empty array, not an empty element
                        yield row, "bad", "empty element in the JSON array (a stray or trailing comma)"
                    row += 1
                    start, dropped = pos, 0
                    if closed:
                        yield from _after_array(f, buf[pos:], row, chunk_size)
                        return
        if pos - start + dropped > limit:
            dropped += pos - start
            del buf[:pos]
            start = pos = 0


def _after_array(f: BinaryIO, rest: bytearray, row: int, chunk_size: int) -> Iterator[Piece]:
    while True:
        if rest.strip():
            yield row, "bad", "unexpected data after the closing ']' of the array"
            return
        rest = bytearray(f.read(chunk_size))
        if not rest:
            return
