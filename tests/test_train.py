"""Supernet training: recipes, the step of each strategy, evaluation, checkpoints, run folders, exact resume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from hwaware.cli import main
from hwaware.data import build_loader
from hwaware.errors import HwawareError
from hwaware.evaluation import evaluate, load_supernet
from hwaware.space import get_space, save_arch
from hwaware.train import SupernetTrainer, make_config, train_supernet

DIGITS = get_space("digits")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two intra-op threads on 2 shared cores thrash; tiny models train faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# A short digits run: 4 steps per epoch, one subnet per step, a checkpoint mid-epoch.
TINY = dict(space="digits", data="digits", epochs=2, batch_size=256, strategy="uniform", checkpoint_every=3,
            progress=False, threads=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_supernet(make_config(**TINY, out=str(out)))
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _learned(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Metrics rows without the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in rows]


# ---- configuration ------------------------------------------------------------------------------


def test_recipes_and_overrides(tmp_path):
    assert make_config(data="digits").epochs == make_config().epochs
    imagenet = make_config(data="imagefolder:/x")
    assert (imagenet.mixup, imagenet.epochs, imagenet.drop_path) == (0.8, 500, 0.1)
    assert make_config("imagenet", epochs=3, lr=None).epochs == 3  # None means "not given"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nstrategy: uniform\n")
    config = make_config(str(recipe), seed=4)
    assert (config.epochs, config.strategy, config.seed) == (7, "uniform", 4)


@pytest.mark.parametrize("bad, match", [
    (dict(strategy="greedy"), "strategy"),
    (dict(epochs=0), "epochs"),
    (dict(lr=-1.0), "lr"),
    (dict(colour="red"), "unknown setting"),
    (dict(epochs="many"), "epochs must be int"),
    (dict(mixup=0.8, batch_size=33), "even"),
])
def test_bad_settings(bad, match):
    with pytest.raises(HwawareError, match=match):
        make_config(**bad)


def test_missing_recipe_file():
    with pytest.raises(HwawareError, match="neither a built-in recipe"):
        make_config("no/such/recipe.yaml")


# ---- the step -----------------------------------------------------------------------------------


def test_subnets_per_step():
    uniform = SupernetTrainer(make_config(strategy="uniform"), DIGITS, steps_per_epoch=10)
    sandwich = SupernetTrainer(make_config(strategy="sandwich", num_random=3), DIGITS, steps_per_epoch=10)
    archs = uniform.step_archs(5)
    assert len(archs) == 1 and DIGITS.contains(archs[0]) and uniform.step_archs(5) == archs
    assert len({uniform.step_archs(s)[0] for s in range(20)}) > 10
    step = sandwich.step_archs(5)
    assert step[:2] == [DIGITS.largest(), DIGITS.smallest()] and len(step) == 5 and all(map(DIGITS.contains, step))


# Uniform sampling over all of digits barely moves any one subnet in a few steps, so its step is
# checked on a one-subnet space; sandwich trains the largest every step.
ONE_SUBNET = replace(DIGITS, name="one", embed_dims=(32,), depths=(2,), num_heads=(2,), mlp_ratios=(2.0,))


@pytest.mark.parametrize("strategy, space", [("uniform", ONE_SUBNET), ("sandwich", DIGITS)])
def test_train_step_learns_a_fixed_batch(strategy, space):
    torch.manual_seed(0)
    trainer = SupernetTrainer(make_config(strategy=strategy, warmup_epochs=0, smoothing=0.0, lr=3e-3), space, 50)
    images, labels = next(iter(build_loader("digits", space, "train", 16)))
    before = evaluate(trainer.model, space.largest(), [(images, labels)])["loss"]
    for _ in range(20):
        trainer.train_step(images, labels)
    assert trainer.step == 20 and trainer.lr < 3e-3  # cosine has started decaying
    assert evaluate(trainer.model, space.largest(), [(images, labels)])["loss"] < before - 0.1


def test_evaluate_counts_and_fractions():
    model = load_supernet_untrained()
    loader = build_loader("digits", DIGITS, "val", 100)
    result = evaluate(model, DIGITS.smallest(), loader)
    n = sum(len(y) for _, y in loader)
    assert result["n"] == n and 0 <= result["top1"] <= result["top5"] <= 1
    logits = torch.cat([model(x, DIGITS.smallest()) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert result["top1"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))


def load_supernet_untrained():
    from hwaware.supernet import SuperViT

    torch.manual_seed(0)
    return SuperViT(DIGITS).eval()


# ---- runs, checkpoints, evaluation --------------------------------------------------------------


def test_run_writes_checkpoint_and_metrics(tiny_run):
    rows = _rows(tiny_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[-1]["step"] == "8"
    for name in ("largest", "smallest", "middle"):
        assert 0 <= float(rows[-1][f"val_top1_{name}"]) <= 1
    model, meta = load_supernet(tiny_run / "last.pt")
    assert meta["complete"] and meta["epoch"] == 2 and meta["step"] == 8 and meta["data"] == "digits"
    assert meta["space"] == DIGITS.to_dict() and set(meta["versions"]) >= {"hwaware", "torch", "timm"}
    assert not model.training
    val = build_loader("digits", DIGITS, "val", 512)
    assert evaluate(model, DIGITS.largest(), val)["top1"] == pytest.approx(float(rows[-1]["val_top1_largest"]))
    assert not any(p.name.endswith(".tmp") for p in tiny_run.iterdir())


def test_complete_run_is_left_alone(tiny_run):
    before = (tiny_run / "last.pt").stat().st_mtime_ns
    row = train_supernet(make_config(**TINY, out=str(tiny_run)))
    assert row["epoch"] == 2 and (tiny_run / "last.pt").stat().st_mtime_ns == before


def test_folder_holding_another_run_is_refused_untouched(tiny_run):
    snapshot = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    with pytest.raises(HwawareError, match="another run .*seed"):
        train_supernet(make_config(**{**TINY, "seed": 9}, out=str(tiny_run)))
    with pytest.raises(HwawareError, match="another run .*strategy"):
        train_supernet(make_config(**{**TINY, "strategy": "sandwich"}, out=str(tiny_run)))
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()} == snapshot


def test_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HwawareError, match="not empty"):
        train_supernet(make_config(**TINY, out=str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_bad_checkpoints(tmp_path, tiny_run):
    good = (tiny_run / "last.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path, match in ((truncated, "truncated"), (garbage, "truncated"), (foreign, "not an hwaware"),
                        (tmp_path / "missing.pt", "no such file")):
        with pytest.raises(HwawareError, match=match):
            load_supernet(path)
    with pytest.raises(HwawareError, match="trained for space 'digits'"):
        load_supernet(tiny_run / "last.pt", space=get_space("autoformer-t"))


def test_evaluate_cli(tiny_run, tmp_path, capsys):
    import json

    assert main(["evaluate", "--checkpoint", str(tiny_run / "last.pt"), "--arch", "smallest", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["n"] == 270 and 0 <= result["top1"] <= result["top5"] <= 1
    arch_file = tmp_path / "arch.yaml"
    save_arch(DIGITS.middle(), arch_file)
    assert main(["evaluate", "--checkpoint", str(tiny_run / "last.pt"), "--arch", str(arch_file), "--split", "test"]) == 0
    assert capsys.readouterr().out.startswith("test top-1 ")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 broken")
    assert main(["evaluate", "--checkpoint", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated, corrupted" in err


def test_train_cli_bad_input(tmp_path, capsys):
    assert main(["train", "--space", "autoformer-t", "--data", "digits", "--out", str(tmp_path / "x")]) == 2
    assert "classes" in capsys.readouterr().err
    assert main(["train", "--space", "digits", "--data", f"imagefolder:{tmp_path}/none", "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing claimed for a failed start
    if not torch.cuda.is_available():
        assert main(["train", "--space", "digits", "--data", "digits", "--out", str(tmp_path / "z"),
                     "--compute-device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "asked for CUDA but none is available" in err
        assert not (tmp_path / "z").exists()


# ---- fixed-subnet training and fine-tuning ------------------------------------------------------

FIXED = DIGITS.middle()


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory, tiny_run) -> Path:
    """The middle digits subnet, fine-tuned from the tiny supernet and distilled from its largest."""
    out = tmp_path_factory.mktemp("runs") / "fixed"
    train_supernet(make_config(**{**TINY, "epochs": 1}, out=str(out), arch=FIXED, init_from=str(tiny_run / "last.pt")))
    return out


def test_fixed_config_trains_one_subnet_every_step():
    config = make_config(arch=FIXED)
    assert (config.strategy, config.distill) == ("fixed", False)  # no supernet to start from: nothing to distil from
    trainer = SupernetTrainer(config, DIGITS, steps_per_epoch=10)
    assert [trainer.step_archs(s) for s in range(5)] == [[FIXED]] * 5 and trainer.teacher is None
    with pytest.raises(HwawareError, match="strategy"):
        make_config(strategy="fixed")
    with pytest.raises(HwawareError, match="init_from"):
        make_config(init_from="runs/x/last.pt")


def test_init_from_copies_the_supernet_and_freezes_the_teacher(tiny_run):
    supernet, _ = load_supernet(tiny_run / "last.pt")
    trainer = SupernetTrainer(make_config(arch=FIXED, init_from=str(tiny_run / "last.pt")), DIGITS, steps_per_epoch=10)
    for name, tensor in supernet.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    assert trainer.teacher is not None and not any(p.requires_grad for p in trainer.teacher.parameters())
    images, labels = next(iter(build_loader("digits", DIGITS, "train", 16)))
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train_step(images, labels)
    assert all(torch.equal(trainer.teacher.state_dict()[k], v) for k, v in teacher_before.items())
    assert not torch.equal(trainer.model.head.weight, supernet.head.weight)  # the student did move


def test_fixed_run_checkpoint_records_its_arch_for_evaluate(fixed_run, tiny_run, capsys):
    import json

    rows = _rows(fixed_run / "metrics.csv")
    assert list(k for k in rows[-1] if k.startswith("val_")) == ["val_top1_subnet"]
    model, meta = load_supernet(fixed_run / "last.pt")
    assert meta["arch"] == FIXED.to_dict() and meta["config"]["strategy"] == "fixed"
    assert load_supernet(tiny_run / "last.pt")[1]["arch"] is None
    assert main(["evaluate", "--checkpoint", str(fixed_run / "last.pt"), "--json"]) == 0  # --arch defaults to FIXED
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == FIXED.to_dict() and result["top1"] == pytest.approx(float(rows[-1]["val_top1_subnet"]))
    identity = json.loads((fixed_run / "run.json").read_text())
    assert len(identity["init_sha256"]) == 64 and json.loads(identity["arch"]) == FIXED.to_dict()


def test_export_takes_the_fixed_runs_arch_and_needs_one_for_a_supernet(fixed_run, tiny_run, tmp_path, capsys,
                                                                        monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)  # no project file
    assert main(["export", "--checkpoint", str(fixed_run / "last.pt"), "--format", "timm", "--out", "m"]) == 0
    assert json.loads((tmp_path / "m" / "card.json").read_text())["arch"] == FIXED.to_dict()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tiny_run / "last.pt"), "--format", "timm", "--out", "n"]) == 2
    assert "is a supernet; name the subnet to export with --arch" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_fixed_run_bad_input_writes_nothing(tmp_path, tiny_run, capsys):
    outside = tmp_path / "outside.yaml"
    save_arch(replace(FIXED, embed_dim=512), outside)
    args = ["train", "--space", "digits", "--data", "digits", "--epochs", "1", "--threads", "1", "--quiet"]
    assert main([*args, "--arch", str(outside), "--out", str(tmp_path / "a")]) == 2
    assert "embed_dim 512 is outside" in capsys.readouterr().err
    other_space = tmp_path / "wide.yaml"
    other_space.write_text(yaml.safe_dump({**DIGITS.to_dict(), "depths": [2, 3, 4, 5]}))
    assert main([*args[:2], str(other_space), *args[3:], "--arch", "middle", "--init-from", str(tiny_run / "last.pt"),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained for space 'digits'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- exact resume after SIGKILL -----------------------------------------------------------------


def _train_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "hwaware.cli", "train", "--space", "digits", "--data", "digits", "--out", str(out),
            "--epochs", "2", "--batch-size", "64", "--strategy", "sandwich", "--num-random", "1",
            "--checkpoint-every", "5", "--threads", "1", "--quiet"]


def test_sigkill_mid_epoch_then_rerun_ends_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(reference), env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    _, meta = load_supernet(killed / "last.pt")
    assert not meta["complete"] and meta["step"] % 19 != 0  # 19 steps per epoch: the kill came mid-epoch

    resumed = subprocess.run(_train_command(killed), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 1" in resumed.stderr
    assert _learned(_rows(killed / "metrics.csv")) == _learned(_rows(reference / "metrics.csv"))
    final, reference_final = torch.load(killed / "last.pt", weights_only=True), torch.load(reference / "last.pt",
                                                                                           weights_only=True)
    for name, tensor in reference_final["model"].items():
        assert torch.equal(final["model"][name], tensor), name


# ---- CUDA: mixed precision ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_step_on_cuda(amp):
    trainer = SupernetTrainer(make_config(strategy="sandwich", amp=amp, warmup_epochs=0, lr=3e-3), DIGITS, 50,
                              device="cuda")
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    images, labels = next(iter(build_loader("digits", DIGITS, "train", 64)))
    before = evaluate(trainer.model, DIGITS.largest(), [(images, labels)], device="cuda")["loss"]
    losses = [trainer.train_step(images, labels) for _ in range(20)]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert evaluate(trainer.model, DIGITS.largest(), [(images, labels)], device="cuda")["loss"] < before
    assert trainer.state_dict()["scaler"] or amp == "bf16"  # fp16 checkpoints carry the scaler's scale


# ---- hostile input (issue 13) --------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"seed": -1}, "seed: must be >= 0"),
    ({"min_lr": 1.0, "lr": 0.01}, "min_lr: 1 is above the peak lr 0.01"),
    ({"compute_device": "mps"}, "compute_device: 'mps' is not auto, cpu, cuda or cuda:N"),
    ({"num_workers": 100000}, "num_workers: 100000 data-loader processes"),
    ({"batch_size": 60000}, "batch_size: 60000 x 1 ranks x 1 accumulated exceeds the 1257 training images"),
    ({"global_batch": 96, "batch_size": 64}, "global_batch: 96 is not a multiple of batch_size 64 x 1 ranks"),
])
def test_refused_settings_write_nothing_so_the_corrected_command_runs(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(HwawareError, match=message):
        train_supernet(make_config(**{**TINY, **overrides}, out=str(out)))
    assert not (out / "run.json").exists() and not (out / "last.pt").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import math

    real = SupernetTrainer.accumulated_step

    def diverges_at_step_3(self, batches):
        loss = real(self, batches)
        return math.nan if self.step == 3 else loss

    monkeypatch.setattr(SupernetTrainer, "accumulated_step", diverges_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(HwawareError, match="the loss became nan at step 3 .* keeps the last good state"):
        train_supernet(make_config(**{**TINY, "checkpoint_every": 2}, out=str(out)))
    model, meta = load_supernet(out / "last.pt")
    assert meta["step"] == 2 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_last_pt_of_another_run_is_not_resumed(tmp_path, tiny_run):
    import shutil

    out = tmp_path / "run"
    train_supernet(make_config(**{**TINY, "epochs": 1}, out=str(out)))  # writes run.json for this run's settings
    shutil.copy(tiny_run / "last.pt", out / "last.pt")  # ... and a checkpoint of another run
    with pytest.raises(HwawareError, match="was written by another run \\(epochs: "):
        train_supernet(make_config(**{**TINY, "epochs": 1}, out=str(out)))


# ---- the ImageNet recipe at scale (issue 16) -----------------------------------------------------


def test_imagenet_recipe_randaugment_survives_10000_draws(monkeypatch):
    """timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (m9 + N(0, 0.5) clipped): Pillow 13 raised
    ValueError there, 13 times in these 10,000 draws before the fix; a 0-bit posterize is now black."""
    import random

    import numpy as np
    from PIL import Image

    import hwaware.data as data
    from hwaware.train import RECIPES

    zero_bits = []
    real = data._posterize

    def counting(image, bits, **kwargs):
        zero_bits.append(bits == 0)
        return real(image, bits, **kwargs)

    monkeypatch.setattr(data, "_posterize", counting)
    space = replace(get_space("autoformer-t"), img_size=16)
    transform = data._image_transform(space, True, RECIPES["imagenet"]["auto_augment"], RECIPES["imagenet"]["reprob"])
    (randaugment,) = [t for t in transform.transforms if type(t).__name__ == "RandAugment"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    failures = 0
    for i in range(10_000):
        seed = data.mix_seed(0, 0, i)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        try:
            randaugment(image)
        except ValueError:
            failures += 1
    assert failures == 0
    assert sum(zero_bits) >= 1  # the draws did reach the case that crashed


def test_zero_bit_posterize_is_black_and_others_are_pillows():
    import numpy as np
    from PIL import Image, ImageOps

    from hwaware.data import _posterize

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert not np.asarray(_posterize(image, 0)).any()
    assert np.array_equal(np.asarray(_posterize(image, 3)), np.asarray(ImageOps.posterize(image, 3)))
    assert _posterize(image, 8) is image


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, expected):
    from hwaware.train import _amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as on a V100, which emulates it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert _amp_dtype("auto", torch.device("cuda", 0)) == expected
    assert _amp_dtype("auto", torch.device("cpu")) is None and _amp_dtype("off", torch.device("cuda", 0)) is None


def test_repeated_augmentation_deals_copies_to_different_ranks_and_resumes():
    from hwaware.data import RepeatedAugmentationSampler, ResumableSampler, SeededItems

    size, repeats, world = 12, 3, 4
    shards = [list(RepeatedAugmentationSampler(size, repeats, seed=5, epoch=2, rank=r, world_size=world))
              for r in range(world)]
    assert [len(s) for s in shards] == [len(ResumableSampler(size, True, world_size=world, rank=r)) for r in range(world)]
    copies: dict[int, list[tuple[int, int]]] = {}
    for rank, shard in enumerate(shards):
        for epoch, index, copy in shard:
            assert epoch == 2
            copies.setdefault(index, []).append((rank, copy))
    assert len(copies) == size // repeats  # an epoch as long as without repeats: a third of the items, 3 times each
    for held in copies.values():
        assert sorted(c for _, c in held) == [0, 1, 2] and len({r for r, _ in held}) == 3  # 3 ranks, 3 seeds
    sampler = RepeatedAugmentationSampler(size, repeats, seed=5, epoch=2, rank=1, world_size=world)
    sampler.set_epoch(2, start=1)
    assert list(sampler) == shards[1][1:]

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return size

        def __getitem__(self, i):
            return float(torch.rand(()))

    items = SeededItems(Noisy(), seed=0)
    assert items[(2, 4, 0)] != items[(2, 4, 1)] and items[(2, 4, 1)] == items[(2, 4, 1)]


def test_accumulated_micro_batches_step_as_one_batch():
    config = make_config(strategy="uniform", warmup_epochs=0, lr=3e-3, clip_grad=0.0)
    images, labels = next(iter(build_loader("digits", ONE_SUBNET, "train", 32)))
    whole = SupernetTrainer(config, ONE_SUBNET, 50)
    whole.train_step(images, labels)
    split = SupernetTrainer(config, ONE_SUBNET, 50)
    split.accumulated_step([(images[:16], labels[:16]), (images[16:], labels[16:])])
    # The gradient the step took (left in .grad until the next step): equal up to float summation order.
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
    assert split.step == 1


def test_global_batch_accumulates_and_identity_keeps_older_runs(tmp_path):
    out = tmp_path / "run"
    row = train_supernet(make_config(**{**TINY, "epochs": 1, "batch_size": 64, "global_batch": 256,
                                        "val_images": 100}, out=str(out)))
    assert row["step"] == 1257 // 64 // 4  # 19 micro-batches: 4 whole steps of 4
    base = make_config(**TINY).identity(DIGITS)
    assert not {"global_batch", "aug_repeats", "val_images"} & set(base)  # a run.json from before still matches
    assert make_config(**TINY, aug_repeats=3).identity(DIGITS)["aug_repeats"] == 3
    with pytest.raises(HwawareError, match="aug_repeats: must be at least 1"):
        make_config(aug_repeats=0)


def test_validation_subset_is_fixed_and_bounded():
    from hwaware.train import validation_subset

    data = build_loader("digits", DIGITS, "val", 8).dataset.dataset
    subset = validation_subset(data, 100)
    assert len(subset) == 100 and list(subset.indices) == sorted(subset.indices)
    assert list(validation_subset(data, 100).indices) == list(subset.indices)
    assert validation_subset(data, 0) is data and validation_subset(data, 10**6) is data


def test_imagenet_recipe_is_autoformers():
    config = make_config("imagenet")
    assert (config.strategy, config.aug_repeats, config.global_batch, config.lr) == ("uniform", 3, 1024, 1e-3)
    assert config.accumulation(8) == 1 and config.accumulation(2) == 4 and config.accumulation(1) == 8
    with pytest.raises(HwawareError, match="global_batch: 1024 is not a multiple of batch_size 128 x 3 ranks"):
        config.accumulation(3)


def test_train_logs_lines_not_bars_off_a_terminal_and_takes_the_old_device_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--space", "digits", "--data", "digits", "--out", str(out), "--epochs", "1",
                 "--batch-size", "256", "--strategy", "uniform", "--threads", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # no redrawn frames, no cursor codes
    assert err.count("--device is deprecated") == 1 and "--compute-device now" in err
    lines = err.splitlines()
    assert any(line.startswith("epoch 1/1: 100% 4/4 step  loss=") for line in lines), err
    assert any(line.startswith("epoch 1/1  loss ") for line in lines)
    assert "warm-up 2 steps, not the 8 of --warmup-epochs 2 (at most half of the run's 4)" in err  # the cap is said


def test_progress_off_a_terminal_is_a_line_per_tenth_and_a_bar_on_one():
    import io

    from hwaware.progress import LineProgress, progress

    log = io.StringIO()
    with progress(total=40, initial=4, desc="epoch 2/9", unit="step", file=log) as bar:
        for i in range(36):
            bar.set_postfix(loss=f"{i:.1f}", refresh=False)
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 9  # 8, 12, ..., 40: resumed at 4, so 9 of the 10 tenths
    assert lines[0].startswith("epoch 2/9: 20% 8/40 step  loss=3.0  ") and "left" in lines[0]
    assert lines[-1].startswith("epoch 2/9: 100% 40/40 step  loss=35.0  ") and "left" not in lines[-1]
    log = io.StringIO()
    assert list(progress(range(3), desc="gen", file=log, every=1)) == [0, 1, 2]
    assert [line.split(":")[1].split()[1] for line in log.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]
    silent = io.StringIO()
    with progress(total=5, file=silent, disable=True) as bar:
        bar.update(5)
    assert silent.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(progress(total=3, file=Terminal()), LineProgress)  # tqdm's bar where someone watches
