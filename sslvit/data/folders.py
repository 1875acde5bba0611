"""Image folders: class subfolders (searched recursively) give labels; symlinks are followed once.

A symlinked folder is scanned the first time it is reached; a link back to a folder already scanned (a loop, or a
second link to the same folder), or to a folder that contains the data set, is not followed. A symlinked image file
whose target is counted already is left out. Each real image is counted once, and the links left out are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslvit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class FolderScan:
    """What :func:`scan_folder` found."""

    files: list[str]  # image files, in a fixed order (sorted, depth first)
    labels: np.ndarray | None  # (N,) int64 class index of each file, or None for a flat folder
    class_names: list[str] | None
    ignored: int  # other files (not images, or loose files beside class folders)
    links_not_followed: list[str] = field(default_factory=list)  # symlinks to folders or images already counted

    def note(self) -> str:
        """What a description says besides the count: files ignored, links not followed."""
        notes = [f"{self.ignored} other files ignored"] * bool(self.ignored)
        if self.links_not_followed:
            notes.append(f"{len(self.links_not_followed)} symlinks to images or folders already counted not followed")
        return f" ({'; '.join(notes)})" if notes else ""


def scan_folder(root: Path) -> FolderScan:
    """List the images under ``root`` without reading any of them.

    Raises:
        DataError: no image under ``root``.
    """
    root_real = os.path.realpath(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loops = [name for name in folders if _holds(os.path.realpath(root / name), root_real)]  # a link to root or above
    classes = [name for name in folders if name not in loops]
    # loose files beside class folders belong to no class: ignore them (and count them) like the rest
    ignored = sum(1 for p in root.iterdir() if p.is_file()) if classes else 0
    tops = [str(root / c) for c in classes] or [str(root)]
    walk = _Walk(root_real, [os.path.realpath(t) for t in tops])
    if classes:  # (a flat folder's walk finds its loops itself)
        walk.not_followed += [str(root / name) for name in loops]
    for label, top in enumerate(tops):
        walk.folder(top, label, top=True)
    files, labels = walk.drop_duplicate_links()
    if not files:
        raise DataError(f"no images in {root}; accepted extensions: {' '.join(IMAGE_EXTENSIONS)}")
    labels_array = np.asarray(labels, dtype=np.int64) if classes else None
    return FolderScan(files, labels_array, classes or None, ignored + walk.ignored, walk.not_followed)


class _Walk:
    """A depth-first walk in the order of ``os.walk(followlinks=True)`` with sorted names, each real folder once.

    ``tops`` are the real paths of the class folders (or of the root of a flat folder): a link into another class's
    folder is left for that class. A link to the root or to a folder above it is a loop.
    """

    def __init__(self, root_real: str, tops: list[str]) -> None:
        self.root_real, self.tops = root_real, set(tops)
        self.walked: set[str] = set()  # real paths of the folders scanned
        self.files: list[str] = []
        self.labels: list[int] = []
        self.linked: list[int] = []  # indices into files of the symlinked image files
        self.ignored = 0
        self.not_followed: list[str] = []

    def folder(self, path: str, label: int, top: bool = False) -> None:
        """Scan ``path`` and, depth first, its subfolders, unless its real folder is scanned already or loops."""
        real = os.path.realpath(path)
        loops = _holds(real, self.root_real) and not (top and real == self.root_real)  # the root or above it
        if loops or real in self.walked or (real in self.tops and not top):
            self.not_followed.append(path)
            return
        self.walked.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:  # an unreadable folder is passed over, as os.walk does
            return
        folders = []
        for entry in entries:
            if _is_dir(entry):
                if not entry.name.startswith("."):  # .git, .ipynb_checkpoints
                    folders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if entry.is_symlink():
                    self.linked.append(len(self.files))
                self.files.append(entry.path)
                self.labels.append(label)
            else:
                self.ignored += 1
        for sub in folders:
            self.folder(sub, label)

    def drop_duplicate_links(self) -> tuple[list[str], list[int]]:
        """Files and labels without the symlinked images whose target is counted already (or linked twice)."""
        drop, targets = set(), set()
        for i in self.linked:
            target = os.path.realpath(self.files[i])
            counted = os.path.dirname(target) in self.walked and target.lower().endswith(IMAGE_EXTENSIONS)
            if (counted and os.path.isfile(target)) or target in targets:
                drop.add(i)
                self.not_followed.append(self.files[i])
            targets.add(target)
        if not drop:
            return self.files, self.labels
        keep = [i for i in range(len(self.files)) if i not in drop]
        return [self.files[i] for i in keep], [self.labels[i] for i in keep]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, as os.walk does
    except OSError:
        return False


def _holds(folder: str, root: str) -> bool:
    """Whether real path ``folder`` is ``root`` or one of its parents: following a link to it loops."""
    return root == folder or root.startswith(folder.rstrip(os.sep) + os.sep)
