"""Lazy public names for a package's ``__init__`` (PEP 562): ``from pkg import name`` imports the
defining module on first use, so importing the package stays cheap (no JAX for a config check).

    __getattr__, __dir__, __all__ = lazy_names(__name__, {"Llama": "dromedary_jax.model.llama"})
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_names(package: str, names: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
    """(``__getattr__``, ``__dir__``, ``__all__``) for ``package`` whose public ``names`` map to
    the module defining each; an unknown name raises AttributeError naming the package."""
    names = dict(names)
    public = sorted(names)

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return public

    return __getattr__, __dir__, public
