"""The scorer: a fixed, seeded, class-stratified image set, streamed (decoded uint8 kept within a bound), on the
device asked for, sharded over ranks; and search / evaluate / export on top of it, including their bad input."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hwaware.checkpoint import save_checkpoint, versions
from hwaware.cli import main
from hwaware.data import build_dataset, build_loader, dataset_targets, image_ids, stratified_sample
from hwaware.errors import HwawareError
from hwaware.evaluation import (
    ImageSet,
    Scorer,
    autocast_dtype,
    build_scorer,
    evaluate,
    held_out_scorer,
    load_supernet,
)
from hwaware.space import Arch, get_space
from hwaware.supernet import SuperViT

TINY_RGB = replace(get_space("digits"), name="tiny-rgb", in_chans=3, img_size=32, patch_size=8, num_classes=3)
SMALL_SEARCH = ["--population", "4", "--generations", "1", "--parents", "2", "--mutation-children", "1",
                "--crossover-children", "1", "--quiet"]


def write_imagefolder(root: Path, classes: int, per_class: int, splits=("train", "val"), size: int = 40) -> Path:
    """Small PNGs whose mean colour depends on the class, so a model can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def supernet_checkpoint(path: Path, space, data: str | None, seed: int = 0) -> Path:
    """A hwaware checkpoint of a randomly initialised supernet (as `hwaware import` writes one: no training)."""
    torch.manual_seed(seed)
    model = SuperViT(space)
    save_checkpoint(path, {"space": space.to_dict(), "config": {"drop_path": 0.0}, "data": data,
                           "model": model.state_dict(), "ema": None, "arch": None, "epoch": 0, "step": 0,
                           "complete": True, "history": [], "versions": versions()})
    return path


@pytest.fixture
def run_cli(capsys):
    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse refuses a flag's value while parsing
            code = exc.code
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run


def one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ---- the image set -------------------------------------------------------------------------------


def test_stratified_sample_keeps_class_shares_and_is_a_pure_function():
    targets = np.repeat(np.arange(4), [50, 30, 15, 5])
    chosen = stratified_sample(targets, 20, seed=7)
    assert len(chosen) == 20 and np.all(np.diff(chosen) > 0)
    assert np.bincount(targets[chosen]).tolist() == [10, 6, 3, 1]
    assert np.array_equal(chosen, stratified_sample(targets, 20, seed=7))
    assert not np.array_equal(chosen, stratified_sample(targets, 20, seed=8))
    odd = stratified_sample(targets, 7, seed=0)  # 3.5, 2.1, 1.05, 0.35: the largest remainders get the rest
    assert np.bincount(targets[odd], minlength=4).tolist() == [4, 2, 1, 0]
    with pytest.raises(HwawareError, match="101 asked"):
        stratified_sample(targets, 101, seed=0)
    with pytest.raises(HwawareError, match="0 asked"):
        stratified_sample(targets, 0, seed=0)


def test_scorer_scores_what_it_names_and_agrees_with_evaluate():
    torch.manual_seed(0)
    space = get_space("digits")
    model = SuperViT(space).eval()
    arch = space.largest()
    whole = build_scorer(model, "digits", device="cpu")
    assert whole.describe() == "val: all 270 images" and whole.fingerprint["images"] == 270
    full = evaluate(model, arch, build_loader("digits", space, "val", 64))
    assert whole.measure(arch)["top1"] == full["top1"] and whole.measure(arch)["n"] == 270

    part = build_scorer(model, "digits", images=100, seed=3, device="cpu")
    assert part.describe() == "val: 100 of 270 images, class-stratified, seed 3"
    assert part.measure(arch)["n"] == 100
    expected = stratified_sample(dataset_targets(build_dataset("digits", space, "val")), 100, 3)
    assert np.array_equal(part.indices, expected)
    ids = "\n".join(image_ids(part.dataset, expected)).encode()
    assert part.fingerprint["ids_sha256"] == hashlib.sha256(ids).hexdigest()
    assert part.fingerprint != build_scorer(model, "digits", images=100, seed=4, device="cpu").fingerprint
    assert part.fingerprint == build_scorer(model, "digits", images=100, seed=3, device="cpu", batch_size=7).fingerprint

    rest = held_out_scorer(model, part, device="cpu")
    assert rest.image_set.part == "remainder" and not set(rest.indices) & set(part.indices)
    assert len(rest.indices) == 100
    assert held_out_scorer(model, whole, device="cpu").image_set.split == "test"  # all of val scored: test


