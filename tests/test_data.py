"""Datasets and loaders: the digits split, spec parsing, fit checks, resumable order and seeded augmentation."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from hwaware.data import ResumableSampler, build_dataset, build_loader
from hwaware.errors import HwawareError
from hwaware.space import get_space

DIGITS = get_space("digits")


def _labels(dataset) -> np.ndarray:
    return np.array([dataset[i][1] for i in range(len(dataset))])


def test_digits_split_is_fixed_stratified_and_disjoint():
    splits = {s: build_dataset("digits", DIGITS, s) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] > 4 * sizes["val"] and abs(sizes["val"] - sizes["test"]) <= 1
    images = {s: d.raw.flatten(1) for s, d in splits.items()}
    # disjoint: no val/test image occurs in train (digits has a handful of exact duplicates, so compare counts)
    all_rows = torch.cat(list(images.values()))
    assert len(all_rows) == 1797
    for split, dataset in splits.items():
        counts = np.bincount(_labels(dataset), minlength=10)
        assert counts.min() >= 0.08 * len(dataset) and counts.max() <= 0.12 * len(dataset), split
    again = build_dataset("digits", DIGITS, "val")
    assert torch.equal(again.raw, splits["val"].raw) and torch.equal(again.targets, splits["val"].targets)


def test_digits_items_are_normalised_1x8x8():
    train = build_dataset("digits", DIGITS, "train")
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert x.shape == (len(train), 1, 8, 8) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_space_mismatch_is_an_error():
    with pytest.raises(HwawareError, match="classes"):
        build_dataset("digits", replace(DIGITS, num_classes=100), "train")
    with pytest.raises(HwawareError, match="img_size"):
        build_dataset("digits", replace(DIGITS, img_size=16), "val")
    with pytest.raises(HwawareError, match="channels"):
        build_dataset("digits", replace(DIGITS, in_chans=3), "val")


@pytest.mark.parametrize("spec", ["mnist", "digits:extra", "imagefolder", "imagefolder:", "cifar10"])
def test_bad_specs(spec):
    with pytest.raises(HwawareError, match="data"):
        build_dataset(spec, DIGITS, "train")


def test_bad_split():
    with pytest.raises(HwawareError, match="split"):
        build_dataset("digits", DIGITS, "holdout")


def test_missing_and_empty_paths(tmp_path):
    space = get_space("autoformer-t")
    with pytest.raises(HwawareError, match="does not exist"):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}", space, "train")
    with pytest.raises(HwawareError, match="empty"):
        build_dataset(f"cifar10:{tmp_path}", space, "train")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(HwawareError, match="cifar|not found|corrupted"):
        build_dataset(f"cifar10:{tmp_path}", space, "train")
    with pytest.raises(HwawareError, match="train"):
        build_dataset(f"imagefolder:{tmp_path}", space, "train")


def _write_imagefolder(root, classes: int, per_class: int = 2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_fits_space_and_checks_classes(tmp_path):
    _write_imagefolder(tmp_path, classes=3)
    space = replace(get_space("digits"), name="tiny-rgb", in_chans=3, img_size=32, patch_size=8, num_classes=3)
    train = build_dataset(f"imagefolder:{tmp_path}", space, "train", augment=True)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert len(build_dataset(f"imagefolder:{tmp_path}", space, "val")) == 6
    with pytest.raises(HwawareError, match="3 classes"):
        build_dataset(f"imagefolder:{tmp_path}", replace(space, num_classes=10), "val")
    with pytest.raises(HwawareError, match="test"):
        build_dataset(f"imagefolder:{tmp_path}", space, "test")


def test_synthetic_has_space_shape_and_is_deterministic():
    space = get_space("autoformer-t")
    data = build_dataset("synthetic", space, "val")
    x, y = data[3]
    assert x.shape == (3, 224, 224) and 0 <= y < 1000
    assert torch.equal(build_dataset("synthetic", space, "val")[3][0], x)


def test_sampler_resumes_mid_epoch_and_shards():
    full = list(ResumableSampler(103, shuffle=True, seed=5, epoch=2))
    assert sorted(i for _, i in full) == list(range(103))
    assert list(ResumableSampler(103, shuffle=True, seed=5, epoch=2, start=40)) == full[40:]
    assert [i for _, i in ResumableSampler(103, shuffle=True, seed=5, epoch=3)] != [i for _, i in full]
    shards = [[i for _, i in ResumableSampler(103, True, 5, 2, rank=r, world_size=2)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 52 and set(shards[0]) | set(shards[1]) == set(range(103))
    plain = [[i for _, i in ResumableSampler(103, False, rank=r, world_size=2)] for r in range(2)]
    assert sorted(plain[0] + plain[1]) == list(range(103))  # evaluation: every item exactly once


class _RandomlyAugmented(Dataset):
    """Item i plus noise from the global RNGs, as timm's transforms draw it."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.full((2,), float(i)) + torch.rand(2) + random.random() + float(np.random.rand()), i


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_started_mid_epoch_sees_the_same_augmented_batches(workers):
    kwargs = dict(shuffle=True, seed=3, epoch=1, num_workers=workers)
    full = list(build_loader(_RandomlyAugmented(), DIGITS, "train", 8, **kwargs))
    torch.manual_seed(123)  # the main process's RNG state must not matter
    resumed = list(build_loader(_RandomlyAugmented(), DIGITS, "train", 8, start_batch=4, **kwargs))
    assert len(full) == 6 and len(resumed) == 2  # drop_last on shuffled loaders
    for (xa, ya), (xb, yb) in zip(full[4:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = next(iter(build_loader(_RandomlyAugmented(), DIGITS, "train", 8, shuffle=True, seed=3, epoch=2)))
    assert not torch.equal(other_epoch[0], full[0][0])


def test_eval_loader_keeps_every_item():
    loader = build_loader("digits", DIGITS, "val", 64)
    assert sum(len(y) for _, y in loader) == len(build_dataset("digits", DIGITS, "val"))


# ---- animals: Animal-MNIST from its installed wheel -----------------------------------------------

ANIMALS = get_space("animals")


def test_animals_split_is_fixed_stratified_disjoint_and_fine_grained():
    splits = {s: build_dataset("animals", ANIMALS, s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 5829, "val": 1943, "test": 1944}  # 9,716 distinct
    for split, dataset in splits.items():
        counts = np.bincount(dataset.targets.numpy(), minlength=10)
        assert counts.min() >= 0.08 * len(dataset) and counts.max() <= 0.104 * len(dataset), split
    assert 100 / len(splits["val"]) <= 0.1 and 100 / len(splits["test"]) <= 0.1  # one image: at most 0.1 point
    pixels = {s: {x.numpy().tobytes() for x in d.images} for s, d in splits.items()}
    assert sum(map(len, pixels.values())) == 9716  # the wheel's 284 repeated images are kept once, in one split
    assert torch.equal(build_dataset("animals", ANIMALS, "val").images, splits["val"].images)
    x = splits["train"].images
    assert x.shape == (5829, 1, 28, 28) and abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_animals_augments_train_only_and_repeatably():
    train = build_dataset("animals", ANIMALS, "train", augment=True)
    seeded = list(build_loader(train, ANIMALS, "train", 32, shuffle=True, seed=3))[0][0]
    again = list(build_loader(train, ANIMALS, "train", 32, shuffle=True, seed=3))[0][0]
    plain = list(build_loader(build_dataset("animals", ANIMALS, "train"), ANIMALS, "train", 32, shuffle=True, seed=3))[0][0]
    assert torch.equal(seeded, again) and not torch.equal(seeded, plain) and seeded.shape == plain.shape
    val = build_dataset("animals", ANIMALS, "val", augment=True)
    assert torch.equal(val[0][0], val.images[0])


def _write_pickle(path, obj) -> str:
    import gzip
    import hashlib
    import pickle

    path.write_bytes(gzip.compress(pickle.dumps(obj)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled a global",))


@pytest.mark.parametrize("obj, match", [
    ({"images": np.zeros(3)}, "not a numeric numpy array"),
    (np.array(["a", "b"], dtype=object), "refuses|not a numeric"),
    (_Payload(), "refuses builtins.print"),
    (b"not a pickle", "not a numeric"),
])
def test_array_pickle_admits_only_numeric_arrays(tmp_path, obj, match, capsys):
    from hwaware.data import read_array_pickle

    path = tmp_path / "x.gz"
    sha = _write_pickle(path, obj)
    with pytest.raises(HwawareError, match=match):
        read_array_pickle(path, sha)
    assert "unpickled" not in capsys.readouterr().out
    good = tmp_path / "good.gz"
    assert read_array_pickle(good, _write_pickle(good, np.arange(6, dtype=np.uint8))).tolist() == list(range(6))


def test_animals_file_with_another_checksum_is_refused(tmp_path):
    import shutil

    from hwaware.data import ANIMALS_FILES, animals_dir, load_animals

    for name, _ in ANIMALS_FILES.values():
        shutil.copy(animals_dir() / name, tmp_path / name)
    images = tmp_path / ANIMALS_FILES["images"][0]
    raw = images.read_bytes()
    images.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(HwawareError, match="SHA-256 .* expected 68a30346"):
        load_animals(tmp_path)
    with pytest.raises(HwawareError, match="no such file"):
        load_animals(tmp_path / "missing")


def test_animals_needs_its_space_shape():
    with pytest.raises(HwawareError, match="img_size"):
        build_dataset("animals", DIGITS, "val")


# ---- a dataset pointed at something that is not its files ------------------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "oversized"])
def test_animals_pointed_at_a_device_fifo_or_huge_file_is_refused_unread(tmp_path, kind):
    import os
    import shutil
    import threading

    from hwaware.data import ANIMALS_FILES, animals_dir, load_animals

    for name, _ in ANIMALS_FILES.values():
        shutil.copy(animals_dir() / name, tmp_path / name)
    images = tmp_path / ANIMALS_FILES["images"][0]
    images.unlink()
    if kind == "device":
        os.symlink("/dev/zero", images)  # read whole, it never ends: MemoryError before
    elif kind == "fifo":
        os.mkfifo(images)
    else:
        with open(images, "wb") as f:
            f.truncate(1 << 30)  # sparse: 1 GiB on paper, nothing on disk
    out = {}
    thread = threading.Thread(target=lambda: out.update(error=_raised(load_animals, tmp_path)), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), f"load_animals hung on a {kind}"
    expected = "over the 256 MiB limit" if kind == "oversized" else "is not a regular file"
    assert isinstance(out["error"], HwawareError) and expected in str(out["error"]) and images.name in str(out["error"])


def _raised(call, *args):
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001 - handed back to the test
        return exc
    return None


def test_cifar_pointed_at_a_fifo_is_refused_before_torchvision_hashes_it(tmp_path):
    import os
    import threading

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    os.mkfifo(batches / "data_batch_1")
    space = replace(get_space("autoformer-t"), num_classes=10, img_size=32, patch_size=16)
    out = {}
    thread = threading.Thread(target=lambda: out.update(error=_raised(build_dataset, f"cifar10:{tmp_path}", space,
                                                                       "train")), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "cifar10 hung on a FIFO"
    assert isinstance(out["error"], HwawareError) and "data_batch_1 is not a regular file" in str(out["error"])
