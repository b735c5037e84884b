"""Reading the user's text files (data and YAML configs): UTF-8, with or without a byte-order mark.

Anything else (Latin-1, Windows-1252, UTF-16 from a Windows editor) stops with a message that names the file,
the line and byte offset of the first bad byte, and the ``iconv`` command that converts it, instead of a
``UnicodeDecodeError`` traceback.
"""

from __future__ import annotations

from pathlib import Path

_UTF16_32_BOMS = {
    b"\xff\xfe\x00\x00": "utf-32le",
    b"\x00\x00\xfe\xff": "utf-32be",
    b"\xff\xfe": "utf-16le",
    b"\xfe\xff": "utf-16be",
}


def read_utf8(path: str | Path, error: type[Exception] = ValueError) -> str:
    """The file's text, decoded as UTF-8 (a leading BOM is dropped); raises ``error`` if it is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as decode_error:
        raise error(not_utf8_message(path, raw, decode_error.start)) from None


def not_utf8_message(path: str | Path, raw: bytes, offset: int) -> str:
    encoding = _guess_encoding(raw)
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    path = Path(path)
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (
        f"{path}:{line}: the file is not UTF-8 (byte 0x{raw[offset]:02x} at byte offset {offset}, column {column}); "
        f"it looks like {encoding}: convert it, e.g. "
        f"iconv -f {encoding} -t utf-8 {path} > {converted}"
    )


def _guess_encoding(raw: bytes) -> str:
    for bom, name in _UTF16_32_BOMS.items():
        if raw.startswith(bom):
            return name.removesuffix("le").removesuffix("be")  # iconv reads the BOM itself
    head = raw[:4096]
    if head and head.count(0) * 4 >= len(head):  # ASCII text in UTF-16 is every other byte zero
        return "utf-16le" if head[1::2].count(0) > head[0::2].count(0) else "utf-16be"
    # Latin-1 and Windows-1252 agree on letters; 0x80-0x9f are Windows-1252's quotes and dashes.
    return "cp1252" if any(0x80 <= byte <= 0x9F for byte in raw) else "latin1"
