"""Train CSKT, DM-Adapter or all of CLIP for text-based person retrieval: one script, top to bottom.

    python train.py --method cskt --data CUHK-PEDES --root data        # the authors' recipe
    python train.py --method dm_adapter --data RSTPReid --root data
    python train.py --method finetune --data ICFG-PEDES --root data    # IRRA's "CLIP fine-tuned" row
    python train.py                                                    # the offline demo, on a CPU
    torchrun --nproc_per_node=4 train.py --method cskt --data CUHK-PEDES   # DDP, one process per GPU

The recipe is the authors' run scripts': Adam (betas 0.9/0.999, eps 1e-3), lr 3e-4 with biases at
2x and without weight decay (4e-5 elsewhere), 60 epochs of batch 128 at 384x128 with augmentation,
a per-epoch schedule of 5 linear warm-up epochs from 0.1x then cosine to 0, seed 1. Every value is
a flag. The best epoch is chosen on val (the authors chose on test); the test split is evaluated
once, at the end, with the best checkpoint.

The demo (`--data demo`, the default) runs the whole pipeline in miniature without a network: a
tiny CLIP is first pretrained from random weights on the synthetic "demo-pretrain" corpus,
standing in for OpenAI's pretraining, and loaded back like any CLIP checkpoint; its zero-shot
result on the demo test split is the baseline to beat.

Under torchrun every process encodes its share of each batch (--batch-size is the global batch),
the shares' features are gathered so that SDM runs over the whole batch, and DDP averages the
gradients: N processes compute the loss and gradients of one. Rank 0 evaluates and saves.

What a run promises. Every flag, the dataset and the CLIP's fit to --image-size/--stride/--depth
are checked before any download, drawing or pretraining (one line, exit status 2; bad data one
line naming the file and entry, exit status 1). A run folder is never overwritten (--out must be
new or empty; default names carry the process id and are claimed atomically). --resume continues
exactly (weights, optimizer, schedule, scaler, every process's random state) with the run's own
flags: one that would change what is trained must equal the run's, or nothing is written; only
RUNNING_FLAGS may change. Every save is written beside its name, synced, then renamed over it, so
a full disk or Ctrl-C leaves the last good checkpoint and one line saying how to continue.

Sections: flags (the demo's recipe among them); the recipe (optimizer, schedule); the run, in the
order it runs; last, the demo's tiny CLIP and its pretraining, a side plot that stands in for
OpenAI's.
"""

import argparse
import contextlib
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
from data import number

# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------

# The demo trains tiny models on tiny images on a CPU; these replace the authors' defaults when
# --data demo is chosen (a flag given on the command line still wins; a method's own flag, such
# as CSKT's --depth, applies only to that method). SDM runs at 0.04, near the
# 0.06 the tiny CLIP learns (the papers' 0.02 suits ViT-B/16, which learned 0.01); its small
# gradients want Adam's usual epsilon rather than the authors' 1e-3; augmentation costs more epochs
# than it has.
DEMO_RECIPE = dict(epochs=12, batch_size=64, lr=6e-3, eps=1e-6, warmup_epochs=1, temperature=0.04,
                   augment=False, image_size=(64, 32), stride=8, depth=4, workers=0, eval_every=3, log_every=25)

# The demo's tiny CLIP (pretrained by demo_clip, the last section) and its pretraining recipe.
DEMO_CLIP = clip_min.CLIPConfig(embed_dim=64, image_size=(64, 32), patch_size=8, stride=8,
                                vision_width=64, vision_layers=4, text_width=64, text_layers=4)
DEMO_PRETRAINING = dict(epochs=6, batch_size=64, lr=1e-3, warmup_steps=50)  # Adam; warm-up, then cosine to 0

# Each method's own flags default to its constructor's keyword defaults, the papers' values.
METHOD_DEFAULTS = {method: {name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()
                            if parameter.default is not parameter.empty}
                   for method, cls in (("cskt", cskt.CSKT), ("dm_adapter", dm_adapter.DMAdapter))}

# Flags that may change when a run is resumed: they change how it is carried out, not what it
# trains. Every other flag is the run's own and must match the checkpoint's.
RUNNING_FLAGS = {"device", "precision", "workers", "eval_every", "log_every", "compile", "grad_checkpointing", "resume",
                 "out", "stop_after"}


def as_flags(values: dict) -> str:
    """{"batch_size": 64, "augment": False} -> "--batch-size 64 --no-augment", as it would be typed."""
    def flag(name, value):
        name = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return name if value else name.replace("--", "--no-", 1)
        return f"{name} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
    return " ".join(flag(name, value) for name, value in values.items())


