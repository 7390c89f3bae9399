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


def test_demo_seeds_reads_its_seeds_and_train_py_s_table():
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import benchmark

    import evaluate
    assert benchmark.seed_list("1-5") == [1, 2, 3, 4, 5] and benchmark.seed_list("1,3-4") == [1, 3, 4]
    zero_shot = {"R1": 52.5, "R5": 80.25, "R10": 90.0, "mAP": 55.12, "mINP": 30.01}
    printed = "demo test split:\n" + evaluate.format_table({"chance (random scores)": dict.fromkeys(zero_shot, 1.0),
                                                             "frozen CLIP, zero-shot": zero_shot})
    assert benchmark.table_row(printed, "frozen CLIP, zero-shot") == zero_shot
