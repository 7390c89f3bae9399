"""Benchmarks for the project (not collected by pytest: the name does not start with test_).

    python tests/benchmark.py train --method cskt        # a training step at ViT-B/16, 384x128, batch 128
    python tests/benchmark.py train --method dm_adapter --compile --data-pipeline
    python tests/benchmark.py eval                       # a CUHK-PEDES-sized test split, end to end
    python tests/benchmark.py metrics                    # retrieval_metrics, ICFG-PEDES-sized
    python tests/benchmark.py metrics --irra             # the same, plus IRRA's ranking method (~7 GB)
    python tests/benchmark.py metrics --direction both   # text-to-image and image-to-text
    python tests/benchmark.py moe                        # DM-Adapter's dispatch against the per-expert loop
    python tests/benchmark.py train --tiny               # a seconds-long smoke run (what CI runs)
    python tests/benchmark.py memory --method cskt --batch-size 8   # one step's peak memory, with and
                                                         # without activation checkpointing, and its time
    python tests/benchmark.py replica                    # CUHK-PEDES at its published size (not in CI)
    python tests/benchmark.py demo-seeds --seeds 1-5 --threads 1 2   # README's demo table (~30 min)

Each prints a table and one JSON line. Weights are random (in OpenAI's layout, built from shapes):
speed does not depend on their values. On CUDA the training step runs under
torch.cuda.set_sync_debug_mode("warn") and every host synchronisation inside it is counted.
Memory in `train`: on CUDA the allocator's peak; on the CPU the peak resident size of the process.
`memory` reads the allocator's own allocations and frees instead (see peak_tensor_mb). The metric
and memory measurements run in fresh processes so that their peak memory is their own (Linux only:
the metric ones read /proc/self/status).

Figures measured on a 2-core CPU machine (no GPU), kept here because they describe that machine:

`demo-seeds --seeds 1-5 --threads 1 2`: R1 on the demo test split, and the time of each run. The
thread count and the CPU change the floating-point sums, so the digits (another 2-core machine
gives seed 1 with two threads 43.50 zero-shot and 61.25 for CSKT), not the lesson:

    seed threads  zero-shot  CSKT            DM-Adapter      train.py  DM-Adapter run
    1    1        43.50      67.25 (+23.75)  66.00 (+22.50)  137 s     78 s
    1    2        43.75      66.00 (+22.25)  56.50 (+12.75)   94 s     53 s
    2    1        33.25      56.00 (+22.75)  56.00 (+22.75)  148 s     82 s
    2    2        33.25      56.25 (+23.00)  62.75 (+29.50)  109 s     64 s
    3    1        40.75      54.00 (+13.25)  58.75 (+18.00)  159 s     84 s
    3    2        40.75      54.25 (+13.50)  57.75 (+17.00)  113 s     57 s
    4    1        47.75      63.75 (+16.00)  63.75 (+16.00)  140 s     81 s
    4    2        47.50      66.25 (+18.75)  65.25 (+17.75)  113 s     61 s
    5    1        34.25      61.50 (+27.25)  60.25 (+26.00)  175 s     82 s
    5    2        34.25      61.00 (+26.75)  56.50 (+22.25)   99 s     65 s

`memory --method cskt|dm_adapter --batch-size 8` at ViT-B/16, 384x128, fp32: one step's peak
tensor memory beyond model, optimizer and batch, without and with --grad-checkpointing: CSKT
1,099 -> 206 MB (0.19x, +42 % step time), DM-Adapter 1,142 -> 238 MB (0.21x, +33 %). The line
through batch 4 and 8 under bf16 puts batch 128 at 10.3 -> 2.1 GB (CSKT) and 11.1 -> 1.8 GB
(DM-Adapter) beside 0.62 GB of weights: a 16 GB GPU without checkpointing, 4 GB with it.
"""

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_dm_adapter import per_expert_loop  # noqa: E402  (the authors' dispatch, as the tests write it)

import clip_min  # noqa: E402  (these need the repository root on the path first)
import data  # noqa: E402
import dm_adapter  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

# -----------------------------------------------------------------------------
# metrics: the ranking of ICFG-PEDES's test split (19,848 captions x 14,993 images, 1,000 ids)


def build_retrieval_problem(queries, gallery, identities, dim, seed):
    """Random unit features with random identities; similarity = text @ image.T in fp32."""
    generator = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(queries, dim, generator=generator), dim=1)       # [Q, D]
    image = F.normalize(torch.randn(gallery, dim, generator=generator), dim=1)      # [G, D]
    query_pids = torch.randint(identities, (queries,), generator=generator)         # [Q]
    gallery_pids = torch.randint(identities, (gallery,), generator=generator)       # [G]
    return text @ image.T, query_pids, gallery_pids                                 # [Q, G]


def irra_style_metrics(similarity, query_pids, gallery_pids):
    """IRRA's ranking method, re-written from its description (IRRA's evaluation code) for comparison only:
    sort every row of the whole matrix, mark the matches, then a Python loop over queries. Like
    the original it fails on a query without any relevant gallery item."""
    order = similarity.argsort(dim=1, descending=True)                             # [Q, G]
    matches = gallery_pids[order] == query_pids[:, None]                           # [Q, G]
    matches_so_far = matches.cumsum(1)                                             # [Q, G]
    recall = {k: (matches_so_far[:, k - 1] > 0).float().mean().item() * 100 for k in (1, 5, 10)}
    average_precisions, inverse_negative_penalties = [], []
    for query_matches, query_matches_so_far in zip(matches, matches_so_far):
        matched_ranks = query_matches.nonzero().squeeze(1)                         # 0-based
        precisions = query_matches_so_far[matched_ranks] / (matched_ranks + 1.0)
        average_precisions.append(precisions.mean().item())
        inverse_negative_penalties.append(precisions[-1].item())
    return {"R1": recall[1], "R5": recall[5], "R10": recall[10],
            "mAP": 100 * sum(average_precisions) / len(average_precisions),
            "mINP": 100 * sum(inverse_negative_penalties) / len(inverse_negative_penalties),
            "num_queries": len(average_precisions), "num_skipped": 0}