def build_parser() -> argparse.ArgumentParser:
    parser = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Defaults that a flag's help tells in words: set here, the flag's own default SUPPRESS (not shown).
    parser.set_defaults(clip=None, out=None, lr=None, image_size=(384, 128), mask_captions=None, resume=None,
                        stop_after=None, **dict.fromkeys(set().union(*METHOD_DEFAULTS.values())))
    add = parser.add_argument
    add("--method", default="cskt", choices=evaluate.METHODS,
        help="what to train: CSKT or DM-Adapter on a frozen CLIP, or every CLIP weight (IRRA's baseline)")
    add("--data", default="demo", choices=[*data.DATASETS],
        help="dataset under --root; 'demo' is drawn on first use (demo-pretrain is the demo's CLIP corpus) "
             "and trains with the demo's recipe, not the values shown below: "
             f"{as_flags(DEMO_RECIPE)} (--depth for cskt only; a flag given still wins)")
    add("--root", default="data", help="folder holding the datasets (see README for the layout)")
    add("--clip", default=argparse.SUPPRESS,
        help="CLIP release name or checkpoint path (default: ViT-B/16; for the demo, its own tiny CLIP)")
    add("--out", default=argparse.SUPPRESS, help="a new run folder (default: runs/<data>-<method>-<time>-<pid>)")
    recipe = parser.add_argument_group("recipe (defaults: the authors' run scripts'; --data demo has its own, "
                                       "see --data)").add_argument
    recipe("--epochs", type=number(int, minimum=1), default=60, help="passes over the training pairs")
    recipe("--batch-size", type=number(int, minimum=1), default=128,
           help="global batch, split evenly across torchrun processes (must divide by their number)")
    recipe("--lr", type=number(float, above=0), default=argparse.SUPPRESS, help="learning rate (default 3e-4; finetune 1e-5)")
    recipe("--bias-lr-factor", type=number(float, minimum=0), default=2.0, help="biases train at lr times this")
    recipe("--weight-decay", type=number(float, minimum=0), default=4e-5, help="L2 on non-bias weights (Adam's)")
    recipe("--betas", type=number(float, minimum=0, below=1), nargs=2, default=(0.9, 0.999),
           help="Adam's moment decay rates")
    recipe("--eps", type=number(float, above=0), default=1e-3, help="Adam's epsilon (large, as the authors')")
    recipe("--warmup-epochs", type=number(int, minimum=0), default=5, help="epochs of linear warm-up before the cosine")
    recipe("--warmup-factor", type=number(float, minimum=0), default=0.1, help="lr factor at the first epoch")
    recipe("--image-size", type=number(int, minimum=1), nargs=2, default=argparse.SUPPRESS, metavar=("H", "W"),
           help="input size; CLIP's position grid is resized to fit (default: 384 128)")
    recipe("--stride", type=number(int, minimum=1), default=16, help="stride of the patch convolution")
    recipe("--augment", action=argparse.BooleanOptionalAction, default=True,
           help="flip, pad-and-crop and random erasing of training images")
    recipe("--mask-captions", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
           help="caption masking augmentation (default: on for dm_adapter, off otherwise)")
    recipe("--temperature", type=number(float, above=0), default=0.02, help="SDM's temperature (fixed)")
    recipe("--seed", type=number(int, minimum=0), default=1, help="seeds the model's initialisation and the data order")
    cskt_defaults, dm_defaults = METHOD_DEFAULTS["cskt"], METHOD_DEFAULTS["dm_adapter"]
    method = parser.add_argument_group("method (default: the paper's value, shown in brackets)").add_argument
    method("--n-ctx", default=argparse.SUPPRESS, type=number(int, minimum=1), help=f"CSKT: prompt tokens per tower and layer [{cskt_defaults['n_ctx']}]")
    method("--depth", default=argparse.SUPPRESS, type=number(int, minimum=1), help=f"CSKT: layers that get prompts [{cskt_defaults['depth']}]")
    method("--reduction", default=argparse.SUPPRESS, type=number(int, minimum=1),
           help=f"adapter bottleneck: width / reduction [{cskt_defaults['reduction']}]")
    method("--vision-scale", default=argparse.SUPPRESS, type=number(float), help=f"adapter output scale, image tower [{cskt_defaults['vision_scale']}]")
    method("--text-scale", default=argparse.SUPPRESS, type=number(float), help=f"adapter output scale, text tower [{cskt_defaults['text_scale']}]")
    method("--num-experts", default=argparse.SUPPRESS, type=number(int, minimum=1), help=f"DM-Adapter: experts per block [{dm_defaults['num_experts']}]")
    method("--top-k", default=argparse.SUPPRESS, type=number(int, minimum=1), help=f"DM-Adapter: experts per token [{dm_defaults['top_k']}]")
    method("--aux-weight", default=argparse.SUPPRESS, type=number(float, minimum=0),
           help=f"DM-Adapter: load-balancing weight [{dm_defaults['aux_weight']}]")
    run = parser.add_argument_group("running (may change on --resume)").add_argument
    run("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    run("--precision", default="auto", choices=["auto", *evaluate.PRECISIONS],
        help="auto: bf16 autocast on GPUs with bf16 units (compute capability 8+), else fp16 with a "
             "grad scaler; fp32 on the CPU")
    run("--workers", type=number(int, minimum=0), default=min(8, os.cpu_count() or 1), help="data loader processes")
    run("--eval-every", type=number(int, minimum=1), default=1, help="evaluate on val every this many epochs")
    run("--log-every", type=number(int, minimum=1), default=50, help="a progress line every this many steps")
    run("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model (GPUs)")
    run("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
        help="activation checkpointing: the backward pass recomputes each block instead of keeping its "
             "activations: a fraction of the memory for one more forward pass; the same loss and gradients")
    run("--resume", default=argparse.SUPPRESS, help="a last.pt to continue from, exactly where it stopped")
    run("--stop-after", type=number(int, minimum=1), default=argparse.SUPPRESS, metavar="N",
        help="stop after N epochs of this invocation (for time-limited jobs; then --resume)")
    return parser


