"""Validation of user-given class names: they end up in files, windows and JSON lines."""

from __future__ import annotations

import unicodedata

MAX_NAME_LENGTH = 64


class InvalidClassName(ValueError):
    pass


def name_key(name: str) -> str:
    """The form a class name is stored and looked up in: stripped, Unicode NFC.

    NFC makes "café" typed as one code point (é) and as two (e + combining accent) the same class.
    """
    return unicodedata.normalize("NFC", name.strip())


def validate_class_name(name: object) -> str:
    """Return the name stripped of surrounding spaces and in NFC, or raise InvalidClassName saying why."""
    if not isinstance(name, str):
        raise InvalidClassName(f"class name must be a string, got {type(name).__name__}")
    cleaned = name_key(name)
    if not cleaned:
        raise InvalidClassName("class name is empty")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise InvalidClassName(
            f"class name is {len(cleaned)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if cleaned in (".", ".."):
        raise InvalidClassName(f"class name {cleaned!r} is reserved")
    if "/" in cleaned or "\\" in cleaned:
        raise InvalidClassName(f"class name {cleaned!r} contains a path separator")
    for ch in cleaned:
        if unicodedata.category(ch).startswith("C"):
            raise InvalidClassName(f"class name {cleaned!r} contains a control character (U+{ord(ch):04X})")
    return cleaned
