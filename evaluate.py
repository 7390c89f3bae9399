"""Retrieval metrics and evaluation for text-based person retrieval (TPR), and train.py's checkpoints.

The metrics are those of IRRA (Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning
for Text-to-Image Person Retrieval", CVPR 2023, arXiv 2303.12501), reproduced exactly: every
published TPR number, CSKT's and DM-Adapter's included, is measured with them. Each query ranks
the whole gallery by descending similarity. If query q has n relevant gallery items (same
identity) at 0-based ranks r_1 < r_2 < ... < r_n, then

    R@k  = mean over q of [r_1 < k]                 (k = 1, 5, 10)
    AP   = (1/n) * sum_{j=1..n} j / (r_j + 1)       (precision at each relevant item)
    INP  = n / (r_n + 1)                            (precision at the last relevant item)
    mAP  = mean over q of AP,   mINP = mean over q of INP,   all reported in percent.

Queries go in chunks; each row is sorted by value only, the rank of every relevant item is a
binary search of its score in the sorted row, and AP and INP follow from those ranks in closed
form, with no loop over queries and no [Q, G] index matrices. Queries without a relevant item are
excluded and counted; ties follow a stated rule (see `retrieval_metrics`).

The file also extracts features from any model with `encode_image` / `encode_text`, holds the
device and precision policy both scripts share, saves and rebuilds the checkpoints train.py
writes, draws pictures of what was retrieved, and is a command line:

    python evaluate.py --checkpoint runs/cuhk-cskt/best.pt                 # the test split's table
    python evaluate.py --checkpoint cuhk/best.pt --data ICFG-PEDES         # across datasets
    python evaluate.py --method clip --clip ViT-B/16 --data CUHK-PEDES      # frozen CLIP, zero-shot
    python evaluate.py --checkpoint best.pt --query "a man in a blue jacket" --topk 10
    python evaluate.py --checkpoint best.pt --save-examples 8              # green: right identity
"""

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image

import clip_min
import cskt
import data
import dm_adapter

# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def _group_gallery_by_identity(gallery_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each identity in the gallery, the indices of its gallery items, padded to one width.

    Returns (identities [U] sorted, members [U, M] gallery indices, counts [U]); slot m of row u
    is a real member only when m < counts[u] (padding slots hold some valid index: mask them).
    """
    order = gallery_pids.argsort(stable=True)                                   # [G]
    identities, counts = torch.unique_consecutive(gallery_pids[order], return_counts=True)
    starts = counts.cumsum(0) - counts                                          # [U]
    slots = torch.arange(int(counts.max()), device=gallery_pids.device)         # [M]
    positions = (starts[:, None] + slots).clamp(max=len(order) - 1)             # [U, M]
    return identities, order[positions], counts


def _sort_rows(scores: torch.Tensor) -> torch.Tensor:
    """Each row of scores [C, G] sorted ascending, values only."""
    if scores.device.type == "cpu":
        # numpy's sort is vectorised (x86-simd-sort, AVX-512 / AVX2): 0.08 s against 1.1 s for
        # torch.sort on a 1024 x 15,000 chunk, measured on 2 cores. Elsewhere torch.sort is fast.
        rows = scores.numpy().copy()         # a dense row-major copy, even of a transposed view
        rows.sort(axis=1)
        return torch.from_numpy(rows)
    return scores.sort(dim=1).values


def retrieval_metrics(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                      chunk_size: int = 1024) -> dict:
    """R1, R5, R10, mAP and mINP in percent, exactly as defined in the module docstring.

    similarity [Q, G]: one row per query, higher = more similar; query_pids [Q]; gallery_pids [G].
    Text-to-image is the default reading (rows are captions, columns images); for image-to-text
    pass the transpose: `retrieval_metrics(similarity.T, image_pids, caption_pids)`.

    Queries with no relevant gallery item have no rank to measure: they are left out of every
    mean and their number is returned as "num_skipped" ("num_queries" counts the ones measured).
    If no query can be measured, the five metrics are NaN. A NaN score is an error.

    Ties (never seen with real features, but a collapsed model makes every score equal): a relevant
    item tied with irrelevant ones is ranked after them, and relevant items tied with each other
    take consecutive ranks. A model cannot gain from ties, and the result does not depend on the
    gallery order. IRRA's argsort leaves the order of ties unspecified.

    Work happens on the device of `similarity`, `chunk_size` queries at a time; the temporaries
    are one or two copies of a chunk (60-120 MB at the default for G = 15,000).
    """
    if similarity.dim() != 2 or similarity.shape != (len(query_pids), len(gallery_pids)):
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match "
                         f"{len(query_pids)} query and {len(gallery_pids)} gallery identities")
    if len(gallery_pids) == 0:
        raise ValueError("the gallery is empty")
    similarity = similarity.detach()
    device = similarity.device
    query_pids, gallery_pids = query_pids.to(device, torch.long), gallery_pids.to(device, torch.long)

    # Which gallery items are relevant to each query, as a short index list per identity: the
    # relevant scores of a query are then a gather of M values, not a mask over all G.
    identities, members, counts = _group_gallery_by_identity(gallery_pids)      # [U], [U, M], [U]
    row = torch.searchsorted(identities, query_pids).clamp(max=len(identities) - 1)  # [Q]
    in_gallery = identities[row] == query_pids                                  # [Q]
    num_relevant = torch.where(in_gallery, counts[row], 0)                      # [Q]
    slots = torch.arange(members.shape[1], device=device)                       # [M]

    hits = {1: 0.0, 5: 0.0, 10: 0.0}
    ap_sum = inp_sum = 0.0
    for start in range(0, len(query_pids), chunk_size):
        chunk = slice(start, start + chunk_size)
        # Half precision is widened (exactly; numpy has no bf16), fp32 and fp64 stay as they are.
        scores = similarity[chunk].to(torch.promote_types(similarity.dtype, torch.float32))  # [C, G]
        n = num_relevant[chunk]                                                 # [C]
        is_relevant_slot = slots < n[:, None]                                   # [C, M]
        # The relevant scores of each query, best first; padding slots become -inf, sort last.
        relevant_scores = scores.gather(1, members[row[chunk]])                 # [C, M]
        relevant_scores = relevant_scores.masked_fill(~is_relevant_slot, float("-inf"))
        relevant_scores = relevant_scores.sort(dim=1, descending=True).values   # [C, M]

        sorted_scores = _sort_rows(scores)                                      # [C, G] ascending
        if sorted_scores[:, -1].isnan().any():                                  # NaN sorts last
            raise ValueError(f"similarity has NaN values in rows {start}..{start + len(scores) - 1}")
        # The left insertion point of a score counts the items strictly below it, so the rest
        # score at least as high (">=": the tie rule). Taking away the relevant ones among them
        # leaves the irrelevant items ranked ahead of the j-th best relevant item; the j relevant
        # items before it complete its 0-based rank.
        at_or_above = len(gallery_pids) - torch.searchsorted(sorted_scores, relevant_scores)  # [C, M]
        relevant_at_or_above = ((relevant_scores[:, None, :] >= relevant_scores[:, :, None])
                                & is_relevant_slot[:, None, :]).sum(2)          # [C, M, M] -> [C, M]
        ranks = at_or_above - relevant_at_or_above + slots                      # [C, M], real for j < n

        measured = n > 0                                                        # [C]
        # float64 for the few values per query, so AP = 5/6 prints as 83.3333333..., not ...373.
        ranks_plus_one = (ranks + 1).double()
        precision_at_hit = (slots + 1).double() / ranks_plus_one                # [C, M]
        ap = (precision_at_hit * is_relevant_slot).sum(1) / n.clamp(min=1)      # [C]
        last_rank_plus_one = ranks_plus_one.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
        inp = n / last_rank_plus_one                                            # [C]
        for k in hits:
            hits[k] += (measured & (ranks[:, 0] < k)).sum().item()
        ap_sum += ap[measured].sum().item()
        inp_sum += inp[measured].sum().item()

    num_queries = int((num_relevant > 0).sum())
    percent = 100.0 / num_queries if num_queries else float("nan")
    return {"R1": hits[1] * percent, "R5": hits[5] * percent, "R10": hits[10] * percent,
            "mAP": ap_sum * percent, "mINP": inp_sum * percent,
            "num_queries": num_queries, "num_skipped": len(query_pids) - num_queries}



# ------------------------------------------------------------------------------------------------
# Device and precision: one policy for training and evaluation
# ------------------------------------------------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device -> a torch device. "auto": this process's GPU, else Apple's, else the CPU. A GPU
    named without an index ("cuda") is this process's (torchrun's LOCAL_RANK). A device that is
    not there raises ValueError with a message for the user."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: this machine has no CUDA GPU that torch can use")
        device = device if device.index is not None else torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{device}: there are only {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: Apple's GPU (MPS) is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: only cpu, cuda and mps devices are supported")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """--precision -> the autocast dtype (None: fp32 throughout). "auto" is bf16 on GPUs that have
    it (no overflow, no loss scaling), else fp16; fp32 on the CPU, where autocast rarely pays."""
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    return next(name for name, dtype in PRECISIONS.items() if dtype == amp_dtype)


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision around a forward pass; a no-op for fp32. Weights stay fp32 either way."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------

def _encode_batches(encode: Callable, loader: Iterable, device: torch.device, name: str,
                    log_every: int) -> torch.Tensor:
    """Encode every batch of `loader` (plain tensors) and return the L2-normalised fp32 features."""
    features = []
    for batch_index, batch in enumerate(loader):
        # non_blocking overlaps the copy with compute when the loader pins memory.
        features.append(F.normalize(encode(batch.to(device, non_blocking=True)).float(), dim=-1))
        if log_every and (batch_index + 1) % log_every == 0:
            print(f"  encoded {batch_index + 1} batches of {name}", file=sys.stderr)
    return torch.cat(features)


def extract_features(model: nn.Module, image_loader: Iterable, caption_loader: Iterable,
                     device: torch.device | str, amp_dtype: torch.dtype | None = None,
                     log_every: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features [G, E] and caption features [Q, E], L2-normalised, fp32, on `device`.

    `model` (already on `device`) needs `encode_image(images [B, 3, H, W]) -> [B, E]` and
    `encode_text(ids [B, 77]) -> [B, E]`. `image_loader` yields image tensors [B, 3, H, W],
    `caption_loader` token-id tensors [B, 77], both in gallery / query order. `amp_dtype` is the
    autocast dtype (see `autocast_dtype`; None: fp32); the features are normalised in fp32 either
    way, so the metric sees full-precision dot products. A progress line goes to stderr every
    `log_every` batches (0: never). The model's train/eval mode is restored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, amp_dtype):
        image_features = _encode_batches(model.encode_image, image_loader, device, "images", log_every)
        caption_features = _encode_batches(model.encode_text, caption_loader, device, "captions", log_every)
    model.train(was_training)
    return image_features, caption_features


def similarity_from_features(caption_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [Q, G] of normalised caption features [Q, E] and image features [G, E]:
    one row per caption, the text-to-image layout that `retrieval_metrics` reads."""
    return caption_features @ image_features.T