def resident_mb():
    """Current resident set size of this process, in MB (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def measure_metrics(method, direction, args):
    """Runs in a fresh process: build the problem, then time one call of `method` in `direction`
    (t2i: the captions rank the images; i2t: the images rank the captions)."""
    similarity, caption_pids, image_pids = build_retrieval_problem(args.queries, args.gallery, args.identities,
                                                                   args.dim, args.seed)
    before_mb = resident_mb()
    start = time.perf_counter()
    if method == "irra":  # IRRA's i2t_metric: its ranking of the transposed matrix
        result = irra_style_metrics(*((similarity, caption_pids, image_pids) if direction == "t2i"
                                      else (similarity.T, image_pids, caption_pids)))
    else:
        result = evaluate.directional_metrics(similarity, caption_pids, image_pids, direction,
                                              chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024            # KB on Linux
    # The peak may predate the call (building the problem); then this over-reports, never under.
    return {"method": method, "direction": direction, "seconds": round(seconds, 2),
            "peak_extra_mb": round(max(0.0, peak_mb - before_mb)), "threads": torch.get_num_threads(),
            **{key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}}


def run_metrics(args):
    methods = ["chunked"] + (["irra"] if args.irra else [])
    directions = ["t2i", "i2t"] if args.direction == "both" else [args.direction]
    results = []
    for direction in directions:
        for method in methods:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results.append(pool.submit(measure_metrics, method, direction, args).result())
    matrix_mb = args.queries * args.gallery * 4 / 2**20
    print(f"problem: {args.queries} queries x {args.gallery} gallery, {args.identities} identities, "
          f"similarity matrix {matrix_mb:.0f} MB, chunk size {args.chunk_size}")
    columns = ["method", "direction", "seconds", "peak_extra_mb", "R1", "R5", "R10", "mAP", "mINP", "num_skipped"]
    print("  ".join(f"{column:>13}" for column in columns))
    for result in results:
        print("  ".join(f"{result[column]:>13}" for column in columns))
    print(json.dumps({"benchmark": "metrics", "queries": args.queries, "gallery": args.gallery,
                      "identities": args.identities, "chunk_size": args.chunk_size, "results": results}))


# -----------------------------------------------------------------------------
# train: one optimisation step of a method, on synthetic tensors and through the real loader

TINY_CLIP = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8,
                                vision_width=64, vision_layers=2, text_width=64, text_layers=2)


def block_flops(width, tokens, attended, adapter_hidden=0):
    """Forward FLOPs of one transformer block over `tokens` tokens, each attending to `attended`
    on average: q, k, v and output projections (4 d^2 multiply-adds a token), the MLP (8 d^2),
    the attention scores and their weighted sum (2 * attended * d), and an adapter beside the
    MLP with `adapter_hidden` hidden units (2 * d * hidden). A multiply-add is 2 FLOPs."""
    per_token = 4 * width ** 2 + 8 * width ** 2 + 2 * attended * width
    return 2 * tokens * per_token, 2 * tokens * 2 * width * adapter_hidden


def flops_per_pair(config, method, method_args):
    """(forward FLOPs, training FLOPs) of one image-caption pair, counted from the architecture.

    Vision: the patch convolution (3 P^2 multiply-adds per output channel and patch), then every
    block over 1 + N tokens (+ 2 n_ctx prompts for CSKT), all attending to all. Text: every block
    over all 77 positions (padding is computed too), causal, so a token attends to (L + 1) / 2 on
    average. Adapters: CSKT's d -> d/r -> d per block; DM-Adapter runs all E experts on every
    token (its dispatch: E d/r hidden units) plus the router's 2 d E. Training = forward plus
    backward: a frozen weight needs only the gradient of its input (1x its forward FLOPs), a
    trained one also its own (2x); fine-tuning trains every weight. Per-batch costs (CSKT's prompt
    projections, the loss, the optimizer) are left out.
    """
    reduction = method_args.get("reduction", 8)
    rows, columns = clip_min.patch_grid(config.image_size, config.patch_size, config.stride)
    vision_tokens = 1 + rows * columns
    vision_tokens += 2 * method_args.get("n_ctx", 4) if method == "cskt" else 0
    text_tokens = config.context_length
    frozen = trained = 0
    patches = (vision_tokens - 1) if method != "cskt" else vision_tokens - 1 - 2 * method_args.get("n_ctx", 4)
    frozen += 2 * patches * 3 * config.patch_size ** 2 * config.vision_width
    for width, layers, tokens, attended in [(config.vision_width, config.vision_layers, vision_tokens, vision_tokens),
                                            (config.text_width, config.text_layers, text_tokens, (text_tokens + 1) / 2)]:
        hidden = {"cskt": width // reduction,
                  "dm_adapter": method_args.get("num_experts", 6) * width // reduction}.get(method, 0)
        backbone, adapter = block_flops(width, tokens, attended, hidden)
        router = 2 * tokens * width * method_args.get("num_experts", 6) * 2 if method == "dm_adapter" else 0
        frozen += layers * backbone
        trained += layers * (adapter + router)
    frozen += 2 * config.vision_width * config.embed_dim + 2 * config.text_width * config.embed_dim
    forward = frozen + trained
    if method == "finetune":
        return forward, 3 * forward
    return forward, 2 * frozen + 3 * trained


def build_benchmark_model(args, device):
    config = TINY_CLIP if args.tiny else clip_min.CLIPConfig(image_size=tuple(args.image_size), stride=args.stride)
    torch.manual_seed(0)
    clip_model = clip_min.CLIP(config)
    method_args = dict(train.METHOD_DEFAULTS.get(args.method, {}))  # the papers' values
    if "depth" in method_args:
        method_args["depth"] = min(method_args["depth"], config.vision_layers, config.text_layers)
    model = evaluate.build_method(args.method, clip_model, method_args).to(device)
    if getattr(args, "grad_checkpointing", False):  # eval has no such flag
        model.set_grad_checkpointing()
    return config, model, method_args


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(step, batches, steps, device):
    """Seconds per step over `steps` steps, after two warm-up steps; and host syncs inside them."""
    syncs = 0
    for i, batch in zip(range(2), batches):
        step(*batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        for _, batch in zip(range(steps), batches):
            step(*batch)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize(device)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return (time.perf_counter() - started) / steps, syncs


# Dense peak TFLOP/s of one GPU per precision, from the vendors' data sheets: bf16 and fp16 on the
# tensor cores, fp32 without TF32 (which train.py leaves off). The first name found in the device's
# name counts; a GPU not listed gets no utilisation column unless --peak-tflops gives its peak.
PEAK_TFLOPS = {"H100 PCIe": {"bf16": 756, "fp16": 756, "fp32": 51},
               "H100": {"bf16": 989, "fp16": 989, "fp32": 67}, "H200": {"bf16": 989, "fp16": 989, "fp32": 67},
               "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5}, "RTX 4090": {"bf16": 165, "fp16": 165, "fp32": 83},
               "V100": {"fp16": 125, "fp32": 15.7}, "T4": {"fp16": 65, "fp32": 8.1}}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """One GPU's peak at `precision` (the utilisation divides by it), None where not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(precision) for gpu, peaks in PEAK_TFLOPS.items() if gpu in name), None)


