"""Evaluation for text-based person retrieval: the metrics, features and tables that train.py and
this script report, trained models read back, and this script's command line.

The metrics are IRRA's (Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning for
Text-to-Image Person Retrieval", CVPR 2023, arXiv 2303.12501). Each query ranks the whole gallery
by descending similarity. If query q has n relevant items (same identity) at 0-based ranks
r_1 < ... < r_n, then

    R@k  = mean over q of [r_1 < k]                 (k = 1, 5, 10)
    AP   = (1/n) * sum_{j=1..n} j / (r_j + 1)       (precision at each relevant item)
    INP  = n / (r_n + 1)                            (precision at the last relevant item)
    mAP  = mean over q of AP,   mINP = mean over q of INP,   all in percent.

Text-to-image (t2i, the papers' tables): a split's captions are the queries, its images the
gallery; image-to-text (i2t, IRRA's `i2t_metric`) swaps the roles. The plain way sorts all of the
[Q, G] similarity (IRRA: a full argsort and several [Q, G] copies). Here queries go in chunks;
each row is sorted by value only, a relevant item's rank is a binary search of its score in the
sorted row, and AP and INP follow from those ranks, with no loop over queries.
"""

import argparse
import collections
import colorsys
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, make_grid

import clip_min
import cskt
import data
import dm_adapter

# ------------------------------------------------------------------------------------------------
# Metrics: R@k, mAP, mINP, text-to-image and image-to-text
# ------------------------------------------------------------------------------------------------

METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")
DIRECTIONS = {"t2i": "text-to-image", "i2t": "image-to-text"}  # t2i is the papers' table


