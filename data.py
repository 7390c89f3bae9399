"""Data for text-based person retrieval (TPR): three benchmark datasets, a synthetic stand-in,
transforms and loaders, all of it in this one file.

The pipeline is IRRA's (Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning for
Text-to-Image Person Retrieval", CVPR 2023, arXiv 2303.12501), which CSKT and DM-Adapter reuse:
training has one sample per (image, caption) pair; evaluation ranks every image of a split (the
gallery) for every caption of it (the queries), and an image is relevant when its identity matches.

Layout under --root (default data/); image paths in the JSON are relative to imgs/:

    <root>/CUHK-PEDES/reid_raw.json      <root>/CUHK-PEDES/imgs/CUHK01/0363004.png ...
    <root>/ICFG-PEDES/ICFG-PEDES.json    <root>/ICFG-PEDES/imgs/...
    <root>/RSTPReid/data_captions.json   <root>/RSTPReid/imgs/0000_c14_0031.jpg ...

Each annotation file is a JSON list with one object per image:

    {"split": "train", "id": 12, "file_path": "CUHK01/0363004.png", "captions": ["A woman ...", ...]}

split is "train", "test" or anything else for val; RSTPReid names the image field "img_path";
CUHK-PEDES entries also carry "processed_tokens", which nobody uses. The synthetic sets "demo"
and "demo-pretrain" are drawn by this file on first use, in the CUHK-PEDES layout, and read back
by the same reader (section "The synthetic demo sets").

Bad data is never dropped: every problem raises DataError, one line naming the file and entry,
before any training: load_dataset tokenizes every caption and reads the header of every image.
`python data.py --check NAME --root DIR` reports every problem of a dataset at once, and decodes
every image in full.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, DistributedSampler

import clip_min


class DataError(Exception):
    """Missing or malformed data. The message is one line naming the file (and entry) at fault."""


# ------------------------------------------------------------------------------------------------
# The datasets, where to get them, and what reading one gives
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    annotation: str   # the JSON file, relative to <root>/<name>/
    image_field: str  # key of the image path in each entry
    has_val: bool     # without val, a split other than train/test is an error
    source: str       # where users get it


DRAWN_HERE = "synthetic, drawn by data.py on first use"
DATASETS = {
    "CUHK-PEDES": DatasetInfo(
        "reid_raw.json", "file_path", True,
        'Li et al., "Person Search with Natural Language Description", CVPR 2017; request it from '
        "the authors via github.com/ShuangLI59/Person-Search-with-Natural-Language-Description"),
    "ICFG-PEDES": DatasetInfo(
        "ICFG-PEDES.json", "file_path", False,
        'Ding et al., "Semantically Self-Aligned Network for Text-to-Image Part-aware Person '
        'Re-identification", arXiv 2107.12666; get it via github.com/zifyloo/SSAN'),
    "RSTPReid": DatasetInfo(
        "data_captions.json", "img_path", True,
        'Zhu et al., "DSSL: Deep Surroundings-person Separation Learning for Text-based Person '
        'Retrieval", ACM MM 2021; get it via github.com/NjtechCVLab/RSTPReid-Dataset'),
    "demo": DatasetInfo("reid_raw.json", "file_path", True, DRAWN_HERE),
    "demo-pretrain": DatasetInfo("reid_raw.json", "file_path", False, DRAWN_HERE),
}


@dataclass
class TrainSplit:
    image_paths: list[str]     # one per annotation entry (= image), absolute
    image_index: torch.Tensor  # [N] long: the image of each (image, caption) sample
    pids: torch.Tensor         # [N] long: identity of each sample, remapped to 0..num_identities-1
    captions: list[str]        # [N]
    ids: torch.Tensor          # [N, 77] long: the captions tokenized (SOT, BPE ids, EOT, zero padding)
    num_truncated: int         # captions longer than 77 tokens, cut to fit
    num_identities: int


@dataclass
class EvalSplit:
    image_paths: list[str]     # the gallery, absolute
    image_pids: torch.Tensor   # [Ng] long, the dataset's own ids (only equality matters)
    captions: list[str]        # the queries: every caption of the split
    caption_pids: torch.Tensor  # [Nq] long
    ids: torch.Tensor          # [Nq, 77] long: the queries tokenized
    num_truncated: int         # queries longer than 77 tokens, cut to fit


@dataclass
class Dataset:
    name: str
    root: str
    train: TrainSplit
    val: EvalSplit | None
    test: EvalSplit


# ------------------------------------------------------------------------------------------------
# Reading and validating an annotation file
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One valid annotation entry: an image and its captions."""
    split: str  # "train", "val" or "test"
    pid: int
    image: str  # absolute path, inside <root>/<name>/imgs/
    captions: list[str]
    tokens: list[list[int]]  # the BPE ids of each caption, without SOT and EOT; never empty


# What Pillow raises on a file it cannot read: the errors its own Image.open takes to mean "not this
# format", those of its decoders, and DecompressionBombError for a size beyond its limit.
READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, IndexError, TypeError, struct.error,
               Image.DecompressionBombError)
