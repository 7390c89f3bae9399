"""The benchmark script runs (a smoke test at a tiny configuration; it asserts nothing about time)."""

import json
import os
import subprocess
import sys

import torch

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


def test_the_replica_has_the_published_counts_and_layout_of_cuhk_pedes():
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark
    import data
    entries = benchmark.replica_entries()
    for split, published in data.PUBLISHED["CUHK-PEDES"].items():
        part = [e for e in entries if e["split"] == split]
        assert (len({e["id"] for e in part}), len(part), sum(len(e["captions"]) for e in part)) == published
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids) and ids[0] == 1 and ids[-1] == 13_003
    assert max(e["id"] for e in entries if e["split"] == "train") == 11_003
    assert sum(len(e["captions"]) > 2 for e in entries) == 9
    per_id = {}
    for e in entries:
        per_id[e["id"]] = per_id.get(e["id"], 0) + 1
    assert sum(n == 1 for n in per_id.values()) == 4
    assert {e["split"] for e in entries if e["file_path"].startswith("train_query/")} == {"train"}
    assert {e["file_path"].split("/")[0] for e in entries} == {"cam_a", "cam_b", "CUHK01", "CUHK03", "Market",
                                                               "test_query", "train_query"}
    assert all(60 <= e["size"][0] <= 200 and 150 <= e["size"][1] <= 400 for e in entries)


def test_the_replica_measurements_run_on_a_small_copy(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark
    from test_data import cuhk_entries, write_dataset
    write_dataset(tmp_path, "CUHK-PEDES", cuhk_entries())
    threads = torch.get_num_threads()
    try:  # it measures one loader process: one thread (in its own process when the benchmark runs it)
        rows = benchmark.measure_loader(str(tmp_path), pairs=4, batch_size=2, image_size=(32, 16))
    finally:
        torch.set_num_threads(threads)
    assert [row["pipeline"] for row in rows] == ["ours", "IRRA"] and all(row["pairs_per_s"] > 0 for row in rows)
    assert all(row["decode_ms"] > 0 and row["augmentation_ms"] > 0 for row in rows)
    reading = benchmark.measure_reading("check, full decode", str(tmp_path))
    assert reading["detail"] == "0 problem(s)" and reading["seconds"] >= 0