def test_shards_cover_the_set_once_and_sum_to_one_process():
    """What each torchrun rank scores (every world-th image) adds up to the one-process counts exactly."""
    from hwaware.evaluation import _tally

    torch.manual_seed(0)
    space = get_space("digits")
    model = SuperViT(space).eval()
    one = build_scorer(model, "digits", images=150, device="cpu")
    arch = space.smallest()
    totals = torch.zeros(4, dtype=torch.float64)
    seen = []
    for rank in range(3):
        shard = Scorer(model, one.dataset, one.image_set, one.indices, device=torch.device("cpu"), autocast=None,
                       batch_size=16, workers=0, cache_mib=0, rank=rank, world_size=3)
        seen += shard.mine.tolist()
        with torch.no_grad():
            totals += _tally(model, arch, shard._raw_batches(), shard.device)
    assert sorted(seen) == one.indices.tolist()
    whole = one.measure(arch)
    assert int(totals[3]) == whole["n"] == 150 and float(totals[0]) / 150 == whole["top1"]


def test_decoded_cache_gives_the_float_transform_s_scores(tmp_path):
    """uint8 images normalised on the device equal timm's float transform; cached, partly cached or streamed
    passes score alike, and the cache never exceeds its bound."""
    data = f"imagefolder:{write_imagefolder(tmp_path, 3, 6)}"
    torch.manual_seed(0)
    model = SuperViT(TINY_RGB).eval()
    arch = TINY_RGB.largest()
    reference = evaluate(model, arch, build_loader(data, TINY_RGB, "val", 5))
    for cache_mib in (0, 5 * 3 * 32 * 32 / 2**20, 64):  # none, one batch of 5, everything
        scorer = build_scorer(model, data, device="cpu", batch_size=5, workers=0, cache_mib=cache_mib)
        first, again = scorer.measure(arch), scorer.measure(arch)
        assert first["n"] == again["n"] == 18
        assert first["top1"] == again["top1"] == reference["top1"]
        assert abs(first["loss"] - reference["loss"]) < 1e-5
        cached = sum(images.numel() for images, _ in scorer._cache)
        assert cached <= cache_mib * 2**20 and all(images.dtype == torch.uint8 for images, _ in scorer._cache)
        assert cached == {0: 0, 64: 18 * 3 * 32 * 32}.get(cache_mib, 5 * 3 * 32 * 32)