def local_process() -> tuple[int, int]:
    """(this process's number on its machine, the number of processes there), as torchrun sets them."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, every one checked before any work; a bad one is the parser's error (exit 2).

    With --resume the run's own flags come from its checkpoint: a flag given again must agree
    with it, and only the running flags may change. Nothing is written before these checks."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The flags given on the command line, told apart from defaults: argparse fills in a default
    # only where the namespace has no value yet.
    unset = object()
    given = {k for k, v in vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))).items()
             if v is not unset}
    if args.resume:
        try:
            checkpoint = evaluate.read_checkpoint(args.resume)
        except evaluate.CheckpointError as error:
            parser.error(f"argument --resume: {error}")
        run_folder = os.path.dirname(os.path.abspath(args.resume))
        if args.out and os.path.abspath(args.out) != run_folder:
            parser.error(f"argument --out: a resumed run stays in its folder ({run_folder})")
        if "optimizer" not in checkpoint:
            parser.error(f"argument --resume: {args.resume} is not a last.pt of this train.py (no optimizer "
                         "state); resume from the last.pt of a run")
        saved = checkpoint["args"]
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved.get(k)})"
                   for k in sorted(given - RUNNING_FLAGS) if json.dumps(getattr(args, k)) != json.dumps(saved.get(k))]
        if changed:
            parser.error(f"argument --resume: these flags differ from the run being resumed: {'; '.join(changed)}. "
                         "Resume without them, or start a new run with another --out")
        # A running flag newer than the run's checkpoint takes its default.
        args = argparse.Namespace(**{"processes": 1, **{k: getattr(args, k) for k in RUNNING_FLAGS}, **saved,
                                     **{k: getattr(args, k) for k in RUNNING_FLAGS & given},
                                     "resume": args.resume, "out": run_folder})
    else:
        own_flags = METHOD_DEFAULTS.get(args.method, {})
        other_methods_flags = set().union(*METHOD_DEFAULTS.values()) - set(own_flags)
        if args.data == "demo":  # the demo's recipe, below any flag given; another method's flags stay unset
            args = argparse.Namespace(**{**vars(args), **{k: v for k, v in DEMO_RECIPE.items()
                                                         if k not in given and k not in other_methods_flags}})
        if args.lr is None:
            args.lr = 1e-5 if args.method == "finetune" else 3e-4
        if args.mask_captions is None:
            args.mask_captions = args.method == "dm_adapter"  # the authors' DM-Adapter script always masks
        for name, default in own_flags.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        for name in sorted(other_methods_flags & given):
            parser.error(f"argument --{name.replace('_', '-')}: not a flag of --method {args.method}")
        if args.method == "dm_adapter" and args.top_k > args.num_experts:
            parser.error(f"argument --top-k: at most --num-experts ({args.num_experts}), got {args.top_k}")
        if args.out and os.path.isdir(args.out) and os.listdir(args.out):
            parser.error(f"argument --out: {args.out} already holds a run; continue it with "
                         f"--resume {os.path.join(args.out, 'last.pt')}, or choose another --out")
        data.check_output_folder(parser, "--out", args.out or "runs")
        args.image_size, args.betas = tuple(args.image_size), tuple(args.betas)
        check_fits_clip(parser, args)
    processes = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if args.batch_size % processes:
        parser.error(f"argument --batch-size: {args.batch_size} pairs do not split evenly over {processes} processes; "
                     f"use a multiple of {processes}")
    # The data order depends on the process count (each process shuffles its own part of the data):
    # a resumed run keeps it, like any flag that changes what is trained.
    if args.resume and args.processes != processes:
        parser.error(f"argument --resume: the run was started with {args.processes} process(es), this is {processes}; "
                     f"resume it with torchrun --nproc_per_node={args.processes} (or start a new run)")
    args.processes = processes
    try:
        evaluate.pick_device(args.device, *local_process())
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    return args


def clip_shape(clip: str | None, data_name: str) -> tuple[int, int, int | None] | None:
    """(patch size, layers of its shallower tower, the positions its image tower is bound to) of the
    CLIP a run will use, known without building it (nor downloading or pretraining it): from
    DEMO_CLIP, from the release name, or from a file's tensors read without running code. The
    positions are None for a square grid, which is resized to any image size; a person-shaped grid
    (the demo's, or a checkpoint saved from a person-shaped model) is used as it is, so the image
    size and stride must give as many patches. None for a file that cannot be read: the run then
    says why."""
    if clip is None and data_name == "demo":
        grid = clip_min.patch_grid(DEMO_CLIP.image_size, DEMO_CLIP.patch_size, DEMO_CLIP.stride)
        return DEMO_CLIP.patch_size, min(DEMO_CLIP.vision_layers, DEMO_CLIP.text_layers), math.prod(grid)
    clip = clip or "ViT-B/16"
    if clip in clip_min.RELEASES:  # "ViT-L/14@336px": patch 14; every release has 12 text layers, 12 or 24 image
        return int(clip.split("/")[1].split("@")[0]), 12, None
    try:
        state_dict, _ = clip_min.read_state_dict(clip)
        patch = state_dict["visual.conv1.weight"].shape[-1]
        positions = state_dict["visual.positional_embedding"].shape[0] - 1
        vision_layers, text_layers = clip_min.layer_counts(state_dict)  # the counts build_model uses
    except (clip_min.CLIPError, KeyError, IndexError, AttributeError):
        return None
    return patch, min(vision_layers, text_layers), None if math.isqrt(positions) ** 2 == positions else positions


def check_fits_clip(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--image-size, --stride and CSKT's --depth against the CLIP the run will use, before any work."""
    shape = clip_shape(args.clip, args.data)
    if shape is None:
        return
    patch, layers, bound = shape
    height, width = args.image_size
    if min(height, width) < patch or any((size - patch) % args.stride for size in args.image_size):
        parser.error(f"argument --image-size: with patch {patch} and stride {args.stride}, {height}x{width} "
                     f"leaves pixels that no patch sees; use sizes of the form {patch} + {args.stride}*k")
    grid = clip_min.patch_grid(args.image_size, patch, args.stride)
    if bound is not None and math.prod(grid) != bound:
        made_for = (f"the demo's CLIP is made for --image-size {' '.join(map(str, DEMO_CLIP.image_size))} "
                    f"--stride {DEMO_CLIP.stride}" if args.clip is None else
                    f"it holds {bound} patches; use the image size and stride it was saved with")
        parser.error(f"argument --image-size: {height}x{width} at stride {args.stride} gives a {grid[0]}x{grid[1]} "
                     f"patch grid, and this CLIP's position embedding is not square, so it cannot be resized: {made_for}")
    if args.method == "cskt" and not 1 <= args.depth <= layers:
        parser.error(f"argument --depth: depth must be between 1 and the number of layers ({layers}), got {args.depth}")


# ------------------------------------------------------------------------------------------------
# The recipe: Adam with two parameter groups, and a per-epoch schedule
# ------------------------------------------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, lr: float, bias_lr_factor: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam with IRRA's two groups: biases at bias_lr_factor x lr and no weight decay."""
    weights, biases = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (biases if "bias" in name else weights).append(parameter)
    groups = [{"params": weights, "weight_decay": weight_decay},
              {"params": biases, "lr": lr * bias_lr_factor, "weight_decay": 0.0}]
    # One fused kernel for all parameters on CUDA; elsewhere the multi-tensor (foreach) version.
    fused = device.type == "cuda"
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


def lr_factor(epoch: int, epochs: int, warmup_epochs: int, warmup_factor: float) -> float:
    """The lr multiplier of 0-based `epoch`: linear warm-up from warmup_factor over warmup_epochs,
    then a cosine from 1 towards 0 over the rest (for 60 and 5: 1.0 at epoch 5, 0.5 at epoch 32)."""
    if epoch < warmup_epochs:
        return warmup_factor + (1 - warmup_factor) * epoch / warmup_epochs
    # max(1, ...): with no epoch left after the warm-up (epochs == warmup_epochs), the factor the
    # scheduler computes after the last epoch is never used; it must only not divide by zero.
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)))


