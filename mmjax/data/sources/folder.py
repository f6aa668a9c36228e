"""`folder:DIR`: ImageNet-style class folders, DIR/<class>/**/<image>.

label = the index of the class folder in sorted order; the caption is the class name (`_` read
as a space), so a folder set can also feed contrastive training.
"""
from __future__ import annotations

import os

from mmjax.data.sources import base
from mmjax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class FolderSource:
    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise UserError(f"folder: {root!r} is not a directory; pass folder:DIR with DIR/<class>/<images>")
        self.root = root
        self.name = f"folder:{root}"
        folders = (d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.class_names = tuple(sorted(folders))
        self.paths, self.labels = [], []  # relative paths: they are the keys, and pickle small
        for label, class_name in enumerate(self.class_names):
            for path in _images_under(os.path.join(root, class_name)):
                self.paths.append(os.path.relpath(path, root))
                self.labels.append(label)
        if not self.paths:
            raise UserError(f"folder: no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}; "
                            "expected DIR/<class>/<images>")

    def __len__(self) -> int:
        return len(self.paths)

    def texts(self, limit: int) -> list[str]:
        """The captions are the class names: no image file needs opening."""
        return [name.replace("_", " ") for name in self.class_names][:limit]

    def __getitem__(self, index: int) -> dict:
        path, label = self.paths[index], self.labels[index]
        captions = [self.class_names[label].replace("_", " ")]
        try:
            with open(os.path.join(self.root, path), "rb") as f:
                return base.record(path, f.read(), captions, label)
        except FileNotFoundError:  # deleted since the listing
            return base.record(path, None, captions, label, skip="missing_image")


def _images_under(directory: str) -> list[str]:
    """Image files below `directory` (nested folders included), in a fixed order."""
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def open_source(scheme: str, argument: str, data_cfg) -> FolderSource:
    return FolderSource(os.path.expanduser(argument))
