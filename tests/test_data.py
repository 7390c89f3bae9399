"""data.py: the three readers on tiny fixtures in their published formats, every bad-input case,
--check, transforms and loaders, caption masking statistics, and the synthetic demo sets."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOT, EOT = 49406, 49407


def write_dataset(root, name, entries):
    """Writes `entries` as the dataset's annotation file, and a small picture for each image."""
    field = data.DATASETS[name].image_field
    for k, entry in enumerate(entries):
        path = root / name / "imgs" / entry[field]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 24), (10 * k, 100, 200)).save(path)
    (root / name / data.DATASETS[name].annotation).write_text(json.dumps(entries))


def cuhk_entries():
    """Train ids 7, 3, 12 (7 with two images), val id 20, test ids 30 and 31."""
    def entry(split, pid, path, captions):
        return {"split": split, "captions": captions, "file_path": path,
                "processed_tokens": [c.lower().split() for c in captions], "id": pid}
    return [entry("train", 7, "cam_a/007_1.png", ["a man in red.", "red shirt, black pants."]),
            entry("train", 7, "cam_b/007_2.png", ["a man in a red shirt.", "he wears black pants."]),
            entry("train", 3, "CUHK01/003.png", ["a woman with a bag.", "she carries a bag."]),
            entry("train", 12, "CUHK03/012.png", ["a child in blue."]),
            entry("val", 20, "Market/020.png", ["a man in grey.", "grey coat."]),
            entry("test", 30, "test_query/030.png", ["a woman in green.", "green dress."]),
            entry("test", 31, "test_query/031.png", ["a man in white.", "white shirt."])]


@pytest.fixture
def cuhk(tmp_path):
    write_dataset(tmp_path, "CUHK-PEDES", cuhk_entries())
    return tmp_path


# ------------------------------------------------------------------------------------------------
# The three readers

def test_cuhk_reader_remaps_ids_and_counts(cuhk):
    dataset = data.load_dataset("CUHK-PEDES", str(cuhk))
    train = dataset.train
    assert train.num_identities == 3
    assert len(train.image_paths) == 4 and len(train.captions) == 7
    assert train.image_index.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert train.pids.tolist() == [1, 1, 1, 1, 0, 0, 2]  # sorted ids 3, 7, 12 -> 0, 1, 2
    assert train.captions[4] == "a woman with a bag."
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in train.image_paths)
    assert dataset.val.image_pids.tolist() == [20] and dataset.val.caption_pids.tolist() == [20, 20]
    assert len(dataset.test.image_paths) == 2 and len(dataset.test.captions) == 4
    assert dataset.test.caption_pids.tolist() == [30, 30, 31, 31]  # original ids: only equality matters


def test_icfg_reader_has_no_val(tmp_path):
    entries = [{"id": pid, "file_path": f"{split}/{pid:04d}/{pid:04d}_0.jpg", "processed_tokens": [],
                "captions": [f"person {pid}."], "split": split}
               for pid, split in [(5, "train"), (2, "train"), (9, "test")]]
    write_dataset(tmp_path, "ICFG-PEDES", entries)
    dataset = data.load_dataset("ICFG-PEDES", str(tmp_path))
    assert dataset.val is None
    assert dataset.train.pids.tolist() == [1, 0] and dataset.test.image_pids.tolist() == [9]

    entries[1]["split"] = "val"
    write_dataset(tmp_path, "ICFG-PEDES", entries)
    with pytest.raises(data.DataError, match=r"ICFG-PEDES\.json: entry 1: split 'val'"):
        data.load_dataset("ICFG-PEDES", str(tmp_path))


def test_rstpreid_reader_uses_img_path(tmp_path):
    splits = [(100, "train"), (101, "train"), (200, "val"), (300, "test")]
    entries = [{"id": pid, "img_path": f"{pid:04d}_c1_000{k}.jpg", "captions": ["one.", "two."],
                "split": split} for pid, split in splits for k in range(2)]
    write_dataset(tmp_path, "RSTPReid", entries)
    dataset = data.load_dataset("RSTPReid", str(tmp_path))
    assert len(dataset.train.captions) == 8 and dataset.train.num_identities == 2
    assert len(dataset.val.image_paths) == 2 and len(dataset.val.captions) == 4
    assert len(dataset.test.image_paths) == 2 and len(dataset.test.captions) == 4

    entries[3] = {"id": 101, "file_path": entries[3]["img_path"], "captions": ["c."], "split": "train"}
    (tmp_path / "RSTPReid/data_captions.json").write_text(json.dumps(entries))
    with pytest.raises(data.DataError, match=r"data_captions\.json: entry 3: missing 'img_path'"):
        data.load_dataset("RSTPReid", str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and the entry)