def group_gallery_by_identity(gallery_pids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(identities [U] sorted, members [U, M]: each one's gallery indices, counts [U]); slot m of
    row u is a member only when m < counts[u] (the padding slots hold some valid index)."""
    order = gallery_pids.argsort(stable=True)  # [G]
    identities, counts = torch.unique_consecutive(gallery_pids[order], return_counts=True)
    starts = counts.cumsum(0) - counts  # [U]
    slots = torch.arange(int(counts.max()), device=gallery_pids.device)  # [M]
    positions = (starts[:, None] + slots).clamp(max=len(order) - 1)  # [U, M]
    return identities, order[positions], counts


def sort_rows(scores: torch.Tensor) -> torch.Tensor:
    """Each row of scores [C, G] sorted ascending, values only."""
    if scores.device.type == "cpu":
        # numpy's sort is vectorised (AVX-512 / AVX2): 0.08 s against 1.1 s for torch.sort on a
        # 1024 x 15,000 chunk, measured on 2 cores. Elsewhere torch.sort is fast.
        rows = scores.numpy().copy()  # a dense row-major copy, even of a transposed view
        rows.sort(axis=1)
        return torch.from_numpy(rows)
    return scores.sort(dim=1).values


def retrieval_metrics(similarity: torch.Tensor, query_pids: torch.Tensor,
                      gallery_pids: torch.Tensor, chunk_size: int = 1024) -> dict:
    """R1, R5, R10, mAP and mINP in percent of similarity [Q, G] (a row per query, higher is
    closer), query_pids [Q] and gallery_pids [G]. Queries without a relevant item are left out
    and counted ("num_skipped"); with none measured the metrics are NaN; a NaN score is an error.
    Ties: a relevant item tied with irrelevant ones ranks after them, relevant items tied with
    each other take consecutive ranks, so a model cannot gain from ties (a collapsed model scores
    all alike; IRRA's argsort leaves ties unspecified). Temporaries: a chunk's copy or two."""
    if similarity.dim() != 2 or similarity.shape != (len(query_pids), len(gallery_pids)):
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match "
                         f"{len(query_pids)} query and {len(gallery_pids)} gallery identities")
    if len(gallery_pids) == 0:
        raise ValueError("the gallery is empty")
    similarity = similarity.detach()
    device = similarity.device
    query_pids = query_pids.to(device, torch.long)
    gallery_pids = gallery_pids.to(device, torch.long)
    # The relevant items of a query: a gather of M indices by identity, not a mask over all G.
    identities, members, counts = group_gallery_by_identity(gallery_pids)  # [U], [U, M], [U]
    row = torch.searchsorted(identities, query_pids).clamp(max=len(identities) - 1)  # [Q]
    num_relevant = torch.where(identities[row] == query_pids, counts[row], 0)  # [Q]
    slots = torch.arange(members.shape[1], device=device)  # [M]

    hits = {1: 0.0, 5: 0.0, 10: 0.0}
    ap_sum = inp_sum = 0.0
    for start in range(0, len(query_pids), chunk_size):
        chunk = slice(start, start + chunk_size)
        # Half precision is widened (exactly; numpy has no bf16); fp32 and fp64 stay as they are.
        scores = similarity[chunk].to(torch.promote_types(similarity.dtype, torch.float32))
        n = num_relevant[chunk]  # [C]
        is_relevant_slot = slots < n[:, None]  # [C, M]
        # The relevant scores of each query, best first; padding slots become -inf, sort last.
        relevant_scores = scores.gather(1, members[row[chunk]])  # [C, M]
        relevant_scores = relevant_scores.masked_fill(~is_relevant_slot, float("-inf"))
        relevant_scores = relevant_scores.sort(dim=1, descending=True).values  # [C, M]
        sorted_scores = sort_rows(scores)  # [C, G] ascending
        if sorted_scores[:, -1].isnan().any():  # NaN sorts last
            raise ValueError(f"similarity has NaN values in rows {start}..{start + len(n) - 1}")
        # The left insertion point of a score counts the items strictly below it, so the rest
        # score at least as high (">=": the tie rule). Less the relevant items among them, they
        # are the irrelevant items ahead of the j-th relevant one; plus j, its 0-based rank.
        at_or_above = len(gallery_pids) - torch.searchsorted(sorted_scores, relevant_scores)
        relevant_at_or_above = ((relevant_scores[:, None, :] >= relevant_scores[:, :, None])
                                & is_relevant_slot[:, None, :]).sum(2)  # [C, M, M] -> [C, M]
        ranks = at_or_above - relevant_at_or_above + slots  # [C, M], real for j < n
        measured = n > 0  # [C]
        # float64 for the few values per query, so AP = 5/6 prints as 83.3333333..., not ...373.
        ranks_plus_one = (ranks + 1).double()
        precision_at_hit = (slots + 1).double() / ranks_plus_one  # [C, M]
        ap = (precision_at_hit * is_relevant_slot).sum(1) / n.clamp(min=1)  # [C]
        last_rank_plus_one = ranks_plus_one.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
        inp = n / last_rank_plus_one  # [C]
        for k in hits:
            hits[k] += (measured & (ranks[:, 0] < k)).sum().item()
        ap_sum += ap[measured].sum().item()
        inp_sum += inp[measured].sum().item()

    num_queries = int((num_relevant > 0).sum())
    percent = 100.0 / num_queries if num_queries else float("nan")
    return {"R1": hits[1] * percent, "R5": hits[5] * percent, "R10": hits[10] * percent,
            "mAP": ap_sum * percent, "mINP": inp_sum * percent,
            "num_queries": num_queries, "num_skipped": len(query_pids) - num_queries}


def directional_metrics(similarity: torch.Tensor, caption_pids: torch.Tensor,
                        image_pids: torch.Tensor, direction="t2i", chunk_size=1024) -> dict:
    """The metrics of the caption-by-image similarity [Q, G]: "t2i", each caption ranks the
    images; "i2t", each image ranks the captions (the transposed view, no copy)."""
    if direction == "t2i":
        return retrieval_metrics(similarity, caption_pids, image_pids, chunk_size)
    if direction == "i2t":
        return retrieval_metrics(similarity.T, image_pids, caption_pids, chunk_size)  # [G, Q]
    raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")


def chance_metrics(split: data.EvalSplit, seed: int = 0, direction: str = "t2i") -> dict:
    """The metrics of a random ranking (one draw of uniform scores): the floor to compare with."""
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.rand(len(split.caption_pids), len(split.image_pids), generator=generator)
    return directional_metrics(similarity, split.caption_pids, split.image_pids, direction)


def mean_and_std(runs: list[dict]) -> dict:
    """Several runs' metrics -> {name: (mean, sample std)} and "num_runs"; the std divides by n - 1
    (the runs are a sample of the seeds one could try)."""
    if len(runs) < 2:
        raise ValueError(f"a mean and standard deviation need at least 2 runs, got {len(runs)}")
    values = torch.tensor([[run[name] for name in METRIC_NAMES] for run in runs],
                          dtype=torch.float64)  # [n, 5]
    means, stds = values.mean(0).tolist(), values.std(0, correction=1).tolist()
    summary = {name: (mean, std) for name, mean, std in zip(METRIC_NAMES, means, stds)}
    return {**summary, "num_runs": len(runs)}


# ------------------------------------------------------------------------------------------------
# Device and precision: one policy for training and evaluation
# ------------------------------------------------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # -> autocast dtype


def pick_device(name: str, local_rank: int = 0, local_processes: int = 1) -> torch.device:
    """--device -> a torch device. "auto": this process's GPU, else Apple's, else the CPU. A GPU
    without an index is this process's (torchrun's LOCAL_RANK of LOCAL_WORLD_SIZE)."""
    if name == "auto":
        name = "mps" if torch.backends.mps.is_available() else "cpu"
        name = "cuda" if torch.cuda.is_available() else name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: this machine has no CUDA GPU that torch can use")
        if device.index is not None and local_processes > 1:
            raise ValueError(f"{name}: under torchrun each of the {local_processes} processes on "
                             "this machine uses its own GPU; give --device cuda or auto")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        count = torch.cuda.device_count()
        if device.index >= count:
            per_machine = (f" for {local_processes} processes; start at most {count} per machine "
                           "(torchrun --nproc_per_node)") if local_processes > 1 else ""
            raise ValueError(f"{device}: there are only {count} GPU(s){per_machine}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: Apple's GPU (MPS) is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: only cpu, cuda and mps devices are supported")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """--precision -> the autocast dtype (None: fp32). "auto": bf16 on GPUs that have it (no
    overflow, no loss scaling), else fp16; fp32 on the CPU, where autocast rarely pays."""
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type == "cuda":
        # bf16 units came with compute capability 8. torch.cuda.is_bf16_supported() also counts
        # the slow emulation of older GPUs, and asks about the current GPU, not this one.
        capability = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if capability >= (8, 0) else torch.float16
    return torch.float16 if device.type == "mps" else None


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision around a forward pass; a no-op for fp32. The weights stay fp32."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def use_device(device: torch.device) -> None:
    """Make `device` current and keep TF32 off, in both scripts. Under autocast the matmuls left
    in fp32 are deliberate (DM-Adapter's router, SDM, the similarity), and TF32 would round their
    inputs to 10 bits; --precision fp32 means fp32 everywhere."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels, NCCL and new tensors go to this GPU
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------------------------------------
# Features, and evaluating a model on a split
# ------------------------------------------------------------------------------------------------

def readable_images(loader: Iterable, messages: list | None = None) -> Iterable[torch.Tensor]:
    """The image batches of a data.image_loader. Each image's message ("" where it was read) goes
    into `messages` where given; else an image that cannot be read is a DataError."""
    for images, batch_messages in loader:
        if messages is not None:
            messages.extend(batch_messages)
        elif any(batch_messages):
            raise data.DataError(next(message for message in batch_messages if message))
        yield images


def encode(encode_batch: Callable, batches: Iterable, device: torch.device,
           amp_dtype: torch.dtype | None, name: str, log_every: int = 50) -> torch.Tensor:
    """L2-normalised fp32 features [N, E] of the batches; progress every `log_every` batches."""
    features = []
    with torch.no_grad(), autocast(device, amp_dtype):
        for number, batch in enumerate(batches, 1):
            # non_blocking overlaps the copy with compute when the loader pins memory.
            batch_features = encode_batch(batch.to(device, non_blocking=True)).float()
            features.append(F.normalize(batch_features, dim=-1))
            if log_every and number % log_every == 0:
                print(f"  encoded {number} batches of {name}", file=sys.stderr)
    return torch.cat(features)


def extract_features(model: nn.Module, image_loader: Iterable, caption_loader: Iterable, device,
                     amp_dtype=None, log_every=50) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [G, E], caption features [Q, E]) of a split's data.eval_loaders."""
    device, was_training = torch.device(device), model.training
    model.eval()
    images = encode(model.encode_image, readable_images(image_loader), device, amp_dtype,
                    "images", log_every)
    captions = encode(model.encode_text, caption_loader, device, amp_dtype, "captions", log_every)
    model.train(was_training)
    return images, captions


def encode_queries(model: nn.Module, queries: list[str], device, amp_dtype=None) -> torch.Tensor:
    """Features [Q, E] of free-text queries; one longer than the 77 positions is cut, and said."""
    for query in queries:
        if len(clip_min.default_tokenizer().encode(query)) + 2 > clip_min.CONTEXT_LENGTH:
            print(f'query cut to its first {clip_min.CONTEXT_LENGTH - 2} tokens: "{query[:60]}..."',
                  file=sys.stderr)
    ids = clip_min.tokenize(queries, truncate=True)  # [Q, 77]
    return encode(model.encode_text, [ids], torch.device(device), amp_dtype, "queries")


def evaluate_loaders(model: nn.Module, loaders: tuple, split: data.EvalSplit, device,
                     amp_dtype=None) -> dict:
    """Text-to-image metrics of `model` on a split, from its data.eval_loaders (train.py makes
    them once and evaluates every few epochs)."""
    images, captions = extract_features(model, *loaders, device, amp_dtype)
    return retrieval_metrics(captions @ images.T, split.caption_pids, split.image_pids)  # [Q, G]


def format_metrics(metrics: dict) -> str:
    skipped = metrics["num_skipped"]
    return ("  ".join(f"{name} {metrics[name]:6.2f}" for name in METRIC_NAMES)
            + f"  ({metrics['num_queries']:,} queries"
            + (f", {skipped} without a relevant image skipped)" if skipped else ")"))


def format_table(rows: dict[str, dict]) -> str:
    """{row name: metrics} -> a Markdown table; a (mean, std) pair shows as "mean ± std"."""
    def cell(value) -> str:
        return f"{value[0]:.2f} ± {value[1]:.2f}" if isinstance(value, tuple) else f"{value:6.2f}"
    table = [["", *(f"{name:>6}" for name in METRIC_NAMES)],
             *([name, *(cell(metrics[m]) for m in METRIC_NAMES)] for name, metrics in rows.items())]
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    lines = ["| " + " | ".join(f"{cell:{'<' if column == 0 else '>'}{width}}"
                               for column, (cell, width) in enumerate(zip(line, widths))) + " |"
             for line in table]
    return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]])