def training_step(model, device, amp_dtype, compile_model=False):
    """step(images, ids, pids): what train.py does per batch, and nothing else, with the authors' recipe."""
    optimizer = train.build_optimizer(model, lr=3e-4, bias_lr_factor=2.0, weight_decay=4e-5, betas=(0.9, 0.999),
                                      eps=1e-3, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_model = torch.compile(model) if compile_model else model
    model.train()

    def step(images, ids, pids):
        images = images.to(device, non_blocking=True)
        ids, pids = ids.to(device, non_blocking=True), pids.to(device, non_blocking=True)
        with evaluate.autocast(device, amp_dtype):
            losses = step_model(images, ids, pids)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def synthetic_batch(config, batch, device):
    """(images, ids, pids): random images, one caption, two pairs per identity."""
    generator = torch.Generator().manual_seed(0)
    captions = clip_min.tokenize(["a woman in a red coat carrying a black bag and wearing white shoes"] * batch)
    synthetic = (torch.randn(batch, 3, *config.image_size, generator=generator), captions,
                 torch.randint(0, max(1, batch // 2), (batch,), generator=generator))
    if device.type == "cuda":
        synthetic = tuple(t.pin_memory() for t in synthetic)
    return synthetic


def run_train(args):
    device = torch.device(args.device)
    evaluate.use_device(device)  # the current GPU and the fp32 precision (no TF32), as train.py sets them
    peak = args.peak_tflops or peak_tflops(device, args.precision)
    amp_dtype = evaluate.PRECISIONS[args.precision]
    config, model, method_args = build_benchmark_model(args, device)
    step = training_step(model, device, amp_dtype, args.compile)
    batch = args.batch_size
    synthetic = synthetic_batch(config, batch, device)
    seconds, syncs = timed_steps(step, iter(lambda: synthetic, None), args.steps, device)
    forward_flops, training_flops = flops_per_pair(config, args.method, method_args)
    achieved = training_flops * batch / seconds / 1e12
    row = {"pipeline": "synthetic", "method": args.method, "batch": batch, "image_size": list(config.image_size),
           "device": str(device), "precision": args.precision, "compile": args.compile,
           "grad_checkpointing": args.grad_checkpointing,
           "step_s": round(seconds, 4), "pairs_per_s": round(batch / seconds, 1),
           "peak_memory_mb": round(memory_mb(device)), "host_syncs_in_step": syncs if device.type == "cuda" else None,
           "gflops_per_pair": round(training_flops / 1e9, 2), "tflops": round(achieved, 3),
           "mfu": round(achieved / peak, 4) if peak else None}
    rows = [row]

    if args.data_pipeline:  # the same step fed by data.py's loader from the demo images
        root = args.root or tempfile.mkdtemp(prefix="benchmark-demo-")
        dataset = data.load_dataset("demo", root)
        loader = data.train_loader(dataset.train, config.image_size, batch, args.workers, augment=True,
                                   mask_captions=args.method == "dm_adapter", seed=0,
                                   pin_memory=device.type == "cuda")
        loader_steps = min(args.steps, len(loader) - 2)

        def batches():
            while True:
                for item in loader:
                    yield item["images"], item["ids"], item["pids"]
        seconds, syncs = timed_steps(step, batches(), loader_steps, device)
        achieved = training_flops * batch / seconds / 1e12
        rows.append({**row, "pipeline": f"demo loader, {args.workers} workers", "step_s": round(seconds, 4),
                     "pairs_per_s": round(batch / seconds, 1), "peak_memory_mb": round(memory_mb(device)),
                     "host_syncs_in_step": syncs if device.type == "cuda" else None, "tflops": round(achieved, 3),
                     "mfu": round(achieved / peak, 4) if peak else None})
    print_table(rows, ["pipeline", "method", "batch", "step_s", "pairs_per_s", "peak_memory_mb",
                       "gflops_per_pair", "tflops", "mfu", "host_syncs_in_step"])
    print(json.dumps({"benchmark": "train", "results": rows}))


def print_table(rows, columns):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)))


# -----------------------------------------------------------------------------
# memory: one training step's peak memory beyond the built model, with and without activation
# checkpointing, and what checkpointing costs in step time


def peak_tensor_mb(run, device):
    """(peak before the optimizer step, peak of the whole step): the most tensor memory in use at
    once during run(), beyond what was in use before it, in MB. Read from every allocation and free
    of PyTorch's allocator on `device`, as the profiler records them, summed in time order: on a
    GPU the allocator's peak; on the CPU what that peak would be (the process's resident size would
    add memory the C allocator keeps and one-off library buffers). The optimizer step's peak does not
    grow with the batch, so the slope over batches is read from the forward and backward passes."""
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []),
                                profile_memory=True) as profile:
        run()
    events = profile.profiler.kineto_results.events()
    optimizer_starts = min(e.start_ns() for e in events if e.name().startswith("Optimizer.step"))
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == kind)
    in_use = peak = before_optimizer = 0
    for time_ns, change in changes:
        in_use += change
        peak = max(peak, in_use)
        if time_ns < optimizer_starts:
            before_optimizer = peak
    return before_optimizer / 2 ** 20, peak / 2 ** 20


