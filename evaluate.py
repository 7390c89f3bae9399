"""What train.py and evaluate.py share, then evaluate.py's own command line: two parts in one file.

The name says "evaluate", but half of this file is the code train.py runs too: the retrieval
metrics it reports every few epochs, the device and precision policy, the checkpoints it writes
and the flag conventions of both scripts. Part II is what only `python evaluate.py` does.

    Part I   what train.py also uses
      I.1  Metrics: R@k, mAP, mINP, text-to-image and image-to-text
      I.2  Device and precision: one policy for training and evaluation
      I.3  Features: encoding a split's images and captions, and free-text queries
      I.4  Evaluating a model on a split, and tables of results (one run, or mean ± std of several)
      I.5  Checkpoints: saving and reading them, building a method around a CLIP, runs to average
    Part II  evaluate.py's command line
      II.1 Pictures of what was retrieved
      II.2 Searching a folder of images
      II.3 DM-Adapter's routing
      II.4 The command line: parse_args and main

The metrics are those of IRRA (Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning
for Text-to-Image Person Retrieval", CVPR 2023, arXiv 2303.12501), reproduced exactly: every
published TPR number, CSKT's and DM-Adapter's included, is measured with them. Each query ranks
the whole gallery by descending similarity. If query q has n relevant gallery items (same
identity) at 0-based ranks r_1 < r_2 < ... < r_n, then

    R@k  = mean over q of [r_1 < k]                 (k = 1, 5, 10)
    AP   = (1/n) * sum_{j=1..n} j / (r_j + 1)       (precision at each relevant item)
    INP  = n / (r_n + 1)                            (precision at the last relevant item)
    mAP  = mean over q of AP,   mINP = mean over q of INP,   all reported in percent.

That is text-to-image (t2i, the papers' tables): the queries are the split's captions, the gallery
its images. Image-to-text (i2t) is IRRA's `i2t_metric`: the same formulas with the roles swapped,
each image of the split a query ranking every caption of the split, relevant = the captions of the
same identity (the image's own and those of its other images).

Queries go in chunks; each row is sorted by value only, the rank of every relevant item is a
binary search of its score in the sorted row, and AP and INP follow from those ranks in closed
form, with no loop over queries and no [Q, G] index matrices (i2t reads the transposed similarity
the same way). Queries without a relevant item are excluded and counted; ties follow a stated rule
(see `retrieval_metrics`). Several runs of one method are summed up as mean ± sample std.

The command line (Part II):

    python evaluate.py --checkpoint runs/cuhk-cskt/best.pt                 # the test split's table
    python evaluate.py --checkpoint runs/s1/best.pt runs/s2/best.pt runs/s3/best.pt --direction both
    python evaluate.py --checkpoint cuhk/best.pt --data ICFG-PEDES         # across datasets
    python evaluate.py --method clip --clip ViT-B/16 --data CUHK-PEDES      # frozen CLIP, zero-shot
    python evaluate.py --checkpoint best.pt --query "a man in a blue jacket" --topk 10
    python evaluate.py --checkpoint best.pt --save-examples 8              # green: right identity
    python evaluate.py --checkpoint best.pt --gallery ~/photos --query "a man in a blue jacket"
    python evaluate.py --checkpoint dm/best.pt --routing                   # which experts DM-Adapter uses
"""

import argparse
import collections
import colorsys
import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

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
# I.1 Metrics
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


DIRECTIONS = {"t2i": "text-to-image", "i2t": "image-to-text"}  # --direction; t2i is the papers' table


def directional_metrics(similarity: torch.Tensor, caption_pids: torch.Tensor, image_pids: torch.Tensor,
                        direction: str = "t2i", chunk_size: int = 1024) -> dict:
    """`retrieval_metrics` in one direction, from the caption-by-image similarity [Q, G].

    "t2i": every caption ranks the images. "i2t" (IRRA's `i2t_metric`): every image ranks the
    captions, read from the transposed view in chunks of images, with no copy of the whole matrix;
    an image whose identity has no caption is excluded and counted, as a caption is in t2i.
    """
    if direction == "t2i":
        return retrieval_metrics(similarity, caption_pids, image_pids, chunk_size)
    if direction == "i2t":
        return retrieval_metrics(similarity.T, image_pids, caption_pids, chunk_size)   # [G, Q]
    raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")


# ------------------------------------------------------------------------------------------------
# I.2 Device and precision: one policy for training and evaluation
# ------------------------------------------------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def pick_device(name: str, local_rank: int = 0, local_processes: int = 1) -> torch.device:
    """--device -> a torch device. "auto": this process's GPU, else Apple's, else the CPU. A GPU
    named without an index ("cuda") is this process's (torchrun's LOCAL_RANK, of LOCAL_WORLD_SIZE
    processes on this machine). A device that is not there, or one GPU named for several processes,
    raises ValueError with a message for the user."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: this machine has no CUDA GPU that torch can use")
        if device.index is not None and local_processes > 1:
            raise ValueError(f"{name}: under torchrun each of the {local_processes} processes on this machine "
                             "uses its own GPU; give --device cuda or auto")
        device = device if device.index is not None else torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{device}: there are only {torch.cuda.device_count()} GPU(s)"
                             + (f" for {local_processes} processes; start at most {torch.cuda.device_count()} per "
                                "machine (torchrun --nproc_per_node)" if local_processes > 1 else ""))
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
        # bf16 units came with compute capability 8 (Ampere). torch.cuda.is_bf16_supported() also
        # counts the slow emulation of older GPUs (a V100, a T4), where fp16 with a grad scaler is
        # the fast path; and it asks about the current GPU, not necessarily this one.
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.float16 if device.type == "mps" else None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    return next(name for name, dtype in PRECISIONS.items() if dtype == amp_dtype)


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision around a forward pass; a no-op for fp32. Weights stay fp32 either way."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def use_device(device: torch.device) -> None:
    """Make `device` this process's current one and set the fp32 matmul precision: the same in
    train.py and evaluate.py, so that a checkpoint routes and scores alike in both.

    TF32 stays off. Under autocast the matmuls left in fp32 are the deliberate ones (DM-Adapter's
    router logits, SDM, the retrieval similarity), and TF32 would round their inputs to a 10-bit
    mantissa; with --precision fp32 everything is meant to be fp32."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels, NCCL and tensors made without a device go to this GPU
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------------------------------------
# I.3 Features
# ------------------------------------------------------------------------------------------------