# ------------------------------------------------------------------------------------------------
# Trained models: what train.py's checkpoints hold, and the models rebuilt from them
# ------------------------------------------------------------------------------------------------
# A checkpoint holds what was trained ("trainable") and how to rebuild the rest ("clip"): the
# name of an OpenAI release (downloaded and hash-checked when read), or the frozen CLIP's weights.
# CSKT and DM-Adapter keep their frozen CLIP under "clip.": that prefix divides the two.

BACKBONE_PREFIX = "clip."
METHODS = ("cskt", "dm_adapter", "finetune")  # what train.py trains ("clip": frozen, zero-shot)


class CheckpointError(Exception):
    """A checkpoint that cannot be read, written, or fitted to the model it describes."""


def build_method(method: str, clip_model: clip_min.CLIP, method_args: dict) -> nn.Module:
    """The model of `method` around `clip_model`; "finetune" trains every CLIP weight."""
    if method == "cskt":
        return cskt.CSKT(clip_model, **method_args)
    if method == "dm_adapter":
        return dm_adapter.DMAdapter(clip_model, **method_args)
    if method not in ("finetune", "clip"):
        raise ValueError(f"unknown method {method!r}")
    clip_model.requires_grad_(method == "finetune")
    # SDM fixes the temperature, so CLIP's own never gets a gradient; a weight that trains
    # without one would stall DDP, which waits for every trainable weight's gradient.
    clip_model.logit_scale.requires_grad_(False)
    return clip_model


def is_trained(name: str) -> bool:
    """What a method trains, by a weight's name: all but the frozen backbone (all of a fine-tuned
    CLIP). The one definition: checkpoints save these, and the methods train exactly these."""
    return not name.startswith(BACKBONE_PREFIX)


def read_checkpoint(path: str) -> dict:
    """The dict train.py saved at `path`, read without running code from the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        checkpoint = clip_min.load_file(path)
    except clip_min.CLIPError as error:
        raise CheckpointError(f"{error} (not a checkpoint written by train.py)") from None
    needed = {"method", "method_args", "clip", "trainable", "args"}
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint written by train.py "
                              "(no method, clip and trainable)")
    return checkpoint


def load_trained(model: nn.Module, trained: dict, source: str) -> None:
    """Puts a checkpoint's trained weights into `model`, whose frozen backbone is in place:
    every trained weight must be there, and nothing else."""
    try:
        missing, unexpected = model.load_state_dict(trained, strict=False)
    except RuntimeError as error:  # a shape mismatch
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{source} does not fit this model: {reason}") from None
    not_restored = [key for key in missing if is_trained(key)]
    if unexpected or not_restored:
        raise CheckpointError(f"{source} does not fit this model: unexpected weights "
                              f"{unexpected or 'none'}, missing {not_restored or 'none'}")


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(the model in eval mode on `device`, the checkpoint) of a best.pt or last.pt."""
    checkpoint = read_checkpoint(path)
    backbone = checkpoint["clip"]
    image_size, stride = tuple(backbone["image_size"]), backbone["stride"]
    if checkpoint["method"] == "finetune":
        clip_model = clip_min.build_model(checkpoint["trainable"], image_size, stride)
    elif "state_dict" in backbone:
        clip_model = clip_min.build_model(backbone["state_dict"], image_size, stride)
    else:
        clip_model = clip_min.load(backbone["name"], image_size, stride)  # checks the hash
    model = build_method(checkpoint["method"], clip_model, checkpoint["method_args"])
    load_trained(model, checkpoint["trainable"], path)
    return model.to(device).eval(), checkpoint


