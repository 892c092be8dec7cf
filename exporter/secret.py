"""A string holder for the API key that never shows the key in repr, str, logs or tracebacks."""

from __future__ import annotations

from typing import Final, NoReturn

_MASK: Final = "***"


class ApiKey:
    """The Devin API key; only `reveal()` gives the value, and only the HTTP client calls it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ApiKey({_MASK})"

    def __str__(self) -> str:
        return _MASK

    def __format__(self, spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("ApiKey", self._value))

    def __reduce__(self) -> NoReturn:
        # Pickling would copy the secret somewhere we do not control.
        raise TypeError("ApiKey cannot be pickled")
