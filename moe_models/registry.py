"""A tiny name -> object registry (after fairseq's registry.py).

One registry per kind of component; registering a name twice is an error and an unknown name is answered with the
list of valid ones, so the study-file validator can quote it.

A registry can know its names before their code is imported (`lazy`: name -> module that registers it), so that
validating a study file never imports torch: the module is imported on the first `get` of one of its names.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    def __init__(self, kind: str, name: str, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


class Registry(Generic[T]):
    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._modules = dict(lazy or {})  # name -> module whose import registers it

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._modules:
            importlib.import_module(self._modules[name])
            if name not in self._entries:
                raise LookupError(f"{self._modules[name]} does not register {self.kind} {name!r}")
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self.names())
        return self._entries[name]

    def check(self, name: str) -> str:
        """`name` if it is registered or declared (nothing is imported), else UnknownNameError with the valid names."""
        if name not in self:
            raise UnknownNameError(self.kind, name, self.names())
        return name

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._modules))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
