"""Train CSKT, DM-Adapter or all of CLIP for text-based person retrieval: one script, top to bottom.

    python train.py --method cskt --data CUHK-PEDES --root data        # the authors' recipe
    python train.py --method dm_adapter --data RSTPReid --root data
    python train.py --method finetune --data ICFG-PEDES --root data    # IRRA's "CLIP fine-tuned" row
    python train.py --method cskt --data demo                          # offline, CPU, about 5 minutes
    torchrun --nproc_per_node=4 train.py --method cskt --data CUHK-PEDES   # DDP, one process per GPU

The recipe (SPEC 2.5, the authors' run scripts): Adam (betas 0.9/0.999, eps 1e-3), lr 3e-4 with
biases at 2x and without weight decay (4e-5 elsewhere), 60 epochs of batch 128 at 384x128 with
augmentation, a per-epoch schedule of 5 linear warm-up epochs from 0.1x then cosine to 0, seed 1.
Every value is a flag. The best epoch is chosen on val (the authors chose on test); the test
split is evaluated once, at the end, with the best checkpoint.

The demo (`--data demo`, the default) runs the whole pipeline in miniature without a network: a
tiny CLIP is first trained from random weights on the synthetic "demo-pretrain" corpus (this same
script, method finetune; it stands in for OpenAI's pretraining) and saved as an OpenAI-layout
state dict, which is then loaded like any CLIP checkpoint; its zero-shot result on the demo test
split is the baseline the method must beat.

Under torchrun every process trains on its share of each batch (--batch-size is the global
batch; SDM sees each process's share) and DDP averages the gradients; rank 0 evaluates and saves.

Sections: arguments; device, precision, DDP; checkpoints; the training run; the demo's CLIP; main.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import clip_min
import data
import evaluate

# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------

# The demo trains tiny models on tiny images on a CPU; these replace the paper's defaults when
# --data demo is chosen (any flag given on the command line still wins). Its CLIP was trained at
# temperature 0.07 (see sdm_loss), and adapting it keeps that; its small gradients want Adam's
# usual epsilon rather than the authors' 1e-3; augmentation costs more epochs than it has.
DEMO_RECIPE = dict(epochs=12, batch_size=64, lr=6e-3, eps=1e-6, warmup_epochs=1, temperature=0.07,
                   augment=False, image_size=(64, 32), stride=8, depth=4, workers=0, eval_every=3, log_every=25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--method", default="cskt", choices=["cskt", "dm_adapter", "finetune"],
        help="what to train: CSKT or DM-Adapter on a frozen CLIP, or every CLIP weight (IRRA's baseline)")
    add("--data", default="demo", choices=[*data.DATASETS],
        help="dataset under --root; 'demo' is drawn on first use (demo-pretrain is the demo's CLIP corpus)")
    add("--root", default="data", help="folder holding the datasets (see README for the layout)")
    add("--clip", default=None,
        help="CLIP release name or checkpoint path (default: ViT-B/16; for the demo, its own tiny CLIP)")
    add("--out", default=None, help="run folder for logs and checkpoints (default: runs/<data>-<method>-<time>)")
    recipe = parser.add_argument_group("recipe (defaults: the authors'; the demo has its own)")
    recipe.add_argument("--epochs", type=int, default=60, help="passes over the training pairs")
    recipe.add_argument("--batch-size", type=int, default=128, help="global batch (split across DDP processes)")
    recipe.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-4; finetune 1e-5)")
    recipe.add_argument("--bias-lr-factor", type=float, default=2.0, help="biases train at lr times this")
    recipe.add_argument("--weight-decay", type=float, default=4e-5, help="L2 on non-bias weights (Adam's)")
    recipe.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="Adam's moment decay rates")
    recipe.add_argument("--eps", type=float, default=1e-3, help="Adam's epsilon (large, as the authors')")
    recipe.add_argument("--warmup-epochs", type=int, default=5, help="epochs of linear warm-up before the cosine")
    recipe.add_argument("--warmup-factor", type=float, default=0.1, help="lr factor at the first epoch")
    recipe.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"),
                        help="input size; CLIP's position grid is resized to fit")
    recipe.add_argument("--stride", type=int, default=16, help="stride of the patch convolution")
    recipe.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="flip, pad-and-crop and random erasing of training images")
    recipe.add_argument("--mask-captions", action=argparse.BooleanOptionalAction, default=None,
                        help="caption masking augmentation (default: on for dm_adapter, off otherwise)")
    recipe.add_argument("--temperature", type=float, default=0.02, help="SDM's temperature (fixed)")
    recipe.add_argument("--seed", type=int, default=1, help="seeds the model's initialisation and the data order")
    method = parser.add_argument_group("method (defaults: the papers')")
    method.add_argument("--n-ctx", type=int, default=4, help="CSKT: prompt tokens per tower and layer")
    method.add_argument("--depth", type=int, default=12, help="CSKT: layers that get prompts")
    method.add_argument("--reduction", type=int, default=8, help="adapter bottleneck: width / reduction")
    method.add_argument("--vision-scale", type=float, default=0.1, help="adapter output scale, image tower")
    method.add_argument("--text-scale", type=float, default=4.0, help="adapter output scale, text tower")
    method.add_argument("--num-experts", type=int, default=6, help="DM-Adapter: experts per block")
    method.add_argument("--top-k", type=int, default=2, help="DM-Adapter: experts per token")
    method.add_argument("--aux-weight", type=float, default=0.5, help="DM-Adapter: load-balancing weight")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    run.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="auto: bf16 autocast on GPUs that have it, else fp16 with a grad scaler; fp32 on CPU")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    run.add_argument("--eval-every", type=int, default=1, help="evaluate on val every this many epochs")
    run.add_argument("--log-every", type=int, default=50, help="a progress line every this many steps")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPUs)")
    run.add_argument("--resume", default=None, help="a last.pt to continue from, exactly where it stopped")
    run.add_argument("--stop-after", type=int, default=None, metavar="N",
                     help="stop after N epochs of this invocation (for time-limited jobs; then --resume)")
    args = parser.parse_args(argv)
    if args.data == "demo":
        parser.set_defaults(**DEMO_RECIPE)
        args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-5 if args.method == "finetune" else 3e-4
    if args.mask_captions is None:
        args.mask_captions = args.method == "dm_adapter"  # the authors' DM-Adapter script always masks
    args.image_size = tuple(args.image_size)
    return args


def method_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of the chosen method's class (saved in checkpoints to rebuild it)."""
    if args.method == "cskt":
        return dict(n_ctx=args.n_ctx, depth=args.depth, reduction=args.reduction,
                    vision_scale=args.vision_scale, text_scale=args.text_scale)
    if args.method == "dm_adapter":
        return dict(num_experts=args.num_experts, top_k=args.top_k, reduction=args.reduction,
                    aux_weight=args.aux_weight, vision_scale=args.vision_scale, text_scale=args.text_scale)
    return {}


