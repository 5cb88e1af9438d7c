"""Datasets and loaders: the embedded `digits`, the offline `animals`, ImageFolder, local CIFAR and `synthetic`.

A dataset spec is one string (`digits`, `animals`, `synthetic`, `imagefolder:PATH`, `cifar10:PATH`,
`cifar100:PATH`) so a checkpoint can record where its supernet learned. Training loaders are
made for exact resume: the order of an epoch is a seeded permutation that can start at any
batch, and each item is augmented under a seed drawn from (seed, epoch, index), so a run
restarted mid-epoch sees the very same pixels, with or without worker processes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from hwaware.errors import HwawareError
from hwaware.io import check_regular_file, read_bytes_file
from hwaware.space import SearchSpace
from hwaware.stopping import ignore_stop_signals_in_worker, kill_workers_at_exit

__all__ = ["build_dataset", "build_loader", "build_run_loader", "dataloader", "ResumableSampler",
           "RepeatedAugmentationSampler", "SPLITS", "mix_seed", "has_split", "dataset_targets", "stratified_sample", "image_ids"]

SPLITS = ("train", "val", "test")
# digits: a fixed stratified 70 / 15 / 15 split; the seed is part of the dataset, not of a run.
DIGITS_SPLIT_SEED = 0
DIGITS_FRACTIONS = (0.70, 0.15, 0.15)
SYNTHETIC_SIZES = {"train": 1024, "val": 256, "test": 256}
CIFAR_VAL_PER_CLASS = {10: 500, 100: 50}  # held out of CIFAR's train set, stratified
# animals: Animal-MNIST 0.4 (PyPI `animal-mnist`, MIT), 10,000 28x28 silhouettes in 10 balanced classes, of which
# 284 occur twice (same pixels, same label): the second copies are dropped so no val/test image is also in train.
# The 9,716 left are split 60 / 20 / 20, so val and test hold ~1,943 images each (one image = 0.05 points): a search
# picks the best of hundreds of subnets on val, and a smaller val let that choice's val-minus-test gap reach ~3
# points on digits.
ANIMALS_PACKAGE = "animal_mnist"
ANIMALS_FILES = {  # file in the wheel's animal_mnist/data/Animal_MNIST/ -> its SHA-256
    "images": ("animal_data_version_3.gz", "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
    "labels": ("animal_label_version_3.gz", "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"),
}
ANIMALS_FRACTIONS = (0.60, 0.20, 0.20)
ANIMALS_SHIFT = 2  # training jitter: random translation by up to this many pixels (zero padded), plus a mirror
# one file of a dataset read whole (animals' arrays, a CIFAR batch: 2.6 and 31 MB): a device, a FIFO or a file
# over this is refused before it is read, wherever the dataset was pointed
DATASET_FILE_MAX_BYTES = 256 << 20


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, epoch, index, rank ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ---- the datasets ---------------------------------------------------------------------------


class DigitsDataset(Dataset):
    """scikit-learn's 1797 real 8x8 handwritten digits as normalised 1x8x8 tensors.

    Pixels are scaled by the train split's mean and std so every split shares one transform.
    No geometric augmentation: on 8x8 digits even a one-pixel random shift slowed a fixed
    subnet from 0.84 to 0.44 val top-1 after 300 steps; the digits recipe regularises with
    label smoothing and weight decay instead.
    """

    def __init__(self, split: str):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = bunch.images.astype(np.float32)  # 0..16 ink
        labels = bunch.target.astype(np.int64)
        index = np.arange(len(labels))
        train_frac, val_frac, test_frac = DIGITS_FRACTIONS
        train_idx, rest = train_test_split(index, train_size=train_frac, stratify=labels, random_state=DIGITS_SPLIT_SEED)
        val_idx, test_idx = train_test_split(
            rest, test_size=test_frac / (val_frac + test_frac), stratify=labels[rest], random_state=DIGITS_SPLIT_SEED
        )
        chosen = {"train": train_idx, "val": val_idx, "test": test_idx}[split]
        train_pixels = images[train_idx]
        self.mean, self.std = float(train_pixels.mean()), float(train_pixels.std())
        self.raw = torch.from_numpy(images[np.sort(chosen)]).unsqueeze(1)  # N x 1 x 8 x 8, raw ink
        self.targets = torch.from_numpy(labels[np.sort(chosen)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.raw[i] - self.mean) / self.std, int(self.targets[i])


class _ArraysOnly(pickle.Unpickler):
    """Admit only what a pickled plain numpy array is made of; any other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refuses {module}.{name}")
        return super().find_class(module, name)