def changed(i, **fields):
    """A spoiler: the entries with fields of entry i replaced (None removes the field)."""
    def spoil(entries):
        entry = {key: value for key, value in {**entries[i], **fields}.items() if value is not None}
        return entries[:i] + [entry] + entries[i + 1:]
    return spoil


BAD_INPUTS = {  # case: (the annotation text, or a spoiler of the clean entries; what the error says)
    "malformed JSON": ('[{"split": "train",\n  "id": 7,,', r"malformed JSON: .* line 2, column 11"),
    "not a list": ('{"split": "train"}', r"reid_raw\.json: expected a JSON list"),
    "entry not an object": (lambda entries: ["cam_a/007_1.png"] + entries[1:],
                            r"reid_raw\.json: entry 0: expected an object, got str"),
    "missing field": (changed(2, captions=None), r"reid_raw\.json: entry 2: missing 'captions'"),
    "wrong type": (changed(0, id="7"), r"reid_raw\.json: entry 0: 'id' should be int, got str"),
    "empty captions": (changed(1, captions=[]), r"reid_raw\.json: entry 1: 'captions' is an empty list"),
    "blank caption": (changed(1, captions=["ok.", " "]), r"reid_raw\.json: entry 1: caption 1 is not"),
    "missing image": (changed(3, file_path="CUHK03/gone.png"),
                      r"reid_raw\.json: entry 3: image not found: .*CUHK03/gone\.png"),
    "no test entries": (lambda entries: entries[:5], r"reid_raw\.json: no valid 'test' entries"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line(cuhk, case):
    spoiler, pattern = BAD_INPUTS[case]
    text = spoiler if isinstance(spoiler, str) else json.dumps(spoiler(cuhk_entries()))
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(text)
    with pytest.raises(data.DataError, match=pattern) as error:
        data.load_dataset("CUHK-PEDES", str(cuhk))
    assert "reid_raw.json" in str(error.value) and "\n" not in str(error.value)


def test_missing_folder_or_file_says_where_to_get_the_dataset(cuhk):
    with pytest.raises(data.DataError, match=r"RSTPReid: dataset folder not found.*NjtechCVLab"):
        data.load_dataset("RSTPReid", str(cuhk))
    (cuhk / "CUHK-PEDES/reid_raw.json").unlink()
    with pytest.raises(data.DataError, match=r"reid_raw\.json: annotation file not found.*ShuangLI59"):
        data.load_dataset("CUHK-PEDES", str(cuhk))
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_dataset("Market-1501", str(cuhk))


def test_unreadable_image_raises_when_loaded(cuhk):
    broken = cuhk / "CUHK-PEDES/imgs/CUHK01/003.png"
    broken.write_bytes(b"not a png at all")
    dataset = data.load_dataset("CUHK-PEDES", str(cuhk))  # a stat cannot tell
    transform = data.build_transform((32, 16))
    with pytest.raises(data.DataError, match=re.escape(str(broken)) + ": unreadable image"):
        data.CaptionImageDataset(dataset.train, transform)[4]
    with pytest.raises(data.DataError, match=re.escape(str(broken))):
        data.ImageList(dataset.train.image_paths, transform)[2]


def run_check(root):
    return subprocess.run([sys.executable, "data.py", "--check", "CUHK-PEDES", "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_check_reports_every_problem(cuhk):
    clean = run_check(cuhk)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert re.search(r"train\s+3\s+4\s+7", clean.stdout) and "0 problem(s)" in clean.stdout

    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(changed(1, captions=[])(cuhk_entries())))
    os.remove(cuhk / "CUHK-PEDES/imgs/CUHK03/012.png")
    (cuhk / "CUHK-PEDES/imgs/test_query/030.png").write_bytes(b"garbage")
    report = run_check(cuhk)
    assert report.returncode == 1
    assert "entry 1: 'captions' is an empty list" in report.stdout
    assert "entry 3: image not found" in report.stdout
    assert "030.png: unreadable image" in report.stdout
    assert "3 problem(s)" in report.stdout


# ------------------------------------------------------------------------------------------------
# Transforms, samples and loaders

def test_transform_shapes_and_normalisation():
    image = Image.new("RGB", (20, 50), tuple(round(255 * m) for m in data.CLIP_MEAN))
    test = data.build_transform((64, 32))(image)
    assert test.shape == (3, 64, 32) and test.dtype == torch.float32
    assert test.abs().max() < 0.02  # the mean colour maps to 0 (up to 8-bit rounding)
    torch.manual_seed(0)
    assert data.build_transform((64, 32), train=True)(image).shape == (3, 64, 32)


def test_samples_and_loaders(cuhk):
    torch.manual_seed(0)
    dataset = data.load_dataset("CUHK-PEDES", str(cuhk))
    transform = data.build_transform((32, 16), train=True)
    samples = data.CaptionImageDataset(dataset.train, transform, mask_captions=True)
    item = samples[6]
    assert item["images"].shape == (3, 32, 16) and item["ids"].shape == (77,)
    assert item["pids"].item() == 2 and item["image_index"].item() == 3
    masked = torch.stack([samples[6]["ids"] for _ in range(20)])  # [20, 77]
    assert (masked == data.MASK_TOKEN).any(dim=1).float().mean() > 0.5
    assert not (samples.ids == data.MASK_TOKEN).any()  # the stored ids stay clean

    def pid_order():
        return [b["pids"].tolist() for b in data.train_loader(samples, batch_size=3, workers=0, seed=1)]
    assert len(pid_order()) == 2  # 7 samples: the incomplete batch is dropped
    assert pid_order() == pid_order()  # the seed fixes the order
    batch = next(iter(data.train_loader(samples, batch_size=3, workers=0)))
    assert batch["images"].shape == (3, 3, 32, 16) and batch["ids"].shape == (3, 77)

    images, captions = data.eval_loaders(dataset.test, data.build_transform((32, 16)), batch_size=3)
    assert [b.shape for b in images] == [(2, 3, 32, 16)]
    assert [b.shape for b in captions] == [(3, 77), (1, 77)]
    assert not (torch.cat(list(captions)) == data.MASK_TOKEN).any()  # queries are never masked


# ------------------------------------------------------------------------------------------------
# Caption masking (SPEC 4.5)

def random_captions(n, low, high, generator):
    """Token ids [n, 77]: SOT, between low and high - 1 ordinary tokens, EOT, zero padding."""
    lengths = torch.randint(low, high, (n,), generator=generator)
    ids = torch.zeros(n, 77, dtype=torch.long)
    positions = torch.arange(77)
    words = (positions >= 1) & (positions[None] <= lengths[:, None])  # [n, 77]
    ids[words] = torch.randint(1, data.MASK_TOKEN, (int(words.sum()),), generator=generator)
    ids[:, 0] = SOT
    ids[torch.arange(n), lengths + 1] = EOT
    return ids


def test_mask_statistics():
    generator = torch.Generator().manual_seed(0)
    ids = random_captions(4000, 20, 70, generator)
    before = ids.clone()
    out = data.mask_caption_ids(ids, generator)
    assert torch.equal(ids, before)  # the caller's tensor is untouched
    eligible = (ids > 0) & (ids < data.MASK_TOKEN)
    assert torch.equal(out[~eligible], ids[~eligible])  # SOT, EOT and padding never change
    masked = (out == data.MASK_TOKEN) & eligible
    replaced = (out != ids) & ~masked
    counted = eligible.clone()
    counted[:, 1] = False  # position 1 is also masked when nothing else was chosen

    def rate(kind):
        return (kind & counted).sum() / counted.sum()
    assert abs(rate(masked) - 0.15 * 0.8) < 0.005
    assert abs(rate(replaced) - 0.15 * 0.1) < 0.002
    assert ((out[replaced] >= 1) & (out[replaced] < data.MASK_TOKEN)).all()

    short = random_captions(4000, 1, 2, generator)  # one token each: usually nothing is chosen
    masked_first = (data.mask_caption_ids(short, generator)[:, 1] == data.MASK_TOKEN).float().mean()
    assert abs(masked_first - (0.85 + 0.15 * 0.8)) < 0.01

    def seeded():
        return torch.Generator().manual_seed(5)
    assert torch.equal(data.mask_caption_ids(ids, seeded()), data.mask_caption_ids(ids, seeded()))


# ------------------------------------------------------------------------------------------------
# The synthetic demo sets

SMALL = data.DemoSize(train_ids=3, val_ids=1, test_ids=2, images_per_id=2, captions_per_image=2, seed=5)


def folder_bytes(folder):
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(parent, name), "rb") as f:
                files[os.path.relpath(os.path.join(parent, name), folder)] = f.read()
    return files


def test_demo_is_deterministic_per_seed(tmp_path):
    first = folder_bytes(data.make_demo("demo", str(tmp_path / "a"), SMALL))
    second = folder_bytes(data.make_demo("demo", str(tmp_path / "b"), SMALL))
    assert first == second and len([p for p in first if p.endswith(".jpg")]) == 12
    other = data.DemoSize(**{**SMALL.__dict__, "seed": 6})
    third = folder_bytes(data.make_demo("demo", str(tmp_path / "c"), other))
    assert third["reid_raw.json"] != first["reid_raw.json"]


def test_demo_is_drawn_again_only_when_its_settings_change(tmp_path):
    folder = data.make_demo("demo", str(tmp_path), SMALL)
    marker = os.path.join(folder, "marker")
    open(marker, "w").close()
    data.make_demo("demo", str(tmp_path), SMALL)
    assert os.path.exists(marker)  # up to date: reused
    data.make_demo("demo", str(tmp_path), data.DemoSize(**{**SMALL.__dict__, "test_ids": 3}))
    assert not os.path.exists(marker)  # another size: drawn again
    assert os.listdir(tmp_path) == ["demo"]  # no temporary folder left behind
    os.makedirs(tmp_path / "mine" / "demo")
    with pytest.raises(data.DataError, match="not drawn by data.py"):  # never overwrites other data
        data.make_demo("demo", str(tmp_path / "mine"), SMALL)


def test_demo_domains_differ_as_designed(tmp_path):
    size = data.DemoSize(train_ids=60, val_ids=0, test_ids=0, images_per_id=1, captions_per_image=4, seed=2)
    captions = {}
    for name in ("demo-pretrain", "demo"):
        with open(os.path.join(data.make_demo(name, str(tmp_path), size), "reid_raw.json")) as f:
            captions[name] = " ".join(c for entry in json.load(f) for c in entry["captions"])
    held_out = re.compile(r"\b(" + "|".join(sorted(data.HELD_OUT)) + r")\b")
    assert not held_out.search(captions["demo-pretrain"])
    assert set(held_out.findall(captions["demo"])) == data.HELD_OUT  # each held-out value does occur
    assert "dressed in" not in captions["demo-pretrain"] and "-sleeved" not in captions["demo"]

    pretrain = data.demo_people("demo-pretrain", data.DEMO_SIZES["demo-pretrain"])
    demo = data.demo_people("demo", data.DEMO_SIZES["demo"])
    assert not set(pretrain) & set(demo)
    size = data.DEMO_SIZES["demo"]
    assert len(set(demo)) == len(demo) == size.train_ids + size.val_ids + size.test_ids
    shown = {value for p in pretrain
             for value in (p.top, p.bottom, p.shoes, p.bag_colour, p.hair, p.pattern, p.bottom_kind)}
    assert not data.HELD_OUT & shown


def test_demo_round_trip_through_the_reader(tmp_path, monkeypatch):
    monkeypatch.setitem(data.DEMO_SIZES, "demo", SMALL)
    monkeypatch.setitem(data.DEMO_SIZES, "demo-pretrain", data.DemoSize(4, 0, 1, images_per_id=1, seed=1))
    demo = data.load_dataset("demo", str(tmp_path))
    assert demo.train.num_identities == 3
    assert len(demo.train.image_paths) == 6 and len(demo.train.captions) == 12
    assert len(demo.val.image_paths) == 2 and len(demo.test.captions) == 8
    assert Image.open(demo.test.image_paths[0]).size == data.DEMO_IMAGE_SIZE[::-1]
    pretrain = data.load_dataset("demo-pretrain", str(tmp_path))
    assert pretrain.val is None and len(pretrain.test.image_paths) == 1