# Header reads in flight at once. Checking 40,000 JPEGs of 128x64 on 2 busy CPU cores took 1.5 s
# on one thread and 1.2 s on 16 with the files in the page cache (Pillow's header parsing, ~25 us
# of CPU a file, holds the GIL), and 5.0 s against 2.9 s with the files evicted from it: threads
# overlap the waits on the disk, which matters most on a network file system.
IMAGE_CHECK_THREADS = 16


def why_unreadable(error: Exception) -> str:
    """Pillow's complaint in one line, without the path that the message names anyway."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image file Pillow can read"
    return (getattr(error, "strerror", None) or str(error)).replace("\n", " ")


def image_problem(image: str) -> str | None:
    """Why the file `image` cannot be used, or None. Opening reads the header only (format, mode,
    size), not the pixels: a file cut short passes here and fails when it is decoded."""
    if not os.path.isfile(image):
        return f"image not found: {image!r}"
    try:
        with Image.open(image):
            return None
    except READ_ERRORS as e:
        return f"unreadable image {image!r}: {why_unreadable(e)}"


def image_problems(images: list[str]) -> list[str | None]:
    """image_problem of each image, on IMAGE_CHECK_THREADS threads. A task reads a chunk of images:
    one future per image would cost about as much as the header read itself."""
    chunks = [images[k : k + 256] for k in range(0, len(images), 256)]
    with ThreadPoolExecutor(IMAGE_CHECK_THREADS) as pool:
        found = pool.map(lambda chunk: [image_problem(image) for image in chunk], chunks)
        return [problem for chunk in found for problem in chunk]


def read_annotations(name: str, root: str) -> tuple[list[Entry], list[str]]:
    """The valid entries of <root>/<name>/<annotation>, and one line per problem found, in file order.

    Every entry is checked, every caption tokenized and the header of every image read, so that
    --check can report all problems at once and load_dataset can stop at the first before any
    training (a corrupt test image would otherwise surface after the last epoch). A missing folder
    or file and malformed JSON leave nothing else to check: they raise at once.
    """
    info = DATASETS[name]
    folder = os.path.join(root, name)
    path = os.path.join(folder, info.annotation)
    get_it = f"Get {name} ({info.source}); put its annotations at {path}, its images under {folder}/imgs/"
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: dataset folder not found. {get_it}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found. {get_it}")
    try:
        with open(path, encoding="utf-8") as f:
            annotations = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    if not isinstance(annotations, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(annotations).__name__}")

    imgs = os.path.abspath(os.path.join(folder, "imgs"))
    tokenizer = clip_min.default_tokenizer()
    required = {"split": str, "id": int, info.image_field: str, "captions": list}
    candidates: list[tuple[int, Entry]] = []  # (index, entry) with all fields right; image not yet opened
    problems: list[tuple[int, str]] = []      # (index of the entry at fault, the line)
    first_entry: dict[str, int] = {}          # image -> index of the first entry naming it
    for i, entry in enumerate(annotations):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            problems.append((i, f"{where}: expected an object, got {type(entry).__name__}"))
            continue
        found = []
        for key, kind in required.items():
            if key not in entry:
                found.append(f"{where}: missing '{key}'")
            elif isinstance(entry[key], bool) or not isinstance(entry[key], kind):  # JSON true is no id
                got = type(entry[key]).__name__
                found.append(f"{where}: '{key}' should be {kind.__name__}, got {got}")
        if found:
            problems += [(i, line) for line in found]
            continue
        pid, relative = entry["id"], entry[info.image_field]
        split = entry["split"] if entry["split"] in ("train", "test") else "val"
        if split == "val" and not info.has_val:
            found.append(f"{where}: split {entry['split']!r}, but {name} has only train and test")
        if not -2**63 <= pid < 2**63:
            found.append(f"{where}: 'id' {pid} does not fit in 64 bits")
        if not entry["captions"]:
            found.append(f"{where}: 'captions' is an empty list")
        tokens = []
        for k, text in enumerate(entry["captions"]):
            if not isinstance(text, str):
                found.append(f"{where}: caption {k} should be str, got {type(text).__name__}")
            elif not (caption_tokens := tokenizer.encode(text)):  # blank, control characters, markup
                found.append(f"{where}: caption {k} has no words once cleaned: {text[:40]!r}")
            else:
                tokens.append(caption_tokens)
        # Paths are taken as written, normalised: "a/../b.jpg" and "b.jpg" are one image. Links are
        # not resolved, since imgs/ itself is often a link to where the images are kept.
        image = os.path.normpath(os.path.join(imgs, relative))
        if not image.startswith(imgs + os.sep):  # absolute, or "../" out of imgs/
            found.append(f"{where}: image path {relative!r} is not inside {imgs}{os.sep}")
        elif image in first_entry:  # a doubled test query, or ground truth with two answers
            j = first_entry[image]
            other = annotations[j]["id"]
            found.append(f"{where}: duplicate of entry {j} (same image {relative!r}, same id {pid})"
                         if other == pid else
                         f"{where}: image {relative!r} is also in entry {j}, under id {other} (here {pid})")
        else:
            first_entry[image] = i
        problems += [(i, line) for line in found]
        if not found:
            candidates.append((i, Entry(split, pid, image, entry["captions"], tokens)))

    entries = []
    for (i, entry), problem in zip(candidates, image_problems([entry.image for _, entry in candidates])):
        if problem:
            problems.append((i, f"{path}: entry {i}: {problem}"))
        else:
            entries.append(entry)
    present = {e.split for e in entries}
    needed = ("train", "val", "test") if info.has_val else ("train", "test")
    problems += [(len(annotations), f"{path}: no valid '{split}' entries")
                 for split in needed if split not in present]
    return entries, [line for _, line in sorted(problems, key=lambda problem: problem[0])]


def caption_ids(tokens: list[list[int]]) -> tuple[torch.Tensor, int]:
    """BPE ids of N captions -> (ids [N, 77] long: SOT, the ids, EOT, zero padding; how many were cut).

    A caption of more than 75 ids keeps its first 75 and still ends in EOT, the text feature's
    position, as clip_min.tokenize(truncate=True) does and person-retrieval training expects.
    """
    length = clip_min.CONTEXT_LENGTH
    ids = torch.zeros(len(tokens), length, dtype=torch.long)  # [N, 77]
    for row, caption in enumerate(tokens):
        kept = [clip_min.SOT_TOKEN, *caption[: length - 2], clip_min.EOT_TOKEN]
        ids[row, : len(kept)] = torch.tensor(kept)
    return ids, sum(len(caption) > length - 2 for caption in tokens)


def train_split(entries: list[Entry]) -> TrainSplit:
    # A real remap by sorted id: IRRA assumes CUHK-PEDES ids are already 1..N and relies on set order.
    remap = {pid: k for k, pid in enumerate(sorted({e.pid for e in entries}))}
    image_index, pids, captions = [], [], []
    for k, e in enumerate(entries):
        image_index += [k] * len(e.captions)
        pids += [remap[e.pid]] * len(e.captions)
        captions += e.captions
    ids, num_truncated = caption_ids([t for e in entries for t in e.tokens])
    return TrainSplit([e.image for e in entries], torch.tensor(image_index), torch.tensor(pids), captions,
                      ids, num_truncated, num_identities=len(remap))


def eval_split(entries: list[Entry]) -> EvalSplit:
    ids, num_truncated = caption_ids([t for e in entries for t in e.tokens])
    return EvalSplit(image_paths=[e.image for e in entries],
                     image_pids=torch.tensor([e.pid for e in entries]),
                     captions=[c for e in entries for c in e.captions],
                     caption_pids=torch.tensor([e.pid for e in entries for _ in e.captions]),
                     ids=ids, num_truncated=num_truncated)


def load_dataset(name: str, root: str) -> Dataset:
    """Reads dataset `name` from <root>/<name>/; the demo sets are first drawn there if needed.

    Every problem stops it here, before any training. With 40,000 images and one-line captions it
    took 5-6 s on 2 busy CPU cores (3 s of CPU); a caption as long as CUHK-PEDES's takes ~70 us
    more to tokenize, ~5 s for its 80,440.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name in DEMO_SIZES:
        make_demo(name, root)  # the last section of this file
    entries, problems = read_annotations(name, root)
    if problems:
        more = f" (and {len(problems) - 1} more: python data.py --check {name} --root {root})"
        raise DataError(problems[0] + (more if len(problems) > 1 else ""))
    by_split = {split: [e for e in entries if e.split == split] for split in ("train", "val", "test")}
    val = eval_split(by_split["val"]) if DATASETS[name].has_val else None
    return Dataset(name, root, train_split(by_split["train"]), val, eval_split(by_split["test"]))


