"""The files of an ImageFolder split (`<split>/<class>/**/<image>`), each real file once, no loop followed.

torchvision's `find_classes` / `make_dataset` walk with `os.walk(followlinks=True)`: a symlink to a parent
folder is followed until the OS gives up (about 40 levels deep), so every image under it is listed dozens of
times, silently; two links to one file, or a class folder linked under two names, count the same image
twice. The functions here keep torchvision's order (sorted classes, then a sorted walk; so indices match
`train.prepare.write_shards`' shard keys) and its rules (symlinks to files and to folders outside the walk are
followed), but raise `DuplicateInputError` naming the paths and the fix for:

- a folder symlink that points back to a folder it is in (a loop),
- a folder or file reached twice (two links, or a link beside its target),
- two class folders whose names differ only in case (they merge on a case-insensitive file system).

Reading and decoding the images is left to `train.data.images`, `train.data.views` and
`train.prepare.write_shards`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

__all__ = ["DuplicateInputError", "find_classes_checked", "make_dataset_checked"]


class DuplicateInputError(ValueError):
    """An input (image file, folder, class name, shard) would be read more than once."""


def find_classes_checked(directory: str | Path) -> tuple[list[str], dict[str, int]]:
    """torchvision's `find_classes` (sorted class folder names and their indices), refusing names that
    differ only in case."""
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    folded: dict[str, str] = {}
    for name in classes:
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise DuplicateInputError(
                f"{directory} has class folders {other!r} and {name!r}, whose names differ only in case: they "
                f"are one class on a case-insensitive file system and two here; merge or rename them")
    return classes, {name: i for i, name in enumerate(classes)}


def _walk(top: str, ancestors: tuple[str, ...], visited: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(folder, file names) under `top`, following folder symlinks but never into a loop or twice."""
    try:
        entries = list(os.scandir(top))
    except OSError:
        return []  # as os.walk: an unreadable folder is left out
    folders, files = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows symlinks, as os.walk(followlinks=True)
        except OSError:
            is_dir = False
        (folders if is_dir else files).append(entry.name)
    found = [(top, files)]
    for name in folders:
        path = os.path.join(top, name)
        real = os.path.realpath(path)
        if real in ancestors:
            raise DuplicateInputError(
                f"{path} links back to {real}, a folder it is inside: following it would list the same "
                f"images again and again; remove the link (or replace it by the folder it should add)")
        if real in visited:
            raise DuplicateInputError(
                f"{path} and {visited[real]} are the same folder ({real}): its images would be counted "
                f"twice; remove one of them")
        visited[real] = path
        found += _walk(path, (*ancestors, real), visited)
    return found


def make_dataset_checked(directory: str | Path, class_to_idx: dict[str, int],
                         extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[tuple[str, int]]:
    """torchvision's `make_dataset(directory, class_to_idx, extensions)`: (path, class index) in its order,
    each real file once (`DuplicateInputError` otherwise, see the module doc)."""
    directory = os.path.expanduser(str(directory))
    top = os.path.realpath(directory)
    visited: dict[str, str] = {top: directory}
    seen: dict[str, str] = {}
    instances, available = [], set()
    for target_class in sorted(class_to_idx):
        target_dir = os.path.join(directory, target_class)
        if not os.path.isdir(target_dir):
            continue
        real = os.path.realpath(target_dir)
        if real in visited:
            raise DuplicateInputError(
                f"class folder {target_dir} is the same folder as {visited[real]} ({real}): its images would "
                f"be counted twice (or under two classes); remove the link")
        visited[real] = target_dir
        for root, fnames in sorted(_walk(target_dir, (top, real), visited)):
            for fname in sorted(fnames):
                path = os.path.join(root, fname)
                if not has_file_allowed_extension(path, extensions):
                    continue
                real_file = os.path.realpath(path)
                if real_file in seen:
                    raise DuplicateInputError(
                        f"{path} and {seen[real_file]} are the same file ({real_file}): the image would be "
                        f"counted twice; remove one of the two (links to files are fine, once each)")
                seen[real_file] = path
                instances.append((path, class_to_idx[target_class]))
                available.add(target_class)
    empty = set(class_to_idx) - available
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                f"Supported extensions are: {', '.join(extensions)}")
    return instances
