"""The one image door: every image file is checked before it is read, while it decodes, and after its transform."""

import os
import threading

import pytest
import torch
from PIL import Image

from hwaware.data import build_dataset, build_loader
from hwaware.errors import HwawareError
from hwaware.images import MAX_IMAGE_PIXELS, BadImageError, ImageFiles, read_image
from hwaware.space import SearchSpace

RGB = SearchSpace("rgb", (16,), (1,), (1,), (1.0,), head_dim=8, img_size=32, patch_size=16, in_chans=3, num_classes=2)


def _ok(path, size=(40, 40)):
    Image.new("RGB", size, (20, 120, 220)).save(path)
    return path


def _truncated(path):
    _ok(path.with_suffix(".full.png"))
    raw = path.with_suffix(".full.png").read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    path.with_suffix(".full.png").unlink()
    return path


def _within(seconds, call):
    """call() on a daemon thread: (finished, result or exception); a hang is a failure, not a stuck suite."""
    out = {}

    def run():
        try:
            out["value"] = call()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            out["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), out.get("value")


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(bomb)  # 225 M pixels in 27 KB: the bomb
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BadImageError, match=r"bomb.png: 225,000,000 pixels, over the limit of 89,478,485"):
        read_image(bomb)
    # the limit is ours and explicit: below Pillow's own error threshold too
    big = _ok(tmp_path / "big.png", (200, 100))
    with pytest.raises(BadImageError, match=r"big.png: 200 x 100 = 20,000 pixels, over the limit of 19,999"):
        read_image(big, max_pixels=19_999)
    assert read_image(big).size == (200, 100) and MAX_IMAGE_PIXELS == 89_478_485


def test_truncated_and_undecodable_files_are_named(tmp_path):
    with pytest.raises(BadImageError, match=r"cut.png: cannot decode \(image file is truncated\)"):
        read_image(_truncated(tmp_path / "cut.png"))
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="junk.jpg: not an image Pillow can read"):
        read_image(tmp_path / "junk.jpg")