# ------------------------------------------------------------------------------------------------
# Image transforms and caption masking (the recipe both methods train with)
# ------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's pixel statistics, RGB in 0..1
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD = 10  # pixels of zero padding before the random crop


def build_transform(image_size: tuple[int, int] = (384, 128), train: bool = False) -> T.Compose:
    """PIL image -> normalised FloatTensor [3, H, W]; image_size is (H, W)."""
    resize = T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR)
    to_input = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if not train:
        return T.Compose([resize, *to_input])
    # Erasing comes after Normalize, so "fill with the mean values" writes those raw numbers into
    # normalised space (not the mean colour, which would be 0). Both methods trained that way.
    erase = T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=CLIP_MEAN)
    return T.Compose([resize, T.RandomHorizontalFlip(0.5), T.Pad(PAD, fill=0), T.RandomCrop(image_size),
                      *to_input, erase])


MASK_TOKEN = 49405  # <|mask|>: IRRA takes over the last BPE merge's id for it
MASK_PROB = 0.15    # chance that an eligible token is chosen


def mask_caption_ids(ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """BERT-style corruption of token ids [N, L] -> a new [N, L]; the caller's tensor is untouched.

    Eligible are real caption tokens, 0 < id < MASK_TOKEN: SOT, EOT and padding never change. A
    caption where nothing was chosen gets position 1 (its first token) masked, as IRRA does.
    """
    def uniform():
        return torch.rand(ids.shape, generator=generator, device=ids.device)  # [N, L]
    chosen = (ids > 0) & (ids < MASK_TOKEN) & (uniform() < MASK_PROB)        # [N, L]
    action = uniform()                                                        # [N, L]
    random_ids = torch.randint(1, MASK_TOKEN, ids.shape, generator=generator, device=ids.device)
    out = torch.where(chosen & (action < 0.8), MASK_TOKEN, ids)                    # 80 %: <|mask|>
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)  # 10 %: any; 10 %: kept
    out[~chosen.any(dim=1), 1] = MASK_TOKEN                                        # rows with none chosen
    return out


