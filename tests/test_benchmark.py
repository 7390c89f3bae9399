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


def test_model_flops_of_clip_vit_b_16():
    """The FLOP count is the architecture's: ViT-B/16 at 224x224 is 17.6 G multiply-adds (image
    tower, as published) and 2.9 G for 77 text positions."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark
    import clip_min
    forward, training = benchmark.flops_per_pair(clip_min.CLIPConfig(), "finetune", {})
    assert 40.9e9 < forward < 41.1e9 and training == 3 * forward


def test_demo_seeds_reads_its_seeds_and_train_py_s_table():
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark
    import evaluate
    assert benchmark.seed_list("1-5") == [1, 2, 3, 4, 5] and benchmark.seed_list("1,3-4") == [1, 3, 4]
    zero_shot = {"R1": 52.5, "R5": 80.25, "R10": 90.0, "mAP": 55.12, "mINP": 30.01}
    printed = "demo test split:\n" + evaluate.format_table({"chance (random scores)": dict.fromkeys(zero_shot, 1.0),
                                                             "frozen CLIP, zero-shot": zero_shot})
    assert benchmark.table_row(printed, "frozen CLIP, zero-shot") == zero_shot
