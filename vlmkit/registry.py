"""Name -> builder tables, so that components are chosen by name, never by sniffing strings.

An unknown name raises a `VlmkitError` that lists the known ones.
"""

from __future__ import annotations

from typing import Any, Callable

from vlmkit.errors import VlmkitError


class Registry:
    """A named table of builders (vision tower kinds, projectors, metrics...)."""

    def __init__(self, what: str):
        self.what = what
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in self._table:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._table[name] = builder
        return builder

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._table:
            raise VlmkitError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._table))}")
        return self._table[name]

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
