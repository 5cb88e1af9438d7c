"""The one door every image file passes on its way to training, scoring, calibration or an accuracy check.

A file is opened without blocking and refused unread unless it is a regular file (a FIFO named
`x.jpg` must not hang a loader, `/dev/zero` must not fill memory); its pixel count is read from the
header and checked against an explicit limit before anything is decoded (a 225-megapixel PNG of
27 KB is a decompression bomb); a file that does not decode, or is cut short, is one line
naming it; and the tensor the transform makes must be finite. `ImageFiles` is torchvision's
ImageFolder with that reader, and with a folder scan that refuses symlink loops instead of walking
them until the path is too long.

By default a bad file stops the run (`ImageReader("error")`). With `ImageReader("skip")` (the CLI:
HWAWARE_BAD_IMAGES=skip) the scan opens each file's header and leaves out, counting them, the files it
already shows bad (not a regular file, too large, not an image, a bomb). A file that fails only while
decoding still stops the run, naming it: leaving it out then would change which images an epoch, a
resumed run or a score's fingerprinted image set holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from hwaware.errors import HwawareError
from hwaware.io import excerpt

__all__ = ["MAX_IMAGE_PIXELS", "MAX_IMAGE_BYTES", "BAD_IMAGE_POLICIES", "BadImageError", "ImageReader",
           "ImageFiles", "read_image", "check_image_header", "scan_image_folder"]

# Pillow's own default for MAX_IMAGE_PIXELS (~89.5 M pixels: a 24-bit image of 256 MiB, 9459 x 9459), stated
# here rather than read from Pillow's global, which any imported library may have raised or switched off.
MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_BYTES = 512 << 20  # one file: far above any photo a ViT trains on, far below a disk image
BAD_IMAGE_POLICIES = ("error", "skip")


class BadImageError(HwawareError):
    """An image file that cannot be trusted: not a regular file, too large, undecodable or non-finite."""

    def __init__(self, path: str | Path, reason: str | None = None):
        if reason is None:  # re-raised from a loader worker: torch hands over its whole report as one string
            path, reason = _from_worker_report(str(path))
        super().__init__(f"image: {path}: {reason}")
        self.path, self.reason = str(path), reason


def _from_worker_report(report: str) -> tuple[str, str]:
    """(path, reason) from the traceback text torch's DataLoader passes when a worker raised BadImageError,
    so the user still reads one line naming the file, not the worker's traceback."""
    marker = f"{BadImageError.__module__}.{BadImageError.__qualname__}: image: "
    lines = [line for line in report.splitlines() if line.startswith(marker)]
    if not lines:
        return "?", report.strip().splitlines()[-1][:200] if report.strip() else "unreadable"
    path, _, reason = lines[-1][len(marker):].rpartition(": ")
    return path, reason


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """The RGB image in `path`, fully decoded; BadImageError naming the file otherwise.

    Checked in this order, each before any more is read: a regular file (opened non-blocking, so a
    FIFO is refused, not waited on), at most `max_bytes`, a header Pillow recognises, at most
    `max_pixels` pixels, then the decode itself (a truncated file is refused, never padded).
    """
    with _opened(path, max_pixels, max_bytes) as image:
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:  # truncated, corrupt data
            raise BadImageError(path, f"cannot decode ({str(exc)[:80] or type(exc).__name__})") from None


