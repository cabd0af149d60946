"""Errors raised by the data layer (kept free of TensorFlow imports)."""

from __future__ import annotations


class DataNotFoundError(FileNotFoundError):
    """A manual dir or a required data file is missing; the message names where it was expected."""


class CorruptDataError(ValueError):
    """A data file exists but is damaged (wrong sha256, truncated, undecodable member, bad layout)."""
