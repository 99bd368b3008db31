"""Refuse configs that would import code from outside the project, Lightning and torch.

Like any LightningCLI program, `python -m train` imports whatever a config names: a `class_path` (a data
module, logger, callback, strategy) is imported to be built, and a dotted name given to a callable field
(`LambdaCallback`'s hooks, a strategy's `auto_wrap_policy`) is imported and later called. Importing a
module runs its top-level code, and jsonargparse imports while it parses, so this check runs on the raw
command line and YAML files, before the parser sees them.

`untrusted_names` collects every dotted name in the arguments (`--config` files and inline YAML included)
whose top-level package is installed and not in `TRUSTED_PACKAGES`, plus every `LambdaCallback` (whose
only job is to run the callables it is given). `check_class_paths` raises with the names and the flag that
allows them: `--allow_class_path <package>` (repeatable) for a package of your own. Short class names
(`CSVLogger`) resolve only among classes already imported, so they are safe and not checked.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

TRUSTED_PACKAGES = ("engram_vision", "tokenizers_vq", "train", "sample", "metrics", "study", "lightning",
                    "lightning_fabric", "pytorch_lightning", "torch", "torchvision")
"""Top-level packages a config may name without `--allow_class_path`."""

ALLOW_FLAG = "--allow_class_path"
CODE_RUNNERS = ("LambdaCallback",)
"""Classes whose arguments are callables to run: refused unless their package is allowed explicitly."""

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def split_allow_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(`args` without `--allow_class_path X` / `--allow_class_path=X`, the allowed package prefixes)."""
    rest, allowed = [], []
    items = iter(args)
    for arg in items:
        if arg == ALLOW_FLAG:
            value = next(items, None)
            if value is None:
                raise SystemExit(f"{ALLOW_FLAG} needs a package name, e.g. {ALLOW_FLAG} mylab")
            allowed.append(value)
        elif arg.startswith(ALLOW_FLAG + "="):
            allowed.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, allowed


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _values(args: list[str]) -> Iterator[tuple[str, str]]:
    """(where, text) of every value the arguments hold, YAML files and inline YAML parsed."""
    for index, arg in enumerate(args):
        flag, _, value = arg.partition("=") if arg.startswith("--") and "=" in arg else (arg, "", None)
        if value is None:  # `--flag value`: the value is the next argument
            if not arg.startswith("-"):
                continue
            value = args[index + 1] if index + 1 < len(args) and not args[index + 1].startswith("--") else None
            if value is None:
                continue
        if flag in ("--config", "-c") and Path(value).is_file():
            where, text = value, Path(value).read_text()
        else:
            where, text = flag, value
        try:
            parsed = yaml.safe_load(text) if text.lstrip()[:1] in ("{", "[") or where != flag else text
        except yaml.YAMLError:
            parsed = text
        for string in _strings(parsed):
            yield where, string


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _installed_outside(name: str, allowed: tuple[str, ...]) -> bool:
    if _within(name, allowed):
        return False
    top = name.split(".", 1)[0]
    try:
        return importlib.util.find_spec(top) is not None  # finds the package without importing it
    except (ImportError, ValueError):
        return False


def untrusted_names(args: list[str], allowed: list[str]) -> list[tuple[str, str]]:
    """(where, name) of every name in `args` that would import code outside the trusted packages."""
    trusted = TRUSTED_PACKAGES + tuple(allowed)
    found = []
    for where, string in _values(args):
        string = string.strip()
        # a short class name resolves among imported classes, LambdaCallback among them
        short = string.rsplit(".", 1)[-1]
        runs_code = short in CODE_RUNNERS and not any(
            _within(string, (prefix,)) or prefix.rsplit(".", 1)[-1] == short for prefix in allowed)
        if runs_code or (_DOTTED.match(string) and _installed_outside(string, trusted)):
            found.append((where, string))
    return list(dict.fromkeys(found))


def check_class_paths(args: list[str], allowed: list[str]) -> None:
    """Raise SystemExit naming every untrusted name in `args` (see the module) and how to allow it."""
    found = untrusted_names(args, allowed)
    if found:
        shown = "; ".join(f"{name} (in {where})" for where, name in found)
        packages = sorted({name.split(".", 1)[0] for _, name in found if name.rsplit(".", 1)[-1] not in CODE_RUNNERS})
        raise SystemExit(
            f"refusing to import code a config names outside this project, Lightning and torch: {shown}. A "
            f"config that names a class or function runs its code"
            + ("; if you trust it, allow its package with " + " ".join(f"{ALLOW_FLAG} {package}" for package in packages)
               if packages else "")
            + (" (a LambdaCallback runs the functions it is given: allow it with "
               f"{ALLOW_FLAG} lightning.pytorch.callbacks.LambdaCallback)" if any(
                   name.rsplit(".", 1)[-1] in CODE_RUNNERS for _, name in found) else ""))
