"""Opt-in ``deepspeed`` import name for ds-train, in one process only.

The documented way to move a DeepSpeed script over is to change its import lines (``import ds_train as
deepspeed``). For a script that must stay byte-for-byte unchanged, run it through this module::

    python -m ds_train.alias train.py --deepspeed_config ds_config.json
    ds-launch --num_gpus 2 -m ds_train.alias train.py --deepspeed_config ds_config.json
    python -m ds_train.alias -m my_package.train ...

or call :func:`install` before the script imports ``deepspeed``. Inside that process ``import deepspeed`` gives
``ds_train`` and ``deepspeed.X`` gives ``ds_train.X``; a ``deepspeed.X`` that ds-train does not have is a
ModuleNotFoundError naming it.

Why not install a ``deepspeed`` package: it would clash with a real DeepSpeed installed beside ds-train (one of
the two would silently win for every program in the environment). The alias lives only in the process that asks
for it: a real DeepSpeed stays importable everywhere else. When one is installed, the alias says (once, as a
warning) that it shadows it here; when the real one was already imported in this process, :func:`install`
refuses, since two libraries would then answer to one name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import warnings

__all__ = ["install", "uninstall", "is_installed", "main"]

_ALIAS, _TARGET = "deepspeed", "ds_train"


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already imported ``ds_train[.X]`` module for ``deepspeed[.X]``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites __spec__ with the alias's; put it back
        return module

    def exec_module(self, module) -> None:
        if self._spec is not None:
            module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _ALIAS and not fullname.startswith(_ALIAS + "."):
            return None
        target_name = _TARGET + fullname[len(_ALIAS):]
        try:
            found = importlib.util.find_spec(target_name)
        except ModuleNotFoundError:
            found = None
        if found is None:
            raise ModuleNotFoundError(f"No module named {fullname!r}: ds-train has no {target_name} (DeepSpeed's "
                                      f"{fullname} is not supported by ds-train yet; see its README, 'Coming from "
                                      "DeepSpeed')", name=fullname)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(target_name),
                                              is_package=found.submodule_search_locations is not None)


_finder: _AliasFinder | None = None


def is_installed() -> bool:
    return _finder is not None and _finder in sys.meta_path


def install() -> None:
    """Make ``import deepspeed`` resolve to ds-train in this process (see the module docstring)."""
    global _finder
    if is_installed():
        return
    loaded = sys.modules.get(_ALIAS)
    if loaded is not None and not getattr(loaded, "__name__", "").startswith(_TARGET):
        raise RuntimeError(f"the real DeepSpeed is already imported in this process (from "
                           f"{getattr(loaded, '__file__', '?')}); ds_train.alias.install() must run before anything "
                           "imports deepspeed")
    try:
        real = importlib.util.find_spec(_ALIAS)
    except (ImportError, ValueError):
        real = None
    if real is not None:
        warnings.warn(f"ds_train.alias: 'deepspeed' now means ds-train in this process; the DeepSpeed installed at "
                      f"{real.origin} is shadowed here (other processes are unaffected)", stacklevel=2)
    _finder = _AliasFinder()
    sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Undo :func:`install`: ``deepspeed`` and ``deepspeed.*`` leave ``sys.modules`` (ds_train's stay)."""
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None
    for name in [n for n in sys.modules if n == _ALIAS or n.startswith(_ALIAS + ".")]:
        if getattr(sys.modules[name], "__name__", "").startswith(_TARGET):
            del sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    """``python -m ds_train.alias SCRIPT [ARGS...]`` or ``python -m ds_train.alias -m MODULE [ARGS...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m ds_train.alias SCRIPT [ARGS...] | -m MODULE [ARGS...]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage + "\n\nRun a DeepSpeed script unchanged, with 'deepspeed' resolving to ds-train in this process.")
        return 0 if argv else 2
    # launchers put --local_rank=N right after the program (DeepSpeed's and ds-launch's order); it belongs to the
    # script, so it moves behind the script's name
    moved = []
    while argv and (argv[0].startswith("--local_rank") or argv[0].startswith("--local-rank")):
        moved.append(argv.pop(0))
        if "=" not in moved[-1] and argv:
            moved.append(argv.pop(0))
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    argv = argv[:2] + moved + argv[2:] if argv[0] == "-m" else argv[:1] + moved + argv[1:]
    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(usage, file=sys.stderr)
            return 2
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` does
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
