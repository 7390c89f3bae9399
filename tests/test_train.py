"""train.py end to end on a tiny dataset in the CUHK-PEDES layout, with a tiny CLIP checkpoint:
checkpoints, exact resume, DDP on CPU, a NaN stop, evaluate.py on the result, and clear errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import clip_min
import evaluate
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=2, text_width=64, text_layers=2)
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "pink", "brown", "purple"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root with a tiny CUHK-PEDES, path of a tiny CLIP state dict)."""
    root = tmp_path_factory.mktemp("data")
    entries, generator = [], torch.Generator().manual_seed(0)
    for pid, split in enumerate(["train"] * 8 + ["val"] * 3 + ["test"] * 3, start=1):
        colour = COLOURS[pid % len(COLOURS)]
        for k in range(2):
            path = f"{split}/{pid:03d}_{k}.png"
            (root / "CUHK-PEDES" / "imgs" / split).mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (24, 12, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "CUHK-PEDES" / "imgs" / path)
            entries.append({"split": split, "id": pid, "file_path": path, "processed_tokens": [],
                            "captions": [f"a person in {colour} clothes, picture {k}", f"someone wearing {colour}"]})
    (root / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps(entries))
    torch.manual_seed(0)
    clip_path = root / "tiny-clip.pt"
    torch.save(clip_min.CLIP(TINY).state_dict(), clip_path)
    return root, str(clip_path)


def arguments(setup, out, *extra):
    root, clip_path = setup
    return ["--method", "cskt", "--data", "CUHK-PEDES", "--root", str(root), "--clip", clip_path,
            "--image-size", "32", "16", "--stride", "8", "--depth", "2", "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--warmup-epochs", "1",
            "--out", str(out), *extra]


def trained_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["trainable"]


@pytest.mark.parametrize("method", ["cskt", "dm_adapter"])
def test_resume_after_epoch_1_equals_an_uninterrupted_run(setup, tmp_path, method):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert train.main(arguments(setup, whole, "--method", method)) == 0
    assert train.main(arguments(setup, halves, "--method", method, "--stop-after", "1")) == 0
    assert trained_weights(halves / "last.pt") != {}
    assert torch.load(halves / "last.pt", weights_only=True)["epoch"] == 0
    assert train.main(arguments(setup, halves, "--method", method, "--resume", str(halves / "last.pt"))) == 0
    uninterrupted, resumed = trained_weights(whole / "last.pt"), trained_weights(halves / "last.pt")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name
    assert all(not k.startswith("clip.") for k in uninterrupted)  # only what was trained...
    assert "state_dict" in torch.load(whole / "best.pt", weights_only=True)["clip"]  # ...and the backbone
    assert not any(name.endswith(".tmp") for name in os.listdir(whole))


def test_run_folder_and_evaluate_py_on_the_checkpoint(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(arguments(setup, out, "--log-every", "2")) == 0
    assert {"args.json", "log.jsonl", "best.pt", "last.pt", "test_metrics.json"} <= set(os.listdir(out))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("pairs_per_s" in entry for entry in log) and any(e.get("split") == "val" for e in log)
    printed = capsys.readouterr().out
    assert "epoch 2/2  step 2/4  loss" in printed and "epoch 2/2  step 4/4  loss" in printed and "pairs/s  ETA" in printed
    test_metrics = json.loads((out / "test_metrics.json").read_text())

    model, checkpoint = evaluate.load_checkpoint(str(out / "best.pt"))
    assert checkpoint["method"] == "cskt" and checkpoint["epoch"] == test_metrics["epoch"] - 1
    root = str(setup[0])
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--root", root, "--workers", "0",
                          "--save-examples", "2", "--query", "someone in red", "--out", str(tmp_path / "pics")]) == 0
    printed = capsys.readouterr().out
    assert f"| cskt   | {test_metrics['R1']:6.2f} |" in printed  # the same number as train.py's
    assert sorted(os.listdir(tmp_path / "pics")) == ["example_00.png", "example_01.png", "query.png"]


def test_evaluate_py_zero_shot_clip(setup, capsys):
    root, clip_path = setup
    common = ["--method", "clip", "--clip", clip_path, "--image-size", "32", "16", "--stride", "8",
              "--root", str(root), "--workers", "0"]
    assert evaluate.main([*common, "--data", "CUHK-PEDES", "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "CUHK-PEDES val, 6 images:" in printed and f"| {clip_path} zero-shot |" in printed
    assert evaluate.main(common) == 1
    assert capsys.readouterr().err == "error: --method clip needs --data\n"


def test_finetune_checkpoint_holds_the_whole_clip(setup, tmp_path):
    out = tmp_path / "finetune"
    assert train.main(arguments(setup, out, "--method", "finetune", "--epochs", "1", "--warmup-epochs", "0")) == 0
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert "state_dict" not in checkpoint["clip"] and "logit_scale" in checkpoint["trainable"]
    model, _ = evaluate.load_checkpoint(str(out / "best.pt"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["trainable"][name]), name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    assert train.main(arguments(setup, out, "--stop-after", "1")) == 0
    good = trained_weights(out / "last.pt")
    monkeypatch.setattr(clip_min, "sdm_loss", lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    assert train.main(arguments(setup, out, "--resume", str(out / "last.pt"))) == 1
    assert "error: the loss became NaN or infinite in epoch 2" in capsys.readouterr().err
    kept = trained_weights(out / "last.pt")
    assert all(torch.equal(good[name], kept[name]) for name in good)


def test_two_process_torchrun_on_cpu(setup, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
               os.path.join(REPO, "train.py"), *arguments(setup, out, "--epochs", "1", "--warmup-epochs", "0")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout and (out / "test_metrics.json").exists()


@pytest.mark.parametrize("extra,message", [
    (["--root", "/nonexistent/datasets"], "error: /nonexistent/datasets/CUHK-PEDES: dataset folder not found. "
                                          "Get CUHK-PEDES"),
    (["--clip", "/nonexistent/clip.pt"], "error: no such file: /nonexistent/clip.pt"),
])
def test_bad_inputs_exit_non_zero_with_one_clear_line(setup, tmp_path, extra, message):
    command = [sys.executable, os.path.join(REPO, "train.py"), *arguments(setup, tmp_path / "bad"), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unreadable_image_in_a_loader_worker_is_one_clear_line(setup, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(setup[0] / "CUHK-PEDES", root / "CUHK-PEDES")
    broken = root / "CUHK-PEDES" / "imgs" / "train" / "003_1.png"
    broken.write_bytes(b"not a picture")
    command = [sys.executable, os.path.join(REPO, "train.py"), *arguments(setup, tmp_path / "run"),
               "--root", str(root), "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {broken}: unreadable image"), result.stderr