def build_step(args, checkpointing):
    device = torch.device(args.device)
    args = argparse.Namespace(**{**vars(args), "grad_checkpointing": checkpointing})
    config, model, _ = build_benchmark_model(args, device)
    step = training_step(model, device, evaluate.PRECISIONS[args.precision])
    return config, model, step, device


def measure_step_memory(args, batch, checkpointing):
    """Runs in a fresh process: build the model, optimizer and batch, then the first step's peak
    memory beyond all that (activations, gradients, Adam's state)."""
    config, model, step, device = build_step(args, checkpointing)
    synthetic = synthetic_batch(config, batch, device)
    model_mb = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2 ** 20
    forward_backward_mb, step_mb = peak_tensor_mb(lambda: step(*synthetic), device)
    return {"batch": batch, "grad_checkpointing": checkpointing, "image_size": list(config.image_size),
            "step_mb": step_mb, "forward_backward_mb": forward_backward_mb, "model_mb": model_mb}


def time_steps_alternately(args, batch):
    """Runs in a fresh process: one model, its steps alternately without and with checkpointing
    (off, on, then on, off, ...), so that a change in the machine's load falls on both; after one
    warm-up step of each, `steps` of each are timed. Returns the seconds of each variant's steps."""
    config, model, step, device = build_step(args, checkpointing=False)
    synthetic = synthetic_batch(config, batch, device)
    seconds, cpu_seconds = {False: [], True: []}, {False: [], True: []}
    for round_ in range(1 + args.steps):
        for checkpointing in (False, True) if round_ % 2 == 0 else (True, False):
            model.set_grad_checkpointing(checkpointing)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            step(*synthetic)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ > 0:
                seconds[checkpointing].append(time.perf_counter() - started)
                cpu_seconds[checkpointing].append(time.process_time() - cpu_started)
    return seconds, cpu_seconds


def run_memory(args):
    """Each memory measurement in its own process (a fresh process's first step); the step times
    of both variants in one more process, alternating."""
    def in_fresh_process(function, *arguments):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(function, args, *arguments).result()

    results = [in_fresh_process(measure_step_memory, batch, checkpointing)
               for batch in args.batch_size for checkpointing in (False, True)]
    seconds, cpu_seconds = in_fresh_process(time_steps_alternately, args.batch_size[0]) if args.steps else (None, None)
    rows = []
    for result in results:
        without = next(r for r in results if r["batch"] == result["batch"] and not r["grad_checkpointing"])
        row = {"method": args.method, "precision": args.precision, "batch": result["batch"],
               "grad_checkpointing": result["grad_checkpointing"], "step_mb": round(result["step_mb"], 1),
               "forward_backward_mb": round(result["forward_backward_mb"], 1),
               "memory_ratio": round(result["step_mb"] / without["step_mb"], 3), "step_s": None, "time_ratio": None,
               "cpu_time_ratio": None, "model_mb": round(result["model_mb"])}
        if seconds and result["batch"] == args.batch_size[0]:
            step_s = statistics.median(seconds[result["grad_checkpointing"]])
            row["step_s"] = round(step_s, 3)
            row["time_ratio"] = round(step_s / statistics.median(seconds[False]), 3)
            cpu_s = statistics.median(cpu_seconds[result["grad_checkpointing"]])
            row["cpu_time_ratio"] = round(cpu_s / statistics.median(cpu_seconds[False]), 3)
        rows.append(row)
    extrapolated = {}
    if len(args.batch_size) > 1:
        # Per pair: the slope of the forward and backward passes' peak between the smallest and the
        # largest batch; the step's peak at the target batch is that line's value there, or the
        # optimizer step's own peak if that is higher.
        low, high = min(args.batch_size), max(args.batch_size)
        for checkpointing in (False, True):
            at = {r["batch"]: r for r in rows if r["grad_checkpointing"] == checkpointing}
            slope = (at[high]["forward_backward_mb"] - at[low]["forward_backward_mb"]) / (high - low)
            target = at[low]["forward_backward_mb"] + slope * (args.extrapolate_to - low)
            extrapolated["on" if checkpointing else "off"] = {
                "mb_per_pair": round(slope, 2),
                f"step_mb_at_{args.extrapolate_to}": round(max(target, at[high]["step_mb"]))}
    device, image_size = torch.device(args.device), results[0]["image_size"]
    print(f"{args.method}, {'tiny CLIP' if args.tiny else 'ViT-B/16'} (random weights), {image_size[0]}x{image_size[1]}, "
          f"{args.precision} on {device}, one training step. step_mb: the most tensor memory in use at once in "
          "a fresh process's first step (activations, gradients, Adam's state) beyond the built model, optimizer "
          "and batch, from the allocator's allocations and frees as the profiler records them; "
          "forward_backward_mb: the same before the optimizer step"
          + (f"; step_s: the median of {args.steps} steps of each, alternating in one process; cpu_time_ratio: "
             "the same for the process's CPU time, which other load on the machine disturbs less" if args.steps else ""))
    print_table(rows, ["method", "precision", "batch", "grad_checkpointing", "step_mb", "memory_ratio",
                       "forward_backward_mb", "step_s", "time_ratio", "cpu_time_ratio", "model_mb"])
    for name, line in extrapolated.items():
        print(f"checkpointing {name}: {line['mb_per_pair']} MB per pair; batch {args.extrapolate_to}: "
              f"{line[f'step_mb_at_{args.extrapolate_to}']} MB beyond the model")
    print(json.dumps({"benchmark": "memory", "results": rows, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "extrapolated": extrapolated}))


# -----------------------------------------------------------------------------
# eval: encode a CUHK-PEDES-sized test split and rank it