def selected_on(checkpoint: dict) -> str:
    """What train.py chose this checkpoint on, in words (a last.pt may be no choice at all)."""
    if "epoch" not in checkpoint:
        return "unknown: the checkpoint records no epoch"
    epoch, best = checkpoint["epoch"], checkpoint["best"]
    this_epoch = f"epoch {epoch + 1} of {checkpoint['args']['epochs']}"
    if math.isnan(best["R1"]):  # train.py's mark for a dataset without a val split
        return f"the last epoch ({this_epoch}): {checkpoint['data']} has no val split"
    if best["epoch"] == epoch:
        return f"val R1 {best['R1']:.2f} at {this_epoch}"
    if best["epoch"] < 0:
        return f"nothing: {this_epoch}, saved before any val evaluation"
    return (f"nothing: {this_epoch}, the last saved (val's best was R1 {best['R1']:.2f} at epoch "
            f"{best['epoch'] + 1})")


def selection_record(checkpoint: dict) -> dict:
    """What the reports say of a checkpoint: "selected_on" and, where the run recorded one,
    "dataset_check" (another copy than the published set gives numbers unlike the papers')."""
    record = {"selected_on": selected_on(checkpoint)}
    if checkpoint.get("dataset_check") is not None:
        record["dataset_check"] = checkpoint["dataset_check"]
    return record


RUN_FIELDS = {  # what the runs of one mean share
    "method": lambda run: run["method"],
    "dataset": lambda run: run["data"],
    "image size": lambda run: "{}x{} stride {}".format(*run["clip"]["image_size"],
                                                       run["clip"]["stride"]),
}


def read_run(path: str) -> dict:
    """A checkpoint without weights or optimizer state: several runs are compared before any
    model is built, and only one run's weights are in memory at a time."""
    checkpoint = read_checkpoint(path)
    checkpoint["clip"] = {k: v for k, v in checkpoint["clip"].items() if k != "state_dict"}
    keys = ("method", "data", "clip", "epoch", "best", "args", "dataset_check")
    return {key: checkpoint[key] for key in keys if key in checkpoint}


def check_runs_agree(runs: dict[str, dict]) -> None:
    """{path: run} of the runs to average: one method, training set, image size and stride, or a
    CheckpointError naming the odd one out against the value most of them share."""
    for field, value_of in RUN_FIELDS.items():
        values = {path: value_of(run) for path, run in runs.items()}
        counts = collections.Counter(values.values())
        common = max(counts, key=counts.get)  # the most frequent; on a tie, the first met
        odd = next((path for path, value in values.items() if value != common), None)
        if odd is not None:
            first = next(path for path, value in values.items() if value == common)
            sharing = counts[common] - 1
            others = f" and {sharing} other{'s' if sharing > 1 else ''} have" if sharing else " has"
            raise CheckpointError(f"{odd}: {field} {values[odd]}, but {first}{others} {common}; "
                                  "a mean over runs needs one method, dataset and image size")


# ------------------------------------------------------------------------------------------------
# The command line: pictures of what was retrieved
# ------------------------------------------------------------------------------------------------

GRID_PADDING = 8  # pixels around every cell and the text
FRAME_WIDTH = 3  # the green or red frame, drawn over the image's edge
GRID_MIN_WIDTH = 320  # room for the query text above a short row
CORRECT_COLOUR = (0, 170, 0)
WRONG_COLOUR = (220, 0, 0)
FONT_SIZE = 13  # pixels


