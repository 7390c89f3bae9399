"""train.py end to end on a tiny dataset in the CUHK-PEDES layout, with a tiny CLIP checkpoint:
the authors' recipe, checkpoints, exact and honest resume, run folders that are never overwritten,
every bad flag as one line, durable saves, the fp16 and bf16 paths, DDP on CPU, evaluate.py."""

import errno
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY  # the CLIP of the `setup` fixture
from PIL import Image
from test_clip_min import irra_checkpoint
from test_data import undecodable_jpeg

import clip_min
import cskt
import data
import evaluate
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arguments(setup, out, *extra):
    root, clip_path = setup
    return ["--method", "cskt", "--data", "CUHK-PEDES", "--root", str(root), "--clip", clip_path,
            "--image-size", "32", "16", "--stride", "8", "--depth", "2", "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--warmup-epochs", "1",
            "--out", str(out), *extra]


def trained_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["trainable"]


def for_method(method, argv):
    """`argv` without CSKT's --depth, for the other methods."""
    if method == "cskt":
        return argv
    return [a for i, a in enumerate(argv) if "--depth" not in (a, argv[i - 1])]


def journal(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def flag_error(capsys, argv, main=train.main):
    """Runs `main` (train.py's, or evaluate.py's) expecting the parser's error; returns its one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------
# The authors' recipe, as their run scripts give it

def test_the_defaults_are_the_authors_recipe():
    args = train.parse_args(["--data", "CUHK-PEDES"])
    assert (args.epochs, args.batch_size, args.lr, args.eps, args.weight_decay) == (60, 128, 3e-4, 1e-3, 4e-5)
    assert (args.bias_lr_factor, args.betas, args.warmup_epochs, args.warmup_factor) == (2.0, (0.9, 0.999), 5, 0.1)
    assert (args.image_size, args.stride, args.augment, args.temperature, args.seed) == ((384, 128), 16, True, 0.02, 1)
    assert (args.n_ctx, args.depth, args.reduction, args.vision_scale, args.text_scale) == (4, 12, 8, 0.1, 4.0)
    assert args.mask_captions is False
    dm = train.parse_args(["--data", "CUHK-PEDES", "--method", "dm_adapter"])
    assert (dm.num_experts, dm.top_k, dm.aux_weight, dm.mask_captions) == (6, 2, 0.5, True)
    assert train.parse_args(["--data", "CUHK-PEDES", "--method", "finetune"]).lr == 1e-5


def test_schedule_is_linear_warm_up_from_a_tenth_then_cosine():
    # The authors' schedule for 60 epochs with 5 warm-up epochs (1-based epoch e):
    # e <= 5: 0.1 + 0.9 (e - 1) / 5;  else 0.5 (1 + cos(pi (e - 6) / 55)).
    for e in range(1, 61):
        expected = 0.1 + 0.9 * (e - 1) / 5 if e <= 5 else 0.5 * (1 + math.cos(math.pi * (e - 6) / 55))
        assert train.lr_factor(e - 1, 60, 5, 0.1) == pytest.approx(expected, abs=1e-12), e
    assert train.lr_factor(0, 60, 5, 0.1) == pytest.approx(0.1)
    assert train.lr_factor(5, 60, 5, 0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("epochs", [1, 2, 5, 7])
@pytest.mark.parametrize("warmup", [0, 1, 5, 9])
def test_schedule_is_defined_for_every_length(epochs, warmup):
    factors = [train.lr_factor(e, epochs, warmup, 0.1) for e in range(epochs + 1)]  # + the step after the last
    assert all(math.isfinite(f) and 0 <= f <= 1 for f in factors)
    assert factors[0] == (0.1 if warmup else 1.0)


def test_bias_group_trains_at_twice_the_lr_without_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    optimizer = train.build_optimizer(model, 3e-4, 2.0, 4e-5, (0.9, 0.999), 1e-3, torch.device("cpu"))
    weights, biases = optimizer.param_groups
    assert [p.shape for p in weights["params"]] == [(4, 3)]  # the frozen LayerNorm gain is left out
    assert [p.shape for p in biases["params"]] == [(4,), (4,)]
    assert (weights["lr"], weights["weight_decay"]) == (3e-4, 4e-5)
    assert (biases["lr"], biases["weight_decay"]) == (6e-4, 0.0)
    assert (optimizer.defaults["betas"], optimizer.defaults["eps"]) == ((0.9, 0.999), 1e-3)


def test_scheduler_steps_once_per_epoch_and_best_pt_keeps_the_best_val_epoch(setup, tmp_path, monkeypatch):
    val_r1 = iter([30.0, 60.0, 45.0])
    real = evaluate.evaluate_loaders

    def scripted(*args, **kwargs):
        metrics, r1 = real(*args, **kwargs), next(val_r1, None)  # the test split comes last
        return metrics if r1 is None else {**metrics, "R1": r1}

    monkeypatch.setattr(evaluate, "evaluate_loaders", scripted)
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--epochs", "3", "--warmup-epochs", "2", "--log-every", "1")) == 0
    steps = [e for e in journal(out) if "step" in e]
    for epoch, factor in zip((1, 2, 3), (0.1, 0.55, 1.0)):  # warm-up 0.1 -> 1 over 2 epochs, then cosine
        lrs = {e["lr"] for e in steps if e["epoch"] == epoch}
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(1e-3 * factor), epoch  # one lr per epoch
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1  # epoch 2 (0-based 1) had R1 60
    assert json.loads((out / "test_metrics.json").read_text())["epoch"] == 2


# ------------------------------------------------------------------------------------------------
# Checkpoints and resume

@pytest.mark.parametrize("method", ["cskt", "dm_adapter"])
def test_resume_after_epoch_1_equals_an_uninterrupted_run(setup, tmp_path, method):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    common = for_method(method, arguments(setup, whole, "--method", method))
    assert train.main(common) == 0
    halves_args = [str(halves) if a == str(whole) else a for a in common]
    assert train.main([*halves_args, "--stop-after", "1"]) == 0
    assert trained_weights(halves / "last.pt") != {}
    assert torch.load(halves / "last.pt", weights_only=True)["epoch"] == 0
    assert train.main(["--resume", str(halves / "last.pt")]) == 0
    uninterrupted, resumed = trained_weights(whole / "last.pt"), trained_weights(halves / "last.pt")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name
    assert all(not k.startswith("clip.") for k in uninterrupted)  # only what was trained...
    assert "state_dict" in torch.load(whole / "best.pt", weights_only=True)["clip"]  # ...and the backbone
    assert not any(name.endswith(".tmp") for name in os.listdir(whole))
    lines = journal(halves)
    assert [e for e in lines if "resumed_at_epoch" in e] == [{"resumed_at_epoch": 2}]
    steps = [(e["epoch"], e["step"]) for e in lines if "step" in e]
    assert len(steps) == len(set(steps))


def test_grad_checkpointing_trains_the_same_weights_and_may_change_on_resume(setup, tmp_path, monkeypatch):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert train.main(arguments(setup, whole)) == 0
    recomputed_blocks, real_checkpoint = [], cskt.checkpoint
    monkeypatch.setattr(cskt, "checkpoint", lambda *a, **k: recomputed_blocks.append(1) or real_checkpoint(*a, **k))
    halves_args = [str(halves) if a == str(whole) else a for a in arguments(setup, whole)]
    assert train.main([*halves_args, "--stop-after", "1", "--grad-checkpointing"]) == 0
    assert recomputed_blocks and json.loads((halves / "args.json").read_text())["grad_checkpointing"] is True
    recomputed_blocks.clear()
    assert train.main(["--resume", str(halves / "last.pt"), "--no-grad-checkpointing"]) == 0
    assert not recomputed_blocks
    uninterrupted, resumed = trained_weights(whole / "last.pt"), trained_weights(halves / "last.pt")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def test_each_epoch_is_drawn_in_its_own_order(setup, tmp_path, monkeypatch):
    # The loader is reseeded at every epoch (for exact resume); each epoch must get its own seed, or
    # every epoch would see the same order, the same augmented images and the same masked captions.
    batches = []  # per step: the batch as the loader gave it
    real_loader = data.train_loader

    def recording_loader(*args, **kwargs):
        loader = real_loader(*args, **kwargs)
        collate = loader.collate_fn  # runs in this process: --workers 0
        loader.collate_fn = lambda samples: batches.append(collate(samples)) or batches[-1]
        return loader

    monkeypatch.setattr(data, "train_loader", recording_loader)
    out = tmp_path / "run"
    assert train.main(arguments(setup, out)) == 0
    assert len(batches) == 8  # 32 pairs in batches of 8, two epochs
    epochs = [torch.cat([batch["pids"] for batch in half]) for half in (batches[:4], batches[4:])]  # [32] each
    assert not torch.equal(*epochs)  # epoch 2 is not epoch 1 again


def test_an_interrupted_epoch_is_redone_without_repeating_the_log(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--stop-after", "1", "--log-every", "1")) == 0
    (out / "last.pt.5f3a9c1e2b4d.tmp").write_bytes(b"half a save")  # a save that was killed
    real_step, calls = torch.optim.Adam.step, []

    def step_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_interrupt)
    assert train.main(["--resume", str(out / "last.pt")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"interrupted; continue with --resume {out / 'last.pt'}"
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0  # still the last good epoch
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert train.main(["--resume", str(out / "last.pt")]) == 0
    assert not (out / "last.pt.5f3a9c1e2b4d.tmp").exists()
    steps = [(e["epoch"], e["step"]) for e in journal(out) if "step" in e]
    assert steps == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    # The interrupted attempt's lines, its "resumed" line too, were work that was redone: gone.
    assert [e for e in journal(out) if "resumed_at_epoch" in e] == [{"resumed_at_epoch": 2}]


def test_resume_refuses_flags_that_change_the_run_and_writes_nothing(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--stop-after", "1")) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    last = str(out / "last.pt")
    err = flag_error(capsys, ["--resume", last, "--method", "dm_adapter", "--lr", "0.002", "--depth", "1"])
    assert "--depth 1 (the run's: 2)" in err and "--lr 0.002 (the run's: 0.001)" in err
    assert "--method dm_adapter (the run's: cskt)" in err
    err = flag_error(capsys, ["--resume", last, "--clip", "ViT-B/16"])
    assert "--clip ViT-B/16" in err
    assert "resume from the last.pt of a run" in flag_error(capsys, ["--resume", str(out / "best.pt")])
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    # Running flags may change; flags repeated with the run's own values are fine.
    assert train.main(["--resume", last, "--workers", "1", "--log-every", "3", "--lr", "1e-3"]) == 0


def test_the_batch_splits_evenly_and_a_resume_keeps_the_process_count(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 sets it
    assert "8 pairs do not split evenly over 3 processes" in flag_error(capsys, arguments(setup, out))
    monkeypatch.delenv("WORLD_SIZE")
    assert train.main(arguments(setup, out, "--stop-after", "1")) == 0
    assert torch.load(out / "last.pt", weights_only=True)["args"]["processes"] == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = flag_error(capsys, ["--resume", str(out / "last.pt")])
    assert "the run was started with 1 process(es), this is 2" in err


def test_a_resume_uses_the_optimizer_kernels_of_its_own_device(setup, tmp_path, monkeypatch):
    """A run saved on CUDA (fused Adam) resumes on the CPU with the CPU's foreach Adam, under
    another precision too (fp16 with its grad scaler)."""
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--stop-after", "1")) == 0
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:  # as build_optimizer sets them on CUDA
        group.update(fused=True, foreach=None)
    torch.save(checkpoint, out / "last.pt")
    real_step, kernels = torch.amp.GradScaler.step, []

    def recording_step(self, optimizer, *args, **kwargs):  # fp16's first steps may be skipped: record here
        kernels.append([(group["fused"], group["foreach"]) for group in optimizer.param_groups])
        return real_step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", recording_step)
    assert train.main(["--resume", str(out / "last.pt"), "--precision", "fp16"]) == 0
    assert kernels and all(step == [(None, True), (None, True)] for step in kernels)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_resume_refuses_a_clip_file_that_changed(setup, tmp_path, capsys):
    clip_path = tmp_path / "clip.pt"
    shutil.copy(setup[1], clip_path)
    out = tmp_path / "run"
    assert train.main([*arguments(setup, out, "--stop-after", "1"), "--clip", str(clip_path)]) == 0
    state = torch.load(clip_path, weights_only=True)
    state["ln_final.bias"] += 1
    torch.save(state, clip_path)
    assert train.main(["--resume", str(out / "last.pt")]) == 1
    assert "is not the CLIP file the run started from" in capsys.readouterr().err


def test_run_folder_and_evaluate_py_on_the_checkpoint(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--log-every", "2")) == 0
    assert {"args.json", "log.jsonl", "best.pt", "last.pt", "test_metrics.json"} <= set(os.listdir(out))
    log = journal(out)
    assert any("pairs_per_s" in entry for entry in log) and any(e.get("split") == "val" for e in log)
    printed = capsys.readouterr().out
    assert "epoch 2/2  step 2/4  loss" in printed and "epoch 2/2  step 4/4  loss" in printed and "pairs/s  ETA" in printed
    assert "precision fp32" in printed
    test_metrics = json.loads((out / "test_metrics.json").read_text())
    # A tiny copy is not the published CUHK-PEDES: said at the start, in the log and beside the numbers.
    assert "CUHK-PEDES: NOT the published set" in printed and log[0]["published_set"] is False
    assert test_metrics["published_set"] is False and test_metrics["dataset_check"] == log[0]["verdict"]

    model, checkpoint = evaluate.load_checkpoint(str(out / "best.pt"))
    assert checkpoint["method"] == "cskt" and checkpoint["epoch"] == test_metrics["epoch"] - 1
    root = str(setup[0])
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--root", root, "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"| cskt   | {test_metrics['R1']:6.2f} |" in printed  # the same number as train.py's
    assert not os.path.exists(tmp_path / "retrieval")  # nothing drawn, no folder made
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--root", root, "--workers", "0",
                          "--save-examples", "2", "--query", "someone in red", "--out", "pics"]) == 0
    assert sorted(os.listdir(tmp_path / "pics")) == ["example_00.png", "example_01.png", "query.png"]


def test_an_existing_run_folder_is_never_overwritten(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--stop-after", "1")) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    err = flag_error(capsys, arguments(setup, out))
    assert f"--resume {out / 'last.pt'}" in err and "another --out" in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_finetune_checkpoint_holds_the_whole_clip(setup, tmp_path):
    out = tmp_path / "finetune"
    args = for_method("finetune", arguments(setup, out))
    assert train.main([*args, "--method", "finetune", "--epochs", "1", "--warmup-epochs", "0"]) == 0
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert "state_dict" not in checkpoint["clip"] and "logit_scale" in checkpoint["trainable"]
    model, _ = evaluate.load_checkpoint(str(out / "best.pt"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["trainable"][name]), name


def test_epochs_equal_to_warm_up_epochs_finish(setup, tmp_path):
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--epochs", "2", "--warmup-epochs", "2")) == 0
    assert (out / "test_metrics.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    opened = []  # every file train.py opens itself (log.jsonl, args.json): closed on every way out
    monkeypatch.setattr(train, "open", lambda *args: opened.append(open(*args)) or opened[-1], raising=False)
    assert train.main(arguments(setup, out, "--stop-after", "1")) == 0
    assert any(f.name.endswith("log.jsonl") for f in opened) and all(f.closed for f in opened)
    good = trained_weights(out / "last.pt")
    monkeypatch.setattr(clip_min, "sdm_loss", lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    opened.clear()
    assert train.main(["--resume", str(out / "last.pt")]) == 1
    assert "error: the loss became NaN or infinite in epoch 2" in capsys.readouterr().err
    assert any(f.name.endswith("log.jsonl") for f in opened) and all(f.closed for f in opened)
    kept = trained_weights(out / "last.pt")
    assert all(torch.equal(good[name], kept[name]) for name in good)


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--stop-after", "1")) == 0
    good = trained_weights(out / "last.pt")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert train.main(["--resume", str(out / "last.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not save {out}") and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1
    assert all(torch.equal(good[name], value) for name, value in trained_weights(out / "last.pt").items())
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["cskt", "dm_adapter"])
def test_mixed_precision_paths_train_on_the_cpu(setup, tmp_path, precision, method):
    out = tmp_path / "run"
    args = arguments(setup, out, "--method", method, "--precision", precision, "--epochs", "1", "--warmup-epochs", "0")
    assert train.main(for_method(method, args)) == 0
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in checkpoint["trainable"].values() if v.is_floating_point())
    assert math.isfinite(json.loads((out / "test_metrics.json").read_text())["R1"])
    assert bool(checkpoint["scaler"]) == (precision == "fp16")  # loss scaling only for fp16


# ------------------------------------------------------------------------------------------------
# Bad input: one clear line, never a traceback

@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["--lr", "-0.001"], "argument --lr: must be greater than 0"),
    (["--lr", "nan"], "argument --lr: nan is not a finite number"),
    (["--workers", "-1"], "argument --workers: must be at least 0"),
    (["--log-every", "0"], "argument --log-every: must be at least 1"),
    (["--eval-every", "0"], "argument --eval-every: must be at least 1"),
    (["--depth", "0"], "argument --depth: must be at least 1"),
    (["--epochs", "0"], "argument --epochs: must be at least 1"),
    (["--temperature", "0"], "argument --temperature: must be greater than 0"),
    (["--bias-lr-factor", "-1"], "argument --bias-lr-factor: must be at least 0"),
    (["--stride", "0"], "argument --stride: must be at least 1"),
    (["--betas", "0.9", "1"], "argument --betas: must be less than 1"),
    (["--seed", "-3"], "argument --seed: must be at least 0"),
    (["--epochs", "two"], "argument --epochs: 'two' is not a whole number"),
    (["--device", "cuda"], "argument --device: cuda: this machine has no CUDA GPU"),
    (["--device", "tpu:0"], "argument --device: 'tpu:0' is not a device"),
    (["--num-experts", "4"], "argument --num-experts: not a flag of --method cskt"),
    (["--method", "dm_adapter", "--top-k", "3", "--num-experts", "2"], "argument --top-k: at most --num-experts (2)"),
    (["--method", "finetune", "--depth", "2"], "argument --depth: not a flag of --method finetune"),
    (["--depth", "5"], "argument --depth: depth must be between 1 and the number of layers (2)"),
    (["--resume", "/nonexistent/last.pt"], "argument --resume: no such checkpoint"),
])
def test_bad_flags_are_the_parsers_one_line(setup, tmp_path, capsys, flags, message):
    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has a GPU")
    argv = arguments(setup, tmp_path / "run", *flags)
    argv = for_method("dm_adapter", argv) if "dm_adapter" in flags else argv
    assert message in flag_error(capsys, argv)
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_image_size_that_leaves_pixels_unseen_is_refused(setup, tmp_path, capsys):
    square_clip = tmp_path / "square.pt"  # a square position grid, like OpenAI's, fits any size
    torch.save(clip_min.CLIP(clip_min.CLIPConfig(**{**vars(TINY), "image_size": (32, 32)})).state_dict(), square_clip)
    argv = [*arguments(setup, tmp_path / "run", "--image-size", "37", "13"), "--clip", str(square_clip)]
    assert "argument --image-size: with patch 8 and stride 8, 37x13 leaves pixels" in flag_error(capsys, argv)


def refuse_downloads(monkeypatch):
    def download(name, *args, **kwargs):
        raise AssertionError(f"{name} was downloaded")
    monkeypatch.setattr(clip_min, "download", download)


def test_flags_that_do_not_fit_the_clip_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # The patch size and the layer count come from DEMO_CLIP or the release name: nothing is drawn,
    # pretrained or downloaded before the one-line flag error.
    refuse_downloads(monkeypatch)
    monkeypatch.setattr(train, "demo_clip", lambda *a: pytest.fail("the demo's CLIP was pretrained"))
    new = tmp_path / "new"
    assert "argument --image-size: with patch 8 and stride 8, 37x13 leaves pixels" in flag_error(
        capsys, ["--root", str(new), "--image-size", "37", "13"])
    assert "the demo's CLIP is made for --image-size 64 32 --stride 8" in flag_error(
        capsys, ["--root", str(new), "--image-size", "72", "32"])
    assert "argument --depth: depth must be between 1 and the number of layers (12), got 13" in flag_error(
        capsys, ["--data", "CUHK-PEDES", "--root", str(new), "--depth", "13"])
    assert "argument --image-size: with patch 32 and stride 16" in flag_error(
        capsys, ["--data", "CUHK-PEDES", "--root", str(new), "--clip", "ViT-B/32", "--image-size", "384", "120"])
    assert not new.exists()


def test_a_missing_dataset_is_reported_before_the_clip_is_downloaded(tmp_path, capsys, monkeypatch):
    refuse_downloads(monkeypatch)
    assert train.main(["--data", "CUHK-PEDES", "--root", str(tmp_path), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/CUHK-PEDES: dataset folder not found"), err


def test_the_demo_recipe_reaches_only_the_method_that_has_the_flag(tmp_path):
    root = str(tmp_path / "data")
    assert train.parse_args(["--root", root]).depth == train.DEMO_RECIPE["depth"] == 4
    for method in ("dm_adapter", "finetune"):
        args = train.parse_args(["--root", root, "--method", method])
        assert args.depth is None and args.n_ctx is None, vars(args)  # args.json records no --depth
        assert args.epochs == train.DEMO_RECIPE["epochs"]


def test_help_shows_each_default_once_and_the_demo_recipe():
    parser = train.build_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = formatter._expand_help(action) if action.help else ""
        assert shown.count("default") <= 1, shown
    # The --data text lists the demo's recipe as flags; typed on the command line, they give the
    # values a demo run uses.
    data_help = " ".join(next(a.help for a in parser._actions if a.dest == "data").split())
    listed = data_help.split("recipe, not the values shown below: ")[1].split(" (--depth")[0].split()
    typed = parser.parse_args(listed)
    assert {k: getattr(typed, k) for k in train.DEMO_RECIPE} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in train.DEMO_RECIPE.items()}
    assert "(default: 60)" in text and "(default: (384, 128))" in text


def test_evaluate_py_help_shows_no_empty_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "(default: None)" not in text and "(default: ViT-B/16)" in text


def test_out_naming_a_file_or_a_read_only_folder_is_refused(setup, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert "argument --out: " in flag_error(capsys, arguments(setup, tmp_path / "file"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root, a test cannot make one
    assert "cannot write into" in flag_error(capsys, arguments(setup, tmp_path / "new" / "run"))


@pytest.mark.parametrize("case", ["bigger batch", "missing root", "missing clip", "random-bytes clip", "empty clip"])
def test_bad_inputs_exit_1_with_one_clear_line(setup, tmp_path, capsys, case):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000) if case == "random-bytes clip" else b"")
    extra, expected = {
        "bigger batch": (["--batch-size", "64"], "error: CUHK-PEDES has 32 training pairs, fewer than one batch"),
        "missing root": (["--root", "/nonexistent/datasets"],
                         "error: /nonexistent/datasets/CUHK-PEDES: dataset folder not found. Get CUHK-PEDES"),
        "missing clip": (["--clip", "/nonexistent/clip.pt"], "error: no such file: /nonexistent/clip.pt"),
        "random-bytes clip": (["--clip", str(garbage)], f"error: could not read {garbage}"),
        "empty clip": (["--clip", str(garbage)], f"error: {garbage} is empty (0 bytes), not a checkpoint"),
    }[case]
    assert train.main(arguments(setup, tmp_path / "run", *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_broken_test_image_stops_the_run_before_training(setup, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(setup[0] / "CUHK-PEDES", root / "CUHK-PEDES")
    broken = root / "CUHK-PEDES" / "imgs" / "test" / "013_1.png"
    broken.write_bytes(b"not a picture")
    assert train.main([*arguments(setup, tmp_path / "run"), "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert str(broken) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_evaluate_py_bad_flags_are_one_line(setup, tmp_path, capsys):
    def error_of(argv):
        return flag_error(capsys, argv, main=evaluate.main)

    assert "--image-size/--stride" in error_of(["--checkpoint", "best.pt", "--image-size", "64", "32"])
    assert "--method clip needs a dataset" in error_of(["--method", "clip"])
    assert "argument --batch-size" in error_of(["--method", "clip", "--data", "demo", "--batch-size", "0"])
    if not torch.cuda.is_available():
        assert "argument --device" in error_of(["--method", "clip", "--data", "demo", "--device", "cuda"])
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert capsys.readouterr().err == f"error: no such checkpoint: {tmp_path / 'missing.pt'}\n"


def test_evaluate_py_zero_shot_clip(setup, capsys):
    root, clip_path = setup
    common = ["--method", "clip", "--clip", clip_path, "--image-size", "32", "16", "--stride", "8",
              "--root", str(root), "--workers", "0"]
    assert evaluate.main([*common, "--data", "CUHK-PEDES", "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "CUHK-PEDES val, 6 images:" in printed and f"| {clip_path} zero-shot |" in printed


def test_irra_s_released_model_is_a_clip_to_evaluate_and_to_fine_tune(setup, tmp_path, capsys):
    root, clip_path = setup
    irra = str(tmp_path / "irra-best.pth")  # IRRA's layout, saved from DDP, around the tiny CLIP
    torch.save(irra_checkpoint(clip_min.load(clip_path, (32, 16), 8), ddp=True), irra)
    common = ["--method", "clip", "--clip", irra, "--image-size", "32", "16", "--stride", "8",
              "--root", str(root), "--workers", "0", "--data", "CUHK-PEDES"]
    assert evaluate.main(common) == 0
    printed = capsys.readouterr()
    assert f"| {irra} zero-shot |" in printed.out and "CUHK-PEDES: NOT the published set" in printed.out
    assert printed.err.count("8 tensors of IRRA's training heads are left out") == 1
    out = tmp_path / "run"
    assert train.main(for_method("finetune", arguments(setup, out, "--method", "finetune", "--clip", irra,
                                                       "--epochs", "1", "--warmup-epochs", "0"))) == 0
    assert capsys.readouterr().err.count("IRRA's checkpoint: its CLIP is used") == 1
    assert (out / "test_metrics.json").exists()


def test_two_process_torchrun_on_cpu_and_its_resume(setup, tmp_path, capsys):
    """Also DDP with activation checkpointing (the first leg), resumed without it."""
    out = tmp_path / "ddp"

    def torchrun(*argv):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
                   os.path.join(REPO, "train.py"), *argv]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    first_leg = arguments(setup, out, "--stop-after", "1", "--grad-checkpointing", "--log-every", "1")
    assert "2 process(es)" in torchrun(*first_leg)
    # --batch-size is the global batch: each process loads its share (4 of 8), so the 32 training
    # pairs are 4 steps per epoch, as in one process (a process loading all 8 would take 2).
    assert [e["step"] for e in journal(out) if "step" in e] == [1, 2, 3, 4]
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["args"]["processes"] == 2
    first, second = checkpoint["rng"]  # each process's own CPU generator, to resume it
    assert not torch.equal(first, second)
    assert "started with 2 process(es), this is 1" in flag_error(capsys, ["--resume", str(out / "last.pt")])
    assert "continuing at epoch 2" in torchrun("--resume", str(out / "last.pt"))
    assert (out / "test_metrics.json").exists()


def test_an_unreadable_image_in_a_loader_worker_is_one_clear_line(setup, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(setup[0] / "CUHK-PEDES", root / "CUHK-PEDES")
    broken = root / "CUHK-PEDES" / "imgs" / "train" / "003_1.png"
    original = broken.read_bytes()
    broken.write_bytes(original[:len(original) // 2])  # cut short: decoded as the authors' pipelines do
    command = [sys.executable, os.path.join(REPO, "train.py"), *arguments(setup, tmp_path / "run", "--epochs", "1",
               "--warmup-epochs", "0"), "--root", str(root), "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"epoch 1: \d+ training image\(s\) read from files cut short", result.stdout), result.stdout

    undecodable_jpeg(np.asarray(Image.open(io.BytesIO(original)).convert("RGB")), broken)  # header reads, pixels not
    command = [sys.executable, os.path.join(REPO, "train.py"), *arguments(setup, tmp_path / "run2"),
               "--root", str(root), "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {broken}"), result.stderr
