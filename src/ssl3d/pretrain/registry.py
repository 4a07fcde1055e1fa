"""Method discovery: every Method subclass in ``methods/*.py`` and ``baselines/*.py`` of this checkout, and every
method an installed package exposes through the entry-point group ``ssl3d.methods``.

Adding a method is one file: discovery finds it, ``ssl3d methods`` lists it, and the contract tests run on it.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

from ssl3d.pretrain.method import Method

CHECKOUT = Path(__file__).resolve().parents[3]
FOLDERS = ("methods", "baselines")


def _methods_in_file(path: Path) -> list[type[Method]]:
    spec = importlib.util.spec_from_file_location(f"ssl3d_{path.parent.name}.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Method) and not inspect.isabstract(obj)
            and obj.__module__ == module.__name__]


@cache
def methods() -> dict[str, type[Method]]:
    """Method name -> class. Two methods with one name is an error naming both places."""
    found: dict[str, tuple[type[Method], str]] = {}

    def add(cls: type[Method], where: str) -> None:
        if cls.name in found and found[cls.name][0] is not cls:
            raise ValueError(f"method name {cls.name!r} is defined twice: {found[cls.name][1]} and {where}")
        found[cls.name] = (cls, where)

    for folder in FOLDERS:
        for path in sorted((CHECKOUT / folder).glob("*.py")):
            if not path.name.startswith("_"):
                for cls in _methods_in_file(path):
                    add(cls, str(path))
    for entry in metadata.entry_points(group="ssl3d.methods"):
        add(entry.load(), f"entry point {entry.value}")
    return {name: cls for name, (cls, _) in sorted(found.items())}


def get_method(name: str) -> type[Method]:
    known = methods()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(known) or 'none'}")
    return known[name]