def image_tensor(batch: torch.Tensor | list) -> torch.Tensor:
    """A batch of data.image_loader, [images, a message per file], as its images (DataError on the
    first file that could not be read); a plain tensor batch as it is."""
    if isinstance(batch, list):
        images, messages = batch
        if any(messages):
            raise data.DataError(next(message for message in messages if message))
        return images
    return batch


def _encode_batches(encode: Callable, loader: Iterable, device: torch.device, name: str,
                    log_every: int) -> torch.Tensor:
    """Encode every batch of `loader` (plain tensors) and return the L2-normalised fp32 features."""
    features = []
    for batch_index, batch in enumerate(loader):
        batch = image_tensor(batch)
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


def encode_queries(model: nn.Module, queries: list[str], device: torch.device | str,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Features [Q, E] of free-text queries, L2-normalised fp32 on `device`. A query longer than
    the 77 positions (SOT + tokens + EOT) is cut to fit, and said so on stderr."""
    for query in queries:
        if len(clip_min.default_tokenizer().encode(query)) + 2 > clip_min.CONTEXT_LENGTH:
            print(f'query cut to its first {clip_min.CONTEXT_LENGTH - 2} tokens: "{query[:60]}..."', file=sys.stderr)
    with torch.no_grad(), autocast(torch.device(device), amp_dtype):
        ids = clip_min.tokenize(queries, truncate=True).to(device)                  # [Q, 77]
        return F.normalize(model.encode_text(ids).float(), dim=-1)                  # [Q, E]


# ------------------------------------------------------------------------------------------------
# I.4 Evaluating a model on a split, and tables of results
# ------------------------------------------------------------------------------------------------

def evaluate_loaders(model: nn.Module, loaders: tuple[DataLoader, DataLoader], split: data.EvalSplit,
                     device: torch.device | str, amp_dtype: torch.dtype | None = None) -> dict:
    """Text-to-image metrics of `model` on an EvalSplit (data.py), given the split's (image, caption)
    loaders (data.eval_loaders): train.py builds its val loaders once (the captions tokenized once,
    the image workers kept) and evaluates every few epochs."""
    image_features, caption_features = extract_features(model, *loaders, device, amp_dtype)
    similarity = similarity_from_features(caption_features, image_features)  # [Q, G]
    return retrieval_metrics(similarity, split.caption_pids, split.image_pids)


def chance_metrics(split: data.EvalSplit, seed: int = 0, direction: str = "t2i") -> dict:
    """The metrics of a random ranking (one draw of uniform scores): the floor to compare with."""
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.rand(len(split.caption_pids), len(split.image_pids), generator=generator)
    return directional_metrics(similarity, split.caption_pids, split.image_pids, direction)


METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")


def mean_and_std(runs: list[dict]) -> dict:
    """Several runs' metrics -> {name: (mean, sample standard deviation)} for R1 ... mINP, and
    "num_runs". The sample std divides by n - 1 (the runs are a sample of the seeds one could try),
    so it needs at least two runs."""
    if len(runs) < 2:
        raise ValueError(f"a mean and standard deviation need at least 2 runs, got {len(runs)}")
    values = torch.tensor([[run[name] for name in METRIC_NAMES] for run in runs], dtype=torch.float64)  # [n, 5]
    means, stds = values.mean(0).tolist(), values.std(0, correction=1).tolist()
    return {**{name: (m, s) for name, m, s in zip(METRIC_NAMES, means, stds)}, "num_runs": len(runs)}


def format_metrics(metrics: dict) -> str:
    skipped = f", {metrics['num_skipped']} without a relevant image skipped" if metrics["num_skipped"] else ""
    return ("  ".join(f"{name} {metrics[name]:6.2f}" for name in METRIC_NAMES)
            + f"  ({metrics['num_queries']:,} queries{skipped})")


def format_table(rows: dict[str, dict]) -> str:
    """{row name: metrics} -> a Markdown table, in percent. A value may be a (mean, std) pair (see
    `mean_and_std`), shown as "mean ± std"."""
    cells = {name: [f"{v[0]:.2f} ± {v[1]:.2f}" if isinstance(v, tuple) else f"{v:6.2f}"
                    for v in (metrics[m] for m in METRIC_NAMES)] for name, metrics in rows.items()}
    width = max(len(name) for name in rows)
    widths = [max(6, *(len(row[column]) for row in cells.values())) for column in range(len(METRIC_NAMES))]
    lines = [f"| {'':{width}} | " + " | ".join(f"{name:>{w}}" for name, w in zip(METRIC_NAMES, widths)) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for name, row in cells.items():
        lines.append(f"| {name:{width}} | " + " | ".join(f"{cell:>{w}}" for cell, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def format_transfer_table(results: dict[tuple[str, str], dict], metrics: tuple[str, ...] = ("R1", "mAP")) -> str:
    """{(trained on, evaluated on): metrics} -> a Markdown table, one row per training set and one
    column per evaluation set (in the order first met), each cell "R1 / mAP" in percent; "-" for
    a pair not evaluated. The diagonal is in-domain, the rest is transfer to an unseen domain."""
    trained_on = list(dict.fromkeys(train for train, _ in results))
    evaluated_on = list(dict.fromkeys(evaluated for _, evaluated in results))
    cells = {pair: " / ".join(f"{values[m]:.2f}" for m in metrics) for pair, values in results.items()}
    header = [f"{' / '.join(metrics)}: trained on ↓, evaluated on →", *evaluated_on]
    rows = [[train, *(cells.get((train, evaluated), "-") for evaluated in evaluated_on)] for train in trained_on]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["| " + " | ".join(f"{text:{width}}" for text, width in zip(row, widths)) + " |" for row in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# I.5 Checkpoints: what train.py saves, and the models rebuilt from them
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


def is_trained(name: str) -> bool:
    """What a method trains, by a weight's name in the model: everything but the frozen backbone
    (a fine-tuned CLIP has no frozen part: all of it). The one definition: checkpoints save these,
    and CSKT and DM-Adapter leave exactly these with requires_grad (the tests hold them to it)."""
    return not name.startswith(BACKBONE_PREFIX)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights (is_trained), on the CPU: what a checkpoint holds."""
    return {name: v.detach().cpu() for name, v in model.state_dict().items() if is_trained(name)}


def describe_backbone(method: str, clip_name: str, clip_model: clip_min.CLIP) -> dict:
    """How `load_checkpoint` gets the frozen CLIP back: a release by name (hash-checked on use),
    else the weights themselves (the file may not exist where the checkpoint is read). A
    fine-tuned CLIP needs neither: all of it is in the trained state. The SHA-256 of the release
    or file lets a resumed run check that it starts from the same CLIP."""
    release = clip_min.RELEASES.get(clip_name)
    sha256 = release[0] if release else clip_min.file_sha256(clip_name)
    config = clip_model.config
    backbone = {"name": clip_name, "sha256": sha256, "image_size": list(config.image_size), "stride": config.stride}
    if method == "finetune" or clip_name in clip_min.RELEASES:
        return backbone
    return {**backbone, "state_dict": {k: v.detach().cpu() for k, v in clip_model.state_dict().items()}}


def save_atomically(obj, path: str) -> None:
    """torch.save(obj, path) through clip_min.atomic_file: a save that fails or is interrupted (a
    full or read-only disk, Ctrl-C) leaves the previous file whole and no temporary one."""
    with clip_min.atomic_file(path) as file:
        torch.save(obj, file)


def save_checkpoint(path: str, model: nn.Module, **fields) -> None:
    """Saves `fields` and the model's trained weights (as "trainable") at `path`, atomically
    (save_atomically). A save that fails (a full or read-only disk) leaves the previous file."""
    try:
        save_atomically({**fields, "trainable": trained_state(model)}, path)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
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
    not_restored = [key for key in missing if is_trained(key)]
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


def selected_on(checkpoint: dict) -> str:
    """What train.py chose this checkpoint on, in words: the val R1 of its epoch, or the last epoch
    where the dataset has no val split; "nothing" for a last.pt that is not the best epoch."""
    if "epoch" not in checkpoint:
        return "unknown: the checkpoint records no epoch"
    epoch, best = checkpoint["epoch"], checkpoint.get("best", {})
    epochs = checkpoint["args"].get("epochs")
    this_epoch = f"epoch {epoch + 1}" + (f" of {epochs}" if epochs else "")
    best_epoch, best_r1 = best.get("epoch", -1), best.get("R1", -1.0)
    if math.isnan(best_r1):  # train.py's mark for a dataset without a val split
        return f"the last epoch ({this_epoch}): {checkpoint['data']} has no val split"
    if best_epoch == epoch:
        return f"val R1 {best_r1:.2f} at {this_epoch}"
    if best_epoch < 0:
        return f"nothing: {this_epoch}, saved before any val evaluation"
    return f"nothing: {this_epoch}, the last saved (val's best was R1 {best_r1:.2f} at epoch {best_epoch + 1})"


def selection_record(checkpoint: dict) -> dict:
    """The fields test_metrics.json and evaluate.py's table carry about a checkpoint: "selected_on"
    and, when the run recorded one, "dataset_check" (whether the dataset on disk matched the
    published set: another copy gives numbers that cannot be compared with the papers')."""
    record = {"selected_on": selected_on(checkpoint)}
    if checkpoint.get("dataset_check") is not None:
        record["dataset_check"] = checkpoint["dataset_check"]
    return record


RUN_KEYS = ("method", "data", "clip", "epoch", "best", "args", "dataset_check")  # what describes a run


def read_run(path: str) -> dict:
    """A checkpoint's description without any weights or optimizer state: what `check_runs_agree`
    and the table read, so that several runs are compared before any model is built, and only
    one run's weights are in memory at a time."""
    checkpoint = read_checkpoint(path)
    checkpoint["clip"] = {key: value for key, value in checkpoint["clip"].items() if key != "state_dict"}
    return {key: checkpoint[key] for key in RUN_KEYS if key in checkpoint}


RUN_FIELDS = {"method": lambda c: c["method"], "dataset": lambda c: c["data"],  # what runs to average share
              "image size": lambda c: "{}x{} stride {}".format(*c["clip"]["image_size"], c["clip"]["stride"])}


def check_runs_agree(checkpoints: dict[str, dict]) -> None:
    """{path: checkpoint} of the runs to average: one method, one training dataset, one image size
    and stride, or CheckpointError naming the odd one out (against the value most of them share)."""
    for field, value_of in RUN_FIELDS.items():
        values = {path: value_of(checkpoint) for path, checkpoint in checkpoints.items()}
        counts = collections.Counter(values.values())
        common = max(counts, key=counts.get)        # the most frequent; on a tie, the first met
        odd = next((path for path, value in values.items() if value != common), None)
        if odd is not None:
            first, sharing = next(path for path, value in values.items() if value == common), counts[common] - 1
            others = f" and {sharing} other{'s' if sharing > 1 else ''} have" if sharing else " has"
            raise CheckpointError(f"{odd}: {field} {values[odd]}, but {first}{others} {common}; "
                                  "a mean over runs needs one method, dataset and image size")


# ------------------------------------------------------------------------------------------------
# II.1 Pictures of what was retrieved
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
    return data.decode_image(str(image))[0]


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
# II.2 Searching a folder of images
# ------------------------------------------------------------------------------------------------
# The papers' code ranks a dataset's test split and nothing else. Here any folder is a gallery:
# every .jpg, .jpeg, .png and .webp under it, of any size, resized as a test image is, ranked for
# one or several queries that share one pass over the images. Encoding is the slow part (ViT-B/16
# at 384x128 costs about 34 GFLOP per image: a few images a second on a CPU), so the features are
# cached in one file in --out with the identity of the model that made them and each file's size,
# mtime and ctime: a file rewritten in place gets a new ctime even when its mtime is put back, so
# a feature is never served stale. A later search encodes only the files whose (path, stamp) the
# cache lacks; a cache of another model is discarded whole (features from another device or
# precision differ by rounding only, so those are not told apart). Unreadable files are cached
# with their message too: listed and counted on every search, decoded again only once changed.

GALLERY_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # matched case-insensitively
GALLERY_CACHE_FILE = "gallery_features.pt"               # in --out
UNREADABLE_SHOWN = 20  # unreadable files printed; all of them go to <out>/unreadable.txt


def file_stamp(path: str) -> tuple[int, int, int]:
    status = os.stat(path)  # follows symbolic links: the stamp is the image's own
    return (status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def model_identity(checkpoint: str | None, clip: str, image_size: tuple[int, int], stride: int) -> dict:
    """What the gallery features depend on: the checkpoint (it holds the method, backbone, input
    size and stride), or zero-shot CLIP's release or weight file, input size and stride. A file
    counts by path and stamp, so a checkpoint retrained in place is another model."""
    source = checkpoint or clip
    identity = {"format": 1, "source": source, "image_size": [int(side) for side in image_size], "stride": stride}
    if os.path.isfile(source):  # a release name is hash-checked when loaded
        identity.update(source=os.path.abspath(source), stamp=list(file_stamp(source)))
    return identity


def _decode_gallery_batch(image_size: tuple[int, int], paths: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The loader's collate_fn: images [B, 3, H, W] as the test split's, and a message per file
    ("" if read). An unreadable file gives a blank image and its message rather than an exception,
    so one bad file among thousands is reported instead of ending the pass."""
    transform, images, messages = data.build_transform(image_size), [], []
    for path in paths:
        try:
            images.append(transform(data.decode_image(path)[0]))
            messages.append("")
        except data.DataError as error:
            images.append(torch.zeros(3, *image_size))
            messages.append(str(error))
    return torch.stack(images), messages


def encode_gallery_files(model: nn.Module, paths: list[str], image_size: tuple[int, int],
                         device: torch.device | str, amp_dtype: torch.dtype | None = None,
                         batch_size: int = 256, workers: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Features [N, E] of `paths` (L2-normalised fp32 on the CPU, where the cache keeps them; a row
    of an unreadable file means nothing) and one message per file ("" if read)."""
    loader = DataLoader(paths, batch_size, num_workers=workers,
                        collate_fn=functools.partial(_decode_gallery_batch, tuple(image_size)))
    features, messages = [], []
    with torch.no_grad(), autocast(torch.device(device), amp_dtype):
        for images, batch_messages in loader:                                   # [B, 3, H, W], B strings
            features.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())  # [B, E]
            messages += batch_messages
            print(f"  encoded {len(messages):,} of {len(paths):,} gallery images", file=sys.stderr)
    return torch.cat(features), messages


def search_folder_main(args: argparse.Namespace, model: nn.Module, image_size: tuple[int, int]) -> int:
    """`--gallery DIR --query TEXT [--query TEXT ...]`: rank the folder's images for each query,
    print the best --topk with their scores and draw them (<out>/search.png, or search_N.png)."""
    start, amp_dtype = time.perf_counter(), autocast_dtype(args.precision, args.device)
    if not os.path.isdir(args.gallery):
        raise data.DataError(f"--gallery: no such folder: {args.gallery}")
    files, problems, others = {}, [], 0  # {path: stamp}; why a folder or file could not be read at all
    for folder, _, names in os.walk(os.path.abspath(args.gallery), onerror=lambda error: problems.append(
            f"{error.filename}: folder cannot be listed: {error.strerror}")):
        for path in (os.path.join(folder, name) for name in names):
            if not path.lower().endswith(GALLERY_EXTENSIONS):
                others += 1
                continue
            try:
                files[path] = file_stamp(path)
            except OSError as error:  # a dangling link, or a file deleted meanwhile
                problems.append(f"{path}: cannot be read: {error.strerror}")
    files = dict(sorted(files.items()))

    # One path for old and new files: a row of the cache where its (path, stamp) is there, else a
    # row of this pass; the features then gathered in path order.
    os.makedirs(args.out, exist_ok=True)
    cache_path = os.path.join(args.out, GALLERY_CACHE_FILE)
    identity = model_identity(args.checkpoint, args.clip, image_size, args.stride or 16)
    cache = {"paths": [], "stamps": [], "features": torch.zeros(0), "messages": []}
    if os.path.isfile(cache_path):
        try:
            loaded = torch.load(cache_path, map_location="cpu", weights_only=True)
            cache = loaded if loaded.get("model") == identity else cache
        except Exception as error:  # unpickling fails in many ways; a cache is only a cache
            print(f"  ignoring the damaged gallery cache {cache_path} ({error})", file=sys.stderr)
    row_of = {(path, tuple(stamp)): row for row, (path, stamp) in enumerate(zip(cache["paths"], cache["stamps"]))}
    new = [path for path, stamp in files.items() if (path, stamp) not in row_of]
    row_of.update(((path, files[path]), len(cache["paths"]) + i) for i, path in enumerate(new))
    new_features, new_messages = (encode_gallery_files(model, new, image_size, args.device, amp_dtype, args.batch_size,
                                                       args.workers) if new else (torch.zeros(0), []))
    rows = [row_of[path, stamp] for path, stamp in files.items()]
    all_messages = cache["messages"] + new_messages
    paths, messages = list(files), [all_messages[row] for row in rows]
    features = torch.cat([cache["features"], new_features])[rows]                          # [N, E]
    if new or cache["paths"] != paths:
        save_atomically({"model": identity, "paths": paths, "stamps": list(files.values()), "features": features,
                         "messages": messages}, cache_path)  # an interrupted save leaves the old cache

    readable = [row for row, message in enumerate(messages) if not message]
    unreadable = problems + [message for message in messages if message]
    print(f"{args.gallery}: {len(files):,} image files, {len(files) - len(new):,} from the cache {cache_path} "
          f"and {len(new):,} decoded now; {len(readable):,} ranked, {len(unreadable):,} unreadable; "
          f"{others:,} other files left out (not {'/'.join(GALLERY_EXTENSIONS)})")
    listing = os.path.join(args.out, "unreadable.txt")
    if unreadable:
        with open(listing, "w") as file:
            file.writelines(f"{message}\n" for message in unreadable)
        more = [f"... and {len(unreadable) - UNREADABLE_SHOWN:,} more"] if len(unreadable) > UNREADABLE_SHOWN else []
        print(f"{len(unreadable):,} unreadable file(s), left out of the ranking (all listed in {listing}):",
              *unreadable[:UNREADABLE_SHOWN], *more, sep="\n  ", file=sys.stderr)
    elif os.path.exists(listing):
        os.remove(listing)  # a list from an earlier search would now be wrong
    if not readable:
        raise data.DataError(f"--gallery: no readable image under {args.gallery}")

    queries = encode_queries(model, args.query, args.device, amp_dtype).cpu()         # [Q, E]
    scores, best = (queries @ features[readable].T).topk(min(args.topk, len(readable)))  # [Q, N] -> [Q, k]
    for number, (query, query_scores, query_best) in enumerate(zip(args.query, scores.tolist(), best.tolist()), 1):
        found = [paths[readable[i]] for i in query_best]
        print(f'\n"{query}": the {len(found)} best of {len(readable):,}')
        for rank, (score, path) in enumerate(zip(query_scores, found), start=1):
            print(f"  {rank:3d}  {score:.4f}  {path}")
        picture = os.path.join(args.out, "search.png" if len(args.query) == 1 else f"search_{number}.png")
        save_retrieval_grid(picture, query, found, query_scores)
        print(f"wrote {picture}")
    print(f"\n{len(args.query)} quer{'y' if len(args.query) == 1 else 'ies'} over {len(readable):,} images "
          f"in {time.perf_counter() - start:.2f} s, the model already loaded")
    return 0


# ------------------------------------------------------------------------------------------------
# II.3 DM-Adapter's routing
# ------------------------------------------------------------------------------------------------
# DM-Adapter's router should spread tokens over experts that specialise, its balance loss keep all
# of them in use. One picture shows what a trained model's routers do: per block of each tower, the
# share of the top-k picks each expert gets over a split (near 100/E % everywhere: all in use; one
# blue cell among red ones: that block collapsed onto one expert), and the experts each token of
# one caption picks at each text block. Forward hooks on the routers read the picks, so
# dm_adapter.py stays as it is. The heatmap leaves out the text padding (routed, and counted in the
# balance loss as the authors do): under the causal mask it never reaches the feature read at EOT,
# and with 77 slots for 20 to 60 tokens it would hide what the words do.

def routed_experts(model: dm_adapter.DMAdapter, tower: str, batches: Iterable,
                   device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(batch on `device`, experts [blocks, T, k]) per batch of images [B, 3, H, W] or ids [B, L], T = B * L:
    the top-k of each router's logits [T, E], best first, as MixtureOfAdapters.route takes them."""
    mixtures = model.vision_adapters if tower == "image" else model.text_adapters
    picks: list[torch.Tensor | None] = [None] * len(mixtures)
    def record(block: int, top_k: int, router: nn.Module, inputs: tuple, logits: torch.Tensor) -> None:
        picks[block] = logits.float().topk(top_k, dim=-1).indices                 # [T, k]
    hooks = [mixture.router.register_forward_hook(functools.partial(record, block, mixture.top_k))
             for block, mixture in enumerate(mixtures)]
    try:
        for batch in batches:
            batch = image_tensor(batch).to(device)
            (model.encode_image if tower == "image" else model.encode_text)(batch)
            yield batch, torch.stack(picks)                                       # [blocks, T, k]
    finally:
        for hook in hooks:
            hook.remove()


def routing_shares(model: dm_adapter.DMAdapter, split: data.EvalSplit, image_size: tuple[int, int],
                   device: torch.device | str, amp_dtype: torch.dtype | None = None, batch_size: int = 256,
                   workers: int = 0, include_padding: bool = False) -> dict[str, torch.Tensor]:
    """{"image": [blocks, E], "text": [blocks, E]}: the percent of each block's top-k picks that
    went to each expert over the split's images and captions (each row sums to 100)."""
    device, num_experts, shares = torch.device(device), len(model.vision_adapters[0].experts), {}
    for tower, loader in zip(("image", "text"), data.eval_loaders(split, tuple(image_size), batch_size, workers,
                                                                   device.type == "cuda")):
        counts = 0
        with torch.no_grad(), autocast(device, amp_dtype):
            for batch, experts in routed_experts(model, tower, loader, device):
                chosen = F.one_hot(experts, num_experts).sum(dim=2)               # [blocks, T, E], k ones a token
                if tower == "text" and not include_padding:  # SOT to EOT (the largest id), without a host sync
                    words = torch.arange(batch.shape[1], device=device) <= batch.argmax(-1, keepdim=True)  # [B, L]
                    chosen = chosen * words.reshape(1, -1, 1)
                counts = counts + chosen.sum(dim=1)                                 # [blocks, E]
        shares[tower] = 100 * counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    return shares


def caption_routing(model: dm_adapter.DMAdapter, caption: str, device: torch.device | str,
                    amp_dtype: torch.dtype | None = None) -> tuple[list[str], torch.Tensor]:
    """(token labels [n], experts [blocks, n, k]): the top-k experts each token of `caption`, SOT
    to EOT, picks at each text block, the one with the larger weight first."""
    ids = clip_min.tokenize(caption, truncate=True)                              # [1, L]
    with torch.no_grad(), autocast(torch.device(device), amp_dtype):
        [(_, experts)] = routed_experts(model, "text", [ids], device)           # [blocks, L, k]
    names, tokenizer = {clip_min.SOT_TOKEN: "SOT", clip_min.EOT_TOKEN: "EOT"}, clip_min.default_tokenizer()
    labels = [names.get(token) or tokenizer.decode([token]) for token in ids[0, : int(ids.argmax()) + 1].tolist()]
    return labels, experts[:, : len(labels)].cpu()


def _share_colour(share: float, even: float, more: tuple = (40, 90, 200), fewer: tuple = (215, 50, 40)) -> tuple:
    """White at the even share; towards blue above it (full at twice), towards red below (full at 0)."""
    t = max(-1.0, min(1.0, (share - even) / even))
    return tuple(round(255 + (channel - 255) * abs(t)) for channel in (more if t > 0 else fewer))


ROUTING_MAX_WIDTH = 1000  # pixels: README shows a picture about 900 wide, so a wider one shrinks its text
ROUTING_FONT_SIZE = 13    # pixels; Pillow's default bitmap font (about 10) is hard to read once scaled down
ROUTING_TOKENS_SHOWN = 40  # the caption's first tokens drawn, a row each


def _routing_font() -> ImageFont.ImageFont:
    """Pillow's own font at ROUTING_FONT_SIZE; the fixed-size bitmap one where Pillow is older than
    10.1 or built without FreeType."""
    try:
        return ImageFont.load_default(size=ROUTING_FONT_SIZE)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _draw_grid(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, x: float, y: float, row: int, cell: float,
               name: str, column_names: list[str], row_names: list[str], cells: list[list[list[tuple]]]) -> None:
    """A table at (x, y): its name, the columns' names, then a row per name, a cell a list of
    (colour, text) stripes side by side, 4 white pixels between cells."""
    draw.text((x, y + 4), name, fill="black", font=font)
    left = x + max(draw.textlength(row_name, font=font) for row_name in row_names) + 8  # right of the rows' names
    for column, column_name in enumerate(column_names):
        centre = left + column * cell + (cell - 4) / 2                           # over the cell's coloured part
        draw.text((centre - draw.textlength(column_name, font=font) / 2, y + row + 4), column_name, fill="black",
                  font=font)
    for number, (row_name, stripes_of_row) in enumerate(zip(row_names, cells)):
        top = y + (number + 2) * row
        draw.text((x, top + 4), row_name, fill="black", font=font)
        for column, stripes in enumerate(stripes_of_row):
            width = (cell - 4) / len(stripes)
            for slot, (colour, text) in enumerate(stripes):
                left_edge = left + column * cell + slot * width
                draw.rectangle((left_edge, top, left_edge + width, top + row - 2), fill=colour, outline="white")
                draw.text((left_edge + (width - draw.textlength(text, font=font)) / 2, top + 4), text, font=font,
                          fill="white" if sum(colour) < 400 else "black")


def _grid_width(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, row_names: list[str],
                num_columns: int, cell: float) -> float:
    """The width of a `_draw_grid` table: the rows' names, then `num_columns` cells."""
    return max(draw.textlength(name, font=font) for name in row_names) + 8 + num_columns * cell


def save_routing_picture(path: str, shares: dict[str, torch.Tensor], caption: str, labels: list[str],
                         experts: torch.Tensor, title: str) -> None:
    """Write the PNG, at most ROUTING_MAX_WIDTH pixels wide for DM-Adapter's 6 experts and CLIP's 12
    text blocks: the title and legend; the two towers' heatmaps side by side (a row per block, a
    column per expert, the percent of the block's picks; one under the other if side by side
    would be too wide); below them the caption, a row per token (the first 40), a column per text
    block, each cell the top-k experts the token picks there, the larger weight on the left."""
    num_experts, top_k, shown = shares["image"].shape[1], experts.shape[2], labels[:ROUTING_TOKENS_SHOWN]
    even = 100 / num_experts
    font, measure = _routing_font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, ascent, _, descent = measure.textbbox((0, 0), "Ag", font=font)
    row, margin, gap = descent - ascent + 10, 16, 24           # pixels: a table row, the border, between tables

    # Each cell a list of (colour, text) stripes: one for a share, one per pick (larger weight first),
    # picks in pale hues on which black numbers stay readable.
    palette = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(e / num_experts, 0.35, 1)) for e in range(num_experts)]
    heatmaps = {tower: [[[(_share_colour(s, even), f"{s:.1f}")] for s in block] for block in shares[tower].tolist()]
                for tower in ("image", "text")}
    picks = [[[(palette[e], str(e)) for e in token] for token in tokens]        # [tokens][blocks][k]
             for tokens in experts[:, : len(shown)].transpose(0, 1).tolist()]
    share_cell = max(measure.textlength(text, font=font) for text in ("100.0", f"e{num_experts - 1}")) + 10
    pick_cell = max(measure.textlength(str(experts.shape[0] - 1), font=font) + 8,
                    top_k * (measure.textlength(str(num_experts - 1), font=font) + 10))
    block_names = {tower: [f"block {b}" for b in range(len(heatmaps[tower]))] for tower in heatmaps}
    heatmap_width = max(_grid_width(measure, font, names, num_experts, share_cell) for names in block_names.values())
    caption_width = _grid_width(measure, font, shown, experts.shape[0], pick_cell)
    side_by_side = 2 * heatmap_width + gap + 2 * margin <= ROUTING_MAX_WIDTH
    content_width = max(2 * heatmap_width + gap if side_by_side else heatmap_width, caption_width)
    width = int(min(ROUTING_MAX_WIDTH, max(600, content_width + 2 * margin)))

    lines = [title, f"Heatmaps: % of each block's top-{top_k} picks per expert; white: the even share, {even:.1f} %; "
             "bluer: more (full blue at twice that); redder: fewer (full red at none).",
             f'Caption: "{caption}": the {top_k} experts each token (the first {ROUTING_TOKENS_SHOWN} at most) '
             "picks at each text block, the larger weight on the left; colour = expert."]
    text_lines = [words for line in lines for words in _wrap_to_width(line, font, measure, width - 2 * margin)]
    heatmaps_top = margin + row * (len(text_lines) + 1)
    heatmap_heights = {tower: row * (len(cells) + 2) for tower, cells in heatmaps.items()}
    heatmap_at = {"image": (margin, heatmaps_top),
                  "text": ((margin + heatmap_width + gap, heatmaps_top) if side_by_side
                           else (margin, heatmaps_top + heatmap_heights["image"] + gap))}
    caption_top = (heatmaps_top + gap + (max(heatmap_heights.values()) if side_by_side
                                         else heatmap_heights["image"] + gap + heatmap_heights["text"]))
    picture = Image.new("RGB", (width, caption_top + row * (len(shown) + 2) + margin), "white")
    draw = ImageDraw.Draw(picture)
    for number, words in enumerate(text_lines):
        _draw_words(draw, margin, margin + number * row, words, font)
    for tower, (x, y) in heatmap_at.items():
        _draw_grid(draw, font, x, y, row, share_cell, f"{tower} tower: % of picks per expert",
                   [f"e{e}" for e in range(num_experts)], block_names[tower], heatmaps[tower])
    _draw_grid(draw, font, margin, caption_top, row, pick_cell, "caption: the experts each token picks, per text block",
               [str(b) for b in range(experts.shape[0])], shown, picks)
    picture.save(path, format="PNG")


def routing_main(args: argparse.Namespace, model: nn.Module, split: data.EvalSplit, image_size: tuple[int, int],
                 amp_dtype: torch.dtype | None, split_name: str) -> int:
    """`--routing`: draw a DM-Adapter checkpoint's routing on the evaluated split (<out>/routing.png)."""
    if not isinstance(model, dm_adapter.DMAdapter):
        raise CheckpointError("--routing draws DM-Adapter's routers: it needs a checkpoint of method dm_adapter")
    shares = routing_shares(model, split, image_size, args.device, amp_dtype, args.batch_size, args.workers)
    caption, path = args.routing_caption or split.captions[0], os.path.join(args.out, "routing.png")
    os.makedirs(args.out, exist_ok=True)
    # The checkpoint's file name, not its path: the picture is made to be shown, and a path tells
    # of the machine it was made on.
    title = (f"DM-Adapter routing of {os.path.basename(args.checkpoint)} on {split_name}: "
             f"{len(split.image_paths):,} images, {len(split.captions):,} captions (text padding not counted)")
    save_routing_picture(path, shares, caption, *caption_routing(model, caption, args.device, amp_dtype), title)
    print(*(f"{tower} tower: each expert gets {float(s.min()):.1f} to {float(s.max()):.1f} % of a block's picks "
            f"(even: {100 / s.shape[1]:.1f} %)" for tower, s in shares.items()), f"wrote {path}", sep="\n")
    return 0


# ------------------------------------------------------------------------------------------------
# II.4 The command line: flags and main
# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = data.ArgumentParser(description="Evaluate a trained checkpoint, or frozen CLIP zero-shot, "
                                          "on a dataset split; optionally draw what was retrieved.")
    # Flags without a default, or whose help tells it in words: None until given (not shown).
    parser.set_defaults(checkpoints=None, method=None, image_size=None, stride=None, data=None, query=None,
                        gallery=None, routing_caption=None)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", nargs="+", dest="checkpoints", metavar="CHECKPOINT", default=argparse.SUPPRESS,
                       help="a best.pt or last.pt written by train.py; several (runs of one method, dataset "
                       "and image size, e.g. seeds) add their mean ± sample std")
    model.add_argument("--method", choices=["clip"], default=argparse.SUPPRESS, help="'clip': evaluate frozen CLIP zero-shot (a baseline)")
    parser.add_argument("--clip", default="ViT-B/16", help="with --method clip: a release name or checkpoint file")
    parser.add_argument("--image-size", type=data.number(int, minimum=1), nargs=2, default=argparse.SUPPRESS, metavar=("H", "W"),
                        help="with --method clip: input size (default 384 128); a checkpoint uses its own")
    parser.add_argument("--stride", type=data.number(int, minimum=1), default=argparse.SUPPRESS,
                        help="with --method clip: patch stride (default 16); a checkpoint uses its own")
    parser.add_argument("--data", default=argparse.SUPPRESS, choices=list(data.DATASETS),
                        help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--root", default="data", help="folder holding the datasets")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="which split to evaluate")
    parser.add_argument("--direction", default="t2i", choices=[*DIRECTIONS, "both"],
                        help="t2i: each caption ranks the images (the papers' tables); i2t: each image ranks "
                        "the captions (IRRA's i2t_metric); both: a table for each")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast dtype: auto is bf16 on GPUs with bf16 units (compute capability 8+), "
                        "else fp16; fp32 on the CPU")
    parser.add_argument("--batch-size", type=data.number(int, minimum=1), default=256, help="images or captions per batch")
    parser.add_argument("--workers", type=data.number(int, minimum=0), default=min(8, os.cpu_count() or 1),
                        help="image-loading processes")
    parser.add_argument("--query", action="append", default=argparse.SUPPRESS,
                        help="a free-text query: draw its best-matching gallery images (repeat for several)")
    parser.add_argument("--topk", type=data.number(int, minimum=1), default=10, help="images per picture")
    parser.add_argument("--save-examples", type=data.number(int, minimum=0), default=0, metavar="N",
                        help="draw the results of N test queries (green: right identity, red: wrong)")
    parser.add_argument("--out", default="retrieval", help="folder for the pictures (made only to hold one)")
    search = parser.add_argument_group("searching a folder of images")
    search.add_argument("--gallery", metavar="DIR", default=argparse.SUPPRESS,
                        help="rank every .jpg/.jpeg/.png/.webp under DIR (recursively) for each --query, "
                        f"instead of a dataset split; features are cached in --out/{GALLERY_CACHE_FILE}")
    routing = parser.add_argument_group("DM-Adapter's routing")
    routing.add_argument("--routing", action="store_true",
                         help="draw which experts a dm_adapter checkpoint's routers pick on the split "
                         "(<out>/routing.png) instead of evaluating it")
    routing.add_argument("--routing-caption", metavar="TEXT", default=argparse.SUPPRESS,
                         help="the caption whose per-token picks are drawn; if not given, the split's first")
    args = parser.parse_args(argv)
    if args.checkpoints and len(args.checkpoints) > 1 and (args.query or args.save_examples or args.gallery
                                                            or args.routing):
        parser.error("argument --checkpoint: --query, --save-examples, --gallery and --routing work on one "
                     "checkpoint; several are for a table of runs")
    files = [os.path.realpath(path) for path in args.checkpoints or []]
    twice = next((path for path, file in zip(args.checkpoints or [], files) if files.count(file) > 1), None)
    if twice:
        parser.error(f"argument --checkpoint: {twice} is given twice; a mean over runs counts each run once")
    # The one checkpoint that pictures, folder search and routing read (None: zero-shot CLIP).
    args.checkpoint = args.checkpoints[0] if args.checkpoints else None
    args.directions = list(DIRECTIONS) if args.direction == "both" else [args.direction]
    if args.checkpoint and (args.image_size or args.stride):
        parser.error("argument --image-size/--stride: a checkpoint is evaluated at the size and stride it was "
                     "trained with; these flags go with --method clip")
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_device(args.device)
    amp_dtype = autocast_dtype(args.precision, args.device)
    try:
        if args.checkpoints:
            # {source: checkpoint without weights}; every file is read and compared before any model is built.
            runs = {path: read_run(path) for path in args.checkpoints}
            check_runs_agree(runs)
            first = next(iter(runs.values()))
            image_size, dataset_name = tuple(first["clip"]["image_size"]), args.data or first["data"]
            # One run's row is named by its method, as in train.py's table; several by their files.
            names = {path: first["method"] if len(runs) == 1 else path for path in runs}
            models = (load_checkpoint(path, args.device)[0] for path in runs)  # one at a time, when needed
        else:
            image_size = tuple(args.image_size or (384, 128))
            clip_model = clip_min.load(args.clip, image_size, args.stride or 16, args.device)
            runs, names, dataset_name = {args.clip: None}, {args.clip: f"{args.clip} zero-shot"}, args.data  # no run
            models = iter([build_method("clip", clip_model, {})])
        if args.gallery:
            return search_folder_main(args, next(models), image_size)
        dataset = data.load_dataset(dataset_name, args.root)
        split = dataset.val if args.split == "val" else dataset.test
        if split is None:
            raise data.DataError(f"{dataset_name} has no val split")
        if args.routing:
            return routing_main(args, next(models), split, image_size, amp_dtype, f"{dataset_name} {args.split}")
        image_loader, caption_loader = data.eval_loaders(split, image_size, args.batch_size, args.workers,
                                                         args.device.type == "cuda")
        tables = {direction: {} for direction in args.directions}  # {direction: {row name: metrics}}
        for source, model in zip(runs, models):
            image_features, caption_features = extract_features(model, image_loader, caption_loader, args.device,
                                                                amp_dtype)
            similarity = similarity_from_features(caption_features, image_features)  # [Q, G]
            for direction, rows in tables.items():
                rows[names[source]] = directional_metrics(similarity, split.caption_pids, split.image_pids, direction)
        cut = f"; {split.num_truncated:,} captions cut to {clip_min.CONTEXT_LENGTH} tokens" if split.num_truncated else ""
        print(dataset.verdict)  # the copy on disk against the published counts
        print(f"{dataset_name} {args.split}, {len(split.image_paths):,} images{cut}:")
        for direction, rows in tables.items():
            measured = next(iter(rows.values()))  # the same queries for every run
            skipped = (f", {measured['num_skipped']:,} without a relevant {'image' if direction == 't2i' else 'caption'}"
                       " left out" if measured["num_skipped"] else "")
            print(f"{DIRECTIONS[direction]} ({direction}): {measured['num_queries']:,} "
                  f"{'captions rank the images' if direction == 't2i' else 'images rank the captions'}{skipped}")
            summary = {f"mean ± std of {len(rows)} runs": mean_and_std(list(rows.values()))} if len(rows) > 1 else {}
            print(format_table({**rows, **summary, "chance": chance_metrics(split, direction=direction)}))
        if len(runs) > 1:
            print(f"std: the sample standard deviation (n - 1) over the n = {len(runs)} runs")
        for source, run in runs.items():
            if run is not None:
                record = selection_record(run)
                check = f"; dataset check: {record['dataset_check']}" if "dataset_check" in record else ""
                print(f"{source}: {run['method']} trained on {run['data']}, selected on {record['selected_on']}{check}")

        topk = min(args.topk, len(split.image_paths))
        if args.query:
            os.makedirs(args.out, exist_ok=True)
            queries = encode_queries(model, args.query, args.device, amp_dtype)     # [Q, E]
            for number, (query_text, query) in enumerate(zip(args.query, queries), start=1):
                scores, indices = (query @ image_features.T).topk(topk)                # [G] -> [k]
                path = os.path.join(args.out, "query.png" if len(args.query) == 1 else f"query_{number}.png")
                save_retrieval_grid(path, query_text, [split.image_paths[i] for i in indices.tolist()], scores.tolist())
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