# ------------------------------------------------------------------------------------------------
# Torch datasets and loaders
# ------------------------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode Pillow reads -> 8-bit RGB. Pillow's own convert("RGB") clips 16-bit
    grey at 255 (a 16-bit PNG comes out almost white) and keeps whatever colour a transparent
    pixel happens to hold."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64)  # [H, W]
        if image.mode != "F":
            # 16-bit grey: Pillow reads 16-bit PNGs as "I;16" (older releases as "I"). 8 bits widen
            # to 16 as v * 257, so dividing by 257 inverts that: 65535 -> 255, 32896 -> 128.
            grey = grey / 257
        # "F" is on Pillow's 0..255 scale, the one convert("F") gives an 8-bit image.
        return Image.fromarray(grey.round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # A transparent pixel's colour means nothing: composite over black, like the padding.
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # RGB, L, 1, P, CMYK (Pillow undoes Adobe's inverted JPEGs), YCbCr


def load_image(path: str) -> Image.Image:
    """The image at `path` as 8-bit RGB. Decodes the whole file, so one cut short fails here."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except READ_ERRORS as e:
        raise DataError(f"{path}: unreadable image: {why_unreadable(e)}") from e


class CaptionImageDataset(torch.utils.data.Dataset):
    """Training samples of a TrainSplit: one per (image, caption) pair."""

    def __init__(self, split: TrainSplit, transform, mask_captions: bool = False):
        self.split, self.transform, self.mask_captions = split, transform, mask_captions
        # Tokenized once, when the split was read: byte-pair encoding per item and epoch would cost
        # more than decoding the image.
        self.ids = split.ids  # [N, 77]

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]  # [L]
        if self.mask_captions:
            # No generator: torch's RNG of the worker process, which the DataLoader seeds from its
            # generator (or the main process's RNG without workers), like the image augmentation.
            ids = mask_caption_ids(ids[None])[0]
        image = load_image(self.split.image_paths[self.split.image_index[i]])
        return {"images": self.transform(image), "ids": ids,
                "pids": self.split.pids[i], "image_index": self.split.image_index[i]}


class ImageList(torch.utils.data.Dataset):
    """Images in the order given, transformed: the gallery for evaluation."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


PREFETCH = 4  # batches each worker keeps ready; images are small, decoding is the bottleneck


def train_loader(split: TrainSplit, image_size: tuple[int, int], batch_size: int, workers: int,
                 augment: bool = True, mask_captions: bool = False, seed: int = 0,
                 distributed: bool = False) -> DataLoader:
    """Shuffled batches of the (image, caption) pairs of `split` at `image_size` (H, W), the last
    incomplete one dropped; augmented images and masked captions if asked. Under DDP call
    sampler.set_epoch(e)."""
    dataset = CaptionImageDataset(split, build_transform(image_size, train=augment), mask_captions)
    sampler, rank = None, 0
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        rank = torch.distributed.get_rank()
    # The generator orders the samples (without DDP) and seeds every worker's RNG, so augmentation
    # and masking are reproducible; per rank, so that ranks do not augment in lockstep. Workers
    # are not persistent: started anew each epoch, they take fresh seeds from the generator, which
    # train.py reseeds per epoch, so an epoch is the same whether or not the run was resumed.
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(dataset, batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
                      num_workers=workers, drop_last=True, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=PREFETCH if workers > 0 else None)


def eval_loaders(split: EvalSplit, image_size: tuple[int, int], batch_size: int = 512,
                 workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """(gallery images [B, 3, H, W], query ids [B, 77]), both in split order, the images at
    `image_size` (H, W) without augmentation. Captions are never masked."""
    images = DataLoader(ImageList(split.image_paths, build_transform(image_size)), batch_size, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    return images, DataLoader(split.ids, batch_size)  # [Nq, 77] rows: a tensor is a dataset of its rows


# ------------------------------------------------------------------------------------------------
# The synthetic demo sets: little people drawn with PIL, in two domains
# ------------------------------------------------------------------------------------------------
# No real dataset or pretrained CLIP can be downloaded offline, so the demo stands in for both
# halves of the pipeline. "demo-pretrain" is a corpus to train a tiny CLIP on from scratch (in
# place of OpenAI's pretraining); "demo" is the retrieval set the methods adapt that CLIP to. An
# identity is a fixed combination of attributes, each with few values shared by many identities,
# so only the combination identifies; its images differ in pose, scale, background and lighting.
# The demo domain has colours and a pattern, wording, clutter and camera noise that the pretraining
# corpus never shows: a frozen backbone has something to adapt to. All the knobs are here.

DEMO_IMAGE_SIZE = (128, 64)  # (H, W) of the stored pictures
# JPEG like the real sets, at a quality that keeps stripes and colours crisp (no chroma
# subsampling); PNG would take 15x longer to write, since sensor noise does not compress.
JPEG = dict(quality=95, subsampling=0)


@dataclass(frozen=True)
class DemoSize:
    train_ids: int
    val_ids: int
    test_ids: int
    images_per_id: int = 4
    captions_per_image: int = 2  # as in CUHK-PEDES
    seed: int = 0


DEMO_SIZES = {"demo": DemoSize(train_ids=200, val_ids=50, test_ids=50, seed=0),
              "demo-pretrain": DemoSize(train_ids=800, val_ids=0, test_ids=50, images_per_id=3, seed=1)}

COLOURS = {"black": (30, 30, 30), "white": (235, 235, 235), "grey": (128, 128, 128),
           "red": (200, 30, 30), "blue": (35, 65, 200), "green": (35, 150, 55), "yellow": (240, 210, 40),
           "purple": (120, 45, 160), "orange": (245, 130, 25), "pink": (245, 150, 190),
           "brown": (115, 70, 35), "teal": (15, 135, 135)}
HAIR_COLOURS = {"black": COLOURS["black"], "brown": COLOURS["brown"], "grey": COLOURS["grey"],
                "blond": (225, 195, 115)}
PATTERNS = ("plain", "striped", "checked", "logo")  # of the top
BOTTOMS = ("trousers", "shorts", "skirt")  # skirts only on women
BAGS = ("none", "backpack", "handbag")
HELD_OUT = {"purple", "orange", "checked"}  # never in demo-pretrain
SKIN_TONES = ((240, 205, 180), (215, 170, 135), (170, 120, 90), (110, 75, 55))
LONG_HAIR_P = {"man": 0.15, "woman": 0.7}
OMIT_P = 0.3        # chance that a caption leaves out hair, bag or shoes, as annotators do
COLOUR_JITTER = 12  # per channel and image: the same colour is never quite the same pixels
BACKGROUND_TINT = 12  # most a background channel strays from grey: too dull to pass for a garment

# Caption wording: a main clause (who, top, bottom), then the optional parts in random order.
# demo-pretrain reads like terse alt text, demo like the sentences of CUHK-PEDES.
PRETRAIN_WORDS = {
    "join": ", ",
    # Web captions begin in many ways. Learning that teaches the tiny CLIP's text tower to read a
    # description wherever it starts, as OpenAI's CLIP can (CSKT puts 8 prompt tokens in front).
    "prefix": ("", "", "", "a photo of a person: ", "photo of a pedestrian, ", "cctv still: ",
               "image of someone in the street, ", "a photo of a person or a pedestrian, ",
               "snapshot from a camera at the station: ", "picture, "),
    "person": {"man": ("man", "guy"), "woman": ("woman", "girl")},
    "main": ("a {person} wearing {top} and {bottom}", "{person} in {top} and {bottom}",
             "a photo of a {person} in {bottom} and {top}"),
    "top": {"plain": "a {sleeves}-sleeved {colour} {noun}",
            "striped": "a {sleeves}-sleeved {colour} striped {noun}",
            "checked": "a {sleeves}-sleeved {colour} checked {noun}",
            "logo": "a {sleeves}-sleeved {colour} {noun} with a logo"},
    "top_noun": ("shirt", "top"),
    "bottom": {"trousers": ("{colour} trousers",), "shorts": ("{colour} shorts",), "skirt": ("a {colour} skirt",)},
    "hair": ("with {length} {colour} hair",),
    "backpack": ("carrying a {colour} backpack",),
    "handbag": ("carrying a {colour} handbag", "with a {colour} bag"),
    "shoes": ("{colour} shoes", "wearing {colour} shoes"),
}
DEMO_WORDS = {
    "join": " ",
    "prefix": ("",),
    "person": {"man": ("man", "male pedestrian", "gentleman"),
               "woman": ("woman", "female pedestrian", "lady")},
    "main": ("The {person} is wearing {top} and {bottom}.",
             "This {person} is dressed in {top} with {bottom}.",
             "A {person} walking in {top} and {bottom}."),
    "top": {"plain": "a {colour} {noun} with {sleeves} sleeves",
            "striped": "a {colour} {noun} with stripes and {sleeves} sleeves",
            "checked": "a {colour} checked {noun} with {sleeves} sleeves",
            "logo": "a {colour} {noun} with {sleeves} sleeves and a logo on the front"},
    "top_noun": ("top", "shirt", "t-shirt"),
    "bottom": {"trousers": ("{colour} pants", "{colour} jeans", "{colour} trousers"),
               "shorts": ("{colour} shorts",), "skirt": ("a {colour} skirt",)},
    "hair": ("{He} has {length} {colour} hair.", "{His} hair is {colour} and {length}."),
    "backpack": ("{He} carries a {colour} backpack.", "There is a {colour} backpack on {his} back."),
    "handbag": ("{He} holds a {colour} handbag.", "A {colour} bag hangs from {his} hand."),
    "shoes": ("{He} wears {colour} shoes.", "{His} shoes are {colour}."),
}


@dataclass(frozen=True)
class DemoDomain:
    colours: tuple[str, ...]  # of tops, bottoms, bags and shoes
    hair_colours: tuple[str, ...]
    patterns: tuple[str, ...]
    bottoms: tuple[str, ...]
    clutter: int                     # at most this many background shapes per image
    brightness: tuple[float, float]  # range of a per-image lighting factor
    noise: float                     # std of per-pixel sensor noise, in 0..255 steps
    words: dict
    # Chance that a caption goes on with a second description of the same person. Long
    # captions train the text tower's positions up to ~70, which CSKT needs: its 8 prompt tokens
    # move every word 8 positions to the right.
    second_description: float = 0.0


def _shown(values) -> tuple[str, ...]:
    return tuple(v for v in values if v not in HELD_OUT)


DEMO_DOMAINS = {
    "demo-pretrain": DemoDomain(_shown(COLOURS), _shown(HAIR_COLOURS), _shown(PATTERNS), _shown(BOTTOMS),
                                clutter=2, brightness=(0.95, 1.05), noise=0.0, words=PRETRAIN_WORDS,
                                second_description=0.5),
    "demo": DemoDomain(tuple(COLOURS), tuple(HAIR_COLOURS), PATTERNS, BOTTOMS,
                       clutter=5, brightness=(0.8, 1.0), noise=4.0, words=DEMO_WORDS),
}


@dataclass(frozen=True)
class Person:
    """An identity. Two are equal when no caption can tell them apart (build and skin do not count)."""
    gender: str
    hair: str
    hair_length: str
    top: str
    pattern: str
    sleeves: str
    bottom: str
    bottom_kind: str
    bag: str
    bag_colour: str  # "" without a bag
    shoes: str
    build: float = field(compare=False)  # width factor
    skin: tuple[int, int, int] = field(compare=False)


def _sample_person(domain: DemoDomain, rng: random.Random) -> Person:
    gender, bag = rng.choice(("man", "woman")), rng.choice(BAGS)
    return Person(
        gender=gender, hair=rng.choice(domain.hair_colours),
        hair_length="long" if rng.random() < LONG_HAIR_P[gender] else "short",
        top=rng.choice(domain.colours), pattern=rng.choice(domain.patterns),
        sleeves=rng.choice(("short", "long")), bottom=rng.choice(domain.colours),
        bottom_kind=rng.choice([b for b in domain.bottoms if gender == "woman" or b != "skirt"]),
        bag=bag, bag_colour=rng.choice(domain.colours) if bag != "none" else "",
        shoes=rng.choice(domain.colours), build=rng.uniform(0.9, 1.15), skin=rng.choice(SKIN_TONES))


def demo_people(name: str, size: DemoSize) -> list[Person]:
    """The identities of a demo set, train then val then test, all different. "demo" shares none
    with "demo-pretrain" (at its configured size)."""
    rng = random.Random(f"{size.seed}:people")
    taken = set(demo_people("demo-pretrain", DEMO_SIZES["demo-pretrain"])) if name == "demo" else set()
    people = []
    while len(people) < size.train_ids + size.val_ids + size.test_ids:
        person = _sample_person(DEMO_DOMAINS[name], rng)
        if person not in taken:
            taken.add(person)
            people.append(person)
    return people


def _caption(p: Person, words: dict, rng: random.Random) -> str:
    he, his = ("he", "his") if p.gender == "man" else ("she", "her")
    who = dict(person=rng.choice(words["person"][p.gender]), he=he, He=he.capitalize(), his=his,
               His=his.capitalize())
    noun = rng.choice(words["top_noun"])
    top = words["top"][p.pattern].format(colour=p.top, sleeves=p.sleeves, noun=noun)
    bottom = rng.choice(words["bottom"][p.bottom_kind]).format(colour=p.bottom)
    parts = [("hair", dict(colour=p.hair, length=p.hair_length)), ("shoes", dict(colour=p.shoes))]
    if p.bag != "none":
        parts.append((p.bag, dict(colour=p.bag_colour)))
    extras = [rng.choice(words[key]).format(**who, **values)
              for key, values in parts if rng.random() >= OMIT_P]
    rng.shuffle(extras)
    text = words["join"].join([rng.choice(words["main"]).format(top=top, bottom=bottom, **who), *extras])
    text = rng.choice(words["prefix"]) + text
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def _muted(rng: random.Random, low: int = 70, high: int = 200) -> tuple[int, int, int]:
    grey = rng.randint(low, high)
    return tuple(grey + rng.randint(-BACKGROUND_TINT, BACKGROUND_TINT) for _ in range(3))


def _along(a: tuple, b: tuple, t: float) -> tuple:
    """The point a fraction t of the way from a to b (where a sleeve or a trouser leg ends)."""
    return a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])


def _paint_top(image: Image.Image, torso: list, colour: tuple, pattern: str, chest: tuple, u: float):
    """Fills the torso polygon with `colour` and its pattern, in an ink that contrasts with it."""
    layer = Image.new("RGB", image.size, colour)
    draw = ImageDraw.Draw(layer)
    ink = (40, 40, 40) if sum(colour) > 330 else (220, 220, 220)  # dark on light colours, light on dark
    step, width = max(3, round(5 * u)), max(1, round(1.5 * u))
    if pattern in ("striped", "checked"):
        for y in range(0, image.height, step):
            draw.line([(0, y), (image.width, y)], fill=ink, width=width)
    if pattern == "checked":
        for x in range(0, image.width, step):
            draw.line([(x, 0), (x, image.height)], fill=ink, width=width)
    if pattern == "logo":
        draw.rectangle((chest[0] - 3 * u, chest[1] - 3 * u, chest[0] + 3 * u, chest[1] + 3 * u), fill=ink)
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(torso, fill=255)
    image.paste(layer, mask=mask)


def draw_person(p: Person, domain: DemoDomain, rng: random.Random,
                noise: np.random.Generator) -> Image.Image:
    """One picture of `p` standing, seen from the front; pose, scale, scene and light vary per call."""
    H, W = DEMO_IMAGE_SIZE

    def tint(rgb):
        return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)

    image = Image.new("RGB", (W, H), _muted(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, domain.clutter)):  # scenery: boxes and poles
        x, y = rng.uniform(0, W), rng.uniform(0, H)
        if rng.random() < 0.5:
            draw.rectangle((x, y, x + rng.uniform(4, W / 2), y + rng.uniform(4, H / 2)), fill=_muted(rng))
        else:
            end = (x + rng.uniform(-W / 2, W / 2), y + H)
            draw.line((x, y, *end), fill=_muted(rng), width=rng.randint(1, 3))
    ground = H * rng.uniform(0.96, 0.99)
    draw.rectangle((0, ground - 2, W, H), fill=_muted(rng, 50, 140))

    # The body, in units u of 1 % of the person's height.
    height = H * rng.uniform(0.8, 0.95)
    u, top, cx = height / 100, ground - height, W / 2 + rng.uniform(-0.08, 0.08) * W
    r = 6.5 * u  # head radius
    y_shoulder, y_hip, y_knee, y_ankle = top + 15 * u, top + 50 * u, top + 72 * u, top + 95 * u
    shoulder = (12.5 if p.gender == "man" else 10.5) * u * p.build  # half widths
    waist = (11 if p.gender == "man" else 9.5) * u * p.build
    arm, leg = max(1, round(5 * u)), max(1, round(6.5 * u))
    spread, swing = rng.uniform(0, 6) * u, rng.uniform(-3, 3) * u
    skin, hair, shirt = tint(p.skin), tint(HAIR_COLOURS[p.hair]), tint(COLOURS[p.top])
    bottom, shoes = tint(COLOURS[p.bottom]), tint(COLOURS[p.shoes])
    bag = tint(COLOURS[p.bag_colour]) if p.bag != "none" else None

    if p.bag == "backpack":  # behind the body: shows beside the shoulders
        reach = shoulder + arm + 1.5 * u
        draw.rectangle((cx - reach, y_shoulder - u, cx + reach, y_shoulder + 26 * u), fill=bag)
    if p.hair_length == "long":
        draw.rectangle((cx - 1.15 * r, top + r, cx + 1.15 * r, y_shoulder + 8 * u), fill=hair)
    covered = {"trousers": 1.0, "shorts": 0.45, "skirt": 0.0}[p.bottom_kind]  # of each leg, from the hip
    for side in (-1, 1):
        hip, ankle = (cx + side * 4.5 * u, y_hip), (cx + side * (4.5 * u + spread), y_ankle)
        draw.line([hip, ankle], fill=skin, width=leg)
        draw.line([hip, _along(hip, ankle, covered)], fill=bottom, width=leg)
        draw.ellipse((ankle[0] - 4 * u, y_ankle - u, ankle[0] + 4 * u, top + height), fill=shoes)
    if p.bottom_kind == "skirt":
        draw.polygon([(cx - waist, y_hip - 2 * u), (cx + waist, y_hip - 2 * u), (cx + 1.6 * waist, y_knee),
                      (cx - 1.6 * waist, y_knee)], fill=bottom)
    else:
        draw.rectangle((cx - waist, y_hip - 2 * u, cx + waist, y_hip + 6 * u), fill=bottom)
    torso = [(cx - shoulder, y_shoulder), (cx + shoulder, y_shoulder), (cx + waist, y_hip),
             (cx - waist, y_hip)]
    _paint_top(image, torso, shirt, p.pattern, (cx, y_shoulder + 9 * u), u)
    hands = []
    for side in (-1, 1):
        start = (cx + side * (shoulder + arm / 2 - u), y_shoulder + 2 * u)
        hand = (cx + side * (shoulder + arm / 2) + swing, y_hip + 2 * u)
        draw.line([start, hand], fill=skin, width=arm)
        draw.line([start, _along(start, hand, 1.0 if p.sleeves == "long" else 0.4)], fill=shirt, width=arm)
        draw.ellipse((hand[0] - 2.5 * u, hand[1] - 2.5 * u, hand[0] + 2.5 * u, hand[1] + 2.5 * u),
                     fill=skin)
        hands.append(hand)
    if p.bag == "backpack":  # the straps
        for side in (-1, 1):
            x = cx + side * 0.55 * shoulder
            draw.line([(x, y_shoulder), (x, y_shoulder + 18 * u)], fill=bag, width=max(1, round(2 * u)))
    if p.bag == "handbag":
        x, y = rng.choice(hands)
        draw.line([(x, y), (x, y + 3 * u)], fill=(40, 40, 40), width=1)
        draw.rectangle((x - 4 * u, y + 3 * u, x + 4 * u, y + 12 * u), fill=bag)
    draw.rectangle((cx - 2.5 * u, top + 2 * r - 2 * u, cx + 2.5 * u, y_shoulder + 1), fill=skin)  # neck
    draw.ellipse((cx - 0.85 * r, top, cx + 0.85 * r, top + 2 * r), fill=skin)
    draw.chord((cx - 0.95 * r, top - 0.5 * u, cx + 0.95 * r, top + 1.3 * r), 180, 360, fill=hair)

    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(*domain.brightness)  # [H, W, 3]
    pixels += noise.normal(0.0, domain.noise, pixels.shape)
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))