# ------------------------------------------------------------------------------------------------
# The run: setup, CLIP, data, model, optimizer, loop, test
# ------------------------------------------------------------------------------------------------

# Under torchrun a collective that waits longer than TRAINING_TIMEOUT ends the job with an error,
# so that a process that hangs in training shows within minutes. Where the others wait for one
# process on purpose (rank 0 evaluating and saving; rank 0, then each machine's first process,
# downloading CLIP or pretraining the demo's), they wait on a second, CPU-side (gloo) group that
# allows hours.
TRAINING_TIMEOUT = datetime.timedelta(minutes=10)
WAITING_TIMEOUT = datetime.timedelta(hours=2)


def once_per_machine(make, group=None):
    """make() in global rank 0 while every other process waits; then in the first process of each
    other machine (torchrun's LOCAL_RANK 0); then in the rest, which find what was made (a
    download, a drawn demo set, a pretrained CLIP) instead of writing the same files at once. On
    a file system that the machines share, the later turns find rank 0's files; on a machine's
    own disk, its first process makes them. Its result, in every process; `group` is waited on."""
    if not dist.is_initialized():
        return make()
    turn = 0 if dist.get_rank() == 0 else 1 if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 2
    for current in range(3):
        if current == turn:
            result = make()
        dist.barrier(group=group)
    return result