# ------------------------------------------------------------------------------------------------
# Evaluating a model on a split, and tables of results
# ------------------------------------------------------------------------------------------------

def evaluate_split(model: nn.Module, split: data.EvalSplit, image_size: tuple[int, int],
                   device: torch.device | str, amp_dtype: torch.dtype | None = None,
                   batch_size: int = 256, workers: int = 0) -> dict:
    """Text-to-image metrics of `model` on an EvalSplit (data.py), images at `image_size` (H, W)."""
    loaders = data.eval_loaders(split, image_size, batch_size, workers)
    return evaluate_loaders(model, loaders, split, device, amp_dtype)


def evaluate_loaders(model: nn.Module, loaders: tuple[DataLoader, DataLoader], split: data.EvalSplit,
                     device: torch.device | str, amp_dtype: torch.dtype | None = None) -> dict:
    """The same with the split's (image, caption) loaders already built: train.py builds its val
    loaders once (the captions tokenized once, the image workers kept) and evaluates every few epochs."""
    image_features, caption_features = extract_features(model, *loaders, device, amp_dtype)
    similarity = similarity_from_features(caption_features, image_features)  # [Q, G]
    return retrieval_metrics(similarity, split.caption_pids, split.image_pids)


def chance_metrics(split: data.EvalSplit, seed: int = 0) -> dict:
    """The metrics of a random ranking (one draw of uniform scores): the floor to compare with."""
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.rand(len(split.caption_pids), len(split.image_pids), generator=generator)
    return retrieval_metrics(similarity, split.caption_pids, split.image_pids)


METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")


def format_metrics(metrics: dict) -> str:
    skipped = f", {metrics['num_skipped']} without a relevant image skipped" if metrics["num_skipped"] else ""
    return ("  ".join(f"{name} {metrics[name]:6.2f}" for name in METRIC_NAMES)
            + f"  ({metrics['num_queries']:,} queries{skipped})")


def format_table(rows: dict[str, dict]) -> str:
    """{row name: metrics} -> a Markdown table, in percent."""
    width = max(len(name) for name in rows)
    lines = [f"| {'':{width}} | " + " | ".join(f"{name:>6}" for name in METRIC_NAMES) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * 8 for _ in METRIC_NAMES) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name:{width}} | " + " | ".join(f"{metrics[m]:6.2f}" for m in METRIC_NAMES) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Checkpoints: what train.py saves, and the models rebuilt from them
# ------------------------------------------------------------------------------------------------
# A checkpoint holds what was trained ("trainable") and how to rebuild the rest ("clip"): the
# name of an OpenAI release (downloaded and hash-checked when read), or the frozen backbone's
# weights themselves. CSKT and DM-Adapter keep their frozen CLIP under the name "clip.", so that
# prefix is the line between the two. The authors' code saved no checkpoints at all.

BACKBONE_PREFIX = "clip."  # parameter names of the frozen CLIP inside CSKT and DM-Adapter
METHODS = ("cskt", "dm_adapter", "finetune")  # what train.py trains ("clip": frozen, zero-shot)


class CheckpointError(Exception):
    """A checkpoint that cannot be read, written, or fitted to the model it describes."""


def build_method(method: str, clip_model: clip_min.CLIP, method_args: dict) -> nn.Module:
    """The model for `method` around `clip_model`: "cskt", "dm_adapter", "finetune" (every CLIP
    weight trains) or "clip" (frozen CLIP, for zero-shot evaluation)."""
    if method == "cskt":
        return cskt.CSKT(clip_model, **method_args)
    if method == "dm_adapter":
        return dm_adapter.DMAdapter(clip_model, **method_args)
    if method == "finetune":
        clip_model.requires_grad_(True)
        # SDM fixes the temperature, so CLIP's own never gets a gradient; a weight that trains
        # without one would also stall DDP, which waits for every trainable weight's gradient.
        clip_model.logit_scale.requires_grad_(False)
        return clip_model
    if method == "clip":
        return clip_model.requires_grad_(False)
    raise ValueError(f"unknown method {method!r}")


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight but the frozen backbone's (a fine-tuned CLIP has no frozen part: all of it)."""
    return {name: v.detach().cpu() for name, v in model.state_dict().items() if not name.startswith(BACKBONE_PREFIX)}


def describe_backbone(method: str, clip_name: str, clip_sha256: str, clip_model: clip_min.CLIP) -> dict:
    """How `load_checkpoint` gets the frozen CLIP back: a release by name (hash-checked on use),
    else the weights themselves (the file may not exist where the checkpoint is read). A
    fine-tuned CLIP needs neither: all of it is in the trained state."""
    config = clip_model.config
    backbone = {"name": clip_name, "sha256": clip_sha256, "image_size": list(config.image_size),
                "stride": config.stride}
    if method == "finetune" or clip_name in clip_min.RELEASES:
        return backbone
    return {**backbone, "state_dict": {k: v.detach().cpu() for k, v in clip_model.state_dict().items()}}


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Atomic and durable: written beside `path`, flushed to the disk, renamed over it, and the
    rename flushed too. A save that fails (a full or read-only disk) leaves the previous file."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        with contextlib.suppress(OSError, AttributeError):  # folders cannot be opened on Windows
            folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(temporary)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise CheckpointError(f"could not save {path}: {reason}; the previous "
                              f"{os.path.basename(path)}, if any, is kept") from None


