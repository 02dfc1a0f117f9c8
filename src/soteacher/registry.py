"""A tiny name -> factory registry.

Every pluggable family (models, datasets, distillers, teacher-training methods) keeps one
``Registry``. Names are lower case; registering a name twice is an error, and looking up an
unknown name raises a ``KeyError`` whose message lists what exists.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

T = TypeVar("T", bound=Callable)


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register()`` or ``@MODELS.register("name")``."""

        def deco(obj: T) -> T:
            key = (name or obj.__name__).lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable:
        key = str(name).lower()
        if key not in self._items:
            raise KeyError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
