"""The benchmark script runs (a smoke test at a tiny configuration; it asserts nothing about time)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(*arguments, cwd):
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "benchmark.py"), *arguments],
                            capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_step_benchmark_at_a_tiny_configuration(tmp_path):
    for method in ("cskt", "dm_adapter"):
        report = run_benchmark("train", "--tiny", "--method", method, "--batch-size", "4", "--steps", "2",
                               "--data-pipeline", "--workers", "0", "--root", str(tmp_path), cwd=tmp_path)
        synthetic, loader = report["results"]
        assert synthetic["pairs_per_s"] > 0 and loader["pipeline"] == "demo loader, 0 workers"
        assert synthetic["gflops_per_pair"] > 0


def test_evaluation_and_dispatch_benchmarks(tmp_path):
    report = run_benchmark("eval", "--tiny", "--images", "64", "--captions", "128", cwd=tmp_path)
    assert report["results"][0]["images_per_s"] > 0
    report = run_benchmark("moe", "--batch-size", "2", "--tokens", "16", "--width", "64", "--steps", "2",
                           cwd=tmp_path)
    assert report["loop_over_dispatch"] > 0


def test_memory_benchmark_measures_less_with_checkpointing(tmp_path):
    report = run_benchmark("memory", "--tiny", "--method", "dm_adapter", "--batch-size", "4", "2", "--steps", "1",
                           cwd=tmp_path)
    rows = {(r["batch"], r["grad_checkpointing"]): r for r in report["results"]}
    assert rows.keys() == {(2, False), (2, True), (4, False), (4, True)}
    assert 0 < rows[4, True]["step_mb"] < rows[4, False]["step_mb"]
    assert rows[4, False]["step_mb"] > rows[2, False]["step_mb"]  # activations grow with the batch
    assert report["extrapolated"]["off"]["mb_per_pair"] > report["extrapolated"]["on"]["mb_per_pair"] > 0
    assert rows[4, True]["time_ratio"] > 0 and rows[2, True]["time_ratio"] is None  # timed at the first batch


def test_model_flops_of_clip_vit_b_16():
    """The FLOP count is the architecture's: ViT-B/16 at 224x224 is 17.6 G multiply-adds (image
    tower, as published) and 2.9 G for 77 text positions."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark
    import clip_min
    forward, training = benchmark.flops_per_pair(clip_min.CLIPConfig(), "finetune", {})
    assert 40.9e9 < forward < 41.1e9 and training == 3 * forward


def test_patches_are_counted_as_the_strided_conv_cuts_them():
    """Stride 4 with patch 8 cuts a 32x16 image into 7 x 3 patches (not 32/4 x 16/4): the FLOPs of
    a 56x24 image at stride 8, which has the same 7 x 3 grid."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark
    import clip_min
    small = dict(embed_dim=32, patch_size=8, vision_width=64, vision_layers=2, text_width=64, text_layers=2)
    overlapping = clip_min.CLIPConfig(image_size=(32, 16), stride=4, **small)
    tiled = clip_min.CLIPConfig(image_size=(56, 24), stride=8, **small)
    for method in ("cskt", "dm_adapter", "finetune"):
        assert benchmark.flops_per_pair(overlapping, method, {}) == benchmark.flops_per_pair(tiled, method, {})


def test_utilisation_divides_by_the_peak_of_this_gpu_at_this_precision(monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark
    import torch
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA A100-SXM4-80GB", 2: "Tesla V100-SXM2-16GB", 3: "NVIDIA H100 PCIe"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[device.index])
    peak = {(index, precision): benchmark.peak_tflops(torch.device("cuda", index), precision)
            for index in names for precision in ("bf16", "fp16", "fp32")}
    assert [peak[0, p] for p in ("bf16", "fp16", "fp32")] == [989, 989, 67]
    assert [peak[1, p] for p in ("bf16", "fp16", "fp32")] == [312, 312, 19.5]
    assert [peak[2, p] for p in ("bf16", "fp16", "fp32")] == [None, 125, 15.7]  # a V100 has no bf16 units
    assert peak[3, "bf16"] == 756
    assert benchmark.peak_tflops(torch.device("cpu"), "fp32") is None