def read_checkpoint(path: str) -> dict:
    """The dict train.py saved at `path`, loaded without running code from the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a checkpoint written by train.py ({reason})") from None
    if not isinstance(checkpoint, dict) or not {"method", "method_args", "clip", "trainable", "args"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (no method, clip and trainable)")
    return checkpoint


def load_trained(model: nn.Module, trained: dict, source: str) -> None:
    """Puts a checkpoint's trained weights into `model`, whose frozen backbone is already in
    place; every other weight must be there, and nothing else."""
    try:
        missing, unexpected = model.load_state_dict(trained, strict=False)
    except RuntimeError as error:  # a shape mismatch
        raise CheckpointError(f"{source} does not fit this model: {str(error).splitlines()[-1].strip()}") from None
    not_restored = [key for key in missing if not key.startswith(BACKBONE_PREFIX)]
    if unexpected or not_restored:
        raise CheckpointError(f"{source} does not fit this model: unexpected weights "
                              f"{unexpected or 'none'}, missing {not_restored or 'none'}")


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, checkpoint) from a best.pt or last.pt that train.py wrote."""
    checkpoint = read_checkpoint(path)
    backbone = checkpoint["clip"]
    image_size, stride = tuple(backbone["image_size"]), backbone["stride"]
    if checkpoint["method"] == "finetune":
        clip_model = clip_min.build_model(checkpoint["trainable"], image_size, stride)
    elif "state_dict" in backbone:
        clip_model = clip_min.build_model(backbone["state_dict"], image_size, stride)
    else:
        clip_model = clip_min.load(backbone["name"], image_size, stride)  # checks the release's hash
    model = build_method(checkpoint["method"], clip_model, checkpoint["method_args"])
    load_trained(model, checkpoint["trainable"], path)
    return model.to(device).eval(), checkpoint


# ------------------------------------------------------------------------------------------------
# Pictures of what was retrieved
# ------------------------------------------------------------------------------------------------

GRID_PADDING = 8       # pixels around every cell and the text
OUTLINE_WIDTH = 3      # the green / red frame drawn inside the padding
GRID_MIN_WIDTH = 320   # so that a short row still leaves room for the query text
CORRECT_COLOUR = (0, 170, 0)
WRONG_COLOUR = (220, 0, 0)