def read_array_pickle(path: Path, sha256: str) -> np.ndarray:
    """A gzip'd pickle of one numeric numpy array, after checking the file's SHA-256; HwawareError otherwise."""
    raw = read_bytes_file(path, "data", DATASET_FILE_MAX_BYTES)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise HwawareError(f"data: {path} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...; reinstall it")
    try:
        array = _ArraysOnly(io.BytesIO(gzip.decompress(raw))).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise HwawareError(f"data: {path} is not a pickled numpy array ({str(exc)[:120]})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise HwawareError(f"data: {path} holds {type(array).__name__} "
                           f"{getattr(array, 'dtype', '')}, not a numeric numpy array")
    return array


def animals_dir() -> Path:
    """Where the installed `animal-mnist` wheel keeps its arrays (found without importing it: it imports tensorflow)."""
    spec = importlib.util.find_spec(ANIMALS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HwawareError("data: animals needs the animal-mnist package; run bash scripts/setup.sh "
                           "(it installs animal-mnist==0.4 without its dependencies)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def load_animals(folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 images (uint8, N x 28 x 28) and labels (0..9), checked for shape and range."""
    folder = animals_dir() if folder is None else folder
    images = read_array_pickle(folder / ANIMALS_FILES["images"][0], ANIMALS_FILES["images"][1])
    labels = read_array_pickle(folder / ANIMALS_FILES["labels"][0], ANIMALS_FILES["labels"][1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise HwawareError(f"data: animals arrays have shapes {images.shape} and {labels.shape}, "
                           "expected N x 28 x 28 and N")
    if labels.min() < 0 or labels.max() > 9:
        raise HwawareError("data: animals labels are outside 0..9")
    return images, labels.astype(np.int64)


class AnimalsDataset(Dataset):
    """Animal-MNIST without its duplicate images, as normalised 1x28x28 tensors, on a fixed stratified 60 / 20 / 20 split.

    Training items (with `augment`) are mirrored half the time and shifted by up to
    `ANIMALS_SHIFT` pixels: a silhouette keeps its class under both, and 6,000 images are
    otherwise memorised by the larger subnets within a few epochs.
    """

    def __init__(self, split: str, augment: bool = False, folder: Path | None = None):
        from sklearn.model_selection import train_test_split

        images, labels = load_animals(folder)
        _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
        index = np.sort(first)
        train_frac, val_frac, test_frac = ANIMALS_FRACTIONS
        train_idx, rest = train_test_split(index, train_size=train_frac, stratify=labels[index], random_state=DIGITS_SPLIT_SEED)
        val_idx, test_idx = train_test_split(
            rest, test_size=test_frac / (val_frac + test_frac), stratify=labels[rest], random_state=DIGITS_SPLIT_SEED
        )
        chosen = np.sort({"train": train_idx, "val": val_idx, "test": test_idx}[split])  # indices into all 10,000
        train_pixels = images[train_idx].astype(np.float32)
        mean, std = float(train_pixels.mean()), float(train_pixels.std())
        self.images = (torch.from_numpy(images[chosen].astype(np.float32)).unsqueeze(1) - mean) / std
        self.targets = torch.from_numpy(labels[chosen])
        self.augment = augment and split == "train"
        self.background = -mean / std  # a blank pixel after normalisation, for the shift's padding

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.augment:
            shift = ANIMALS_SHIFT
            flip, dy, dx = torch.randint(2, (1,)).item(), *torch.randint(-shift, shift + 1, (2,)).tolist()
            if flip:
                image = image.flip(-1)
            padded = F.pad(image, (shift, shift, shift, shift), value=self.background)
            size = image.shape[-1]
            image = padded[:, shift + dy : shift + dy + size, shift + dx : shift + dx + size]
        return image, int(self.targets[i])


class SyntheticDataset(Dataset):
    """Random images and labels of the space's shape: for smoke tests and throughput, not accuracy.

    Item i is generated from seed i, so nothing is held in memory even at 224 px.
    """

    def __init__(self, space: SearchSpace, split: str):
        self.shape = (space.in_chans, space.img_size, space.img_size)
        self.num_classes = space.num_classes
        self.size = SYNTHETIC_SIZES[split]
        self.offset = {"train": 0, "val": 1 << 20, "test": 2 << 20}[split]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(self.offset + i)
        return torch.randn(self.shape, generator=gen), int(torch.randint(self.num_classes, (1,), generator=gen))


def _image_transform(space: SearchSpace, augment: bool, auto_augment: str | None, reprob: float, decoded: bool = False):
    """DeiT / AutoFormer ImageNet transforms from timm: RandAugment + random erasing when training.

    `decoded` (evaluation only): the same resize and crop, but the image stays uint8 (C x H x W at
    the model's resolution, 4x smaller than float32) and the transform carries the `normalize`
    (mean, std) that turns it into exactly what the float transform gives, so a scorer can keep
    decoded images and normalise on its device.
    """
    from timm.data import create_transform
    from torchvision import transforms

    if augment:
        return _posterize_to_zero_bits(create_transform(
            space.img_size, is_training=True, auto_augment=auto_augment, re_prob=reprob, re_mode="pixel",
            interpolation="bicubic",
        ))
    full = create_transform(space.img_size, is_training=False, interpolation="bicubic", crop_pct=0.875)
    if not decoded:
        return full
    steps = list(full.transforms)
    norm = next(i for i, step in enumerate(steps) if isinstance(step, transforms.Normalize))
    uint8 = transforms.Compose([*steps[: norm - 1], transforms.PILToTensor()])  # steps[norm - 1] is the to-float
    uint8.normalize = (tuple(float(m) for m in steps[norm].mean), tuple(float(v) for v in steps[norm].std))
    return uint8


def _posterize(image, bits: int, **_op_settings):
    """Keep the `bits` most significant bits of each channel; 0 bits is a black image.

    timm's `PosterizeIncreasing` asks for 0 bits at magnitude 10, which `rand-m9-mstd0.5` reaches
    (9 + N(0, 0.5) clipped to 10: 2.3 % of its posterize ops, 13 of 10,000 seeded draws of the
    ImageNet recipe); Pillow 13 refuses 0 bits with a ValueError that kills the data worker.
    Older Pillow returned black, which is what the TensorFlow policy (shift by 8 bits) and the
    published recipes trained on.
    """
    from PIL import ImageOps

    if bits >= 8:
        return image
    if bits <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits)


def _posterize_to_zero_bits(transform):
    """Point every posterize op of timm's RandAugment, AugMix or AutoAugment in `transform` at `_posterize`
    (found by timm's function, which all three Posterize variants call, not by a name older timm lacks)."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", None) or [op for policy in getattr(step, "policy", []) for op in policy]:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise HwawareError(f"data: {what} {path} does not exist or is not a folder")
    if not any(path.iterdir()):
        raise HwawareError(f"data: {what} {path} is empty")


def _imagefolder(root: Path, space: SearchSpace, split: str, augment: bool, auto_augment, reprob,
                 decoded: bool = False) -> Dataset:
    folder = root / split
    if not folder.is_dir():
        raise HwawareError(f"data: {folder} is missing; imagefolder:PATH expects PATH/train and PATH/val (and PATH/test for --split test)")
    _check_same_classes(root, split)
    transform = _image_transform(space, augment, auto_augment, reprob, decoded)
    try:
        dataset = _image_files(folder, transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise HwawareError(f"data: {folder}: {exc}") from None
    dataset.normalize = getattr(transform, "normalize", None)
    return dataset


def _image_files(folder: Path, transform) -> Dataset:
    """An image folder behind the one image door (hwaware.images): every file checked before and after decoding,
    the scan refusing symlink loops. A bad file stops the run; with HWAWARE_BAD_IMAGES=skip the scan leaves out,
    and counts, the files whose header already shows them bad."""
    from hwaware.images import BAD_IMAGE_POLICIES, ImageFiles, ImageReader

    policy = os.environ.get("HWAWARE_BAD_IMAGES", "error")
    if policy not in BAD_IMAGE_POLICIES:
        raise HwawareError(f"HWAWARE_BAD_IMAGES: must be {' or '.join(BAD_IMAGE_POLICIES)}, got {policy[:40]!r}")
    return ImageFiles(folder, transform, ImageReader(bad_images=policy))


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _check_same_classes(root: Path, split: str) -> None:
    """A val or test folder must name the classes train does: label i has to mean the same class in both."""
    train = root / "train"
    if split == "train" or not train.is_dir():
        return
    mine, trained = _class_folders(root / split), _class_folders(train)
    if mine and trained and mine != trained:
        only = sorted(set(mine) ^ set(trained))
        example = f" ({only[0]!r} is in one only)" if only else " (same names, another count)"
        raise HwawareError(f"data: {root / split} has {len(mine)} class folders and {train} {len(trained)}, "
                           f"not the same classes{example}")


def _cifar(root: Path, classes: int, space: SearchSpace, split: str, augment: bool, auto_augment, reprob,
           decoded: bool = False) -> Dataset:
    """Local CIFAR only (never downloads); val is a stratified hold-out of CIFAR's train set, test is CIFAR's test."""
    from torch.utils.data import Subset
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if classes == 10 else CIFAR100
    _check_dataset_files(root / cls.base_folder, [name for name, _ in cls.train_list + cls.test_list]
                         + [cls.meta["filename"]])
    transform = _image_transform(space, augment, auto_augment, reprob, decoded)
    try:
        dataset = cls(str(root), train=split != "test", download=False, transform=transform)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise HwawareError(f"data: {root}: {exc}") from None
    dataset.normalize = getattr(transform, "normalize", None)
    if split == "test":
        return dataset
    targets = np.asarray(dataset.targets)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    val = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[: CIFAR_VAL_PER_CLASS[classes]] for c in range(classes)])
    keep = np.sort(val) if split == "val" else np.setdiff1d(np.arange(len(targets)), val)
    subset = Subset(dataset, keep.tolist())
    subset.classes, subset.normalize = dataset.classes, dataset.normalize
    return subset


def _check_dataset_files(folder: Path, names: list[str]) -> None:
    """Refuse, unread, any of `names` in `folder` that is not a regular file of at most DATASET_FILE_MAX_BYTES
    (torchvision would hash it whole first: /dev/zero never ends, a FIFO never answers). Missing ones are
    left to the dataset's own message."""
    for name in names:
        if os.path.lexists(folder / name):
            check_regular_file(folder / name, "data", DATASET_FILE_MAX_BYTES)


def _check_fit(spec: str, space: SearchSpace, num_classes: int, chans: int | None, size: int | None) -> None:
    if num_classes != space.num_classes:
        raise HwawareError(f"data: {spec} has {num_classes} classes but space {space.name} has num_classes {space.num_classes}")
    if chans is not None and chans != space.in_chans:
        raise HwawareError(f"data: {spec} images have {chans} channels but space {space.name} has in_chans {space.in_chans}")
    if size is not None and size != space.img_size:
        raise HwawareError(f"data: {spec} images are {size}x{size} but space {space.name} has img_size {space.img_size}")


def build_dataset(
    spec: str,
    space: SearchSpace,
    split: str,
    augment: bool = False,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    decoded: bool = False,
) -> Dataset:
    """The dataset `spec` for `split` (train / val / test), shaped for `space`; HwawareError if it cannot fit.

    `augment` turns on the training transforms of image folders and CIFAR (timm RandAugment
    `auto_augment`, random erasing `reprob`) and of animals (mirror and shift, see `AnimalsDataset`);
    digits has none (see `DigitsDataset`). `decoded` (no augment): image folders and CIFAR give
    uint8 images at the model's resolution and the dataset's `normalize` says how to make them
    float (see `_image_transform`); the in-memory datasets ignore it.
    """
    if split not in SPLITS:
        raise HwawareError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        _check_fit(spec, space, 10, 1, 8)
        return DigitsDataset(split)
    if kind == "animals" and not arg:
        _check_fit(spec, space, 10, 1, 28)
        return AnimalsDataset(split, augment=augment)
    if kind == "synthetic" and not arg:
        return SyntheticDataset(space, split)
    if kind in ("imagefolder", "cifar10", "cifar100"):
        if not arg:
            raise HwawareError(f"data: {kind}: needs a path, as in {kind}:/data/{kind}")
        root = Path(arg).expanduser()
        _require_dir(root, f"{kind} root")
        if space.in_chans != 3:
            raise HwawareError(f"data: {spec} has RGB images but space {space.name} has in_chans {space.in_chans}")
        decoded = decoded and not augment
        if kind == "imagefolder":
            dataset = _imagefolder(root, space, split, augment, auto_augment, reprob, decoded)
        else:
            dataset = _cifar(root, int(kind.removeprefix("cifar")), space, split, augment, auto_augment, reprob,
                             decoded)
        _check_fit(spec, space, len(dataset.classes), None, None)
        return dataset
    raise HwawareError(f"data: unknown spec {spec!r}; use digits, animals, synthetic, imagefolder:PATH, cifar10:PATH or cifar100:PATH")


def has_split(spec: str, split: str) -> bool:
    """Whether dataset `spec` has `split` without loading it: an image folder may lack test (ImageNet has
    train and val only); the other datasets have all three."""
    kind, _, arg = spec.partition(":")
    if kind == "imagefolder" and arg:
        return (Path(arg).expanduser() / split).is_dir()
    return split in SPLITS


# ---- fixed image sets -----------------------------------------------------------------------


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Every item's label, read without decoding an image where the dataset records them."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_targets(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:  # synthetic: labels come with the pixels
        targets = [dataset[i][1] for i in range(len(dataset))]
    return np.asarray(targets, dtype=np.int64)


def stratified_sample(targets: np.ndarray, count: int, seed: int, among: np.ndarray | None = None) -> np.ndarray:
    """`count` item indices (sorted) drawn from `among` (default: all) in proportion to each class's share.

    Each class gets floor(count x share) images, the largest remainders one more (ties to the lower
    class), drawn by a permutation seeded from (seed, class): a pure function of its arguments, so
    every rank and every resumed run chooses the same images.
    """
    among = np.arange(len(targets)) if among is None else np.asarray(among, dtype=np.int64)
    if not 1 <= count <= len(among):
        raise HwawareError(f"images: {count} asked, but the set has {len(among)}")
    classes, sizes = np.unique(targets[among], return_counts=True)
    exact = count * sizes / len(among)
    quota = np.floor(exact).astype(np.int64)
    extra = np.lexsort((np.arange(len(classes)), -(exact - quota)))[: count - int(quota.sum())]
    quota[extra] += 1
    chosen = []
    for label, take in zip(classes, quota):
        members = among[targets[among] == label]
        order = np.random.default_rng(mix_seed(seed, int(label))).permutation(len(members))
        chosen.append(members[order[:take]])
    return np.sort(np.concatenate(chosen))


def image_ids(dataset: Dataset, indices: np.ndarray) -> list[str]:
    """Stable names of items: an image folder's relative file paths, else the items' indices in their split."""
    if isinstance(dataset, torch.utils.data.Subset):
        return image_ids(dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)[indices])
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        root = Path(dataset.root)
        return [Path(samples[i][0]).relative_to(root).as_posix() for i in indices]
    return [str(int(i)) for i in indices]


# ---- loaders --------------------------------------------------------------------------------


class ResumableSampler(Sampler):
    """Epoch order that is a pure function of (seed, epoch), sharded over ranks, able to start mid-epoch.

    Shuffled: one permutation per epoch shared by all ranks, padded to a multiple of the world
    size (as `DistributedSampler`), rank r taking every world-th item. Not shuffled: items
    rank, rank + world, ... without padding, so a sharded evaluation counts every item once.
    Yields (epoch, index) pairs so `SeededItems` can seed each item's augmentation.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))).tolist()
        order += order[: (-len(order)) % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self._indices()[self.start :])

    def __len__(self) -> int:
        return max(len(self._indices()) - self.start, 0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Go on with `epoch` from its item `start`: a loader whose workers persist keeps its sampler."""
        self.epoch, self.start = epoch, start


class RepeatedAugmentationSampler(ResumableSampler):
    """DeiT's repeated augmentation, resumable: each item of the epoch's permutation `repeats` times in a row,
    dealt round-robin so its copies land on different ranks (on one rank: in one batch), each copy augmented
    under its own seed. An epoch is as long as without repeats, so it sees about 1/`repeats` of the items,
    `repeats` times each (Hoffer et al. 2020; DeiT and AutoFormer train ImageNet with 3).
    """

    def __init__(self, size: int, repeats: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        super().__init__(size, True, seed, epoch, rank, world_size, start)
        self.repeats = repeats

    def _keys(self) -> list[tuple[int, int]]:
        """(index, copy) for this rank: slot g of the repeated permutation holds copy g % repeats of item g // repeats."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))).tolist()
        total = -(-self.size // self.world_size) * self.world_size
        return [(order[(g // self.repeats) % self.size], g % self.repeats)
                for g in range(self.rank, total, self.world_size)]

    def _indices(self) -> list[int]:
        return [index for index, _ in self._keys()]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return ((self.epoch, index, copy) for index, copy in self._keys()[self.start :])


class SeededItems(Dataset):
    """Fetch item `index` of epoch `epoch` with python, numpy and torch RNGs seeded from (seed, epoch, index),
    or from (seed, epoch, index, copy) for the copies of repeated augmentation."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]):
        epoch, index, *copy = key
        item_seed = mix_seed(self.seed, epoch, index, *copy)
        random.seed(item_seed)
        np.random.seed(item_seed % (1 << 32))
        torch.default_generator.manual_seed(item_seed)  # CPU only: torch.manual_seed also queues every accelerator (~0.5 ms)
        return self.dataset[index]


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_loader(
    spec: str | Dataset,
    space: SearchSpace,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    *,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    drop_last: bool | None = None,
    augment: bool = False,
    pin_memory: bool = False,
    **dataset_kwargs,
) -> DataLoader:
    """A DataLoader over `build_dataset(spec, space, split)` (or a dataset you pass as `spec`).

    Shuffled loaders follow `ResumableSampler`: order from (seed, epoch), starting at batch
    `start_batch`, with `drop_last` defaulting to True. Rank and world size default to
    torch.distributed's when it is initialised, so evaluation shards without being told.
    """
    if batch_size < 1:
        raise HwawareError(f"batch_size: must be at least 1, got {batch_size}")
    dataset = spec if isinstance(spec, Dataset) else build_dataset(spec, space, split, augment=augment, **dataset_kwargs)
    if len(dataset) == 0:
        raise HwawareError(f"data: {spec} has no {split} images")
    dist_rank, dist_world = _dist_rank_world()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    drop_last = shuffle if drop_last is None else drop_last
    sampler = ResumableSampler(len(dataset), shuffle, seed, epoch, rank, world_size, start_batch * batch_size)
    return dataloader(SeededItems(dataset, seed), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin_memory)


def dataloader(dataset: Dataset, num_workers: int = 0, **options) -> DataLoader:
    """Every DataLoader hwaware makes: its workers leave stop signals to the main process (which stops at a
    safe point, see `hwaware.stopping`), and any still alive when the interpreter exits are killed, not waited for."""
    if num_workers > 0:
        kill_workers_at_exit()
    return DataLoader(dataset, num_workers=num_workers, worker_init_fn=ignore_stop_signals_in_worker, **options)



def build_run_loader(dataset: Dataset, batch_size: int, shuffle: bool, *, seed: int = 0, rank: int = 0,
                     world_size: int = 1, num_workers: int = 0, aug_repeats: int = 1,
                     pin_memory: bool = False) -> DataLoader:
    """A loader a training run keeps for all its epochs: worker processes start once and persist
    (`persistent_workers`), and `loader.sampler.set_epoch(epoch, start_item)` moves it to the next epoch.

    Shuffled: the order of `ResumableSampler` (or `RepeatedAugmentationSampler` with `aug_repeats` > 1),
    whole batches only. Not shuffled: this rank's shard of every item, for validation.
    """
    if shuffle and aug_repeats > 1:
        sampler: ResumableSampler = RepeatedAugmentationSampler(len(dataset), aug_repeats, seed, 0, rank, world_size)
    else:
        sampler = ResumableSampler(len(dataset), shuffle, seed, 0, rank, world_size)
    return dataloader(SeededItems(dataset, seed), batch_size=batch_size, sampler=sampler, drop_last=shuffle,
                      num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory)