def picture_font() -> ImageFont.ImageFont:
    """Pillow's own font at FONT_SIZE; its small bitmap font where Pillow is older than 10.1."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_block(text: str, width: int, font: ImageFont.ImageFont) -> Image.Image:
    """`text` wrapped to `width` pixels, black on white, GRID_PADDING around it."""
    per_character = font.getlength("abcdefghijklmnopqrstuvwxyz") / 26
    lines = textwrap.wrap(text, max(1, int((width - 2 * GRID_PADDING) / per_character))) or [""]
    line_height = FONT_SIZE + 4
    block = Image.new("RGB", (width, 2 * GRID_PADDING + len(lines) * line_height), "white")
    for number, line in enumerate(lines):
        ImageDraw.Draw(block).text((GRID_PADDING, GRID_PADDING + number * line_height), line,
                                   fill="black", font=font)
    return block


def save_retrieval_grid(path: str, query: str, images: list, scores: list[float],
                        correct: list[bool] | None = None, cell_size=(192, 64), columns=10) -> None:
    """A PNG: the query on top, then the images in rank order, `columns` to a row, each with its
    score and, where `correct` is given, a green (right identity) or red frame. Images: paths, PIL
    images or [3, H, W] tensors in [0, 1], fitted into `cell_size` (H, W), 3:1 like person crops."""
    height, width = cell_size
    font = picture_font()
    cells = []
    for index, (image, score) in enumerate(zip(images, scores)):
        if isinstance(image, torch.Tensor):
            image = to_pil_image(image.detach().float().clamp(0, 1).cpu())
        elif not isinstance(image, Image.Image):
            image = data.decode_image(str(image))[0]
        cell = Image.new("RGB", (width, height + FONT_SIZE + 4), "white")  # the image, its score
        cell.paste(ImageOps.pad(image.convert("RGB"), (width, height), color="white"))
        ImageDraw.Draw(cell).text((width / 2, height + 2), f"{score:.3f}", fill="black",
                                  font=font, anchor="ma")
        cell = pil_to_tensor(cell)  # [3, H', W] uint8
        if correct is not None:
            colour = CORRECT_COLOUR if correct[index] else WRONG_COLOUR
            frame = torch.tensor([[0, 0, width - 1, height - 1]])
            cell = draw_bounding_boxes(cell, frame, colors=colour, width=FRAME_WIDTH)
        cells.append(cell)
    grid = make_grid(cells, nrow=columns, padding=GRID_PADDING, pad_value=255)  # [3, H'', W'']
    header = text_block(query, max(grid.shape[2], GRID_MIN_WIDTH), font)
    grid = F.pad(grid, (0, header.width - grid.shape[2]), value=255)  # white to the text's width
    to_pil_image(torch.cat([pil_to_tensor(header), grid], dim=1)).save(path, format="PNG")


def draw_rankings(out, names, texts, similarity, split, topk, truth=None) -> None:
    """<out>/<name> for each row of similarity [N, G] against the split's images: its text and best
    `topk` images, framed where `truth` (the rows' identities [N]) is given."""
    os.makedirs(out, exist_ok=True)
    scores, best = similarity.topk(min(topk, len(split.image_paths)), dim=1)  # [N, k]
    for row, (name, text) in enumerate(zip(names, texts)):
        found = [split.image_paths[i] for i in best[row].tolist()]
        correct = None
        if truth is not None:
            correct = (split.image_pids[best[row].cpu()] == truth[row]).tolist()
        save_retrieval_grid(os.path.join(out, name), text, found, scores[row].tolist(), correct)
        print(f"wrote {os.path.join(out, name)}")


# ------------------------------------------------------------------------------------------------
# The command line: searching a folder of images
# ------------------------------------------------------------------------------------------------
# Any folder is a gallery: every .jpg, .jpeg, .png and .webp under it, resized as a test image,
# ranked for the queries in one pass. Encoding is the slow part (ViT-B/16 at 384x128: about 34
# GFLOP an image), so the features are cached in --out with the model's identity and each file's
# size, mtime and ctime (a file rewritten in place gets a new ctime even when its mtime is put
# back): a later search encodes only what the cache lacks. Unreadable files are cached with their
# message: listed on every search, decoded again only once changed.

GALLERY_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # matched case-insensitively
GALLERY_CACHE_FILE = "gallery_features.pt"  # in --out
UNREADABLE_SHOWN = 20  # unreadable files printed; all of them go to <out>/unreadable.txt


def file_stamp(path: str) -> tuple[int, int, int]:
    status = os.stat(path)  # follows links: the stamp is the image's own
    return (status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def model_identity(checkpoint: str | None, clip: str, image_size, stride: int) -> dict:
    """What the gallery features depend on: the checkpoint (by path and stamp: retrained in place,
    it is another model), or zero-shot CLIP's release or file, with the input size and stride."""
    source = checkpoint or clip
    identity = {"format": 2, "source": source, "image_size": list(image_size), "stride": stride}
    if os.path.isfile(source):  # a release name is hash-checked when loaded
        identity.update(source=os.path.abspath(source), stamp=list(file_stamp(source)))
    return identity


def gallery_files(folder: str) -> tuple[dict, list[str], int]:
    """({image path: stamp} in path order, why a folder or file could not be read, the number of
    other files)."""
    files, problems, others = {}, [], 0

    def unlistable(error: OSError):
        problems.append(f"{error.filename}: folder cannot be listed: {error.strerror}")
    for parent, _, names in os.walk(os.path.abspath(folder), onerror=unlistable):
        for path in (os.path.join(parent, name) for name in names):
            if not path.lower().endswith(GALLERY_EXTENSIONS):
                others += 1
                continue
            try:
                files[path] = file_stamp(path)
            except OSError as error:  # a dangling link, or a file deleted meanwhile
                problems.append(f"{path}: cannot be read: {error.strerror}")
    return dict(sorted(files.items())), problems, others


def gallery_features(args, model, files: dict, amp_dtype) -> tuple[torch.Tensor, list[str], int]:
    """(features [N, E] and messages [N] of `files` in their order, how many were encoded now):
    what --out's cache holds for this model and these stamps, the rest encoded and cached."""
    identity = model_identity(args.checkpoint, args.clip, args.image_size, args.stride)
    cache_path = os.path.join(args.out, GALLERY_CACHE_FILE)
    cached = {}  # (path, stamp) -> (feature, message)
    if os.path.isfile(cache_path):
        try:
            cache = torch.load(cache_path, map_location="cpu", weights_only=True)
            if cache.get("model") == identity:
                cached = dict(zip(cache["files"], zip(cache["features"], cache["messages"])))
        except Exception as error:  # unpickling fails in many ways; a cache is only a cache
            print(f"  ignoring the damaged gallery cache {cache_path} ({error})", file=sys.stderr)
    keys = list(files.items())
    new = [key for key in keys if key not in cached]
    if new:
        loader = data.image_loader([path for path, _ in new], args.image_size, args.batch_size,
                                   args.workers)
        messages = []
        features = encode(model.encode_image, readable_images(loader, messages), args.device,
                          amp_dtype, "gallery images", log_every=1).cpu()
        cached.update(zip(new, zip(features, messages)))
    features = torch.stack([cached[key][0] for key in keys])  # [N, E]
    messages = [cached[key][1] for key in keys]
    if new or len(cached) != len(keys):  # an interrupted save leaves the old cache
        with clip_min.atomic_file(cache_path) as file:
            torch.save({"model": identity, "files": keys, "features": features,
                        "messages": messages}, file)
    return features, messages, len(new)


def search_folder_main(args: argparse.Namespace, model: nn.Module, amp_dtype) -> int:
    """--gallery DIR --query TEXT [...]: rank the folder's images for each query, print the best
    --topk with their scores and draw them (<out>/search.png, or search_N.png)."""
    start = time.perf_counter()
    if not os.path.isdir(args.gallery):
        raise data.DataError(f"--gallery: no such folder: {args.gallery}")
    files, problems, others = gallery_files(args.gallery)
    os.makedirs(args.out, exist_ok=True)
    features, messages, decoded = gallery_features(args, model, files, amp_dtype)
    readable = [row for row, message in enumerate(messages) if not message]
    unreadable = problems + [message for message in messages if message]
    print(f"{args.gallery}: {len(files):,} image files, {len(files) - decoded:,} from the cache "
          f"{os.path.join(args.out, GALLERY_CACHE_FILE)} and {decoded:,} decoded now; "
          f"{len(readable):,} ranked, {len(unreadable):,} unreadable; {others:,} other files "
          f"left out (not {'/'.join(GALLERY_EXTENSIONS)})")
    listing = os.path.join(args.out, "unreadable.txt")
    if unreadable:
        with open(listing, "w") as file:
            file.writelines(f"{message}\n" for message in unreadable)
        more = len(unreadable) - UNREADABLE_SHOWN
        print(f"{len(unreadable):,} unreadable file(s), left out of the ranking (all listed in "
              f"{listing}):", *unreadable[:UNREADABLE_SHOWN], *([f"... and {more:,} more"]
              if more > 0 else []), sep="\n  ", file=sys.stderr)
    elif os.path.exists(listing):
        os.remove(listing)  # a list from an earlier search would now be wrong
    if not readable:
        raise data.DataError(f"--gallery: no readable image under {args.gallery}")
    paths = [path for path, message in zip(files, messages) if not message]
    queries = encode_queries(model, args.query, args.device, amp_dtype).cpu()  # [Q, E]
    scores, best = (queries @ features[readable].T).topk(min(args.topk, len(readable)))  # [Q, k]
    for number, query in enumerate(args.query):
        found = [paths[i] for i in best[number].tolist()]
        print(f'\n"{query}": the {len(found)} best of {len(readable):,}')
        for rank, (score, path) in enumerate(zip(scores[number].tolist(), found), start=1):
            print(f"  {rank:3d}  {score:.4f}  {path}")
        name = "search.png" if len(args.query) == 1 else f"search_{number + 1}.png"
        save_retrieval_grid(os.path.join(args.out, name), query, found, scores[number].tolist())
        print(f"wrote {os.path.join(args.out, name)}")
    print(f"\n{len(args.query)} quer{'y' if len(args.query) == 1 else 'ies'} over "
          f"{len(readable):,} images in {time.perf_counter() - start:.2f} s, the model already "
          "loaded")
    return 0


# ------------------------------------------------------------------------------------------------
# The command line: DM-Adapter's routing
# ------------------------------------------------------------------------------------------------
# The routers should spread tokens over experts that specialise, and the balance loss keep every
# expert in use. The picture shows, per block of each tower, the share of the top-k picks each
# expert gets over a split (near 100/E % everywhere: all in use; one blue cell among red ones:
# that block collapsed onto one expert), and the experts each token of a caption picks at each
# text block. Hooks on the routers read the picks. Text padding is routed (and counted in the
# balance loss, as the authors do) but not in the shares: it never reaches the EOT feature.

ROUTING_MAX_WIDTH = 1000  # pixels: README shows the picture about 900 wide
ROUTING_TOKENS_SHOWN = 40  # the caption's first tokens drawn, a row each


def routed_experts(model: dm_adapter.DMAdapter, tower: str, batches: Iterable, device):
    """(batch, experts [blocks, T, k]) for each batch of images [B, 3, H, W] or ids [B, L],
    T = B * L: the top-k of each router's logits [T, E], best first."""
    mixtures = model.vision_adapters if tower == "image" else model.text_adapters
    picks = [None] * len(mixtures)

    def recorder(block: int, top_k: int):
        def record(router, inputs, logits):
            picks[block] = logits.float().topk(top_k, dim=-1).indices  # [T, k]
        return record
    hooks = [mixture.router.register_forward_hook(recorder(block, mixture.top_k))
             for block, mixture in enumerate(mixtures)]
    try:
        for batch in batches:
            batch = batch.to(device)
            (model.encode_image if tower == "image" else model.encode_text)(batch)
            yield batch, torch.stack(picks)  # [blocks, T, k]
    finally:
        for hook in hooks:
            hook.remove()


def routing_shares(model: dm_adapter.DMAdapter, split: data.EvalSplit, image_size, device,
                   amp_dtype=None, batch_size=256, workers=0, include_padding=False) -> dict:
    """{"image": [blocks, E], "text": [blocks, E]}: the percent of each block's top-k picks that
    went to each expert over the split's images and captions (each row sums to 100)."""
    device = torch.device(device)
    num_experts = len(model.vision_adapters[0].experts)
    images, captions = data.eval_loaders(split, tuple(image_size), batch_size, workers)
    shares = {}
    for tower, batches in (("image", readable_images(images)), ("text", captions)):
        counts = 0
        with torch.no_grad(), autocast(device, amp_dtype):
            for batch, experts in routed_experts(model, tower, batches, device):
                chosen = F.one_hot(experts, num_experts).sum(dim=2)  # [blocks, T, E]: k ones
                if tower == "text" and not include_padding:  # SOT to EOT, without a host sync
                    positions = torch.arange(batch.shape[1], device=device)
                    words = positions <= batch.argmax(-1, keepdim=True)  # [B, L]
                    chosen = chosen * words.reshape(1, -1, 1)
                counts = counts + chosen.sum(dim=1)  # [blocks, E]
        shares[tower] = 100 * counts.double() / counts.sum(dim=1, keepdim=True)
    return shares


def caption_routing(model: dm_adapter.DMAdapter, caption: str, device, amp_dtype=None) -> tuple:
    """(token labels [n], experts [blocks, n, k]): the top-k experts that each token of `caption`,
    SOT to EOT, picks at each text block, the one with the larger weight first."""
    ids = clip_min.tokenize(caption, truncate=True)  # [1, L]
    with torch.no_grad(), autocast(torch.device(device), amp_dtype):
        [(_, experts)] = routed_experts(model, "text", [ids], torch.device(device))
    names = {clip_min.SOT_TOKEN: "SOT", clip_min.EOT_TOKEN: "EOT"}
    tokens = ids[0, : int(ids.argmax()) + 1].tolist()
    labels = [names.get(token) or clip_min.default_tokenizer().decode([token]) for token in tokens]
    return labels, experts[:, : len(labels)].cpu()  # [blocks, n, k]


def share_colour(share: float, even: float) -> tuple[int, int, int]:
    """White at the even share; bluer above it (full at twice), redder below (full at none)."""
    t = max(-1.0, min(1.0, (share - even) / even))
    target = (40, 90, 200) if t > 0 else (215, 50, 40)
    return tuple(round(255 + (channel - 255) * abs(t)) for channel in target)


def draw_table(draw: ImageDraw.ImageDraw, font, x: float, y: float, table: tuple) -> float:
    """A table at (x, y): (its name, the columns' names, a name per row, the rows of cells, a
    cell's width), a cell a list of (colour, text) stripes side by side. Returns its width."""
    name, column_names, row_names, cells, cell = table
    row = FONT_SIZE + 10
    left = x + max(font.getlength(row_name) for row_name in row_names) + 8
    draw.text((x, y + 4), name, fill="black", font=font)
    for column, column_name in enumerate(column_names):
        draw.text((left + column * cell + (cell - 4) / 2, y + row + 4), column_name,
                  fill="black", font=font, anchor="ma")
    for number, (row_name, stripes_of_row) in enumerate(zip(row_names, cells)):
        top = y + (number + 2) * row
        draw.text((x, top + 4), row_name, fill="black", font=font)
        for column, stripes in enumerate(stripes_of_row):
            width = (cell - 4) / len(stripes)
            for slot, (colour, text) in enumerate(stripes):
                edge = left + column * cell + slot * width
                draw.rectangle((edge, top, edge + width, top + row - 2), fill=colour,
                               outline="white")
                draw.text((edge + width / 2, top + 4), text, font=font, anchor="ma",
                          fill="white" if sum(colour) < 400 else "black")
    return left - x + len(column_names) * cell


def save_routing_picture(path, shares, caption, labels, experts, title) -> None:
    """The PNG: title and legend; the towers' heatmaps side by side; the caption's picks below."""
    num_experts, num_blocks, top_k = shares["image"].shape[1], experts.shape[0], experts.shape[2]
    even, shown, font = 100 / num_experts, labels[:ROUTING_TOKENS_SHOWN], picture_font()
    row, margin, gap = FONT_SIZE + 10, 16, 24
    # Picks in pale hues round the colour wheel, on which black numbers stay readable.
    palette = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(e / num_experts, 0.35, 1))
               for e in range(num_experts)]
    heatmaps = [(f"{tower} tower: % of picks per expert", [f"e{e}" for e in range(num_experts)],
                 [f"block {b}" for b in range(len(shares[tower]))],
                 [[[(share_colour(s, even), f"{s:.1f}")] for s in block]
                  for block in shares[tower].tolist()], font.getlength("100.0") + 10)
                for tower in ("image", "text")]
    picks = [[[(palette[e], str(e)) for e in token] for token in tokens]  # [tokens][blocks][k]
             for tokens in experts[:, : len(shown)].transpose(0, 1).tolist()]
    pick_cell = max(font.getlength(str(num_blocks)) + 8, top_k * (font.getlength("0") + 12))
    caption_table = ("caption: the experts each token picks, per text block",
                     [str(b) for b in range(num_blocks)], shown, picks, pick_cell)
    legend = text_block(
        f"{title}. Heatmaps: % of each block's top-{top_k} picks per expert; white: the even "
        f"share, {even:.1f} %; bluer: more (full blue at twice that); redder: fewer (full red at "
        f'none). Caption: "{caption}": the {top_k} experts each token (the first '
        f"{ROUTING_TOKENS_SHOWN} at most) picks at each text block, the larger weight on the "
        "left; colour = expert.", ROUTING_MAX_WIDTH, font)
    caption_top = legend.height + row * (max(len(s) for s in shares.values()) + 2) + gap
    picture = Image.new("RGB", (ROUTING_MAX_WIDTH, caption_top + row * (len(shown) + 2) + margin),
                        "white")
    picture.paste(legend)
    draw = ImageDraw.Draw(picture)
    heatmap_width = draw_table(draw, font, margin, legend.height, heatmaps[0])
    draw_table(draw, font, margin + heatmap_width + gap, legend.height, heatmaps[1])
    draw_table(draw, font, margin, caption_top, caption_table)
    picture.save(path, format="PNG")