def test_autocast_choice_follows_the_device():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(HwawareError, match="fp16 autocast runs on CUDA only"):
        autocast_dtype(cpu, "fp16")
    with pytest.raises(HwawareError, match="not one of"):
        autocast_dtype(cpu, "int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_scores_on_the_gpu_with_autocast_agree_with_the_cpu():
    torch.manual_seed(0)
    space = get_space("digits")
    model = SuperViT(space).eval()
    arch = space.largest()
    cpu = build_scorer(model, "digits", device="cpu").measure(arch)
    gpu = build_scorer(model, "digits", device="cuda")
    major, _ = torch.cuda.get_device_capability()
    assert gpu.autocast == (torch.bfloat16 if major >= 8 else torch.float16)
    assert abs(gpu.measure(arch)["top1"] - cpu["top1"]) <= 3 / 270  # a few argmax flips at half precision


def test_image_set_refuses_counts_outside_the_split():
    torch.manual_seed(0)
    model = SuperViT(get_space("digits"))
    with pytest.raises(HwawareError, match="271 asked, but digits val has 270"):
        build_scorer(model, "digits", images=271, device="cpu")
    with pytest.raises(HwawareError, match="none is left out"):
        ImageSet("digits", images="all", part="remainder").choose(build_dataset("digits", model.space, "val"))


# ---- the commands ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    return supernet_checkpoint(tmp_path_factory.mktemp("digits") / "last.pt", get_space("digits"), "digits")


def test_search_names_its_scoring_set_and_held_out_images(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "search"
    result = run_cli("search", "--checkpoint", digits_checkpoint, "--flops-g", "0.01", "--out", out,
                     "--score-images", "120", "--compute-device", "cpu", *SMALL_SEARCH)
    assert result.returncode == 0, result.stderr
    assert "scored on val: 120 of 270 images, class-stratified, seed 0" in result.stdout
    report = json.loads((out / "scoring.json").read_text())
    assert report["selection"]["images"] == 120 and report["held_out"]["part"] == "remainder"
    state = json.loads((out / "search_state.json").read_text())
    assert state["config"]["fingerprint"]["scoring"]["ids_sha256"] == report["selection"]["ids_sha256"]
    again = run_cli("search", "--checkpoint", digits_checkpoint, "--flops-g", "0.01", "--out", out,
                    "--score-images", "121", "--compute-device", "cpu", *SMALL_SEARCH)
    one_line_error(again, "fingerprint")  # another scoring set never reuses the cached scores


@pytest.mark.parametrize("flags, message", [
    (["--score-images", "271"], "271 asked, but digits val has 270"),
    (["--score-images", "0"], "--score-images"),
    (["--workers", "100000"], "--workers"),
    (["--workers", str(os.cpu_count() + 1)], "loader processes asked"),
    (["--compute-device", "tpu"], "not a device"),
    (["--score-precision", "fp8"], "not one of"),
])
def test_bad_scoring_flags_are_one_line_and_write_nothing(run_cli, digits_checkpoint, tmp_path, flags, message):
    out = tmp_path / "search"
    one_line_error(run_cli("search", "--checkpoint", digits_checkpoint, "--flops-g", "0.01", "--out", out,
                           *flags, *SMALL_SEARCH), message)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["search", "evaluate", "export"])
def test_cuda_without_cuda_is_one_line(run_cli, digits_checkpoint, tmp_path, command):
    args = {"search": ["--flops-g", "0.01", "--out", tmp_path / "o", "--quiet"], "evaluate": [],
            "export": ["--arch", "smallest", "--out", tmp_path / "o"]}[command]
    one_line_error(run_cli(command, "--checkpoint", digits_checkpoint, "--compute-device", "cuda", *args),
                   "asked for CUDA but none is available")
    assert not (tmp_path / "o").exists()


def test_evaluate_takes_workers_a_subset_and_the_old_device_flag(run_cli, digits_checkpoint):
    result = run_cli("evaluate", "--checkpoint", digits_checkpoint, "--score-images", "90", "--workers", "1",
                     "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["n"] == 90 and row["images"] == "val: 90 of 270 images, class-stratified, seed 0"
    old = run_cli("evaluate", "--checkpoint", digits_checkpoint, "--device", "cpu", "--batch-size", "64")
    assert old.returncode == 0 and "val: all 270 images" in old.stdout
    assert len(old.stderr.strip().splitlines()) == 1 and "deprecated" in old.stderr


def test_data_folders_that_cannot_score_are_one_line(run_cli, tmp_path):
    empty_classes = tmp_path / "flat"
    (empty_classes / "val").mkdir(parents=True)
    (empty_classes / "val" / "loose.png").write_bytes(b"")
    mismatched = write_imagefolder(tmp_path / "mismatch", 3, 1)
    (mismatched / "val" / "class2").rename(mismatched / "val" / "other")
    checkpoint = supernet_checkpoint(tmp_path / "c.pt", TINY_RGB, None)
    for data, message in ((empty_classes, "class folder"), (mismatched, "not the same classes ('class2'")):
        out = tmp_path / f"out-{data.name}"
        one_line_error(run_cli("search", "--checkpoint", checkpoint, "--data", f"imagefolder:{data}", "--flops-g",
                               "0.01", "--out", out, *SMALL_SEARCH), message)
        assert not out.exists()


def test_export_needs_no_test_split_and_no_data(run_cli, tmp_path):
    folder = write_imagefolder(tmp_path / "trainval", 3, 4)
    trained_on_folder = supernet_checkpoint(tmp_path / "a.pt", TINY_RGB, f"imagefolder:{folder}")
    result = run_cli("export", "--checkpoint", trained_on_folder, "--arch", "smallest", "--format", "timm",
                     "--out", tmp_path / "e1", "--score-images", "6")
    assert result.returncode == 0, result.stderr
    card = json.loads((tmp_path / "e1" / "card.json").read_text())
    assert set(card["accuracy"]) == {"val", "held_out"} and "test_top1" not in card
    assert card["accuracy"]["val"]["images"] == "val: 6 of 12 images, class-stratified, seed 0"
    assert card["accuracy"]["held_out"]["n"] == 6

    imported = supernet_checkpoint(tmp_path / "b.pt", TINY_RGB, None)  # an imported supernet records no data
    result = run_cli("export", "--checkpoint", imported, "--arch", "smallest", "--format", "timm",
                     "--out", tmp_path / "e2")
    assert result.returncode == 0, result.stderr
    card = json.loads((tmp_path / "e2" / "card.json").read_text())
    assert card["accuracy"] is None and "no accuracy" in card["accuracy_note"]
    assert "no accuracy (no data)" in result.stdout


@pytest.mark.slow  # ~10-30 s: ONNX export, static calibration, float and int8 ONNX Runtime over three image sets
def test_int8_export_checks_accuracy_on_the_card_s_bounded_image_sets(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "int8"
    result = run_cli("export", "--checkpoint", digits_checkpoint, "--arch", "smallest", "--format", "onnx",
                     "--precision", "int8", "--quantize-mode", "static", "--calibration-images", "40",
                     "--max-accuracy-drop", "100", "--score-images", "60", "--out", out)
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "card.json").read_text())
    assert {name: row["n"] for name, row in card["accuracy"].items()} == {"val": 60, "held_out": 60, "test": 60}
    checked = card["quantized"]["accuracy"]
    assert {name: row["n"] for name, row in checked.items()} == {"val": 60, "held_out": 60, "test": 60}
    assert abs(checked["val"]["float_top1"] - card["accuracy"]["val"]["top1"]) <= 1 / 60  # same images, via ONNX
    assert card["quantized"]["calibration_count"] == 40
    refused = run_cli("export", "--checkpoint", digits_checkpoint, "--arch", "smallest", "--format", "onnx",
                      "--precision", "int8", "--quantize-mode", "static", "--calibration-images", "2000",
                      "--out", tmp_path / "too-many")
    one_line_error(refused, "2000 images asked, but digits has 1257 training images")
    assert not (tmp_path / "too-many").exists()


def test_calibration_draws_every_class_and_refuses_more_than_there_is(tmp_path):
    from hwaware.quantize import calibration_images

    folder = write_imagefolder(tmp_path / "f", 3, 8)
    data = f"imagefolder:{folder}"
    images = calibration_images(data, TINY_RGB, 6, workers=0)
    assert images.shape == (6, 3, 32, 32)
    train = build_dataset(data, TINY_RGB, "train")
    chosen = stratified_sample(dataset_targets(train), 6, 0)
    assert np.bincount(dataset_targets(train)[chosen]).tolist() == [2, 2, 2]  # the first 6 files are one class
    assert torch.equal(images[0], train[int(chosen[0])][0])
    with pytest.raises(HwawareError, match="25 images asked, but .* has 24 training images"):
        calibration_images(data, TINY_RGB, 25, workers=0)
    with pytest.raises(HwawareError, match="calibrate on 1 to 2048"):
        calibration_images(data, TINY_RGB, 5000, workers=0)


# ---- at scale (slow) -------------------------------------------------------------------------------

RSS_SCRIPT = r"""
import json, sys
from pathlib import Path

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

from hwaware.pipeline import search_checkpoint
from hwaware.evaluation import load_supernet
from hwaware.search import standard_costs
checkpoint, out = sys.argv[1], sys.argv[2]
# Before the baseline: what any search holds whatever its images (torch, timm and the weights; fvcore,
# which prices FLOPs; pandas and matplotlib, which write the results), so the growth is the images' share.
model, _ = load_supernet(checkpoint)
start = kib("VmRSS")
[cost(model.space.largest()) for cost in standard_costs(model.space, None).values()]
import matplotlib.pyplot, pandas
before = kib("VmRSS")
result = search_checkpoint(checkpoint, out, {"flops_g": 1.0}, progress=False, population=3, generations=1,
                           parents=2, mutation_children=1, crossover_children=1, scoring={"device": "cpu"})
best = next(iter(result.best.values()))
peak = kib("VmHWM")
print(json.dumps({"growth_mib": (peak - before) / 1024, "growth_with_imports_mib": (peak - start) / 1024,
                  "evaluations": len(result.evaluations),
                  "best_arch": best.arch.to_dict(), "best_top1": best.top1}))
"""


@pytest.mark.slow  # ~1-2 min: writes 20,000 PNGs, then decodes 10,000 of them
def test_search_on_20k_images_streams_within_a_memory_bound(tmp_path):
    space = replace(TINY_RGB, name="rgb64", img_size=64, patch_size=16, num_classes=10)
    folder = write_imagefolder(tmp_path / "big", 10, 2000, splits=("val",), size=64)
    checkpoint = supernet_checkpoint(tmp_path / "c.pt", space, f"imagefolder:{folder}")
    float32_split_mib = 20000 * 3 * 64 * 64 * 4 / 2**20  # 938 MiB: what the search held before
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(checkpoint), str(tmp_path / "s")], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {measured['growth_mib']:.0f} MiB ({measured['growth_with_imports_mib']:.0f} MiB with the "
          f"search's fixed imports; float32 split: {float32_split_mib:.0f} MiB)")
    assert measured["growth_mib"] < 300 and measured["evaluations"] >= 3

    report = json.loads((tmp_path / "s" / "scoring.json").read_text())
    assert report["selection"]["describe"] == "val: 10000 of 20000 images, class-stratified, seed 0"
    dataset = build_dataset(f"imagefolder:{folder}", space, "val", decoded=True)
    chosen = stratified_sample(dataset_targets(dataset), 10000, 0)
    assert np.bincount(dataset_targets(dataset)[chosen]).tolist() == [1000] * 10
    assert report["selection"]["ids_sha256"] == hashlib.sha256("\n".join(image_ids(dataset, chosen)).encode()).hexdigest()
    model, _ = load_supernet(checkpoint)  # the best subnet's score is its top-1 on exactly those 10,000 images
    rescored = build_scorer(model, f"imagefolder:{folder}", device="cpu", cache_mib=0).measure(
        Arch.from_dict(measured["best_arch"]))
    assert rescored["n"] == 10000 and rescored["top1"] == measured["best_top1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~1 min: a torchrun of two fresh interpreters beside a one-process search
@pytest.mark.distributed
def test_two_process_search_scores_as_one_process(digits_checkpoint, tmp_path):
    common = ["search", "--checkpoint", str(digits_checkpoint), "--flops-g", "0.01", "--score-images", "201",
              "--compute-device", "cpu", "--threads", "1", "--no-accuracy-cache", *SMALL_SEARCH]  # both score afresh
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "hwaware.cli", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", "-m", "hwaware.cli", *common, "--out",
                             str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-2000:]
    assert double.stdout.count("scored on val: 201 of 270") == 1  # rank 0 reports
    one, two = ((tmp_path / d / "candidates.csv").read_text() for d in ("one", "two"))
    assert one == two
    assert (json.loads((tmp_path / "one" / "scoring.json").read_text())
            == json.loads((tmp_path / "two" / "scoring.json").read_text()))