# ------------------------------------------------------------------------------------------------
# Device, precision, DDP
# ------------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32 throughout
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(args: argparse.Namespace) -> Runtime:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        elif torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    precision = args.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp16" if device.type == "mps" else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(device, amp_dtype, rank, world_size)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict):
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    np.random.set_state(("MT19937", np.array(states["numpy"], dtype=np.uint32), states["numpy_pos"], 0, 0.0))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Adam:
    """Adam with IRRA's two groups: biases at bias_lr_factor x lr and no weight decay."""
    weights, biases = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (biases if "bias" in name else weights).append(parameter)
    groups = [{"params": weights, "weight_decay": args.weight_decay},
              {"params": biases, "lr": args.lr * args.bias_lr_factor, "weight_decay": 0.0}]
    # One fused kernel for all parameters on CUDA; elsewhere the multi-tensor (foreach) version.
    fused = device.type == "cuda"
    return torch.optim.Adam(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                            fused=fused or None, foreach=None if fused else True)


def lr_factor(epoch: int, args: argparse.Namespace) -> float:
    """The lr multiplier of 0-based `epoch`: linear warm-up from warmup_factor, then cosine to 0."""
    if epoch < args.warmup_epochs:
        return args.warmup_factor + (1 - args.warmup_factor) * epoch / args.warmup_epochs
    return 0.5 * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))


# ------------------------------------------------------------------------------------------------
# Checkpoints: what was trained, plus what rebuilds the rest
# ------------------------------------------------------------------------------------------------

def save_atomically(obj, path: str):
    """Write to a temporary file, then rename: an interrupted save never leaves a broken file."""
    temporary = path + ".tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)


def backbone_description(args: argparse.Namespace, clip_model: clip_min.CLIP) -> dict:
    """How evaluate.load_checkpoint gets the frozen CLIP back: a release by name and hash, or the
    weights themselves (any other file may not exist where the checkpoint is read). A fine-tuned
    CLIP needs neither: all of it is in the trained state."""
    description = {"image_size": list(args.image_size), "stride": args.stride, "name": args.clip}
    if args.clip in clip_min.RELEASES:
        return {**description, "sha256": clip_min.RELEASES[args.clip][0]}
    if args.method == "finetune":
        return description
    return {**description, "state_dict": {k: v.detach().cpu() for k, v in clip_model.state_dict().items()}}