def routing_main(args: argparse.Namespace, model: nn.Module, split, amp_dtype) -> int:
    if not isinstance(model, dm_adapter.DMAdapter):
        raise CheckpointError("--routing draws DM-Adapter's routers: it needs a checkpoint of "
                              "method dm_adapter")
    shares = routing_shares(model, split, args.image_size, args.device, amp_dtype,
                            args.batch_size, args.workers)
    caption = args.routing_caption or split.captions[0]
    labels, experts = caption_routing(model, caption, args.device, amp_dtype)
    # The checkpoint's file name, not its path: the picture is made to be shown, and a path tells
    # of the machine it was made on.
    title = (f"DM-Adapter routing of {os.path.basename(args.checkpoint)} on {args.data} "
             f"{args.split}: {len(split.image_paths):,} images, {len(split.captions):,} captions "
             "(text padding not counted)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "routing.png")
    save_routing_picture(path, shares, caption, labels, experts, title)
    for tower, tower_shares in shares.items():
        print(f"{tower} tower: each expert gets {float(tower_shares.min()):.1f} to "
              f"{float(tower_shares.max()):.1f} % of a block's picks "
              f"(even: {100 / tower_shares.shape[1]:.1f} %)")
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# The command line: flags and main
# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # A flag without a default shows none in --help (SUPPRESS); it is None unless given.
    parser = data.ArgumentParser(
        description="Evaluate a trained checkpoint, or frozen CLIP zero-shot, on a dataset split; "
        "draw what was retrieved.", argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", nargs="+", dest="checkpoints", metavar="CHECKPOINT",
                       help="a best.pt or last.pt of train.py; several (runs of one method, "
                       "dataset and image size, e.g. seeds) add their mean ± sample std")
    model.add_argument("--method", choices=["clip"], help="'clip': frozen CLIP, zero-shot")
    add("--clip", default="ViT-B/16", help="with --method clip: a release name or a file "
        "(OpenAI's, a state dict, or IRRA's released model)")
    add("--image-size", type=data.number(int, minimum=1), nargs=2, metavar=("H", "W"),
        help="with --method clip: input size [384 128]; a checkpoint uses its own")
    add("--stride", type=data.number(int, minimum=1),
        help="with --method clip: patch stride [16]; a checkpoint uses its own")
    add("--data", choices=list(data.DATASETS), help="dataset [the checkpoint's own]")
    add("--root", default="data", help="folder holding the datasets")
    add("--split", default="test", choices=["test", "val"], help="which split to evaluate")
    add("--direction", default="t2i", choices=[*DIRECTIONS, "both"],
        help="t2i: each caption ranks the images (the papers' tables); i2t: each image ranks "
        "the captions (IRRA's i2t_metric); both: a table for each")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    add("--precision", default="auto", choices=["auto", *PRECISIONS],
        help="autocast: auto is bf16 on GPUs of compute capability 8+, else fp16; fp32 on CPUs")
    add("--batch-size", type=data.number(int, minimum=1), default=256,
        help="images or captions per batch")
    add("--workers", type=data.number(int, minimum=0), default=min(8, os.cpu_count() or 1),
        help="image-loading processes")
    add("--query", action="append",
        help="a free-text query: draw its best-matching gallery images (repeat for several)")
    add("--topk", type=data.number(int, minimum=1), default=10, help="images per picture")
    add("--save-examples", type=data.number(int, minimum=0), default=0, metavar="N",
        help="draw the results of N test queries (green: right identity, red: wrong)")
    add("--out", default="retrieval", help="folder for the pictures (made only to hold one)")
    add("--gallery", metavar="DIR", help="rank every .jpg/.jpeg/.png/.webp under DIR for each "
        f"--query instead of a dataset split; features are cached in --out/{GALLERY_CACHE_FILE}")
    add("--routing", action="store_true", default=False,
        help="draw which experts a dm_adapter checkpoint's routers pick on the split "
        "(<out>/routing.png) instead of evaluating it")
    add("--routing-caption", metavar="TEXT",
        help="the caption whose per-token picks are drawn [the split's first]")
    unset = dict.fromkeys(["checkpoints", "method", "image_size", "stride", "data", "query",
                           "gallery", "routing_caption"])
    args = argparse.Namespace(**{**unset, **vars(parser.parse_args(argv))})
    checkpoints = args.checkpoints or []
    if len(checkpoints) > 1 and (args.query or args.save_examples or args.gallery or args.routing):
        parser.error("argument --checkpoint: --query, --save-examples, --gallery and --routing "
                     "work on one checkpoint; several are for a table of runs")
    files = [os.path.realpath(path) for path in checkpoints]
    twice = [path for path, file in zip(checkpoints, files) if files.count(file) > 1]
    if twice:
        parser.error(f"argument --checkpoint: {twice[0]} is given twice; a mean over runs counts "
                     "each run once")
    if checkpoints and (args.image_size or args.stride):
        parser.error("argument --image-size/--stride: a checkpoint is evaluated at the size and "
                     "stride it was trained with; these flags go with --method clip")
    if args.method == "clip" and args.data is None and not args.gallery:
        parser.error("argument --data: --method clip needs a dataset")
    try:
        args.device = pick_device(args.device)
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    if args.query is not None and not all(query.strip() for query in args.query):
        parser.error("argument --query: the query is empty")
    if args.gallery and not args.query:
        parser.error("argument --gallery: needs at least one --query")
    if args.query or args.save_examples or args.routing:
        data.check_output_folder(parser, "--out", args.out)
    # The one checkpoint that pictures, folder search and routing read (None: zero-shot CLIP).
    args.checkpoint = checkpoints[0] if checkpoints else None
    args.directions = list(DIRECTIONS) if args.direction == "both" else [args.direction]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_device(args.device)
    amp_dtype = autocast_dtype(args.precision, args.device)
    try:
        if args.checkpoints:  # every file is read and compared before any model is built
            runs = {path: read_run(path) for path in args.checkpoints}
            check_runs_agree(runs)
            first = next(iter(runs.values()))
            args.image_size = tuple(first["clip"]["image_size"])
            args.stride = first["clip"]["stride"]
            args.data = args.data or first["data"]
            # One run's row is named by its method, as in train.py's table; several by their files.
            names = {path: first["method"] if len(runs) == 1 else path for path in runs}
            models = (load_checkpoint(path, args.device)[0] for path in runs)  # one at a time
        else:
            args.image_size, args.stride = tuple(args.image_size or (384, 128)), args.stride or 16
            clip_model = clip_min.load(args.clip, args.image_size, args.stride, args.device)
            runs, names = {args.clip: None}, {args.clip: f"{args.clip} zero-shot"}
            models = iter([build_method("clip", clip_model, {})])
        if args.gallery:
            return search_folder_main(args, next(models), amp_dtype)
        dataset = data.load_dataset(args.data, args.root)
        split = dataset.val if args.split == "val" else dataset.test
        if split is None:
            raise data.DataError(f"{args.data} has no val split")
        if args.routing:
            return routing_main(args, next(models), split, amp_dtype)
        loaders = data.eval_loaders(split, args.image_size, args.batch_size, args.workers,
                                    args.device.type == "cuda")
        tables = {direction: {} for direction in args.directions}  # {direction: {row: metrics}}
        for source, model in zip(runs, models):
            images, captions = extract_features(model, *loaders, args.device, amp_dtype)
            similarity = captions @ images.T  # [Q, G]
            for direction, rows in tables.items():
                rows[names[source]] = directional_metrics(similarity, split.caption_pids,
                                                          split.image_pids, direction)
        print_tables(args, dataset, split, tables, runs)
        if args.query:
            queries = encode_queries(model, args.query, args.device, amp_dtype)  # [Q, E]
            picture_names = ["query.png"]
            if len(args.query) > 1:
                picture_names = [f"query_{number}.png" for number in range(1, len(args.query) + 1)]
            draw_rankings(args.out, picture_names, args.query, queries @ images.T, split, args.topk)
        if args.save_examples:  # spread evenly over the split: a fair sample, not the easiest
            spread = np.linspace(0, len(split.captions) - 1, args.save_examples).astype(int)
            rows = torch.from_numpy(spread)
            draw_rankings(args.out, [f"example_{n:02d}.png" for n in range(len(rows))],
                          [split.captions[row] for row in rows], similarity[rows], split,
                          args.topk, split.caption_pids[rows])
    except (data.DataError, clip_min.CLIPError, CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def print_tables(args, dataset: data.Dataset, split: data.EvalSplit, tables, runs) -> None:
    """The dataset's verdict, the table of each direction, what each checkpoint was selected on."""
    cut = (f"; {split.num_truncated:,} captions cut to {clip_min.CONTEXT_LENGTH} tokens"
           if split.num_truncated else "")
    print(dataset.verdict)  # the copy on disk against the published counts
    print(f"{args.data} {args.split}, {len(split.image_paths):,} images{cut}:")
    for direction, rows in tables.items():
        measured = next(iter(rows.values()))  # the same queries for every run
        queries, gallery = ("captions", "images") if direction == "t2i" else ("images", "captions")
        skipped = measured["num_skipped"]
        left_out = f", {skipped:,} without a relevant {gallery[:-1]} left out" if skipped else ""
        print(f"{DIRECTIONS[direction]} ({direction}): {measured['num_queries']:,} {queries} rank "
              f"the {gallery}{left_out}")
        if len(rows) > 1:
            rows = {**rows, f"mean ± std of {len(rows)} runs": mean_and_std(list(rows.values()))}
        print(format_table({**rows, "chance": chance_metrics(split, direction=direction)}))
    if len(runs) > 1:
        print(f"std: the sample standard deviation (n - 1) over the n = {len(runs)} runs")
    for source, run in runs.items():
        if run is not None:
            record = selection_record(run)
            check = record.get("dataset_check")
            check = f"; dataset check: {check}" if check else ""
            print(f"{source}: {run['method']} trained on {run['data']}, selected on "
                  f"{record['selected_on']}{check}")


if __name__ == "__main__":
    sys.exit(main())