def _as_rgb_image(image: str | Image.Image | torch.Tensor) -> Image.Image:
    """A PIL image from a file path, a PIL image, or a float tensor [3, H, W] with values in [0, 1]
    (undo the normalisation first)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        return to_pil_image(image.detach().float().clamp(0, 1).cpu())
    return data.load_image(str(image))


def _word_gap(font: ImageFont.ImageFont, draw: ImageDraw.ImageDraw) -> float:
    """The space between two words. Pillow's built-in font draws " " 2 pixels wide, which runs
    the words of a line together ("short sleevesand"); half an "m" reads as a space."""
    return max(draw.textlength(" ", font=font), draw.textlength("m", font=font) / 2)


def _wrap_to_width(text: str, font: ImageFont.ImageFont, draw: ImageDraw.ImageDraw,
                   width: float) -> list[list[str]]:
    """Greedy word wrap measured in pixels -> lines of words (a word wider than `width` gets a
    line of its own)."""
    gap, lines, line_width = _word_gap(font, draw), [], 0.0
    for word in text.split():
        word_width = draw.textlength(word, font=font)
        if lines and line_width + gap + word_width <= width:
            lines[-1].append(word)
            line_width += gap + word_width
        else:
            lines.append([word])
            line_width = word_width
    return lines or [[]]


def _draw_words(draw: ImageDraw.ImageDraw, x: float, y: float, words: list[str], font: ImageFont.ImageFont) -> None:
    gap = _word_gap(font, draw)
    for word in words:
        draw.text((x, y), word, fill="black", font=font)
        x += draw.textlength(word, font=font) + gap


def save_retrieval_grid(path: str, query: str, images: list, scores: list[float],
                        correct: list[bool] | None = None, cell_size: tuple[int, int] = (192, 64),
                        columns: int = 10) -> None:
    """Write a PNG: the query text on top, then the retrieved images in rank order, `columns` per
    row, each with its score underneath and, when `correct` is given, a green (right identity) or
    red (wrong identity) frame. `correct=None` (a free-text query has no identity) draws no frame.

    images: file paths, PIL images or [3, H, W] tensors in [0, 1]; cell_size: (height, width) of
    the box each image is fitted into, 3:1 by default like the 384x128 person crops.
    """
    if len(scores) != len(images) or (correct is not None and len(correct) != len(images)):
        raise ValueError(f"{len(images)} images need as many scores ({len(scores)}) and "
                         f"correct flags ({'none' if correct is None else len(correct)})")
    cell_height, cell_width = cell_size
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = measure.textbbox((0, 0), "Ag", font=font)
    line_height = bottom - top + 4

    num_columns = max(1, min(columns, len(images)))
    num_rows = -(-len(images) // num_columns)                          # ceil division
    cell_pitch_x = cell_width + 2 * GRID_PADDING
    cell_pitch_y = cell_height + 2 * GRID_PADDING + line_height        # image, then its score line
    width = max(num_columns * cell_pitch_x, GRID_MIN_WIDTH)
    query_lines = _wrap_to_width(query, font, measure, width - 2 * GRID_PADDING)
    header_height = 2 * GRID_PADDING + len(query_lines) * line_height
    canvas = Image.new("RGB", (width, header_height + num_rows * cell_pitch_y), "white")
    draw = ImageDraw.Draw(canvas)

    for line_index, words in enumerate(query_lines):
        _draw_words(draw, GRID_PADDING, GRID_PADDING + line_index * line_height, words, font)
    for index, (image, score) in enumerate(zip(images, scores)):
        x = (index % num_columns) * cell_pitch_x + GRID_PADDING
        y = header_height + (index // num_columns) * cell_pitch_y + GRID_PADDING
        # Fitted with its aspect ratio kept (demo images are 2:1, real crops 3:1), centred on white.
        fitted = ImageOps.pad(_as_rgb_image(image), (cell_width, cell_height), Image.BILINEAR, color="white")
        canvas.paste(fitted, (x, y))
        if correct is not None:
            # The frame sits just outside the image, in the padding, so it hides no pixel of it.
            draw.rectangle((x - OUTLINE_WIDTH, y - OUTLINE_WIDTH,
                            x + cell_width + OUTLINE_WIDTH - 1, y + cell_height + OUTLINE_WIDTH - 1),
                           outline=CORRECT_COLOUR if correct[index] else WRONG_COLOUR,
                           width=OUTLINE_WIDTH)
        label = f"{score:.3f}"
        label_x = x + (cell_width - draw.textlength(label, font=font)) / 2
        draw.text((label_x, y + cell_height + OUTLINE_WIDTH + 2), label, fill="black", font=font)
    canvas.save(path, format="PNG")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def number(kind: type, minimum: float | None = None, above: float | None = None,
           below: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite `kind` (int or float) with bounds, so that a bad value is the
    parser's one-line error (exit 2) rather than a traceback halfway through a run."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be less than {below}, got {text}")
        return value
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line (exit 2) that names it and what is allowed,
    without the usage block, which for train.py is longer than the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_output_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """A folder we may create or write into: not a file, and under a writable existing parent."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"argument {flag}: {folder} is a file, not a folder")
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"argument {flag}: cannot write into {parent} (read-only or not a folder)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Evaluate a trained checkpoint, or frozen CLIP zero-shot, "
                                     "on a dataset split; optionally draw what was retrieved.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a best.pt or last.pt written by train.py")
    model.add_argument("--method", choices=["clip"], help="'clip': evaluate frozen CLIP zero-shot (a baseline)")
    parser.add_argument("--clip", default="ViT-B/16", help="with --method clip: a release name or checkpoint file")
    parser.add_argument("--image-size", type=number(int, minimum=1), nargs=2, default=None, metavar=("H", "W"),
                        help="with --method clip: input size (default 384 128); a checkpoint uses its own")
    parser.add_argument("--stride", type=number(int, minimum=1), default=None,
                        help="with --method clip: patch stride (default 16); a checkpoint uses its own")
    parser.add_argument("--data", default=None, choices=list(data.DATASETS),
                        help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--root", default="data", help="folder holding the datasets")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="which split to evaluate")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast dtype: auto is bf16 on GPUs that have it, else fp16; fp32 on the CPU")
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=256, help="images or captions per batch")
    parser.add_argument("--workers", type=number(int, minimum=0), default=min(8, os.cpu_count() or 1),
                        help="image-loading processes")
    parser.add_argument("--query", help="a free-text query: draw its best-matching gallery images")
    parser.add_argument("--topk", type=number(int, minimum=1), default=10, help="images per picture")
    parser.add_argument("--save-examples", type=number(int, minimum=0), default=0, metavar="N",
                        help="draw the results of N test queries (green: right identity, red: wrong)")
    parser.add_argument("--out", default="retrieval", help="folder for the pictures (made only to hold one)")
    args = parser.parse_args(argv)
    if args.checkpoint and (args.image_size or args.stride):
        parser.error("argument --image-size/--stride: a checkpoint is evaluated at the size and stride it was "
                     "trained with; these flags go with --method clip")
    if args.method == "clip" and args.data is None:
        parser.error("argument --data: --method clip needs a dataset")
    try:
        args.device = pick_device(args.device)
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    if args.query is not None and not args.query.strip():
        parser.error("argument --query: the query is empty")
    if args.query or args.save_examples:
        check_output_folder(parser, "--out", args.out)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    amp_dtype = autocast_dtype(args.precision, args.device)
    try:
        if args.checkpoint:
            model, checkpoint = load_checkpoint(args.checkpoint, args.device)
            image_size = tuple(checkpoint["clip"]["image_size"])
            name, dataset_name = checkpoint["method"], args.data or checkpoint["data"]
        else:
            image_size = tuple(args.image_size or (384, 128))
            clip_model = clip_min.load(args.clip, image_size, args.stride or 16, args.device)
            model, name, dataset_name = build_method("clip", clip_model, {}), f"{args.clip} zero-shot", args.data
        dataset = data.load_dataset(dataset_name, args.root)
        split = dataset.val if args.split == "val" else dataset.test
        if split is None:
            raise data.DataError(f"{dataset_name} has no val split")
        image_loader, caption_loader = data.eval_loaders(split, image_size, args.batch_size, args.workers)
        image_features, caption_features = extract_features(model, image_loader, caption_loader, args.device, amp_dtype)
        similarity = similarity_from_features(caption_features, image_features)  # [Q, G]
        metrics = retrieval_metrics(similarity, split.caption_pids, split.image_pids)
        cut = f"; {split.num_truncated:,} captions cut to 77 tokens" if split.num_truncated else ""
        print(f"{dataset_name} {args.split}, {len(split.image_paths):,} images{cut}:")
        print(format_table({name: metrics, "chance": chance_metrics(split)}))

        topk = min(args.topk, len(split.image_paths))
        if args.query:
            os.makedirs(args.out, exist_ok=True)
            with torch.no_grad(), autocast(args.device, amp_dtype):
                query_ids = clip_min.tokenize(args.query, truncate=True).to(args.device)  # [1, 77]
                query = F.normalize(model.encode_text(query_ids).float(), dim=-1)     # [1, E]
            scores, indices = (query @ image_features.T)[0].topk(topk)
            path = os.path.join(args.out, "query.png")
            save_retrieval_grid(path, args.query, [split.image_paths[i] for i in indices.tolist()], scores.tolist())
            print(f"wrote {path}")
        if args.save_examples:
            os.makedirs(args.out, exist_ok=True)
            # Evenly spread over the split, so that the pictures are a fair sample, not the easiest.
            for example, q in enumerate(np.linspace(0, len(split.captions) - 1, args.save_examples).astype(int)):
                scores, indices = similarity[q].topk(topk)
                correct = (split.image_pids[indices.cpu()] == split.caption_pids[q]).tolist()
                path = os.path.join(args.out, f"example_{example:02d}.png")
                save_retrieval_grid(path, split.captions[q], [split.image_paths[i] for i in indices.tolist()],
                                    scores.tolist(), correct)
                print(f"wrote {path}")
    except (data.DataError, clip_min.CLIPError, CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