def test_anything_but_a_regular_file_is_refused_unread(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    finished, result = _within(10, lambda: read_image(fifo))
    assert finished, "reading a FIFO hung"
    assert isinstance(result, BadImageError) and "pipe.png: not a regular file" in str(result)
    finished, result = _within(10, lambda: read_image("/dev/zero"))
    assert finished and isinstance(result, BadImageError) and "not a regular file" in str(result)


def _folder(root, split="train", bad=None):
    for label in ("a", "b"):
        (root / split / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            _ok(root / split / label / f"{i}.png")
    if bad is not None:
        bad(root / split / "a" / "bad.png")
    return root


def test_an_image_folder_reads_through_the_door_and_names_the_bad_file(tmp_path):
    root = _folder(tmp_path, bad=_truncated)
    dataset = build_dataset(f"imagefolder:{root}", RGB, "train")
    assert isinstance(dataset, ImageFiles) and dataset.classes == ["a", "b"] and len(dataset) == 5
    with pytest.raises(HwawareError, match=r"image: .*train/a/bad.png: cannot decode"):
        list(build_loader(dataset, RGB, "train", batch_size=5))


def test_a_fifo_in_an_image_folder_is_refused_by_the_scan(tmp_path):
    root = _folder(tmp_path, bad=os.mkfifo)
    finished, result = _within(20, lambda: build_dataset(f"imagefolder:{root}", RGB, "train"))
    assert finished, "scanning a folder holding a FIFO hung"
    assert isinstance(result, HwawareError) and "bad.png: not a regular file" in str(result)


def test_bad_images_are_skipped_and_counted_when_asked(tmp_path, monkeypatch, capsys):
    root = _folder(tmp_path)
    os.mkfifo(root / "train" / "b" / "pipe.png")
    (root / "train" / "a" / "junk.png").write_bytes(b"not an image")
    Image.new("1", (15000, 15000)).save(root / "train" / "a" / "bomb.png")
    monkeypatch.setenv("HWAWARE_BAD_IMAGES", "skip")
    dataset = build_dataset(f"imagefolder:{root}", RGB, "train")
    assert len(dataset) == 4 and len(dataset.reader.skipped) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[-1].endswith("3 bad images skipped so far")
    assert [line.split(" (")[0].rsplit("/", 1)[1] for line in err] == ["bomb.png", "junk.png", "pipe.png"]
    images, labels = next(iter(build_loader(dataset, RGB, "train", batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    # a file whose header is fine but whose data is cut short still stops the run: leaving it out mid-epoch
    # would change which images a score's fingerprint names
    _truncated(root / "train" / "a" / "cut.png")
    dataset = build_dataset(f"imagefolder:{root}", RGB, "train")
    with pytest.raises(BadImageError, match="cut.png: cannot decode"):
        list(build_loader(dataset, RGB, "train", batch_size=5))
    monkeypatch.setenv("HWAWARE_BAD_IMAGES", "ignore")
    with pytest.raises(HwawareError, match="HWAWARE_BAD_IMAGES: must be error or skip"):
        build_dataset(f"imagefolder:{root}", RGB, "train")


def test_non_finite_pixels_after_the_transform_are_refused(tmp_path):
    root = _folder(tmp_path)
    dataset = ImageFiles(root / "train", lambda image: torch.full((3, 4, 4), float("nan")))
    with pytest.raises(BadImageError, match=r"train/a/0.png: the transform produced non-finite pixel values"):
        dataset[0]


def test_the_scan_keeps_torchvisions_order(tmp_path):
    from torchvision.datasets import ImageFolder

    root = _folder(tmp_path)
    (root / "train" / "a" / "sub" / "deeper").mkdir(parents=True)
    _ok(root / "train" / "a" / "sub" / "deeper" / "z.png")
    _ok(root / "train" / "a" / "sub" / "0.jpg")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    assert ImageFiles(root / "train").samples == ImageFolder(str(root / "train")).samples


@pytest.mark.parametrize("links", [1, 2])
def test_a_symlink_loop_in_an_image_folder_is_refused(tmp_path, links):
    root = _folder(tmp_path)
    for i in range(links):  # one link: torchvision lists every image ~40 times; two: 2**40 folders, for ever
        os.symlink("..", root / "train" / "a" / f"loop{i}")
    finished, result = _within(20, lambda: build_dataset(f"imagefolder:{root}", RGB, "train"))
    assert finished, "the scan walked the loop"
    assert isinstance(result, HwawareError), result
    assert str(result).startswith("data: ") and "train/a/loop0/a is a symlink loop to" in str(result)


def test_two_links_to_one_folder_would_list_its_images_twice(tmp_path):
    root = _folder(tmp_path)
    (tmp_path / "shared").mkdir()
    _ok(tmp_path / "shared" / "s.png")
    for label in ("a", "b"):
        os.symlink(tmp_path / "shared", root / "train" / label / "shared")
    with pytest.raises(HwawareError, match=r"train/b/shared is a second link to .*train/a/shared"):
        build_dataset(f"imagefolder:{root}", RGB, "train")


def test_a_bad_image_in_a_loader_worker_is_still_one_line_naming_it(tmp_path):
    root = _folder(tmp_path, bad=_truncated)
    dataset = ImageFiles(root / "train", lambda image: torch.zeros(3, 4, 4))
    with pytest.raises(BadImageError) as caught:
        list(build_loader(dataset, RGB, "train", batch_size=5, num_workers=1))
    assert str(caught.value) == f"image: {root / 'train' / 'a' / 'bad.png'}: cannot decode (image file is truncated)"


@pytest.mark.slow
def test_train_on_an_image_folder_holding_a_bomb_is_one_line(tmp_path):
    """The issue's case end to end: `hwaware train --data imagefolder:...` (8 loader workers by default)."""
    import subprocess
    import sys

    import yaml

    for split in ("train", "val"):
        _folder(tmp_path / "data", split)
    Image.new("1", (15000, 15000)).save(tmp_path / "data" / "train" / "a" / "bomb.png")
    (tmp_path / "rgb.yaml").write_text(yaml.safe_dump({**RGB.to_dict(), "num_classes": 2}))
    result = subprocess.run([sys.executable, "-m", "hwaware.cli", "train", "--space", "rgb.yaml", "--data",
                             "imagefolder:data", "--out", "run", "--epochs", "1", "--batch-size", "4", "--threads",
                             "1", "--quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # torch's own warnings about worker counts may come first
    assert last == ("hwaware train: error: image: data/train/a/bomb.png: 225,000,000 pixels, over the limit of "
                    "89,478,485 (a decompression bomb?)"), result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