STAMP = "generated-by-data.py"  # in a demo folder: a hash of what the set was generated from


def make_demo(name: str, root: str, size: DemoSize | None = None) -> str:
    """Draws demo set `name` into <root>/<name>/ unless it is there already; returns the folder.

    The stamp hashes the size and this very file, so changing any knob above (or the drawing)
    draws the set anew rather than reusing a stale one. Everything goes to a temporary folder,
    renamed at the end: an interrupted run never leaves a set that looks complete.
    """
    size = size or DEMO_SIZES[name]
    folder = os.path.join(root, name)
    with open(__file__, "rb") as f:
        stamp = hashlib.sha256(repr(size).encode() + f.read()).hexdigest()

    def found_stamp() -> str | None:
        if not os.path.isfile(os.path.join(folder, STAMP)):
            return None
        with open(os.path.join(folder, STAMP)) as f:
            return f.read()

    if found_stamp() == stamp:
        return folder
    if os.path.exists(folder) and found_stamp() is None:
        raise DataError(f"{folder}: exists but was not drawn by data.py; move it away to draw {name} there")
    start, work = time.time(), f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    domain, rng = DEMO_DOMAINS[name], random.Random(f"{size.seed}:images")
    noise = np.random.default_rng(size.seed)
    splits = ["train"] * size.train_ids + ["val"] * size.val_ids + ["test"] * size.test_ids
    for split in set(splits):
        os.makedirs(os.path.join(work, "imgs", split))
    entries = []
    for pid, (person, split) in enumerate(zip(demo_people(name, size), splits), start=1):
        for k in range(size.images_per_id):
            path = f"{split}/{pid:05d}_{k}.jpg"
            draw_person(person, domain, rng, noise).save(os.path.join(work, "imgs", path), **JPEG)
            captions = [_caption(person, domain.words, rng) for _ in range(size.captions_per_image)]
            captions = [c + "; " + _caption(person, domain.words, rng) if rng.random() < domain.second_description
                        else c for c in captions]
            entries.append({"split": split, "id": pid, "file_path": path, "captions": captions})
    with open(os.path.join(work, DATASETS[name].annotation), "w") as f:
        json.dump(entries, f, indent=1)
    with open(os.path.join(work, STAMP), "w") as f:
        f.write(stamp)
    if found_stamp() == stamp:  # another process drew the same set meanwhile
        shutil.rmtree(work)
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an older drawing: it carries a stamp
    os.rename(work, folder)
    print(f"data.py: drew {name} ({len(entries)} images) in {folder}, {time.time() - start:.1f} s",
          file=sys.stderr)
    return folder