def run_eval(args):
    device = torch.device(args.device)
    evaluate.use_device(device)  # as evaluate.py
    config, model, _ = build_benchmark_model(args, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, *config.image_size, generator=generator)
    captions = clip_min.tokenize(["a man in a blue jacket, grey trousers and white shoes"] * args.captions)
    image_pids = torch.randint(0, args.identities, (args.images,), generator=generator)
    caption_pids = image_pids[torch.randint(0, args.images, (args.captions,), generator=generator)]
    image_loader = torch.utils.data.DataLoader(images, args.batch_size, pin_memory=device.type == "cuda")
    caption_loader = torch.utils.data.DataLoader(captions, args.batch_size, pin_memory=device.type == "cuda")
    amp_dtype = evaluate.autocast_dtype("auto", device)  # what evaluate.py uses by default
    model.eval()
    evaluate.encode(model.encode_image, [images[:2]], device, amp_dtype, "images", 0)  # warm-up
    evaluate.encode(model.encode_text, [captions[:2]], device, amp_dtype, "captions", 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    image_features = evaluate.encode(model.encode_image, image_loader, device, amp_dtype, "images", 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    image_seconds = time.perf_counter() - started
    started = time.perf_counter()
    caption_features = evaluate.encode(model.encode_text, caption_loader, device, amp_dtype, "captions", 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    caption_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluate.retrieval_metrics(caption_features @ image_features.T,
                               caption_pids, image_pids)
    metric_seconds = time.perf_counter() - started
    row = {"method": args.method, "device": str(device), "images": args.images, "captions": args.captions,
           "images_per_s": round(args.images / image_seconds, 1),
           "captions_per_s": round(args.captions / caption_seconds, 1), "metric_s": round(metric_seconds, 3),
           "total_s": round(image_seconds + caption_seconds + metric_seconds, 2)}
    print_table([row], list(row))
    print(json.dumps({"benchmark": "eval", "results": [row]}))


# -----------------------------------------------------------------------------
# moe: DM-Adapter's sync-free dispatch against the authors' per-expert loop


def run_moe(args):
    torch.manual_seed(0)
    mixture = dm_adapter.MixtureOfAdapters(args.width, args.num_experts, args.top_k, 8, 0.1)
    for expert in mixture.experts:  # up projections start at zero; any values will do for timing
        torch.nn.init.normal_(expert.up.weight, std=0.02)
    x = torch.randn(args.batch_size, args.tokens, args.width, requires_grad=True)
    rows = []
    for name, run in [("dispatch", lambda: mixture(x)[0]), ("per-expert loop", lambda: per_expert_loop(mixture, x))]:
        def forward_backward():
            run().sum().backward()
        for _ in range(2):
            forward_backward()
        started = time.perf_counter()
        for _ in range(args.steps):
            forward_backward()
        rows.append({"dispatch": name, "ms_forward_backward": round(1000 * (time.perf_counter() - started) / args.steps, 2)})
    ratio = rows[1]["ms_forward_backward"] / rows[0]["ms_forward_backward"]
    print(f"{args.batch_size} x {args.tokens} tokens of width {args.width}, {args.num_experts} experts, "
          f"top-{args.top_k}, {torch.get_num_threads()} threads; the loop takes {ratio:.2f}x the dispatch's time")
    print_table(rows, ["dispatch", "ms_forward_backward"])
    print(json.dumps({"benchmark": "moe", "loop_over_dispatch": round(ratio, 3), "results": rows}))


# -----------------------------------------------------------------------------
# replica: CUHK-PEDES at its published size and shape, read, checked, loaded and trained on

# (ids, [(images per id, how many ids)], [extra captions of the first images]) per split: the
# published counts (train 11,003 ids / 34,054 images / 68,126 captions; 4 ids with a single image;
# 9 images with more than 2 captions), ids 1..13,003 in split order.
REPLICA_SPLITS = {"train": ([(4, 1053), (3, 9946), (1, 4)], [4, 4, 4, 3, 3]),
                  "val": ([(4, 78), (3, 922)], [2]),
                  "test": ([(4, 74), (3, 926)], [3, 3, 2])}
REPLICA_FOLDERS = {"train": ("cam_a", "cam_b", "CUHK01", "CUHK03", "Market", "train_query"),
                   "val": ("cam_a", "cam_b", "CUHK01", "CUHK03", "Market"),
                   "test": ("cam_a", "cam_b", "CUHK01", "CUHK03", "Market", "test_query")}
REPLICA_WORDS = dict(person=("man", "woman", "young man", "lady", "boy", "girl"),
                     colour=("black", "white", "red", "blue", "grey", "green", "dark", "light brown", "pink"),
                     upper=("shirt", "jacket", "t-shirt", "coat", "sweater", "hoodie", "blouse"),
                     lower=("pants", "jeans", "shorts", "skirt", "trousers"),
                     extra=("He is carrying a {colour} bag over his shoulder.", "She has long {colour} hair.",
                            "The person is wearing {colour} shoes and walking away from the camera.",
                            "There is a {colour} backpack on the back.", "He holds a phone in his hand."))


def replica_caption(rng):
    """A caption of CUHK-PEDES's length (about 23 words, two or three sentences)."""
    words = {key: rng.choice(values) for key, values in REPLICA_WORDS.items() if key != "extra"}
    text = (f"A {words['person']} is wearing a {words['colour']} {words['upper']} and "
            f"{rng.choice(REPLICA_WORDS['colour'])} {words['lower']}.")
    extras = rng.sample(REPLICA_WORDS["extra"], rng.randint(1, 3))
    return " ".join([text] + [e.format(colour=rng.choice(REPLICA_WORDS["colour"])) for e in extras])


def replica_entries(seed=0):
    """reid_raw.json's entries of the replica, in split order, each with its image size (W, H)."""
    import random
    rng, entries, pid = random.Random(seed), [], 0
    for split, (groups, extra_captions) in REPLICA_SPLITS.items():
        first = len(entries)
        for images, ids in groups:
            for _ in range(ids):
                pid += 1
                folder = rng.choice(REPLICA_FOLDERS[split])
                for k in range(images):
                    height = rng.randint(150, 400)  # CUHK-PEDES: 60-200 px wide, 150-400 high
                    width = min(200, max(60, round(height / rng.uniform(2.0, 3.0))))
                    entries.append({"split": split, "captions": [replica_caption(rng) for _ in range(2)],
                                    "file_path": f"{folder}/{pid:05d}_{k}.jpg", "processed_tokens": [],
                                    "id": pid, "size": (width, height)})
        for k, extra in enumerate(extra_captions):
            entries[first + k]["captions"] += [replica_caption(rng) for _ in range(extra)]
    return entries


def write_replica_images(job):
    """Writes textured JPEGs (a coarse pattern, smoothly scaled, plus sensor noise) for (folder, entries)."""
    import numpy as np
    from PIL import Image
    imgs, entries, seed = job
    rng = np.random.default_rng(seed)
    for entry in entries:
        width, height = entry["size"]
        coarse = rng.integers(0, 256, (max(2, height // 12), max(2, width // 12), 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
        pixels += rng.normal(0, 10, pixels.shape)  # [H, W, 3]
        path = os.path.join(imgs, entry["file_path"])
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_replica(root):
    """<root>/CUHK-PEDES/ as the published set is laid out: written once (a stamp), then reused."""
    folder = os.path.join(root, "CUHK-PEDES")
    stamp = os.path.join(folder, "replica-complete")
    if os.path.isfile(stamp):
        return folder
    entries = replica_entries()
    imgs = os.path.join(folder, "imgs")
    for split_folders in REPLICA_FOLDERS.values():
        for name in split_folders:
            os.makedirs(os.path.join(imgs, name), exist_ok=True)
    started = time.perf_counter()
    jobs = [(imgs, entries[k : k + 1000], k) for k in range(0, len(entries), 1000)]
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write_replica_images, jobs))
    with open(os.path.join(folder, "reid_raw.json"), "w") as file:
        json.dump([{k: v for k, v in e.items() if k != "size"} for e in entries], file)
    open(stamp, "w").close()
    print(f"wrote {len(entries):,} JPEGs under {imgs} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return folder


def peak_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KB on Linux


def measure_reading(what, root):
    """Runs in a fresh process: load_dataset, or --check's header pass, or --check in full."""
    import contextlib
    import io
    started = time.perf_counter()
    if what == "load_dataset":
        dataset = data.load_dataset("CUHK-PEDES", root)
        detail = dataset.verdict
    elif what == "check, headers":
        detail = f"{len(data.read_annotations('CUHK-PEDES', root).problems)} problem(s)"
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            detail = f"{data.check('CUHK-PEDES', root)} problem(s)"
    return {"stage": what, "seconds": round(time.perf_counter() - started, 1), "peak_mb": peak_mb(),
            "detail": detail}


def irra_read_image(path):
    """IRRA's read_image, re-written from its description: check the file exists, open, convert to RGB."""
    from PIL import Image
    if not os.path.exists(path):
        raise OSError(f"{path} does not exist")
    return Image.open(path).convert("RGB")


def irra_train_transform(height, width):
    """IRRA's training transform (build_transform with aug=True), as its code composes it."""
    import torchvision.transforms as T
    return T.Compose([T.Resize((height, width)), T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop((height, width)),
                      T.ToTensor(), T.Normalize(mean=data.CLIP_MEAN, std=data.CLIP_STD),
                      T.RandomErasing(scale=(0.02, 0.4), value=data.CLIP_MEAN)])


def measure_loader(root, pairs, batch_size, image_size):
    """Runs in a fresh process on one thread (one loader process): pairs/s of our training samples and
    of IRRA's on the same pairs, batch by batch in turn, and where the time goes in each."""
    import torchvision.transforms as T
    from torch.utils.data import default_collate
    torch.set_num_threads(1)
    split = data.load_dataset("CUHK-PEDES", root).train
    ours = data.CaptionImageDataset(split, data.build_transform(image_size, train=True))
    irra_transform = irra_train_transform(*image_size)

    def irra_sample(i):  # IRRA's ImageTextDataset item, its caption tokenized beforehand as ours is
        image = irra_transform(irra_read_image(split.image_paths[split.image_index[i]]))
        return {"pids": split.pids[i], "image_ids": split.image_index[i], "images": image, "caption_ids": split.ids[i]}
    sample = {"ours": ours.__getitem__, "IRRA": irra_sample}
    decode = {"ours": lambda path: data.decode_image(path)[0], "IRRA": irra_read_image}
    transforms = {"ours": ours.transform.transforms, "IRRA": irra_transform.transforms}
    resize = {name: steps[0] for name, steps in transforms.items()}
    augment = {name: T.Compose(steps[1:]) for name, steps in transforms.items()}

    order = torch.randperm(len(ours), generator=torch.Generator().manual_seed(0))[:pairs].tolist()
    seconds = dict.fromkeys(sample, 0.0)
    stages = {name: dict.fromkeys(("decode", "resize", "augmentation", "collation"), 0.0) for name in sample}
    for start in range(0, pairs, batch_size):
        batch = order[start : start + batch_size]
        for name in sample:  # in turn, so that the machine's load falls on both alike
            began = time.perf_counter()  # the whole sample and batch, as the loader makes them
            default_collate([sample[name](i) for i in batch])
            seconds[name] += time.perf_counter() - began
            items = []  # then stage by stage
            for i in batch:
                t0 = time.perf_counter()
                image = decode[name](split.image_paths[split.image_index[i]])
                t1 = time.perf_counter()
                image = resize[name](image)
                t2 = time.perf_counter()
                items.append({"images": augment[name](image), "ids": split.ids[i], "pids": split.pids[i]})
                t3 = time.perf_counter()
                for stage, t in (("decode", t1 - t0), ("resize", t2 - t1), ("augmentation", t3 - t2)):
                    stages[name][stage] += t
            t0 = time.perf_counter()
            default_collate(items)
            stages[name]["collation"] += time.perf_counter() - t0
    return [{"pipeline": name, "pairs_per_s": round(len(order) / seconds[name], 1),
             **{f"{stage}_ms": round(1000 * t / len(order), 3) for stage, t in stages[name].items()},
             "peak_mb": peak_mb()} for name in sample]


def measure_epoch(root, workers, batch_size, out):
    """Runs train.py for one epoch of a tiny CLIP over the whole replica, then the full test split."""
    config = clip_min.CLIPConfig(embed_dim=32, image_size=(384, 128), patch_size=16, stride=16, vision_width=64,
                                 vision_layers=2, text_width=64, text_layers=2)
    torch.manual_seed(0)
    clip_path = os.path.join(out, "tiny-clip.pt")
    torch.save(clip_min.CLIP(config).state_dict(), clip_path)
    command = [sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"), "--method", "cskt",
               "--data", "CUHK-PEDES", "--root", root, "--clip", clip_path, "--depth", "2", "--epochs", "1",
               "--warmup-epochs", "0", "--batch-size", str(batch_size), "--workers", str(workers),
               "--log-every", "100000", "--out", os.path.join(out, "run")]
    import subprocess
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    with open(os.path.join(out, "run", "log.jsonl")) as journal:
        lines = [json.loads(line) for line in journal]
    step = next(line for line in lines if "pairs_per_s" in line)
    return {"stage": f"train.py: 1 epoch + test split, {workers} workers", "seconds": round(seconds, 1),
            "pairs_per_s": round(step["pairs_per_s"], 1),
            "peak_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "detail": result.stdout.strip().splitlines()[-1]}


def run_replica(args):
    root = args.root
    make_replica(root)
    spawn = multiprocessing.get_context("spawn")
    rows = []
    for what in ("load_dataset", "check, headers", "check, full decode"):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            rows.append(pool.submit(measure_reading, what, root).result())
    print_table(rows, ["stage", "seconds", "peak_mb", "detail"])
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        loaders = pool.submit(measure_loader, root, args.pairs, args.batch_size, tuple(args.image_size)).result()
    print_table(loaders, ["pipeline", "pairs_per_s", "decode_ms", "resize_ms", "augmentation_ms", "collation_ms",
                          "peak_mb"])
    # What one GPU step needs: CSKT's training FLOPs per pair at ViT-B/16, 384x128, at a utilisation of
    # 40 % of an H100's dense bf16 peak (989 TFLOP/s): the loader processes that keep up with it.
    _, training_flops = flops_per_pair(clip_min.CLIPConfig(image_size=tuple(args.image_size), stride=16), "cskt",
                                       dict(train.METHOD_DEFAULTS["cskt"]))
    gpu_pairs_per_s = 0.4 * 989e12 / training_flops
    ours = loaders[0]["pairs_per_s"]
    print(f"a GPU step at 40 % of 989 TFLOP/s: {gpu_pairs_per_s:,.0f} pairs/s; at {ours:,.0f} pairs/s per loader "
          f"process that needs {math.ceil(gpu_pairs_per_s / ours)} loader processes")
    epoch = None
    if args.epoch:
        with tempfile.TemporaryDirectory(prefix="replica-run-") as out:
            epoch = measure_epoch(root, args.workers, args.epoch_batch_size, out)
        print_table([epoch], ["stage", "seconds", "pairs_per_s", "peak_mb", "detail"])
    print(json.dumps({"benchmark": "replica", "data": "CUHK-PEDES", "reading": rows, "loader": loaders,
                      "gpu_pairs_per_s": round(gpu_pairs_per_s), "epoch": epoch}))


# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# demo-seeds: README's demo table, `python train.py` and the DM-Adapter run per seed and thread count


def seed_list(text):
    """'1-5' -> [1, 2, 3, 4, 5]; '1,3' -> [1, 3]."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def demo_run(root, seed, threads, method):
    """One `python train.py` of the demo in a fresh process with OMP_NUM_THREADS=threads: (zero-shot
    metrics, test metrics, seconds). The process's whole life is timed, imports included."""
    out = os.path.join(root, "runs", method)
    command = [sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"), "--method", method,
               "--data", "demo", "--root", root, "--seed", str(seed), "--out", out]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.time() - started
    if result.returncode != 0:
        sys.exit(f"benchmark.py: {' '.join(command)} failed (OMP_NUM_THREADS={threads}):\n{result.stderr[-2000:]}")
    with open(os.path.join(out, "test_metrics.json")) as file:
        return table_row(result.stdout, "frozen CLIP, zero-shot"), json.load(file), seconds


def table_row(printed, name):
    """The metrics of row `name` of the last evaluate.format_table in `printed`."""
    row = [line for line in printed.splitlines() if line.startswith(f"| {name} ")][-1]
    return dict(zip(evaluate.METRIC_NAMES, map(float, row.strip(" |").split("|")[1:])))


def run_demo_seeds(args):
    # What `python train.py` gets without OMP_NUM_THREADS: torch's default, asked of a fresh process.
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    default_threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                     capture_output=True, text=True, env=environment, check=True).stdout.strip()
    rows = []
    for seed in args.seeds:
        for threads in args.threads:
            # A fresh root per cell: the demo is drawn and its CLIP pretrained by the CSKT run, as a
            # new user's first `python train.py` does; the DM-Adapter run reuses that cached CLIP.
            with tempfile.TemporaryDirectory(prefix="demo-seeds-") as root:
                zero_shot, cskt_metrics, cskt_seconds = demo_run(root, seed, threads, "cskt")
                dm_zero_shot, dm_metrics, dm_seconds = demo_run(root, seed, threads, "dm_adapter")
            if dm_zero_shot != zero_shot:
                sys.exit(f"benchmark.py: seed {seed}, {threads} thread(s): the DM-Adapter run did not reuse the CLIP")
            rows.append({"seed": seed, "threads": threads, "zero_shot": zero_shot["R1"], "cskt": cskt_metrics["R1"],
                         "dm_adapter": dm_metrics["R1"], "train_py_s": round(cskt_seconds), "dm_run_s": round(dm_seconds)})
            print(f"seed {seed}, {threads} thread(s): done", file=sys.stderr, flush=True)
    print(f"Test R1 in percent (gain over the frozen CLIP's zero-shot R1); `python train.py` = draw, pretrain, "
          f"zero-shot, CSKT; the DM-Adapter run reuses its cached CLIP. Without OMP_NUM_THREADS, python train.py "
          f"runs {default_threads} thread(s) here.\n")
    print("| seed | threads | frozen tiny CLIP, zero-shot | CSKT | DM-Adapter | `python train.py` | DM-Adapter run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['threads']} | {r['zero_shot']:.2f} | {r['cskt']:.2f} (+{r['cskt'] - r['zero_shot']:.2f}) "
              f"| {r['dm_adapter']:.2f} (+{r['dm_adapter'] - r['zero_shot']:.2f}) | {r['train_py_s']} s | {r['dm_run_s']} s |")
    gains = [r[m] - r["zero_shot"] for r in rows for m in ("cskt", "dm_adapter")]
    lowest = min(r[m] for r in rows for m in ("cskt", "dm_adapter"))
    print(f"\nsmallest gain {min(gains):.2f} points, lowest R1 {lowest:.2f}; slowest `python train.py` "
          f"{max(r['train_py_s'] for r in rows)} s, slowest DM-Adapter run {max(r['dm_run_s'] for r in rows)} s")
    print(json.dumps({"benchmark": "demo-seeds", "default_threads": int(default_threads), "results": rows}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    metrics = commands.add_parser("metrics", help="time retrieval_metrics and measure its peak memory")
    metrics.add_argument("--queries", type=int, default=19848)
    metrics.add_argument("--gallery", type=int, default=14993)
    metrics.add_argument("--identities", type=int, default=1000)
    metrics.add_argument("--dim", type=int, default=512)
    metrics.add_argument("--chunk-size", type=int, default=1024, help="queries per chunk")
    metrics.add_argument("--seed", type=int, default=0)
    metrics.add_argument("--direction", choices=["t2i", "i2t", "both"], default="t2i",
                         help="t2i: the queries (captions) rank the gallery (images); i2t: the reverse")
    metrics.add_argument("--irra", action="store_true",
                         help="also time IRRA's method (full argsort + Python loop; ~25 s, ~7 GB)")
    metrics.set_defaults(run=run_metrics)

    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, run, help_text in [("train", run_train, "time a training step (synthetic tensors, optionally the loader)"),
                                 ("eval", run_eval, "time encoding and ranking a CUHK-PEDES-sized test split")]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--method", default="cskt", choices=["cskt", "dm_adapter", "finetune"])
        command.add_argument("--device", default=default_device)
        command.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
        command.add_argument("--stride", type=int, default=16)
        command.add_argument("--tiny", action="store_true", help="a tiny CLIP instead of ViT-B/16 (smoke test)")
        command.set_defaults(run=run)
    train_command, eval_command = commands.choices["train"], commands.choices["eval"]
    train_command.add_argument("--batch-size", type=int, default=128)
    train_command.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    train_command.add_argument("--precision", default="bf16" if default_device == "cuda" else "fp32",
                               choices=["fp32", "bf16", "fp16"])
    train_command.add_argument("--compile", action="store_true", help="torch.compile the model")
    train_command.add_argument("--grad-checkpointing", action="store_true",
                               help="activation checkpointing: recompute each block in the backward pass")
    train_command.add_argument("--data-pipeline", action="store_true",
                               help="also time the step fed by data.py's loader on the demo images")
    train_command.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    train_command.add_argument("--root", default=None, help="where the demo set is (default: a temporary folder)")
    train_command.add_argument("--peak-tflops", type=float, default=None,
                               help="one GPU's dense peak at --precision for the utilisation column (default: "
                                    "looked up by the GPU's name; none on the CPU)")
    eval_command.add_argument("--images", type=int, default=3074)
    eval_command.add_argument("--captions", type=int, default=6156)
    eval_command.add_argument("--identities", type=int, default=1000)
    eval_command.add_argument("--batch-size", type=int, default=512)

    memory = commands.add_parser("memory", help="one step's peak memory and time, with and without activation "
                                                 "checkpointing, each in a fresh process")
    memory.add_argument("--method", default="cskt", choices=["cskt", "dm_adapter", "finetune"],
                        help="what trains (finetune: every CLIP weight)")
    memory.add_argument("--device", default=default_device, help="a torch device")
    memory.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"), help="input size")
    memory.add_argument("--stride", type=int, default=16, help="stride of the patch convolution")
    memory.add_argument("--tiny", action="store_true", help="a tiny CLIP instead of ViT-B/16 (smoke test)")
    memory.add_argument("--batch-size", type=int, nargs="+", default=[8],
                        help="pairs per step; with two or more, the per-pair slope between the smallest and the "
                             "largest is extrapolated to --extrapolate-to")
    memory.add_argument("--extrapolate-to", type=int, default=128, help="the batch the slope is extrapolated to")
    memory.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast dtype (fp16 adds a grad scaler)")
    memory.add_argument("--steps", type=int, default=3,
                        help="timed steps of each variant at the first --batch-size, alternating in one process "
                             "after a warm-up step of each (0: memory only)")
    memory.set_defaults(run=run_memory)
    replica = commands.add_parser("replica", help="CUHK-PEDES at its published size: read, check, load, train")
    replica.add_argument("--data", default="CUHK-PEDES", choices=["CUHK-PEDES"])
    replica.add_argument("--root", default="/tmp/tpr-replica",
                         help="where the replica is written once (40,206 JPEGs, ~0.5 GB) and reused")
    replica.add_argument("--pairs", type=int, default=2048, help="training pairs timed per loader pipeline")
    replica.add_argument("--batch-size", type=int, default=64, help="pairs per batch in the loader timing")
    replica.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    replica.add_argument("--epoch", action=argparse.BooleanOptionalAction, default=True,
                         help="also run train.py for one epoch of a tiny CLIP over the whole replica and the "
                              "full test split (minutes on a few CPU cores)")
    replica.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes of that run")
    replica.add_argument("--epoch-batch-size", type=int, default=64)
    replica.set_defaults(run=run_replica)
    seeds = commands.add_parser("demo-seeds", help="README's demo table: python train.py and the DM-Adapter run "
                                "per seed and thread count, each in its own process and temporary --root")
    seeds.add_argument("--seeds", type=seed_list, default=seed_list("1-5"), help="seeds, as 1-5 or 1,3")
    seeds.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS values")
    seeds.set_defaults(run=run_demo_seeds)

    moe = commands.add_parser("moe", help="DM-Adapter's dispatch against the per-expert loop, forward + backward")
    moe.add_argument("--batch-size", type=int, default=8)
    moe.add_argument("--tokens", type=int, default=193, help="tokens per image (ViT-B/16 at 384x128: 193)")
    moe.add_argument("--width", type=int, default=768)
    moe.add_argument("--num-experts", type=int, default=6)
    moe.add_argument("--top-k", type=int, default=2)
    moe.add_argument("--steps", type=int, default=20)
    moe.set_defaults(run=run_moe)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
