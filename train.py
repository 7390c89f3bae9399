"""Train CSKT, DM-Adapter or all of CLIP for text-based person retrieval: one script, top down.

    python train.py --method cskt --data CUHK-PEDES --root data        # the authors' recipe
    python train.py --method dm_adapter --data RSTPReid --root data
    python train.py --method finetune --data ICFG-PEDES --root data    # IRRA's "CLIP fine-tuned"
    python train.py                                                    # the offline demo, on a CPU
    torchrun --nproc_per_node=4 train.py --method cskt --data CUHK-PEDES   # one process per GPU

What a run promises. Every flag, the dataset and the CLIP's fit to --image-size, --stride and
--depth are checked before any download or drawing (one line, exit status 2; bad data: one line
naming the file and entry, exit status 1). A run folder is never overwritten. --resume continues
exactly (weights, optimizer, schedule, scaler, every process's random state) with the run's own
flags; only RUNNING_FLAGS may change. Every save is atomic, so a full disk or Ctrl-C leaves the
last good checkpoint and one line saying how to go on. Under torchrun --batch-size is the global
batch and the loss and gradients are one process's; an error in any process ends the job at once.
"""

import argparse
import datetime
import hashlib
import inspect
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import clip_min
import cskt
import data
import dm_adapter
import evaluate

# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    # --- setup: processes, device, precision ------------------------------------------------------
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    log = print if rank == 0 else lambda *_: None
    device = evaluate.pick_device(args.device, *local_process())
    evaluate.use_device(device)  # the current GPU, and fp32 without TF32, as in evaluate.py
    waiting = start_processes(device) if world_size > 1 else None  # torchrun set RANK etc.
    amp_dtype = evaluate.autocast_dtype(args.precision, device)

    # --- data: every entry and image checked before the CLIP is downloaded or pretrained ----------
    if args.data in data.DEMO_SIZES:  # drawn on first use
        once_per_machine(lambda: data.make_demo(args.data, args.root), waiting)
    dataset = data.load_dataset(args.data, args.root)
    pin = device.type == "cuda"  # page-locked batches copy to a GPU asynchronously
    loader = data.train_loader(dataset.train, args.image_size, args.batch_size // world_size,
                               args.workers, args.augment, args.mask_captions, seed=args.seed,
                               distributed=world_size > 1, pin_memory=pin)
    if len(loader) == 0:
        raise TrainingError(f"{args.data} has {len(dataset.train.captions)} training pairs, fewer "
                            f"than one batch (--batch-size {args.batch_size}); lower --batch-size")
    # Made once: the tokenized captions and the image workers serve every evaluation.
    val_loaders = dataset.val and data.eval_loaders(dataset.val, args.image_size, 256,
                                                    args.workers, pin)
    test_loaders = data.eval_loaders(dataset.test, args.image_size, 256, args.workers, pin)

    # --- model: the frozen CLIP (made once per machine), the method around it --------------------
    args.clip = once_per_machine(lambda: clip_file(args, device, log), waiting)
    clip_model = clip_min.load(args.clip, args.image_size, args.stride, device)
    backbone = describe_backbone(args.method, args.clip, clip_model)
    torch.manual_seed(args.seed + rank)  # also seeds every GPU
    model = evaluate.build_method(args.method, clip_model, method_args(args))
    if args.grad_checkpointing:  # the papers' batch of 128 on a smaller GPU, the same gradients
        model.set_grad_checkpointing()
    step_model = model if world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_model = torch.compile(step_model)
    if rank == 0 and not args.resume:
        claim_run_folder(args)
    journal = os.path.join(args.out, "log.jsonl") if rank == 0 else None
    describe_run(args, dataset, model, device, amp_dtype, world_size, len(loader), log)
    zero_shot = None
    if args.data == "demo" and rank == 0:
        zero_shot = demo_zero_shot(args, clip_model, test_loaders, dataset.test, device,
                                   amp_dtype, log)

    # --- optimizer, schedule, loss scaling: new, or as the resumed run left them ------------------
    optimizer = build_optimizer(model, args.lr, args.bias_lr_factor, args.weight_decay,
                                args.betas, args.eps, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # stepped once per epoch, as the authors do
        optimizer, lambda epoch: lr_factor(epoch, args.epochs, args.warmup_epochs,
                                           args.warmup_factor))
    # fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    first_epoch, best = 0, {"epoch": -1, "R1": -1.0}
    if args.resume:
        first_epoch, best = resume(args, model, optimizer, scheduler, scaler, backbone, journal)
        log(f"resumed from {args.resume}: continuing at epoch {first_epoch + 1}")
    record(journal, {"resumed_at_epoch": first_epoch + 1} if args.resume else
           {"data": args.data, "published_set": dataset.published, "verdict": dataset.verdict})

    # --- the loop ---------------------------------------------------------------------------------
    last_epoch = min(args.epochs, first_epoch + (args.stop_after or args.epochs))
    progress = Progress(args, len(loader), first_epoch, last_epoch, journal, log)
    for epoch in range(first_epoch, last_epoch):
        model.train()
        # Reseeded per epoch, so that the order, the augmentation and the masking of an epoch
        # are the same whether or not the run was resumed (workers start anew each epoch).
        loader.generator.manual_seed(args.seed + 1000 * epoch + rank)
        if world_size > 1:
            loader.sampler.set_epoch(epoch)
        cut_short = 0  # image files cut short, decoded as the authors' pipelines decode them
        for step, batch in enumerate(loader, 1):
            cut_short += data.check_batch(batch)  # an image that cannot be read stops the run
            images, ids, pids = (batch[key].to(device, non_blocking=True)
                                 for key in ("images", "ids", "pids"))
            # fp32 master weights under autocast (the authors cast the weights to fp16 and ran
            # Adam on them, with neither a master copy nor loss scaling).
            with evaluate.autocast(device, amp_dtype):
                losses = step_model(images, ids, pids, temperature=args.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            progress.step(epoch, step, losses, optimizer.param_groups[0]["lr"])
        scheduler.step()
        if cut_short:
            log(f"epoch {epoch + 1}: {cut_short:,} training image(s) read from files cut short, "
                "decoded with the missing part filled (python data.py --check names them)")

        # --- val: the best epoch is chosen on val (the authors chose on test) -------------------
        if rank == 0 and dataset.val is None:  # ICFG-PEDES has no val split: the last epoch is kept
            best = {"epoch": epoch, "R1": float("nan")}
        elif rank == 0 and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            metrics = evaluate.evaluate_loaders(model, val_loaders, dataset.val, device, amp_dtype)
            log(f"epoch {epoch + 1} val: " + evaluate.format_metrics(metrics))
            record(journal, {"epoch": epoch + 1, "split": "val", **metrics})
            if metrics["R1"] > best["R1"]:
                best = {"epoch": epoch, "R1": metrics["R1"]}
        if best["epoch"] == epoch:  # a new best, in rank 0
            save_checkpoint("best.pt", model, args, backbone, dataset.verdict, epoch, best)
        save_last(args, model, backbone, dataset.verdict, epoch, best, optimizer, scheduler,
                  scaler, journal, waiting)

    # --- test: the test split, once, with the best checkpoint -------------------------------------
    if last_epoch < args.epochs:
        log(f"stopped after epoch {last_epoch} as asked; continue with --resume {args.out}/last.pt")
    elif rank == 0:
        test(args, model, test_loaders, dataset, device, amp_dtype, journal, zero_shot, log)
    if world_size > 1:
        dist.barrier(group=waiting)  # the others wait while rank 0 tests, then all end together


# ------------------------------------------------------------------------------------------------
# What the run calls: processes, files, checkpoints, resuming, the progress line, the demo's table
# ------------------------------------------------------------------------------------------------

class TrainingError(Exception):
    """The run cannot go on (a NaN loss, a dataset smaller than a batch); the message says why."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    prefix = f"error: process {rank}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "error: "
    code = 1
    try:
        run(args)
        code = 0
    except (data.DataError, clip_min.CLIPError, evaluate.CheckpointError, TrainingError,
            OSError) as error:  # OSError: a folder we may not write, a full disk, in its words
        print(prefix + " ".join(str(error).split()), file=sys.stderr)
    except torch.cuda.OutOfMemoryError:
        print(f"{prefix}out of GPU memory: lower --batch-size, or add --grad-checkpointing",
              file=sys.stderr)
    except KeyboardInterrupt:  # every save is atomic: what was saved is whole
        last = os.path.join(args.out or "", "last.pt")
        print("interrupted; " + (f"continue with --resume {last}" if os.path.isfile(last) else
                                 "no epoch had finished, so there is nothing to resume"),
              file=sys.stderr)
        code = 130
    except RuntimeError as error:
        if not dist.is_initialized():
            raise
        # A collective broke (gloo: the connection closed; NCCL: DistBackendError): another
        # process stopped, and its own line says why.
        print(f"process {rank}: stopped, as a collective failed ({type(error).__name__}): another "
              "process has most likely failed, see its error", file=sys.stderr)
    except BaseException:  # a bug: its traceback, and under torchrun the same prompt exit
        if not dist.is_initialized():
            raise
        traceback.print_exc()
    if dist.is_initialized():
        if code:
            # No graceful shutdown of the process group on an error: NCCL's waits for every
            # process to join it, and the others may sit in a collective until its timeout.
            # torchrun sees this exit and ends the other processes at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        dist.destroy_process_group()
    return code


def local_process() -> tuple[int, int]:
    """(this process's number on its machine, the processes there), as torchrun sets them."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


# A collective that waits longer than TRAINING_TIMEOUT ends the job with an error, so that a
# process that hangs in training shows within minutes. Where the others wait for one process on
# purpose (rank 0 evaluating and saving; a download; the demo CLIP's pretraining), they wait on a
# second, CPU-side (gloo) group that allows hours.
TRAINING_TIMEOUT = datetime.timedelta(minutes=10)
WAITING_TIMEOUT = datetime.timedelta(hours=2)


def start_processes(device: torch.device) -> dist.ProcessGroup:
    """The process group of torchrun's processes; returns the group to wait for rank 0 on."""
    # device_id: NCCL uses this process's GPU from the first collective on (else it guesses it
    # from the global rank, wrong on machines that run fewer processes than they have GPUs).
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TRAINING_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return dist.new_group(backend="gloo", timeout=WAITING_TIMEOUT)


def once_per_machine(make, group=None):
    """make() in global rank 0 while every other process waits on `group`; then in the first
    process of each other machine (LOCAL_RANK 0); then in the rest, which find what was made (a
    download, a demo set, a pretrained CLIP) rather than write the same files at once: rank 0's on
    a file system the machines share, else their first process's. Returns make()'s result."""
    if not dist.is_initialized():
        return make()
    turn = 0 if dist.get_rank() == 0 else 1 if local_process()[0] == 0 else 2
    for current in range(3):
        if current == turn:
            result = make()
        dist.barrier(group=group)
    return result


def clip_file(args: argparse.Namespace, device: torch.device, log) -> str:
    """--clip or its default, in place: a release downloaded, or the demo's tiny CLIP pretrained."""
    if args.clip is None and args.data == "demo":
        return demo_clip(args.root, args.seed, device, log)
    clip = args.clip or "ViT-B/16"
    if clip in clip_min.RELEASES:
        clip_min.download(clip)  # checks the SHA-256 of a cached file too
    return clip


def method_args(args: argparse.Namespace) -> dict:
    """The keyword arguments of the method's constructor (the papers' values by default)."""
    return {name: getattr(args, name) for name in METHOD_DEFAULTS.get(args.method, {})}


def describe_backbone(method: str, clip_name: str, clip_model: clip_min.CLIP) -> dict:
    """How a checkpoint gets its frozen CLIP back: a release by name, else the weights (the file
    may be gone where the checkpoint is read). The SHA-256 lets --resume check it is the same."""
    release = clip_min.RELEASES.get(clip_name)
    sha256 = release[0] if release else clip_min.file_sha256(clip_name)
    config = clip_model.config
    backbone = {"name": clip_name, "sha256": sha256, "image_size": list(config.image_size),
                "stride": config.stride}
    if method != "finetune" and not release:
        backbone["state_dict"] = {k: v.detach().cpu() for k, v in clip_model.state_dict().items()}
    return backbone


def claim_run_folder(args: argparse.Namespace) -> None:
    """A new run folder, claimed by creating its args.json ("x": fails if another run has it)."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    args.out = args.out or f"runs/{args.data}-{args.method}-{stamp}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "x") as file:
        json.dump(vars(args), file, indent=2)


def record(journal: str | None, entry: dict) -> None:
    """Appends `entry` to log.jsonl at once, as a JSON line (rank 0's; the others pass None)."""
    if journal:
        with open(journal, "a") as file:
            file.write(json.dumps(entry) + "\n")


def describe_run(args, dataset, model, device, amp_dtype, world_size, steps, log) -> None:
    log("\n".join([*dataset.report, dataset.verdict]))  # oddities read as the authors read them
    for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        if split is not None and split.num_truncated:
            log(f"{args.data} {name}: {split.num_truncated:,} of {len(split.captions):,} "
                f"captions cut to {clip_min.CONTEXT_LENGTH} tokens")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    precision = {dtype: name for name, dtype in evaluate.PRECISIONS.items()}[amp_dtype]
    log(f"device {device}, precision {precision}, {world_size} process(es); run folder "
        f"{args.out}\n{args.data}: {len(dataset.train.captions):,} training pairs of "
        f"{dataset.train.num_identities:,} identities; {steps:,} steps per epoch; test "
        f"{len(dataset.test.captions):,} queries x {len(dataset.test.image_paths):,} images\n"
        f"{args.method}: {trainable:,} trainable parameters of {total:,} "
        f"({100 * trainable / total:.2f} %)")


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights (evaluate.is_trained) on the CPU: what a checkpoint holds."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if evaluate.is_trained(k)}


def save_checkpoint(name: str, model: torch.nn.Module, args: argparse.Namespace, backbone: dict,
                    verdict: str, epoch: int, best: dict, **resume_state) -> None:
    """<out>/<name>: for evaluate.py (best.pt), or with resume_state for --resume (last.pt)."""
    path = os.path.join(args.out, name)
    fields = dict(method=args.method, method_args=method_args(args), data=args.data,
                  args=vars(args), clip=backbone, epoch=epoch, best=best, dataset_check=verdict,
                  trainable=trained_state(model), **resume_state)
    try:
        with clip_min.atomic_file(path) as file:
            torch.save(fields, file)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise evaluate.CheckpointError(f"could not save {path}: {reason}; the previous {name}, if "
                                       "any, is kept") from None


def save_last(args, model, backbone, verdict, epoch, best, optimizer, scheduler, scaler, journal,
              waiting) -> None:
    """last.pt, by rank 0, with every process's CPU generator in rank order as it stands after
    rank 0's evaluation (whose loaders draw their seeds from it); the others wait meanwhile."""
    rng_states = [torch.get_rng_state()] * (dist.get_world_size() if waiting else 1)
    if waiting:
        dist.all_gather_object(rng_states, rng_states[0], group=waiting)
    if not waiting or dist.get_rank() == 0:
        save_checkpoint("last.pt", model, args, backbone, verdict, epoch, best,
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict(), rng=rng_states,
                        log_size=os.path.getsize(journal))
    if waiting:
        dist.barrier(group=waiting)


def resume(args, model, optimizer, scheduler, scaler, backbone, journal) -> tuple[int, dict]:
    """Puts the state of --resume's last.pt back; returns (the first epoch to run, the best)."""
    checkpoint = evaluate.read_checkpoint(args.resume)
    if checkpoint["clip"]["sha256"] != backbone["sha256"]:
        raise TrainingError(f"--resume: {args.clip} is not the CLIP file the run started from "
                            f"(SHA-256 {backbone['sha256'][:12]}..., the run's "
                            f"{checkpoint['clip']['sha256'][:12]}...)")
    evaluate.load_trained(model, checkpoint["trainable"], args.resume)
    # The saved groups carry the kernels of the device they were saved on (fused on CUDA,
    # foreach elsewhere); the device may change on resume, so this one's are kept.
    for saved, group in zip(checkpoint["optimizer"]["param_groups"], optimizer.param_groups):
        saved.update(fused=group["fused"], foreach=group["foreach"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run had no scaler
        scaler.load_state_dict(checkpoint["scaler"])
    # Augmentation and masking draw from torch's CPU generator, each process from its own (a
    # last.pt written before processes saved their own holds one state, a tensor).
    rng = checkpoint["rng"]
    torch.set_rng_state(rng[int(os.environ.get("RANK", 0))] if isinstance(rng, list) else rng)
    if journal:  # forget what the run logged after this checkpoint, and a save cut short
        os.truncate(journal, checkpoint["log_size"])
        for name in os.listdir(args.out):
            if name.endswith(".tmp"):
                os.remove(os.path.join(args.out, name))
    return checkpoint["epoch"] + 1, checkpoint["best"]


class Progress:
    """The losses summed on the device; every --log-every steps and at an epoch's end, a line and a
    log.jsonl entry of their means: the loop's one host sync. A NaN or infinite loss stops."""

    def __init__(self, args, steps_per_epoch, first_epoch, last_epoch, journal, log):
        self.args, self.journal, self.log = args, journal, log
        self.steps_per_epoch, self.first_epoch = steps_per_epoch, first_epoch
        self.epochs_to_run = last_epoch - first_epoch
        self.started = time.time()
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.window_started = {}, 0, time.time()

    def step(self, epoch: int, step: int, losses: dict, lr: float) -> None:
        self.sums = {k: self.sums.get(k, 0) + v.detach() for k, v in losses.items()}
        self.steps += 1
        if step % self.args.log_every and step != self.steps_per_epoch:
            return
        totals = torch.stack(list(self.sums.values())) / self.steps  # one copy to the host
        means = dict(zip(self.sums, totals.tolist()))
        if not math.isfinite(means["loss"]):
            raise TrainingError(f"the loss became NaN or infinite in epoch {epoch + 1} (before "
                                f"step {step}); stopped, {self.args.out}/last.pt holds the last "
                                "good epoch. Try a lower --lr or --precision fp32")
        pairs_per_s = self.steps * self.args.batch_size / (time.time() - self.window_started)
        done = epoch - self.first_epoch + step / self.steps_per_epoch  # epochs of this invocation
        eta = round((time.time() - self.started) / done * (self.epochs_to_run - done))
        self.log(f"epoch {epoch + 1}/{self.args.epochs}  step {step}/{self.steps_per_epoch}  "
                 + "  ".join(f"{k} {v:.4f}" for k, v in means.items()) + f"  lr {lr:.2e}  "
                 f"{pairs_per_s:,.0f} pairs/s  ETA {datetime.timedelta(seconds=eta)}")
        record(self.journal, {"epoch": epoch + 1, "step": step, **means, "lr": lr,
                              "pairs_per_s": pairs_per_s})
        self.reset()


def test(args, model, loaders, dataset, device, amp_dtype, journal, zero_shot, log) -> None:
    """best.pt's test metrics, logged and in test_metrics.json with what it was selected on and
    whether the data is the published set; the demo's table."""
    best = evaluate.read_checkpoint(os.path.join(args.out, "best.pt"))
    evaluate.load_trained(model, best["trainable"], "best.pt")
    results = evaluate.evaluate_loaders(model, loaders, dataset.test, device, amp_dtype)
    log(f"test (epoch {best['epoch'] + 1}): " + evaluate.format_metrics(results))
    record(journal, {"epoch": best["epoch"] + 1, "split": "test", **results})
    with open(os.path.join(args.out, "test_metrics.json"), "w") as file:
        json.dump({"epoch": best["epoch"] + 1, **evaluate.selection_record(best),
                   "published_set": dataset.published, **results}, file, indent=2)
    if zero_shot is not None:
        rows = {"chance (random scores)": evaluate.chance_metrics(dataset.test),
                "frozen CLIP, zero-shot": zero_shot, f"{args.method}, CLIP frozen": results}
        log("\ndemo test split:\n" + evaluate.format_table(rows))


def demo_zero_shot(args, clip_model, loaders, split, device, amp_dtype, log) -> dict:
    log("demo 2/3: the frozen CLIP's zero-shot result on the demo test split, the baseline to "
        "beat (the demo set shows colours, a pattern and wording the pretraining never did)")
    zero_shot = evaluate.evaluate_loaders(clip_model, loaders, split, device, amp_dtype)
    log("  " + evaluate.format_metrics(zero_shot))
    log(f"demo 3/3: training {args.method} on the demo set, CLIP frozen")
    return zero_shot


# ------------------------------------------------------------------------------------------------
# The recipe: Adam with two parameter groups, and a per-epoch schedule
# ------------------------------------------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, lr: float, bias_lr_factor: float,
                    weight_decay: float, betas: tuple[float, float], eps: float,
                    device: torch.device) -> torch.optim.Adam:
    """Adam with IRRA's two groups: biases at bias_lr_factor x lr and no weight decay."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trained if "bias" not in name],
               "weight_decay": weight_decay},
              {"params": [p for name, p in trained if "bias" in name],
               "lr": lr * bias_lr_factor, "weight_decay": 0.0}]
    # One fused kernel for all parameters on CUDA; elsewhere the multi-tensor (foreach) version.
    fused = device.type == "cuda"
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, fused=fused or None,
                            foreach=None if fused else True)


def lr_factor(epoch: int, epochs: int, warmup_epochs: int, warmup_factor: float) -> float:
    """The lr multiplier of 0-based `epoch`: linear warm-up from warmup_factor over warmup_epochs,
    then a cosine from 1 to 0 over the rest (for 60 and 5: 1.0 at epoch 5, 0.5 at epoch 32)."""
    if epoch < warmup_epochs:
        return warmup_factor + (1 - warmup_factor) * epoch / warmup_epochs
    # max(1, ...): with no epoch after the warm-up, the factor after the last epoch is unused.
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)))


# ------------------------------------------------------------------------------------------------
# Flags, and their checks before any work
# ------------------------------------------------------------------------------------------------

# The demo trains tiny models on tiny images on a CPU: these replace the authors' values when
# --data demo is chosen (a flag given still wins; --depth reaches CSKT only). SDM runs at 0.04,
# near the 0.06 the tiny CLIP learns (0.02 suits ViT-B/16, which learned 0.01); its small
# gradients want Adam's usual epsilon; augmentation costs more epochs than it has.
DEMO_RECIPE = dict(epochs=12, batch_size=64, lr=6e-3, eps=1e-6, warmup_epochs=1, temperature=0.04,
                   augment=False, image_size=(64, 32), stride=8, depth=4, workers=0, eval_every=3,
                   log_every=25)
# Each method's own flags default to its constructor's defaults, the papers' values.
METHOD_DEFAULTS = {method: {name: parameter.default
                            for name, parameter in inspect.signature(cls).parameters.items()
                            if parameter.default is not parameter.empty}
                   for method, cls in (("cskt", cskt.CSKT), ("dm_adapter", dm_adapter.DMAdapter))}
METHOD_FLAGS = set().union(*METHOD_DEFAULTS.values())
# Flags that may change on --resume: how the run is carried out, not what it trains.
RUNNING_FLAGS = {"device", "precision", "workers", "eval_every", "log_every", "compile",
                 "grad_checkpointing", "resume", "out", "stop_after"}


def as_flags(values: dict) -> str:
    """{"batch_size": 64, "augment": False} -> "--batch-size 64 --no-augment", as typed."""
    def flag(name, value):
        name = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return name if value else name.replace("--", "--no-", 1)
        return f"{name} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
    return " ".join(flag(name, value) for name, value in values.items())


def build_parser() -> argparse.ArgumentParser:
    # A flag without a default shows none in --help (SUPPRESS); parse_args sets the ones that
    # depend on --method, --data or --resume.
    parser = data.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 argument_default=argparse.SUPPRESS)
    add, number = parser.add_argument, data.number
    positive = number(int, minimum=1)
    non_negative = number(float, minimum=0)
    switch = argparse.BooleanOptionalAction
    add("--method", default="cskt", choices=evaluate.METHODS,
        help="CSKT or DM-Adapter on a frozen CLIP, or every CLIP weight (IRRA's baseline)")
    add("--data", default="demo", choices=[*data.DATASETS],
        help="dataset under --root; 'demo' is drawn on first use and trains with the demo's "
        f"recipe, not the values shown below: {as_flags(DEMO_RECIPE)} (--depth for cskt only; "
        "a flag given still wins)")
    add("--root", default="data", help="folder holding the datasets (see README for the layout)")
    add("--clip", help="CLIP release name or checkpoint path [ViT-B/16; the demo: its own]")
    add("--out", help="a new run folder [runs/<data>-<method>-<time>-<pid>]")
    recipe = parser.add_argument_group("recipe (the authors' run scripts'; the demo has its own, "
                                       "see --data)").add_argument
    recipe("--epochs", type=positive, default=60, help="passes over the pairs")
    recipe("--batch-size", type=positive, default=128,
           help="global batch, split evenly across torchrun's processes")
    recipe("--lr", type=number(float, above=0), help="learning rate [3e-4; finetune 1e-5]")
    recipe("--bias-lr-factor", type=non_negative, default=2.0, help="biases train at lr x this")
    recipe("--weight-decay", type=non_negative, default=4e-5, help="Adam's L2 on non-bias weights")
    recipe("--betas", type=number(float, minimum=0, below=1), nargs=2, default=(0.9, 0.999),
           help="Adam's moment decay rates")
    recipe("--eps", type=number(float, above=0), default=1e-3, help="Adam's epsilon (large)")
    recipe("--warmup-epochs", type=number(int, minimum=0), default=5,
           help="epochs of linear warm-up before the cosine")
    recipe("--warmup-factor", type=non_negative, default=0.1, help="lr factor at the first epoch")
    recipe("--image-size", type=positive, nargs=2, default=(384, 128),
           metavar=("H", "W"), help="input size; CLIP's position grid is resized to fit")
    recipe("--stride", type=positive, default=16, help="patch convolution stride")
    recipe("--augment", action=switch, default=True,
           help="flip, pad-and-crop and random erasing of training images")
    recipe("--mask-captions", action=switch,
           help="caption masking augmentation [on for dm_adapter, off otherwise]")
    recipe("--temperature", type=number(float, above=0), default=0.02, help="SDM's (fixed)")
    recipe("--seed", type=number(int, minimum=0), default=1,
           help="seeds the model's initialisation and the data order")
    method = parser.add_argument_group("method (the paper's value in brackets)").add_argument
    paper_values = {**METHOD_DEFAULTS["cskt"], **METHOD_DEFAULTS["dm_adapter"]}
    for name, kind, text in [("n_ctx", positive, "CSKT: prompt tokens per tower and layer"),
                             ("depth", positive, "CSKT: layers that get prompts"),
                             ("reduction", positive, "adapter bottleneck: width / reduction"),
                             ("vision_scale", number(float), "adapter output scale, image tower"),
                             ("text_scale", number(float), "adapter output scale, text tower"),
                             ("num_experts", positive, "DM-Adapter: experts per block"),
                             ("top_k", positive, "DM-Adapter: experts per token"),
                             ("aux_weight", non_negative, "DM-Adapter: load-balancing weight")]:
        method("--" + name.replace("_", "-"), type=kind, help=f"{text} [{paper_values[name]}]")
    running = parser.add_argument_group("running (may change on --resume)").add_argument
    running("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    running("--precision", default="auto", choices=["auto", *evaluate.PRECISIONS],
            help="auto: bf16 autocast on GPUs of compute capability 8+, else fp16 with a grad "
            "scaler; fp32 on the CPU")
    running("--workers", type=number(int, minimum=0), default=min(8, os.cpu_count() or 1),
            help="data loader processes")
    running("--eval-every", type=positive, default=1, help="evaluate on val every this many epochs")
    running("--log-every", type=positive, default=50, help="a progress line every this many steps")
    running("--compile", action=switch, default=False, help="torch.compile the model (GPUs)")
    running("--grad-checkpointing", action=switch, default=False,
            help="activation checkpointing: the backward pass recomputes each block instead of "
            "keeping its activations; a fraction of the memory, the same loss and gradients")
    running("--resume", help="a last.pt to continue from, exactly where it stopped")
    running("--stop-after", type=positive, metavar="N",
            help="stop after N epochs of this invocation (for time-limited jobs; then --resume)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, each checked before any work (nothing is written here); with --resume, the run's
    own from its last.pt, where a flag given again must agree and only RUNNING_FLAGS may change."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)  # --help, --resume, --data and --method
    parser.set_defaults(clip=None, out=None, resume=None, stop_after=None)
    resumed = getattr(first, "resume", None)
    if resumed:
        try:
            checkpoint = evaluate.read_checkpoint(resumed)
        except evaluate.CheckpointError as error:
            parser.error(f"argument --resume: {error}")
        if "optimizer" not in checkpoint:
            parser.error(f"argument --resume: {resumed} is not a last.pt of this train.py (no "
                         "optimizer state); resume from the last.pt of a run")
        # The run's flags are the defaults, running flags too: a flag given still wins.
        saved = {k: v for k, v in checkpoint["args"].items() if k not in ("resume", "out")}
        parser.set_defaults(**{"processes": 1, **saved})
        args = parser.parse_args(argv)
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {v})"
                   for k, v in saved.items() if k not in RUNNING_FLAGS
                   and json.dumps(getattr(args, k)) != json.dumps(v)]
        if changed:
            parser.error(f"argument --resume: these flags differ from the run being resumed: "
                         f"{'; '.join(changed)}. Resume without them, or start a new run with "
                         "another --out")
        run_folder = os.path.dirname(os.path.abspath(resumed))
        if args.out and os.path.abspath(args.out) != run_folder:
            parser.error(f"argument --out: a resumed run stays in its folder ({run_folder})")
        args.out = run_folder
    else:
        own = METHOD_DEFAULTS.get(first.method, {})
        parser.set_defaults(lr=1e-5 if first.method == "finetune" else 3e-4,
                            mask_captions=first.method == "dm_adapter", **own)
        if first.data == "demo":  # the demo's recipe: another method's flags stay unset
            parser.set_defaults(**{k: v for k, v in DEMO_RECIPE.items()
                                   if k in own or k not in METHOD_FLAGS})
        args = parser.parse_args(argv)
        for name in sorted(METHOD_FLAGS - set(own)):
            if hasattr(args, name):
                parser.error(f"argument --{name.replace('_', '-')}: not a flag of --method "
                             f"{args.method}")
            setattr(args, name, None)  # recorded as unset
        check_new_run(parser, args)
    processes = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if args.batch_size % processes:
        parser.error(f"argument --batch-size: {args.batch_size} pairs do not split evenly over "
                     f"{processes} processes; use a multiple of {processes}")
    # The data order depends on the process count: a resumed run keeps it.
    if resumed and args.processes != processes:
        parser.error(f"argument --resume: the run was started with {args.processes} process(es), "
                     f"this is {processes}; resume it with torchrun --nproc_per_node="
                     f"{args.processes} (or start a new run)")
    args.processes = processes
    try:
        evaluate.pick_device(args.device, *local_process())
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    return args


def check_new_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A new run's flags against each other, its run folder and the CLIP it will use."""
    if args.method == "dm_adapter" and args.top_k > args.num_experts:
        parser.error(f"argument --top-k: at most --num-experts ({args.num_experts}), "
                     f"got {args.top_k}")
    if args.out and os.path.isdir(args.out) and os.listdir(args.out):
        parser.error(f"argument --out: {args.out} already holds a run; continue it with --resume "
                     f"{os.path.join(args.out, 'last.pt')}, or choose another --out")
    data.check_output_folder(parser, "--out", args.out or "runs")
    args.image_size, args.betas = tuple(args.image_size), tuple(args.betas)
    shape = clip_shape(args.clip, args.data)
    if shape is None:  # a file that cannot be read: the run says why
        return
    patch, layers, bound = shape
    height, width = args.image_size
    if min(height, width) < patch or any((size - patch) % args.stride for size in args.image_size):
        parser.error(f"argument --image-size: with patch {patch} and stride {args.stride}, "
                     f"{height}x{width} leaves pixels that no patch sees; use sizes of the form "
                     f"{patch} + {args.stride}*k")
    grid = clip_min.patch_grid(args.image_size, patch, args.stride)
    if bound is not None and math.prod(grid) != bound:
        demo_fit = as_flags({"image_size": DEMO_CLIP.image_size, "stride": DEMO_CLIP.stride})
        made_for = (f"the demo's CLIP is made for {demo_fit}" if args.clip is None else
                    f"it holds {bound} patches; use the image size and stride it was saved with")
        parser.error(f"argument --image-size: {height}x{width} at stride {args.stride} gives a "
                     f"{grid[0]}x{grid[1]} patch grid, and this CLIP's position embedding is not "
                     f"square, so it cannot be resized: {made_for}")
    if args.method == "cskt" and not 1 <= args.depth <= layers:
        parser.error(f"argument --depth: depth must be between 1 and the number of layers "
                     f"({layers}), got {args.depth}")


def clip_shape(clip: str | None, data_name: str) -> tuple[int, int, int | None] | None:
    """(patch size, layers of the shallower tower, the patches a person-shaped position grid is
    bound to or None) of the CLIP a run will use, known without building it: from DEMO_CLIP, a
    release name, or a file's tensors. None for a file that cannot be read."""
    if clip is None and data_name == "demo":
        grid = clip_min.patch_grid(DEMO_CLIP.image_size, DEMO_CLIP.patch_size, DEMO_CLIP.stride)
        layers = min(DEMO_CLIP.vision_layers, DEMO_CLIP.text_layers)
        return DEMO_CLIP.patch_size, layers, math.prod(grid)
    clip = clip or "ViT-B/16"
    if clip in clip_min.RELEASES:  # "ViT-L/14@336px": patch 14; every release has 12 text layers
        return int(clip.split("/")[1].split("@")[0]), 12, None
    try:
        state_dict, _ = clip_min.read_state_dict(clip)
        patch = state_dict["visual.conv1.weight"].shape[-1]
        positions = state_dict["visual.positional_embedding"].shape[0] - 1
        layers = min(clip_min.layer_counts(state_dict))
    except (clip_min.CLIPError, KeyError, IndexError, AttributeError):
        return None
    return patch, layers, None if math.isqrt(positions) ** 2 == positions else positions


# ------------------------------------------------------------------------------------------------
# The demo's CLIP: pretrained here from random weights, because none can be downloaded offline
# ------------------------------------------------------------------------------------------------
# With OpenAI's loss (symmetric InfoNCE over each batch, a learned temperature), not SDM: at the
# methods' fixed temperature SDM is too sharp from random weights (the gradient that lifts the right
# pair is proportional to its probability, tiny while the features are random), and training sits
# on a plateau for a number of epochs that depends on the seed.

DEMO_CLIP = clip_min.CLIPConfig(embed_dim=64, image_size=(64, 32), patch_size=8, stride=8,
                                vision_width=64, vision_layers=4, text_width=64, text_layers=4)
DEMO_PRETRAINING = dict(epochs=6, batch_size=64, lr=1e-3, warmup_steps=50)  # then cosine to 0


def demo_clip(root: str, seed: int, device: torch.device, log) -> str:
    """Path of the demo's tiny CLIP, an OpenAI-layout state dict, pretrained first if not cached.
    It lives in the corpus's folder (redrawn with the corpus) under a name that hashes everything
    it was made from: a cached CLIP is never stale."""
    log("demo 1/3: a CLIP to adapt")
    corpus = data.load_dataset("demo-pretrain", root)  # drawn on first use
    made_from = (DEMO_CLIP, DEMO_PRETRAINING, seed, data.DEMO_VERSION,
                 data.DEMO_SIZES["demo-pretrain"])
    digest = hashlib.sha256(repr(made_from).encode()).hexdigest()[:12]
    path = os.path.join(root, "demo-pretrain", f"clip-{digest}.pt")
    if os.path.isfile(path):
        log(f"  using the tiny CLIP cached at {path}")
        return path
    log("  No CLIP can be downloaded offline, so a tiny one is pretrained from random weights on "
        "the synthetic demo-pretrain corpus, as OpenAI pretrained theirs (symmetric InfoNCE, "
        "learned temperature):")
    started, recipe = time.time(), DEMO_PRETRAINING
    # The corpus is small and not augmented: every image is decoded and transformed once, and kept.
    image_batches, _ = data.eval_loaders(corpus.train, DEMO_CLIP.image_size)
    images = torch.cat([batch for batch, _ in image_batches])[corpus.train.image_index]  # [N, ...]
    ids = corpus.train.ids  # [N, 77]
    caption_ends = ids.argmax(dim=-1)  # [N]: the EOT position of each caption
    torch.manual_seed(seed)
    model = clip_min.CLIP(DEMO_CLIP).to(device)
    steps_per_epoch = len(ids) // recipe["batch_size"]  # the last incomplete batch is dropped
    total_steps, warmup = recipe["epochs"] * steps_per_epoch, recipe["warmup_steps"]
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # per step, as OpenAI's: warm-up, then cosine
        optimizer, lambda step: (step + 1) / warmup if step < warmup
        else lr_factor(step - warmup, total_steps - warmup, 0, 1))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(ids), generator=generator)
        order = order[: steps_per_epoch * recipe["batch_size"]]
        loss_sum = torch.zeros((), device=device)
        for batch in order.view(steps_per_epoch, -1):  # [B] sample indices
            # Each text batch is cut to its longest caption: exact, since the causal text tower
            # is read at EOT and no token before EOT sees the padding.
            batch_ids = ids[batch, : caption_ends[batch].max() + 1]  # [B, L']
            image_features = model.encode_image(images[batch].to(device))  # [B, E]
            text_features = model.encode_text(batch_ids.to(device))  # [B, E]
            loss = clip_min.clip_loss(image_features, text_features, model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # as OpenAI's: the learned scale stops at 100 (temperature 0.01)
                model.logit_scale.clamp_(0, math.log(100))
            loss_sum += loss.detach()
        log(f"  pretraining epoch {epoch + 1}/{recipe['epochs']}  InfoNCE "
            f"{loss_sum.item() / steps_per_epoch:.4f}  temperature "
            f"{1 / model.logit_scale.exp().item():.4f}  {time.time() - started:.0f} s")
    with clip_min.atomic_file(path) as file:  # a CLIP cut short is never taken for a cached one
        torch.save(model.state_dict(), file)
    log(f"  saved the tiny CLIP to {path}, an OpenAI-layout state dict that clip_min.load reads")
    return path


if __name__ == "__main__":
    sys.exit(main())