# ------------------------------------------------------------------------------------------------
# Command line: check a dataset, draw the demo sets
# ------------------------------------------------------------------------------------------------

PROGRESS_EVERY = 5000  # images between progress lines of --check


def check(name: str, root: str) -> int:
    """Prints the counts per split and every problem, decoding every image; returns the problem count."""
    if name in DEMO_SIZES:
        make_demo(name, root)
    try:
        entries, problems = read_annotations(name, root)
    except DataError as e:  # nothing readable: that one problem is all there is to say
        entries, problems = [], [str(e)]
    for n, entry in enumerate(entries, start=1):
        try:
            load_image(entry.image)  # the whole file: one cut short passes the header read
        except DataError as e:
            problems.append(str(e))
        if n % PROGRESS_EVERY == 0:
            print(f"opened {n} / {len(entries)} images", file=sys.stderr)
    print(f"{name} under {root} (valid entries):\n"
          f"{'split':<6} {'ids':>7} {'images':>7} {'captions':>8} {'cut to 77 tokens':>16}")
    for split in ("train", "val", "test"):
        part = [e for e in entries if e.split == split]
        if part:
            ids, captions = len({e.pid for e in part}), sum(len(e.captions) for e in part)
            cut = caption_ids([t for e in part for t in e.tokens])[1]
            print(f"{split:<6} {ids:>7} {len(part):>7} {captions:>8} {cut:>16}")
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)")
    return len(problems)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Check a person-retrieval dataset, or draw the demo sets.")
    parser.add_argument("--check", metavar="NAME", choices=list(DATASETS),
                        help=f"scan dataset NAME ({', '.join(DATASETS)}), open every image, report every "
                             "problem with counts per split; exit status 1 if there is any")
    parser.add_argument("--make-demo", action="store_true",
                        help="draw demo and demo-pretrain under --root (unless they are up to date)")
    parser.add_argument("--root", default="data",
                        help="folder holding one folder per dataset (default: data)")
    args = parser.parse_args()
    if not (args.check or args.make_demo):
        parser.error("nothing to do: give --check NAME or --make-demo")
    try:
        if args.make_demo:
            for demo in DEMO_SIZES:
                make_demo(demo, args.root)
        if args.check:
            sys.exit(1 if check(args.check, args.root) else 0)
    except DataError as e:
        sys.exit(f"data.py: {e}")