def trained_state(model: torch.nn.Module) -> dict:
    """Everything but the frozen backbone (the methods keep it under "clip."; finetune has none)."""
    return {name: v.detach().cpu() for name, v in model.state_dict().items() if not name.startswith("clip.")}


# ------------------------------------------------------------------------------------------------
# The training run
# ------------------------------------------------------------------------------------------------

class TrainingError(Exception):
    """The run cannot go on (a NaN loss, a checkpoint that does not fit); the message says why."""


def train(args: argparse.Namespace, runtime: Runtime, clip_model: clip_min.CLIP, log) -> dict:
    """Trains args.method on args.data from `clip_model`; returns the test metrics of the best epoch."""
    device = runtime.device
    os.makedirs(args.out, exist_ok=True)
    journal = open(os.path.join(args.out, "log.jsonl"), "a") if runtime.is_main else None

    def record(entry: dict):
        if journal:
            journal.write(json.dumps(entry) + "\n")
            journal.flush()

    if runtime.is_main:
        with open(os.path.join(args.out, "args.json"), "w") as file:
            json.dump(vars(args), file, indent=2)

    # --- data --------------------------------------------------------------------------------
    dataset = data.load_dataset(args.data, args.root)
    train_set = data.CaptionImageDataset(dataset.train, data.build_transform(args.image_size, train=args.augment),
                                         mask_captions=args.mask_captions)
    loader = data.train_loader(train_set, args.batch_size // runtime.world_size, args.workers,
                               seed=args.seed, distributed=runtime.world_size > 1)
    # The best epoch is chosen on val (the authors chose it on test); without a val split
    # (ICFG-PEDES, demo-pretrain) the last epoch is kept.
    selection_split = dataset.val
    selection_loaders = selection_split and data.eval_loaders(
        selection_split, data.build_transform(args.image_size), batch_size=256, workers=args.workers)
    log(f"{args.data}: {len(train_set):,} training pairs of {dataset.train.num_identities:,} identities; "
        f"{len(loader):,} steps per epoch; test {len(dataset.test.captions):,} queries x "
        f"{len(dataset.test.image_paths):,} images")

    # --- model and optimizer -------------------------------------------------------------------
    model = evaluate.build_method(args.method, clip_model.to(device), method_arguments(args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"{args.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f} %)")
    optimizer = build_optimizer(model, args, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, args))
    # fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
    step_model = model
    if runtime.world_size > 1:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_model = torch.compile(step_model)

    checkpoint_base = {"method": args.method, "method_args": method_arguments(args),
                       "clip": backbone_description(args, clip_model), "data": args.data, "args": vars(args)}
    first_epoch, best = 0, {"epoch": -1, "R1": -1.0}
    if args.resume:
        try:
            state = torch.load(args.resume, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling errors come in many types
            raise TrainingError(f"--resume: cannot read {args.resume} ({error})") from None
        if not isinstance(state, dict) or "optimizer" not in state:
            raise TrainingError(f"--resume: {args.resume} holds no optimizer state; resume from a last.pt")
        if (state["method"], state["data"]) != (args.method, args.data):
            raise TrainingError(f"{args.resume} is a {state['method']} run on {state['data']}, "
                                f"not {args.method} on {args.data}")
        evaluate.load_trained(model, state["trainable"], args.resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        first_epoch, best = state["epoch"] + 1, state["best"]
        log(f"resumed from {args.resume}: continuing at epoch {first_epoch + 1}")

    def save(name: str, epoch: int, full: bool):  # (the authors' code saved no checkpoints)
        checkpoint = {**checkpoint_base, "trainable": trained_state(model), "epoch": epoch, "best": best}
        if full:  # what --resume needs on top of the weights
            checkpoint.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                              scaler=scaler.state_dict(), rng=rng_states())
        save_atomically(checkpoint, os.path.join(args.out, name))

    # --- the loop ----------------------------------------------------------------------------
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, first_epoch + args.stop_after)
    steps_per_epoch, started, steps_done = len(loader), time.time(), 0
    for epoch in range(first_epoch, last_epoch):
        model.train()
        # Reseeding per epoch makes the order, the augmentation and the masking of epoch e the
        # same whether or not the run was resumed (workers are started anew each epoch).
        loader.generator.manual_seed(args.seed + 1000 * epoch + runtime.rank)
        if runtime.world_size > 1:
            loader.sampler.set_epoch(epoch)
        # Losses are summed on the device and read once per progress line: no sync per step.
        window_sums, window_steps, window_pairs, window_started = {}, 0, 0, time.time()
        nonfinite_steps = torch.zeros((), dtype=torch.long, device=device)
        for step, batch in enumerate(loader, 1):
            images = batch["images"].to(device, non_blocking=True)
            ids = batch["ids"].to(device, non_blocking=True)
            pids = batch["pids"].to(device, non_blocking=True)
            # fp32 master weights under autocast (the authors cast the weights to fp16 and ran Adam
            # on them, with neither a master copy nor loss scaling).
            with runtime.autocast():
                losses = step_model(images, ids, pids, temperature=args.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            for name, value in losses.items():
                window_sums[name] = window_sums.get(name, 0) + value.detach()
            nonfinite_steps += ~torch.isfinite(losses["loss"].detach())
            window_steps += 1
            window_pairs += len(images) * runtime.world_size
            steps_done += 1

            if step % args.log_every == 0 or step == steps_per_epoch:
                if nonfinite_steps.item():  # one sync per log line, not per step
                    raise TrainingError(
                        f"the loss became NaN or infinite in epoch {epoch + 1} (before step {step}); "
                        f"stopped, {args.out}/last.pt holds the last good epoch. Try a lower --lr or "
                        "--precision fp32")
                elapsed = time.time() - started
                remaining = (last_epoch - epoch) * steps_per_epoch - step
                parts = {name: (total / window_steps).item() for name, total in window_sums.items()}
                pairs_per_s = window_pairs / (time.time() - window_started)
                lr = optimizer.param_groups[0]["lr"]
                log(f"epoch {epoch + 1}/{args.epochs}  step {step}/{steps_per_epoch}  "
                    + "  ".join(f"{k} {v:.4f}" for k, v in parts.items())
                    + f"  lr {lr:.2e}  {pairs_per_s:,.0f} pairs/s  ETA {format_seconds(elapsed / steps_done * remaining)}")
                record({"epoch": epoch + 1, "step": step, **parts, "lr": lr, "pairs_per_s": pairs_per_s})
                window_sums, window_steps, window_pairs, window_started = {}, 0, 0, time.time()
        scheduler.step()

        # --- evaluate, keep the best, save -----------------------------------------------------
        is_last = epoch + 1 == args.epochs
        if runtime.is_main:
            if selection_split is None:
                best = {"epoch": epoch, "R1": float("nan")}  # no val split: the last epoch is kept
                save("best.pt", epoch, full=False)
            elif (epoch + 1) % args.eval_every == 0 or is_last:
                metrics = evaluate.evaluate_loaders(model, selection_loaders, selection_split, device)
                log(f"epoch {epoch + 1} val: " + evaluate.format_metrics(metrics))
                record({"epoch": epoch + 1, "split": "val", **metrics})
                if metrics["R1"] > best["R1"]:
                    best = {"epoch": epoch, "R1": metrics["R1"]}
                    save("best.pt", epoch, full=False)
            save("last.pt", epoch, full=True)
        if runtime.world_size > 1:
            dist.barrier()  # the other ranks wait while rank 0 evaluates and saves

    if last_epoch < args.epochs:
        log(f"stopped after epoch {last_epoch} as asked; continue with --resume {args.out}/last.pt")
        return {}

    # --- the test split, once, with the best checkpoint -------------------------------------------
    results = {}
    if runtime.is_main:
        best_state = torch.load(os.path.join(args.out, "best.pt"), map_location="cpu", weights_only=True)
        evaluate.load_trained(model, best_state["trainable"], "best.pt")
        results = evaluate.evaluate_split(model, dataset.test, args.image_size, device, workers=args.workers)
        log(f"test (epoch {best_state['epoch'] + 1}): " + evaluate.format_metrics(results))
        record({"epoch": best_state["epoch"] + 1, "split": "test", **results})
        with open(os.path.join(args.out, "test_metrics.json"), "w") as file:
            json.dump({"epoch": best_state["epoch"] + 1, **results}, file, indent=2)
    if journal:
        journal.close()
    return results


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------------
# The demo's CLIP: trained here from random weights, because no pretrained one can be downloaded
# ------------------------------------------------------------------------------------------------

DEMO_CLIP = clip_min.CLIPConfig(embed_dim=64, image_size=(64, 32), patch_size=8, stride=8,
                                vision_width=64, vision_layers=4, text_width=64, text_layers=4)
DEMO_PRETRAIN_RECIPE = ["--epochs", "8", "--batch-size", "64", "--lr", "1e-3", "--warmup-epochs", "1",
                        "--bias-lr-factor", "1", "--weight-decay", "0", "--eps", "1e-6",
                        "--temperature", "0.07", "--no-augment"]


def demo_clip_path(args: argparse.Namespace, runtime: Runtime, log) -> str:
    """The demo's tiny CLIP, as an OpenAI-layout state dict; trained first if not there yet.

    It is kept inside the demo-pretrain folder, which data.py replaces whenever it redraws the
    corpus, under a name that hashes its recipe: a cached CLIP is never stale.
    """
    recipe = hashlib.sha256(repr((DEMO_CLIP, DEMO_PRETRAIN_RECIPE, args.seed)).encode()).hexdigest()[:12]
    log("demo 1/3: a CLIP to adapt")
    data.make_demo("demo-pretrain", args.root)
    path = os.path.join(args.root, "demo-pretrain", f"clip-{recipe}.pt")
    if os.path.isfile(path):
        log(f"  using the tiny CLIP cached at {path}")
        return path
    log("  No pretrained CLIP can be downloaded offline, so a tiny one is trained from random weights "
        "on the synthetic demo-pretrain corpus (standing in for OpenAI's pretraining), all of it trained:")
    pretrain_args = parse_args(["--method", "finetune", "--data", "demo-pretrain", "--root", args.root,
                                "--out", os.path.join(args.out, "demo-pretrain"), "--image-size",
                                *map(str, DEMO_CLIP.image_size), "--stride", str(DEMO_CLIP.stride),
                                "--workers", str(args.workers), "--device", str(runtime.device),
                                "--seed", str(args.seed), *DEMO_PRETRAIN_RECIPE])
    pretrain_args.clip = "random initialisation"
    seed_everything(args.seed)
    clip_model = clip_min.CLIP(DEMO_CLIP)
    train(pretrain_args, runtime, clip_model, log)
    save_atomically(clip_model.state_dict(), path)
    log(f"  saved the tiny CLIP to {path}, an ordinary OpenAI-layout state dict, loaded back by clip_min.load")
    return path


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runtime = setup_runtime(args)
        log = print if runtime.is_main else (lambda *a, **k: None)
        if args.resume and not args.out:
            args.out = os.path.dirname(os.path.abspath(args.resume))
        args.out = args.out or os.path.join("runs", f"{args.data}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        log(f"device {runtime.device}, precision {runtime.amp_dtype or 'fp32'}, "
            f"{runtime.world_size} process(es); run folder {args.out}")
        if args.resume and not os.path.isfile(args.resume):
            raise TrainingError(f"--resume: no such file: {args.resume}")

        demo_baseline = None
        if args.data == "demo" and args.clip is None:
            args.clip = demo_clip_path(args, runtime, log)
        args.clip = args.clip or "ViT-B/16"
        clip_model = clip_min.load(args.clip, args.image_size, args.stride, runtime.device)
        if args.data == "demo" and runtime.is_main:
            test_split = data.load_dataset("demo", args.root).test
            log("demo 2/3: the frozen CLIP's zero-shot result on the demo test split, the baseline to beat "
                "(the demo set shows colours, a pattern and wording the pretraining never did)")
            demo_baseline = evaluate.evaluate_split(clip_model, test_split, args.image_size, runtime.device)
            log("  " + evaluate.format_metrics(demo_baseline))
            log(f"demo 3/3: training {args.method} on the demo set, CLIP frozen")

        seed_everything(args.seed + runtime.rank)
        results = train(args, runtime, clip_model, log)
        if demo_baseline is not None and results:
            rows = {"chance (random scores)": evaluate.chance_metrics(test_split),
                    "frozen CLIP, zero-shot": demo_baseline, f"{args.method}, CLIP frozen": results}
            log("\ndemo test split:\n" + evaluate.format_table(rows))
    except (data.DataError, clip_min.CLIPError, TrainingError, evaluate.CheckpointError) as error:
        # A DataError raised in a loader worker arrives with the worker's traceback in its message:
        # its last line is the error itself.
        message = str(error).strip().splitlines()[-1]
        print(f"error: {message.split('Error: ', 1)[-1] if message.startswith('data.') else message}",
              file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
