"""The sibling packages ds-train can use when they are installed (ds-pipe, ds-moe), found without mistaking
another folder of the same name for them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["installed_sibling"]


def installed_sibling(name: str) -> ModuleType | None:
    """The imported package ``name``, or ``None`` when it is not installed.

    A folder named ``name`` without ``__init__.py`` anywhere on ``sys.path`` (``tests/ds_pipe`` when a test
    runner puts ``tests/`` there) imports as an empty namespace package; that is not the package, and
    treating it as one would hand out a module with none of its names. A real package has a ``__file__``."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name != name:  # the package is there but broken: its own error is the useful one
            raise
        return None
    if getattr(module, "__file__", None) is None:
        return None
    return module