def check_image_header(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> None:
    """Every check of `read_image` short of decoding: what a scan can afford for each file."""
    with _opened(path, max_pixels, max_bytes):
        pass


@contextlib.contextmanager
def _opened(path: str | Path, max_pixels: int, max_bytes: int) -> Iterator[Image.Image]:
    """`path` opened by Pillow (header read, pixels not) after the file checks, with its pixel count checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadImageError(path, f"cannot open ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(path, "not a regular file; refusing to read it")
        if info.st_size > max_bytes:
            raise BadImageError(path, f"{info.st_size / 2**20:.1f} MiB, over the limit of {max_bytes >> 20} MiB")
        try:
            with warnings.catch_warnings():  # Pillow's own bomb warning: the check below is ours, and explicit
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f)  # reads the header only
        except Image.DecompressionBombError as exc:  # over twice Pillow's global: refused inside Image.open
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
            raise BadImageError(path, f"{pixels}, over the limit of {max_pixels:,} (a decompression bomb?)") from None
        except Image.UnidentifiedImageError:
            raise BadImageError(path, "not an image Pillow can read") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header that breaks the parser
            raise BadImageError(path, f"cannot decode ({str(exc)[:80] or type(exc).__name__})") from None
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(path, f"{width} x {height} = {width * height:,} pixels, over the limit of "
                                      f"{max_pixels:,} (a decompression bomb?)")
        with image:
            yield image


def check_finite_pixels(sample: Any, path: str | Path) -> Any:
    """`sample` (a tensor from the transform) if every value is finite; BadImageError otherwise."""
    if isinstance(sample, torch.Tensor) and sample.is_floating_point() and not bool(torch.isfinite(sample).all()):
        raise BadImageError(path, "the transform produced non-finite pixel values")
    return sample


class ImageReader:
    """`read_image` with its limits and a policy for bad files found by the scan: "error" refuses them,
    "skip" checks each file's header there and leaves out (and counts) those it shows bad."""

    def __init__(self, bad_images: str = "error", max_pixels: int = MAX_IMAGE_PIXELS,
                 max_bytes: int = MAX_IMAGE_BYTES):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise HwawareError(f"bad_images: must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {excerpt(bad_images)}")
        for name, value in (("max_pixels", max_pixels), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HwawareError(f"{name}: must be a positive integer, got {excerpt(value)}")
        self.bad_images, self.max_pixels, self.max_bytes = bad_images, max_pixels, max_bytes
        self.skipped: list[BadImageError] = []  # what the scan left out, in scan order

    def __call__(self, path: str | Path) -> Image.Image:
        return read_image(path, self.max_pixels, self.max_bytes)

    def admit(self, path: str) -> bool:
        """At the scan: under "skip", False (counted, one warning line) for a file whose header shows it bad."""
        if self.bad_images != "skip":
            return True
        try:
            check_image_header(path, self.max_pixels, self.max_bytes)
            return True
        except BadImageError as exc:
            self.refuse(exc)
            return False

    def refuse(self, error: BadImageError) -> None:
        """Raise `error`, or under "skip" count it and say so on stderr (one line per file)."""
        if self.bad_images != "skip":
            raise error
        self.skipped.append(error)
        count = len(self.skipped)
        print(f"hwaware: warning: skipped {error.path} ({error.reason}); {count} bad image{'s' * (count != 1)} "
              "skipped so far", file=sys.stderr, flush=True)


# ---- the folder scan ----------------------------------------------------------------------------------


def scan_image_folder(directory: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...],
                      reader: ImageReader | None = None) -> list[tuple[str, int]]:
    """(path, class index) of every image under `directory/<class>/`, in torchvision's order.

    Symlinked folders are followed, as torchvision does, but a folder reached twice (a symlink loop,
    or two links to one folder, which would put its images in the set twice) is refused, naming the
    link. An entry with an image extension that is not a regular file (a FIFO, a device, a dangling
    link) is refused unread, or skipped under a skipping `reader`.
    """
    reader = reader or ImageReader()
    directory = os.path.expanduser(str(directory))
    seen: dict[tuple[int, int], str] = {}
    samples, empty = [], []
    for name in sorted(class_to_idx):
        top = os.path.join(directory, name)
        if not os.path.isdir(top):
            continue
        folders = _walk_once(top, extensions, seen, reader)
        found = [(os.path.join(root, f), class_to_idx[name]) for root, files in sorted(folders) for f in files]
        if not found:
            empty.append(name)
        samples += found
    if empty:
        raise HwawareError(f"data: {directory}: no images for the class{'es' * (len(empty) > 1)} "
                           f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
                           f"(image extensions: {', '.join(extensions)})")
    return samples


def _walk_once(top: str, extensions: tuple[str, ...], seen: dict[tuple[int, int], str],
               reader: ImageReader) -> list[tuple[str, list[str]]]:
    """(folder, sorted image names) for `top` and every folder below it, each real folder entered once."""
    folders, stack = [], [top]
    while stack:
        root = stack.pop()
        try:
            info = os.stat(root)
        except OSError as exc:
            raise HwawareError(f"data: cannot read folder {root} ({exc.strerror or exc})") from None
        key = (info.st_dev, info.st_ino)
        if key in seen:
            first = seen[key]
            kind = "a symlink loop" if (root + os.sep).startswith(first + os.sep) else "a second link"
            raise HwawareError(f"data: {root} is {kind} to {first}; an image folder must reach each folder once")
        seen[key] = root
        try:
            entries = sorted(os.scandir(root), key=lambda entry: entry.name)
        except OSError as exc:
            raise HwawareError(f"data: cannot read folder {root} ({exc.strerror or exc})") from None
        files, below = [], []
        for entry in entries:
            if entry.is_dir():  # follows symlinks, as torchvision's scan does
                below.append(entry.path)
            elif entry.name.lower().endswith(extensions):
                if not entry.is_file():
                    reader.refuse(BadImageError(entry.path, "not a regular file; refusing to read it"))
                elif reader.admit(entry.path):
                    files.append(entry.name)
        stack.extend(reversed(below))  # depth first, in name order: the same folder is named in every run
        folders.append((root, files))
    return folders


class ImageFiles(Dataset):
    """torchvision's ImageFolder (same classes, same sample order, same `classes`, `samples`, `targets`)
    read through `ImageReader`, its transform's output checked finite, its scan bounded (`scan_image_folder`).

    torchvision is imported here, not with the module: a loader over digits need not pay for it.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, reader: ImageReader | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

        self.root, self.transform, self.reader = str(root), transform, reader or ImageReader()
        self.classes, self.class_to_idx = find_classes(self.root)
        self.samples = scan_image_folder(self.root, self.class_to_idx, IMG_EXTENSIONS, self.reader)
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.reader(path)
        sample = self.transform(image) if self.transform is not None else image
        return check_finite_pixels(sample, path), target
