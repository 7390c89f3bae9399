"""Benchmarks for the project (not collected by pytest: the name does not start with test_).

    python tests/benchmark.py train --method cskt        # a training step at ViT-B/16, 384x128, batch 128
    python tests/benchmark.py train --method dm_adapter --compile --data-pipeline
    python tests/benchmark.py eval                       # a CUHK-PEDES-sized test split, end to end
    python tests/benchmark.py metrics                    # retrieval_metrics, ICFG-PEDES-sized
    python tests/benchmark.py metrics --irra             # the same, plus IRRA's ranking method (~7 GB)
    python tests/benchmark.py moe                        # DM-Adapter's dispatch against the per-expert loop
    python tests/benchmark.py train --tiny               # a seconds-long smoke run (what CI runs)
    python tests/benchmark.py demo-seeds --seeds 1-5 --threads 1 2   # README's demo table (~30 min)

Each prints a table and one JSON line. Weights are random (in OpenAI's layout, built from shapes):
speed does not depend on their values. On CUDA the training step runs under
torch.cuda.set_sync_debug_mode("warn") and every host synchronisation inside it is counted.
Memory: on CUDA the allocator's peak; on the CPU the peak resident size of the process. The
metric measurements run in fresh processes so that their peak memory is their own (Linux only:
they read /proc/self/status).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import clip_min  # noqa: E402  (these need the repository root on the path first)
import data  # noqa: E402
import dm_adapter  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from test_dm_adapter import per_expert_loop  # noqa: E402  (the authors' dispatch, as the tests write it)

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


def measure_metrics(method, args):
    """Runs in a fresh process: build the problem, then time one call of `method`."""
    problem = build_retrieval_problem(args.queries, args.gallery, args.identities, args.dim, args.seed)
    before_mb = resident_mb()
    start = time.perf_counter()
    if method == "irra":
        result = irra_style_metrics(*problem)
    else:
        result = evaluate.retrieval_metrics(*problem, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024            # KB on Linux
    # The peak may predate the call (building the problem); then this over-reports, never under.
    return {"method": method, "seconds": round(seconds, 2),
            "peak_extra_mb": round(max(0.0, peak_mb - before_mb)), "threads": torch.get_num_threads(),
            **{key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}}


def run_metrics(args):
    methods = ["chunked"] + (["irra"] if args.irra else [])
    results = []
    for method in methods:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(measure_metrics, method, args).result())
    matrix_mb = args.queries * args.gallery * 4 / 2**20
    print(f"problem: {args.queries} queries x {args.gallery} gallery, {args.identities} identities, "
          f"similarity matrix {matrix_mb:.0f} MB, chunk size {args.chunk_size}")
    columns = ["method", "seconds", "peak_extra_mb", "R1", "R5", "R10", "mAP", "mINP", "num_skipped"]
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
    vision_tokens = 1 + config.image_size[0] // config.stride * (config.image_size[1] // config.stride)
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


def run_train(args):
    device = torch.device(args.device)
    amp_dtype = evaluate.PRECISIONS[args.precision]
    config, model, method_args = build_benchmark_model(args, device)
    optimizer = train.build_optimizer(model, lr=3e-4, bias_lr_factor=2.0, weight_decay=4e-5, betas=(0.9, 0.999),
                                      eps=1e-3, device=device)  # the authors' recipe
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_model = torch.compile(model) if args.compile else model
    model.train()

    def step(images, ids, pids):  # what train.py does per batch, and nothing else
        images = images.to(device, non_blocking=True)
        ids, pids = ids.to(device, non_blocking=True), pids.to(device, non_blocking=True)
        with evaluate.autocast(device, amp_dtype):
            losses = step_model(images, ids, pids)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()

    batch = args.batch_size
    generator = torch.Generator().manual_seed(0)
    captions = clip_min.tokenize(["a woman in a red coat carrying a black bag and wearing white shoes"] * batch)
    synthetic = (torch.randn(batch, 3, *config.image_size, generator=generator), captions,
                 torch.randint(0, batch // 2, (batch,), generator=generator))
    if device.type == "cuda":
        synthetic = tuple(t.pin_memory() for t in synthetic)
    seconds, syncs = timed_steps(step, iter(lambda: synthetic, None), args.steps, device)
    forward_flops, training_flops = flops_per_pair(config, args.method, method_args)
    achieved = training_flops * batch / seconds / 1e12
    row = {"pipeline": "synthetic", "method": args.method, "batch": batch, "image_size": list(config.image_size),
           "device": str(device), "precision": args.precision, "compile": args.compile,
           "step_s": round(seconds, 4), "pairs_per_s": round(batch / seconds, 1),
           "peak_memory_mb": round(memory_mb(device)), "host_syncs_in_step": syncs if device.type == "cuda" else None,
           "gflops_per_pair": round(training_flops / 1e9, 2), "tflops": round(achieved, 3),
           "mfu": round(achieved / args.peak_tflops, 4) if args.peak_tflops else None}
    rows = [row]

    if args.data_pipeline:  # the same step fed by data.py's loader from the demo images
        root = args.root or tempfile.mkdtemp(prefix="benchmark-demo-")
        dataset = data.load_dataset("demo", root)
        loader = data.train_loader(dataset.train, config.image_size, batch, args.workers, augment=True,
                                   mask_captions=args.method == "dm_adapter", seed=0)
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
                     "mfu": round(achieved / args.peak_tflops, 4) if args.peak_tflops else None})
    print_table(rows, ["pipeline", "method", "batch", "step_s", "pairs_per_s", "peak_memory_mb",
                       "gflops_per_pair", "tflops", "mfu", "host_syncs_in_step"])
    print(json.dumps({"benchmark": "train", "results": rows}))


def print_table(rows, columns):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)))


# -----------------------------------------------------------------------------
# eval: encode a CUHK-PEDES-sized test split and rank it


def run_eval(args):
    device = torch.device(args.device)
    config, model, _ = build_benchmark_model(args, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, *config.image_size, generator=generator)
    captions = clip_min.tokenize(["a man in a blue jacket, grey trousers and white shoes"] * args.captions)
    image_pids = torch.randint(0, args.identities, (args.images,), generator=generator)
    caption_pids = image_pids[torch.randint(0, args.images, (args.captions,), generator=generator)]
    image_loader = torch.utils.data.DataLoader(images, args.batch_size, pin_memory=device.type == "cuda")
    caption_loader = torch.utils.data.DataLoader(captions, args.batch_size, pin_memory=device.type == "cuda")
    amp_dtype = evaluate.autocast_dtype("auto", device)  # what evaluate.py uses by default
    evaluate.extract_features(model, [images[:2]], [captions[:2]], device, amp_dtype, log_every=0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    # One caption (or one image) rides along with the other side: extract_features encodes both.
    image_features, _ = evaluate.extract_features(model, image_loader, [captions[:1]], device, amp_dtype, log_every=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    image_seconds = time.perf_counter() - started
    started = time.perf_counter()
    caption_features = evaluate.extract_features(model, [images[:1]], caption_loader, device, amp_dtype, log_every=0)[1]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    caption_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluate.retrieval_metrics(evaluate.similarity_from_features(caption_features, image_features),
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
    train_command.add_argument("--data-pipeline", action="store_true",
                               help="also time the step fed by data.py's loader on the demo images")
    train_command.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    train_command.add_argument("--root", default=None, help="where the demo set is (default: a temporary folder)")
    train_command.add_argument("--peak-tflops", type=float, default=989.0 if default_device == "cuda" else None,
                               help="the device's dense bf16 peak for the utilisation column "
                                    "(989 for an H100/H200 SXM; none by default on the CPU)")
    eval_command.add_argument("--images", type=int, default=3074)
    eval_command.add_argument("--captions", type=int, default=6156)
    eval_command.add_argument("--identities", type=int, default=1000)
    eval_command.add_argument("--batch-size", type=int, default=512)

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