def clip_file(args: argparse.Namespace, device: torch.device, log) -> str:
    """--clip, or its default, with its file in place: a release downloaded, or for the demo its
    tiny CLIP pretrained."""
    clip = args.clip or (demo_clip(args.root, args.seed, device, log) if args.data == "demo" else "ViT-B/16")
    if clip in clip_min.RELEASES:
        clip_min.download(clip)  # checks the SHA-256 of a cached file too
    return clip


class TrainingError(Exception):
    """The run cannot go on (a NaN loss, a dataset smaller than a batch); the message says why."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    error_prefix = f"error: process {rank}: " if world_size > 1 else "error: "
    try:
        with contextlib.ExitStack() as open_files:  # closed on every path: the end, --stop-after, an error
            run(args, open_files)
        code = 0
    except (data.DataError, clip_min.CLIPError, evaluate.CheckpointError, TrainingError) as error:
        print(error_prefix + " ".join(str(error).split()), file=sys.stderr)
        code = 1
    except OSError as error:  # a folder we may not write, a disk that is full: the system's own words
        print(f"{error_prefix}{error}", file=sys.stderr)
        code = 1
    except torch.cuda.OutOfMemoryError:
        print(f"{error_prefix}out of GPU memory: lower --batch-size, or add --grad-checkpointing", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # every save is atomic: what was saved is whole
        last = os.path.join(args.out or "", "last.pt")
        print("interrupted; " + (f"continue with --resume {last}" if os.path.isfile(last) else
                                 "no epoch had finished, so there is nothing to resume"), file=sys.stderr)
        code = 130
    except RuntimeError as error:
        if not dist.is_initialized():
            raise
        # A collective broke (gloo: the connection closed; NCCL: DistBackendError): another
        # process stopped, and its own line says why.
        print(f"process {rank}: stopped, as a collective failed ({type(error).__name__}): another process "
              "has most likely failed, see its error", file=sys.stderr)
        code = 1
    except BaseException:  # a bug: its traceback, then the same prompt exit as any error
        if not dist.is_initialized():
            raise
        traceback.print_exc()
        code = 1
    if dist.is_initialized():
        if code:
            # No graceful shutdown of the process group on an error: NCCL's waits for every process
            # to join it, and the others may sit in a collective until its timeout. torchrun sees
            # this exit and ends the other processes at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        dist.destroy_process_group()
    return code


def run(args: argparse.Namespace, open_files: contextlib.ExitStack) -> None:
    # --- setup: processes, device, precision ------------------------------------------------------
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    is_main = rank == 0
    log = print if is_main else (lambda *_: None)
    device = evaluate.pick_device(args.device, *local_process())
    evaluate.use_device(device)  # the current GPU; fp32 stays fp32 (no TF32), as in evaluate.py
    waiting = None  # the process group the others wait on while one process works
    if world_size > 1:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
        # device_id: NCCL uses this process's GPU from the first collective on (else it guesses
        # it from the global rank, wrong on machines that run fewer processes than they have GPUs).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TRAINING_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        waiting = dist.new_group(backend="gloo", timeout=WAITING_TIMEOUT)
    amp_dtype = evaluate.autocast_dtype(args.precision, device)

    # --- data: every entry and image is checked before the CLIP is downloaded or pretrained -------
    if args.data in data.DEMO_SIZES:  # a demo set is drawn on first use, by one process per machine
        once_per_machine(lambda: data.make_demo(args.data, args.root), waiting)
    dataset = data.load_dataset(args.data, args.root)
    for line in dataset.report:  # what the authors' readers accept and so do we, said once per split
        log(line)
    log(dataset.verdict)  # whether the numbers of this run can be compared with the papers'
    for split_name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        if split is not None and split.num_truncated:
            log(f"{args.data} {split_name}: {split.num_truncated:,} of {len(split.captions):,} captions cut "
                f"to {clip_min.CONTEXT_LENGTH} tokens")
    pin = device.type == "cuda"  # page-locked batches copy to a GPU asynchronously; on the CPU, a wasted copy
    loader = data.train_loader(dataset.train, args.image_size, args.batch_size // world_size, args.workers,
                               args.augment, args.mask_captions, seed=args.seed, distributed=world_size > 1,
                               pin_memory=pin)
    if len(loader) == 0:
        raise TrainingError(f"{args.data} has {len(dataset.train.captions)} training pairs, fewer than one "
                            f"batch (--batch-size {args.batch_size}); lower --batch-size")
    # The best epoch is chosen on val; without one (ICFG-PEDES) the last epoch is kept. Both splits'
    # loaders are made once: the images' workers and the tokenized captions are reused.
    val_loaders = dataset.val and data.eval_loaders(dataset.val, args.image_size, 256, args.workers, pin)
    test_loaders = data.eval_loaders(dataset.test, args.image_size, 256, args.workers, pin)

    # --- the frozen CLIP (for the demo, its own tiny one), made once per machine ------------------
    args.clip = once_per_machine(lambda: clip_file(args, device, log), waiting)
    clip_model = clip_min.load(args.clip, args.image_size, args.stride, device)
    # What a checkpoint needs to get this CLIP back; the SHA-256 of a CLIP file is taken once, here.
    backbone = evaluate.describe_backbone(args.method, args.clip, clip_model)

    # --- model ----------------------------------------------------------------------------------
    torch.manual_seed(args.seed + rank)  # also seeds every CUDA device
    method_args = {name: getattr(args, name) for name in METHOD_DEFAULTS.get(args.method, {})}
    model = evaluate.build_method(args.method, clip_model, method_args)
    if args.grad_checkpointing:  # the papers' batch of 128 on a smaller GPU, with the same gradients
        model.set_grad_checkpointing()
    step_model = model
    if world_size > 1:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_model = torch.compile(step_model)

    # --- a new run folder, claimed by creating its args.json ("x": fails if another run has it) ----
    if not args.resume and is_main:
        args.out = args.out or f"runs/{args.data}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "x") as file:
            json.dump(vars(args), file, indent=2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"device {device}, precision {evaluate.precision_name(amp_dtype)}, {world_size} process(es); "
        f"run folder {args.out}\n"
        f"{args.data}: {len(dataset.train.captions):,} training pairs of {dataset.train.num_identities:,} "
        f"identities; {len(loader):,} steps per epoch; test {len(dataset.test.captions):,} queries x "
        f"{len(dataset.test.image_paths):,} images\n"
        f"{args.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f} %)")
    if args.data == "demo" and is_main:
        log("demo 2/3: the frozen CLIP's zero-shot result on the demo test split, the baseline to beat "
            "(the demo set shows colours, a pattern and wording the pretraining never did)")
        zero_shot = evaluate.evaluate_loaders(clip_model, test_loaders, dataset.test, device, amp_dtype)
        log("  " + evaluate.format_metrics(zero_shot))
        log(f"demo 3/3: training {args.method} on the demo set, CLIP frozen")

    # --- optimizer, schedule, loss scaling; or all of them as a resumed run left them ------------
    optimizer = build_optimizer(model, args.lr, args.bias_lr_factor, args.weight_decay, args.betas, args.eps, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # stepped once per epoch, as the authors do
        optimizer, lambda epoch: lr_factor(epoch, args.epochs, args.warmup_epochs, args.warmup_factor))
    # fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    journal = open_files.enter_context(open(os.path.join(args.out, "log.jsonl"), "a")) if is_main else None

    def record(entry: dict):  # one JSON line per event, flushed at once
        if journal:
            journal.write(json.dumps(entry) + "\n")
            journal.flush()

    first_epoch, best = 0, {"epoch": -1, "R1": -1.0}
    if not args.resume:  # a resumed run keeps the line its start wrote
        record({"data": args.data, "published_set": dataset.published, "verdict": dataset.verdict})
    if args.resume:
        checkpoint = evaluate.read_checkpoint(args.resume)
        if checkpoint["clip"]["sha256"] != backbone["sha256"]:
            raise TrainingError(f"--resume: {args.clip} is not the CLIP file the run started from (SHA-256 "
                                f"{backbone['sha256'][:12]}..., the run's {checkpoint['clip']['sha256'][:12]}...)")
        evaluate.load_trained(model, checkpoint["trainable"], args.resume)
        # The saved groups carry the kernel choice of the device they were saved on (fused on
        # CUDA, foreach elsewhere); the device may change on resume, so this one's choice is kept.
        saved_state = checkpoint["optimizer"]
        for saved_group, group in zip(saved_state["param_groups"], optimizer.param_groups):
            saved_group.update(fused=group["fused"], foreach=group["foreach"])
        optimizer.load_state_dict(saved_state)
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run had no scaler
            scaler.load_state_dict(checkpoint["scaler"])
        # Augmentation and masking draw from torch's CPU generator, each process from its own.
        rng = checkpoint["rng"]
        torch.set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # a tensor: saved before per-process states
        first_epoch, best = checkpoint["epoch"] + 1, checkpoint["best"]
        if journal:  # forget what the run logged after this checkpoint, and a save it was killed in
            journal.seek(checkpoint["log_size"])
            journal.truncate()
            for name in (name for name in os.listdir(args.out) if name.endswith(".tmp")):
                os.remove(os.path.join(args.out, name))
        record({"resumed_at_epoch": first_epoch + 1})
        log(f"resumed from {args.resume}: continuing at epoch {first_epoch + 1}")

    def save(name: str, epoch: int, resumable: bool):  # best.pt: what evaluate.py needs; last.pt: all
        state = dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                     rng=rng_states, log_size=journal.tell()) if resumable else {}
        evaluate.save_checkpoint(os.path.join(args.out, name), model, method=args.method, method_args=method_args,
                                 data=args.data, args=vars(args), clip=backbone, epoch=epoch, best=best,
                                 dataset_check=dataset.verdict, **state)

    # --- the loop -------------------------------------------------------------------------------
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, first_epoch + args.stop_after)
    steps_per_epoch, started = len(loader), time.time()
    for epoch in range(first_epoch, last_epoch):
        model.train()
        # Reseeding per epoch makes the order, the augmentation and the masking of epoch e the
        # same whether or not the run was resumed (workers are started anew each epoch).
        loader.generator.manual_seed(args.seed + 1000 * epoch + rank)
        if world_size > 1:
            loader.sampler.set_epoch(epoch)
        window, window_steps, window_started = {}, 0, time.time()  # losses summed on the device
        cut_short = 0  # image files cut short, decoded as the authors' pipelines decode them
        for step, batch in enumerate(loader, 1):
            cut_short += data.check_batch(batch)  # DataError for an image that could not be decoded
            images, ids, pids = (batch[k].to(device, non_blocking=True) for k in ("images", "ids", "pids"))
            # fp32 master weights under autocast (the authors cast the weights to fp16 and ran Adam
            # on them, with neither a master copy nor loss scaling).
            with evaluate.autocast(device, amp_dtype):
                losses = step_model(images, ids, pids, temperature=args.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            window, window_steps = {k: window.get(k, 0) + v.detach() for k, v in losses.items()}, window_steps + 1

            if step % args.log_every == 0 or step == steps_per_epoch:  # a progress line: the one host sync
                means = {name: (total / window_steps).item() for name, total in window.items()}
                if not math.isfinite(means["loss"]):
                    raise TrainingError(f"the loss became NaN or infinite in epoch {epoch + 1} (before step {step}); "
                                        f"stopped, {args.out}/last.pt holds the last good epoch. Try a lower --lr "
                                        "or --precision fp32")
                entry = {"epoch": epoch + 1, "step": step, **means, "lr": optimizer.param_groups[0]["lr"],
                         "pairs_per_s": window_steps * args.batch_size / (time.time() - window_started)}
                done = epoch - first_epoch + step / steps_per_epoch  # epochs run by this invocation
                eta = round((time.time() - started) / done * (last_epoch - first_epoch - done))
                log(f"epoch {epoch + 1}/{args.epochs}  step {step}/{steps_per_epoch}  "
                    + "  ".join(f"{k} {v:.4f}" for k, v in means.items()) + f"  lr {entry['lr']:.2e}  "
                    f"{entry['pairs_per_s']:,.0f} pairs/s  ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")
                record(entry)
                window, window_steps, window_started = {}, 0, time.time()
        scheduler.step()
        if cut_short:
            log(f"epoch {epoch + 1}: {cut_short:,} training image(s) read from files cut short, decoded with the "
                "missing part filled (python data.py --check names them)")

        # --- evaluate on val, keep the best, save ---------------------------------------------------
        if is_main:
            if dataset.val is None:
                best = {"epoch": epoch, "R1": float("nan")}  # no val split: the last epoch is kept
                save("best.pt", epoch, resumable=False)
            elif (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                metrics = evaluate.evaluate_loaders(model, val_loaders, dataset.val, device, amp_dtype)
                log(f"epoch {epoch + 1} val: " + evaluate.format_metrics(metrics))
                record({"epoch": epoch + 1, "split": "val", **metrics})
                if metrics["R1"] > best["R1"]:
                    best = {"epoch": epoch, "R1": metrics["R1"]}
                    save("best.pt", epoch, resumable=False)
        # Every process's CPU generator, in rank order, as it stands after rank 0's evaluation (whose
        # loaders draw their seeds from it): a resume restores each its own. The others wait here.
        rng_states = [torch.get_rng_state()] * world_size
        if world_size > 1:
            dist.all_gather_object(rng_states, rng_states[0], group=waiting)
        if is_main:
            save("last.pt", epoch, resumable=True)
        if world_size > 1:
            dist.barrier(group=waiting)  # the other ranks wait while rank 0 saves

    if last_epoch < args.epochs:
        log(f"stopped after epoch {last_epoch} as asked; continue with --resume {args.out}/last.pt")
        return

    # --- the test split, once, with the best checkpoint -------------------------------------------
    if is_main:
        best_checkpoint = evaluate.read_checkpoint(os.path.join(args.out, "best.pt"))
        evaluate.load_trained(model, best_checkpoint["trainable"], "best.pt")
        results = evaluate.evaluate_loaders(model, test_loaders, dataset.test, device, amp_dtype)
        log(f"test (epoch {best_checkpoint['epoch'] + 1}): " + evaluate.format_metrics(results))
        record({"epoch": best_checkpoint["epoch"] + 1, "split": "test", **results})
        with open(os.path.join(args.out, "test_metrics.json"), "w") as file:
            # What the number was selected on (val R1 at epoch N, or the last epoch without a val split),
            # and whether the data was the published set (else the numbers compare with no paper's).
            json.dump({"epoch": best_checkpoint["epoch"] + 1, **evaluate.selection_record(best_checkpoint),
                       "published_set": dataset.published, **results}, file, indent=2)
        if args.data == "demo":
            rows = {"chance (random scores)": evaluate.chance_metrics(dataset.test),
                    "frozen CLIP, zero-shot": zero_shot, f"{args.method}, CLIP frozen": results}
            log("\ndemo test split:\n" + evaluate.format_table(rows))
    if world_size > 1:
        dist.barrier(group=waiting)  # the others wait while rank 0 tests, then all end together


# ------------------------------------------------------------------------------------------------
# The demo's CLIP: pretrained here from random weights, because none can be downloaded offline
# ------------------------------------------------------------------------------------------------

# A tiny CLIP learns the synthetic "demo-pretrain" corpus the way OpenAI's CLIP learned the web:
# every weight trained, symmetric InfoNCE over each batch's B x B similarities (cross-entropy from
# images to captions and back, the matching pair the target), with a learned temperature. SDM at
# the methods' fixed temperature is too sharp from random weights: the gradient that lifts the
# right pair is proportional to its probability, tiny while the features are random, and training
# sits on a plateau of near-uniform similarities for a number of epochs that depends on the seed.

def demo_clip(root: str, seed: int, device: torch.device, log) -> str:
    """Path of the demo's tiny CLIP, an OpenAI-layout state dict, pretrained first if not cached.

    It lives in the corpus's folder, which data.py replaces when it redraws the corpus, under a
    name that hashes everything it was made from: a cached CLIP is never stale."""
    log("demo 1/3: a CLIP to adapt")
    corpus = data.load_dataset("demo-pretrain", root)  # drawn on first use
    made_from = (DEMO_CLIP, DEMO_PRETRAINING, seed, data.DEMO_VERSION, data.DEMO_SIZES["demo-pretrain"])
    path = os.path.join(root, "demo-pretrain", f"clip-{hashlib.sha256(repr(made_from).encode()).hexdigest()[:12]}.pt")
    if os.path.isfile(path):
        log(f"  using the tiny CLIP cached at {path}")
        return path
    log("  No CLIP can be downloaded offline, so a tiny one is pretrained from random weights on the "
        "synthetic demo-pretrain corpus, as OpenAI pretrained theirs (symmetric InfoNCE, learned temperature):")
    started, recipe = time.time(), DEMO_PRETRAINING
    # The corpus is small and not augmented: every image is decoded and transformed once, and kept.
    image_batches, _ = data.eval_loaders(corpus.train, DEMO_CLIP.image_size)
    images = torch.cat([batch for batch, _ in image_batches])[corpus.train.image_index]  # [N, 3, H, W]: each pair's image
    ids = corpus.train.ids  # [N, 77]
    caption_ends = ids.argmax(dim=-1)  # [N]: the EOT position of each caption

    torch.manual_seed(seed)
    model = clip_min.CLIP(DEMO_CLIP).to(device)
    steps_per_epoch = len(ids) // recipe["batch_size"]  # the last incomplete batch is dropped
    total_steps, warmup = recipe["epochs"] * steps_per_epoch, recipe["warmup_steps"]
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # per step, as OpenAI's: linear warm-up, then cosine to 0
        optimizer, lambda step: (step + 1) / warmup if step < warmup else lr_factor(step - warmup, total_steps - warmup, 0, 1))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(ids), generator=generator)[: steps_per_epoch * recipe["batch_size"]]
        loss_sum = torch.zeros((), device=device)
        for batch in order.view(steps_per_epoch, -1):  # [B] sample indices
            # Each text batch is cut to its longest caption: exact, since the causal text tower
            # is read at EOT and no token before EOT sees the padding.
            batch_ids = ids[batch, : caption_ends[batch].max() + 1]  # [B, L']
            loss = clip_min.clip_loss(model.encode_image(images[batch].to(device)),  # [B, E]
                                      model.encode_text(batch_ids.to(device)), model.logit_scale)  # [B, E]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # as OpenAI's: the learned scale stops at 100 (temperature 0.01)
                model.logit_scale.clamp_(0, math.log(100))
            loss_sum += loss.detach()
        log(f"  pretraining epoch {epoch + 1}/{recipe['epochs']}  InfoNCE {loss_sum.item() / steps_per_epoch:.4f}  "
            f"temperature {1 / model.logit_scale.exp().item():.4f}  {time.time() - started:.0f} s")
    evaluate.save_atomically(model.state_dict(), path)  # a CLIP cut short is never taken for a cached one
    log(f"  saved the tiny CLIP to {path}, an OpenAI-layout state dict that clip_min.load reads back")
    return path


if __name__ == "__main__":
    sys.exit(main())
