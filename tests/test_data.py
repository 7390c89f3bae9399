"""data.py: the three readers on tiny fixtures in their published formats, every bad-input case,
the reports and the verdict, --check, transforms and loaders and caption masking statistics (the
demo sets: test_demo.py)."""

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip_min
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


def test_icfg_in_its_published_shape_with_one_training_image_listed_twice(tmp_path):
    """ICFG-PEDES.json as published: one caption per entry, MSMT17-style paths (a train entry may sit
    under test/), train and test only, and one training image listed twice under its id with
    another caption (34,674 entries for 34,673 images). IRRA's reader takes both pairs; so do we."""
    def entry(split, pid, path, caption):
        return {"split": split, "file_path": path, "id": pid, "captions": [caption],
                "processed_tokens": [caption.lower().split()]}
    entries = [entry("train", 0, "train/0000/0000_000_01_0303morning_0015_0.jpg", "a man in a black coat."),
               entry("train", 0, "train/0000/0000_001_05_0303morning_0020_1.jpg", "black coat, grey trousers."),
               entry("train", 1, "test/0627/0627_010_05_0303afternoon_1591_0.jpg", "a woman with a red bag."),
               entry("train", 0, "train/0000/0000_000_01_0303morning_0015_0.jpg", "the man wears a black coat."),
               entry("test", 2, "test/0001/0001_004_01_0303morning_0031_0.jpg", "a man in white."),
               entry("test", 3, "test/0002/0002_007_02_0303noon_0112_0.jpg", "a woman in a blue dress.")]
    write_dataset(tmp_path, "ICFG-PEDES", entries)
    dataset = data.load_dataset("ICFG-PEDES", str(tmp_path))
    train = dataset.train
    assert len(train.captions) == 4 and train.captions[3] == "the man wears a black coat."
    assert train.image_paths[train.image_index[3]] == train.image_paths[train.image_index[0]]
    assert train.pids.tolist() == [0, 0, 1, 0]
    assert dataset.val is None and len(dataset.test.image_paths) == 2
    assert dataset.report == ["ICFG-PEDES train: entries repeating an earlier entry's image under the same id, "
                              "each kept as IRRA's reader keeps it: 1 (entry 3 = entry 0, "
                              "'train/0000/0000_000_01_0303morning_0015_0.jpg')"]
    assert dataset.published is False and "NOT the published set" in dataset.verdict


def test_rstpreid_captions_with_cjk_code_or_shared_text_are_read_as_written(tmp_path):
    """Some published RSTPReid captions hold CJK characters or fragments of code, and some identical
    captions appear under different ids: IRRA's reader tokenizes them as they are."""
    captions = {0: ["一个穿红衣服的女人 a woman in red.", "she wears <br> red shoes."],
                1: ["a man in a dark jacket.", "a man in a dark jacket."],
                2: ["a man in a dark jacket.", "def f(): return x"]}
    entries = [{"id": pid, "img_path": f"{pid:04d}_c14_00{k}1.jpg", "captions": text, "split": "train"}
               for pid, text in captions.items() for k in range(1)]
    entries += [{"id": 8, "img_path": "0008_c3_0011.jpg", "captions": ["a girl.", "a child."], "split": "val"},
                {"id": 9, "img_path": "0009_c3_0011.jpg", "captions": ["a boy.", "a child."], "split": "test"}]
    write_dataset(tmp_path, "RSTPReid", entries)
    dataset = data.load_dataset("RSTPReid", str(tmp_path))
    assert dataset.train.captions == [c for text in captions.values() for c in text]
    assert torch.equal(dataset.train.ids[2], dataset.train.ids[4])  # the same caption under ids 1 and 2
    assert dataset.train.pids.tolist() == [0, 0, 1, 1, 2, 2]
    assert (dataset.train.ids[0] > 0).sum() > 2  # the CJK caption keeps its tokens


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
    "caption not a string": (changed(1, captions=["ok.", 5]),
                             r"reid_raw\.json: entry 1: caption 1 should be str, got int"),
    "id beyond 64 bits": (changed(0, id=2**64),
                          r"reid_raw\.json: entry 0: 'id' 18446744073709551616 does not fit in 64 bits"),
    "missing image": (changed(3, file_path="CUHK03/gone.png"),
                      r"reid_raw\.json: entry 3: image not found: '.*CUHK03/gone\.png'"),
    "missing test image": (changed(6, file_path="test_query/gone.png"), r"entry 6: image not found"),
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


def test_what_the_authors_readers_accept_is_read_as_they_read_it_and_reported_once_per_split(cuhk):
    """An image listed twice (under one id or two), captions that clean to nothing and training ids
    with gaps: IRRA's readers take them as they are, so do we, and the report says so per split."""
    entries = cuhk_entries()
    entries[1]["captions"] = ["ok.", " "]
    entries[2]["captions"] = ["\x00\x07\x1b[0m\x7f", "&nbsp;\u3000\ufeff"]  # control characters, markup
    entries.insert(4, {**entries[0], "captions": ["another caption."]})  # entry 4: image of entry 0, same id
    entries += [{**entries[6], "captions": ["the same woman."]},  # entry 8: test image of entry 6, same id
                {**entries[7], "id": 32, "file_path": "test_query/./031.png"}]  # entry 9: entry 7's image, id 32
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
    dataset = data.load_dataset("CUHK-PEDES", str(cuhk))

    train = dataset.train  # the pairs of IRRA's reader: per entry, per caption, in file order
    assert len(train.image_paths) == 5 and train.image_paths[4] == train.image_paths[0]
    assert train.image_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert train.pids.tolist() == [1, 1, 1, 1, 0, 0, 2, 1]
    assert train.ids[3, :3].tolist() == [SOT, EOT, 0] and train.ids[4, :3].tolist() == [SOT, EOT, 0]
    assert train.captions[3] == " "  # the text as written; only its ids are empty
    test = dataset.test  # the gallery and the queries in file order, duplicates included
    assert [os.path.basename(p) for p in test.image_paths] == ["030.png", "031.png", "030.png", "031.png"]
    assert test.image_pids.tolist() == [30, 31, 30, 32]
    assert test.caption_pids.tolist() == [30, 30, 31, 31, 30, 32, 32]

    repeat = "entries repeating an earlier entry's image under {}, each kept as IRRA's reader keeps it"
    assert dataset.report == [  # one line per split and kind: the count, the first entries
        f"CUHK-PEDES train: {repeat.format('the same id')}: 1 (entry 4 = entry 0, 'cam_a/007_1.png')",
        "CUHK-PEDES train: captions with no words once cleaned, read as [SOT, EOT] as IRRA's tokenizer reads "
        "them: 3 (entry 1 caption 1; entry 2 caption 0; entry 2 caption 1)",
        "CUHK-PEDES train: gaps between the ids, remapped to 0..2 in sorted order: 2 (4..6; 8..11)",
        f"CUHK-PEDES test: {repeat.format('the same id')}: 1 (entry 8 = entry 6, 'test_query/030.png')",
        f"CUHK-PEDES test: {repeat.format('another id')}: 1 (entry 9 = entry 7, 'test_query/./031.png')"]


def test_a_clean_copy_reports_nothing(cuhk):
    entries = cuhk_entries()
    for entry, pid in zip(entries, [1, 1, 2, 3]):  # contiguous training ids
        entry["id"] = pid
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
    assert data.load_dataset("CUHK-PEDES", str(cuhk)).report == []


def test_a_report_names_the_first_few_entries_and_counts_all(cuhk):
    entries = cuhk_entries()
    entries += [dict(entries[5]) for _ in range(5)]  # five more copies of test entry 5
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
    report = data.load_dataset("CUHK-PEDES", str(cuhk)).report
    assert report[1].startswith("CUHK-PEDES test: entries repeating an earlier entry's image under the same id")
    assert report[1].endswith(": 5 (entry 7 = entry 5, 'test_query/030.png'; entry 8 = entry 5, "
                              "'test_query/030.png'; entry 9 = entry 5, 'test_query/030.png'; ...)")


# ------------------------------------------------------------------------------------------------
# The published counts: a copy on disk is compared with them, and the verdict says how it differs

FIXTURE_COUNTS = {"train": (3, 4, 7), "val": (1, 1, 2), "test": (2, 2, 4)}  # of cuhk_entries()


def test_the_verdict_says_whether_a_copy_is_the_published_set(cuhk, monkeypatch):
    subset = data.load_dataset("CUHK-PEDES", str(cuhk))  # a tiny copy: it loads, and says what it is
    assert subset.published is False
    assert subset.verdict.startswith("CUHK-PEDES: NOT the published set (ids / images / captions: train 3 / 4 / 7 "
                                     "against 11,003 / 34,054 / 68,126; val 1 / 1 / 2 against")
    assert "likely cause: entries: 7 listed, 40,206 published. It trains, but its results cannot" in subset.verdict
    assert "\n" not in subset.verdict

    monkeypatch.setitem(data.PUBLISHED, "CUHK-PEDES", FIXTURE_COUNTS)
    same = data.load_dataset("CUHK-PEDES", str(cuhk))
    assert same.published is True and same.verdict == ("CUHK-PEDES: matches the published set (ids / images / "
                                                       "captions: train 3 / 4 / 7; val 1 / 1 / 2; test 2 / 2 / 4)")
    entries = cuhk_entries() + [dict(cuhk_entries()[6], file_path="test_query/extra.png")]
    write_dataset(cuhk, "CUHK-PEDES", entries)
    more = data.load_dataset("CUHK-PEDES", str(cuhk))
    assert more.published is False and "(ids / images / captions: test 2 / 3 / 6 against 2 / 2 / 4)" in more.verdict
    assert "likely cause: entries: 8 listed, 7 published" in more.verdict


def test_missing_image_folders_are_named_as_the_likely_cause(cuhk, monkeypatch):
    monkeypatch.setitem(data.PUBLISHED, "CUHK-PEDES", FIXTURE_COUNTS)
    for folder in ("cam_a", "cam_b", "Market"):  # a copy handed out without these folders
        for image in (cuhk / "CUHK-PEDES/imgs" / folder).iterdir():
            image.unlink()
        (cuhk / "CUHK-PEDES/imgs" / folder).rmdir()
    missing = r"images missing: 3 \(Market/ 1, no such folder; cam_a/ 1, no such folder; cam_b/ 1, no such folder\)"
    with pytest.raises(data.DataError, match=rf"reid_raw\.json: entry 0 and more: {missing} \(first "
                                             r"'cam_a/007_1\.png'\); get the complete image archive \(Li et al"):
        data.load_dataset("CUHK-PEDES", str(cuhk))
    found = data.read_annotations("CUHK-PEDES", str(cuhk))
    published, said = data.verdict("CUHK-PEDES", found)
    assert published is False and re.match(rf"CUHK-PEDES: NOT the published set \(every entry listed\); "
                                           rf"likely cause: {missing}\. It trains", said)

    (cuhk / "CUHK-PEDES/imgs/cam_a").mkdir()  # the folder is there, its image is not
    found = data.read_annotations("CUHK-PEDES", str(cuhk))
    assert "(Market/ 1, no such folder; cam_a/ 1; cam_b/ 1, no such folder)" in data.verdict("CUHK-PEDES", found)[1]


def test_rstpreid_of_the_older_release_is_told_to_download_again():
    counts = {"train": (3_901, 19_505, 39_010), "val": (100, 500, 1_000), "test": (100, 500, 1_000)}
    old = data.Annotations("data/RSTPReid/data_captions.json", [], [], counts, [], [])
    published, said = data.verdict("RSTPReid", old)
    assert published is False and "train 3,901 / 19,505 / 39,010 against 3,701 / 18,505 / 37,010" in said
    assert "older release's 3,901/100/100 split" in said and "download it again" in said
    current = data.Annotations("", [], [], dict(data.PUBLISHED["RSTPReid"]), [], [])
    assert data.verdict("RSTPReid", current)[0] is True


def test_check_prints_the_verdict(cuhk, capsys):
    data.check("CUHK-PEDES", str(cuhk))
    assert "\nCUHK-PEDES: NOT the published set (ids / images / captions: train 3 / 4 / 7" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# CUHK-PEDES from caption_all.json, the archive's own file: the split from the id ranges

def caption_all_entries(train_ids, val_ids, test_ids):
    """caption_all.json's entries (no split) for contiguous ids 1.., two images of 1 and 2 captions each."""
    return [{"id": pid, "file_path": f"CUHK01/{pid:05d}_{k}.png", "captions": [f"person {pid}."] * (1 + k)}
            for pid in range(1, train_ids + val_ids + test_ids + 1) for k in range(2)]


def test_caption_all_that_does_not_give_the_published_split_is_refused(tmp_path):
    """The ids of caption_all.json split as reid_raw.json's: train 1..11,003, then val, then test."""
    write_dataset(tmp_path, "CUHK-PEDES", caption_all_entries(3, 1, 2))
    os.rename(tmp_path / "CUHK-PEDES/reid_raw.json", tmp_path / "CUHK-PEDES/caption_all.json")
    with pytest.raises(data.DataError, match=r"caption_all\.json: no reid_raw\.json beside it, and the ids of this "
                                             r"file \(train 1\.\.11,003, val 11,004\.\.12,003, test 12,004\.\.13,003\) "
                                             r"do not give the published split \(ids / images / captions: train 6 / "
                                             r"12 / 18 against 11,003 / 34,054 / 68,126; val 0 / 0 / 0 against"):
        data.load_dataset("CUHK-PEDES", str(tmp_path))


def test_caption_all_is_read_when_reid_raw_is_absent(tmp_path, monkeypatch):
    monkeypatch.setitem(data.PUBLISHED, "CUHK-PEDES", {"train": (3, 6, 9), "val": (1, 2, 3), "test": (2, 4, 6)})
    entries = caption_all_entries(3, 1, 2)
    write_dataset(tmp_path, "CUHK-PEDES", entries)
    os.rename(tmp_path / "CUHK-PEDES/reid_raw.json", tmp_path / "CUHK-PEDES/caption_all.json")
    dataset = data.load_dataset("CUHK-PEDES", str(tmp_path))
    assert dataset.train.num_identities == 3 and len(dataset.train.captions) == 9
    assert dataset.val.image_pids.tolist() == [4, 4] and dataset.test.image_pids.tolist() == [5, 5, 6, 6]
    assert dataset.report[0].startswith("CUHK-PEDES: reid_raw.json not found; the split was derived from the ids "
                                        "of caption_all.json (train 1..3, val 4..4, test 5..6)")
    assert dataset.published is True

    (tmp_path / "CUHK-PEDES/caption_all.json").write_text(json.dumps(entries[:-1]))  # one image short
    with pytest.raises(data.DataError, match=r"caption_all\.json: no reid_raw\.json beside it.*: test 2 / 3 / 4 "
                                             r"against 2 / 4 / 6\)\. Get CUHK-PEDES .* put "
                                             r"its annotations at .*reid_raw\.json"):
        data.load_dataset("CUHK-PEDES", str(tmp_path))
    (tmp_path / "CUHK-PEDES/caption_all.json").write_text(json.dumps(entries)[:-5])
    with pytest.raises(data.DataError, match=r"caption_all\.json: malformed JSON"):
        data.load_dataset("CUHK-PEDES", str(tmp_path))


def test_missing_folder_or_file_says_where_to_get_the_dataset(cuhk):
    with pytest.raises(data.DataError, match=r"RSTPReid: dataset folder not found.*NjtechCVLab"):
        data.load_dataset("RSTPReid", str(cuhk))
    (cuhk / "CUHK-PEDES/reid_raw.json").unlink()
    with pytest.raises(data.DataError, match=r"reid_raw\.json: annotation file not found.*ShuangLI59"):
        data.load_dataset("CUHK-PEDES", str(cuhk))
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_dataset("Market-1501", str(cuhk))


def test_image_paths_stay_inside_imgs(cuhk):
    outside = cuhk / "CUHK-PEDES/elsewhere.png"  # an image that exists, but outside imgs/
    Image.new("RGB", (12, 24)).save(outside)
    for escape in (str(outside), "../elsewhere.png", "CUHK01/../../elsewhere.png"):
        entries = changed(2, file_path=escape)(cuhk_entries())
        (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
        imgs = re.escape(str(cuhk / "CUHK-PEDES/imgs"))
        pattern = rf"entry 2: image path {re.escape(repr(escape))} is not inside {imgs}/$"
        with pytest.raises(data.DataError, match=pattern):
            data.load_dataset("CUHK-PEDES", str(cuhk))

    # A roundabout spelling of a path inside is fine, and imgs/ may be a link to where images are kept.
    entries = changed(2, file_path="CUHK01/../CUHK01/./003.png")(cuhk_entries())
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
    os.rename(cuhk / "CUHK-PEDES/imgs", cuhk / "storage")
    os.symlink(cuhk / "storage", cuhk / "CUHK-PEDES/imgs")
    train = data.load_dataset("CUHK-PEDES", str(cuhk)).train
    assert train.image_paths[2] == str(cuhk / "CUHK-PEDES/imgs/CUHK01/003.png")


def undecodable_jpeg(pixels, path):
    """Writes the shortest start of a JPEG of `pixels` whose header reads but which no decoding copes
    with, even with the missing part filled (cut inside its entropy-coding tables)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    for n in range(len(buffer.getvalue())):
        path.write_bytes(buffer.getvalue()[:n])
        if data.image_problem(str(path)) is None:
            try:
                data.decode_image(str(path))
            except data.DataError:
                return
    raise AssertionError("every header that reads also decodes")


def test_unreadable_image_stops_loading_and_a_truncated_one_is_decoded_as_the_authors_decode_it(cuhk, capsys):
    broken = cuhk / "CUHK-PEDES/imgs/test_query/031.png"  # a test image: found before any training
    broken.write_bytes(b"<html>not a png at all</html>")
    with pytest.raises(data.DataError, match=rf"entry 6: unreadable image '{re.escape(str(broken))}': "
                                             "not an image file Pillow can read$"):
        data.load_dataset("CUHK-PEDES", str(cuhk))
    broken.write_bytes(b"")
    with pytest.raises(data.DataError, match="entry 6: unreadable image"):
        data.load_dataset("CUHK-PEDES", str(cuhk))
    write_dataset(cuhk, "CUHK-PEDES", cuhk_entries())

    # Cut short after its header: reading the header cannot tell; decoding fills the rest, as Pillow's
    # LOAD_TRUNCATED_IMAGES (which IRRA and TBPS-CLIP set) does, and says so.
    pixels = np.random.default_rng(0).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    truncated = cuhk / "CUHK-PEDES/imgs/CUHK01/003.png"
    Image.fromarray(pixels).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    jpeg = cuhk / "CUHK-PEDES/imgs/test_query/030.png"  # a JPEG under another name, as Pillow reads either
    Image.fromarray(pixels).save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:-300])
    dataset = data.load_dataset("CUHK-PEDES", str(cuhk))
    image, cut_short = data.decode_image(str(truncated))
    assert cut_short and image.size == (32, 64)
    rows = np.asarray(image)  # [H, W, 3]
    assert np.array_equal(rows[0], pixels[0]) and not rows[-1].any()  # the rows it holds, then black
    assert not data.decode_image(str(cuhk / "CUHK-PEDES/imgs/CUHK03/012.png"))[1]
    assert data.decode_image(str(jpeg))[1] and not Image.open(jpeg).size == (0, 0)
    assert not data.ImageFile.LOAD_TRUNCATED_IMAGES  # Pillow's flag is on only for the retry

    samples = data.CaptionImageDataset(dataset.train, data.build_transform((32, 16)))
    assert samples[4]["cut_short"].item() and not samples[0]["cut_short"].item()
    batch = next(iter(data.train_loader(dataset.train, (32, 16), batch_size=7, workers=0, augment=False)))
    assert data.check_batch(batch) == 2  # the two captions of the image cut short
    (images, messages), = data.image_loader(dataset.test.image_paths, (32, 16), batch_size=2)
    assert messages == ("", "") and images[0].abs().sum() > 0  # decoded, its missing part filled
    assert f"{jpeg}: file cut short, decoded" in capsys.readouterr().err

    # Undecodable even so: a training sample carries the one line, check_batch raises it (not a
    # loader worker, where torch would wrap it in a traceback's text); image_loader gives zeros and
    # the line, so that a folder search can list the file and go on.
    undecodable_jpeg(pixels, truncated)
    assert samples[4]["problem"].startswith(f"{truncated}: unreadable image: ") and not samples[0]["problem"]
    batch = next(iter(data.train_loader(dataset.train, (32, 16), batch_size=7, workers=1, augment=False)))
    with pytest.raises(data.DataError, match="^" + re.escape(str(truncated)) + ": unreadable image: [^\n]*$"):
        data.check_batch(batch)
    (images, messages), = data.image_loader(dataset.train.image_paths, (32, 16), batch_size=4, workers=1)
    assert messages[0] == messages[1] == messages[3] == "" and messages[2].startswith(f"{truncated}: unreadable")
    assert not images[2].any() and images[1].any()


def test_image_problems_keep_the_order_across_chunks_and_threads(tmp_path):
    image, text = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("L", (4, 4)).save(image)
    text.write_text("no image")
    paths = [str(image), str(tmp_path / "gone.png"), str(text)] * 300  # several chunks of 256
    problems = data.image_problems(paths)
    assert problems[:3] == [None, f"image not found: {paths[1]!r}",
                            f"unreadable image {paths[2]!r}: not an image file Pillow can read"]
    assert problems == problems[:3] * 300


# Each mode Pillow reads: (an image [1, W] of it, the 8-bit RGB pixels it must become).
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759  # red, green, blue


def pixels(mode, values, **info):
    image = Image.new(mode, (len(values), 1))
    if mode.startswith("P"):
        image.putpalette(PALETTE)
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    image.info.update(info)
    return image


MODES = {
    "I": (Image.fromarray(np.array([[0, 257, 32896, 65535, 70000, -5]], dtype=np.int32)),
          [(v, v, v) for v in (0, 1, 128, 255, 255, 0)]),  # 16-bit grey, as older Pillow reads a PNG
    "F": (Image.fromarray(np.array([[0.0, 127.6, 300.0, -5.0]], dtype=np.float32)),
          [(v, v, v) for v in (0, 128, 255, 0)]),
    "P": (pixels("P", [0, 2]), [(255, 0, 0), (0, 0, 255)]),
    "P, an index transparent": (pixels("P", [0, 1], transparency=1), [(255, 0, 0), (0, 0, 0)]),
    "P, alpha per index": (pixels("P", [0, 1, 2], transparency=bytes([255, 0, 128])),
                           [(255, 0, 0), (0, 0, 0), (0, 0, 128)]),
    "PA": (pixels("PA", [(1, 255), (2, 0)]), [(0, 255, 0), (0, 0, 0)]),
    "CMYK": (pixels("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]),
             [(255, 255, 255), (0, 255, 255), (0, 0, 0)]),
    "LA": (pixels("LA", [(200, 255), (200, 0), (200, 128)]), [(200, 200, 200), (0, 0, 0), (100, 100, 100)]),
    "L": (pixels("L", [0, 77, 255]), [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
    "1": (pixels("1", [0, 1]), [(0, 0, 0), (255, 255, 255)]),
    "RGBA": (pixels("RGBA", [(200, 100, 50, 255), (200, 100, 50, 0), (200, 100, 50, 128)]),
             [(200, 100, 50), (0, 0, 0), (100, 50, 25)]),
    "RGB, a colour transparent": (pixels("RGB", [(9, 9, 9), (1, 2, 3)], transparency=(9, 9, 9)),
                                  [(0, 0, 0), (1, 2, 3)]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_becomes_8_bit_rgb(mode):
    image, expected = MODES[mode]
    rgb = data.to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    got = np.asarray(rgb, dtype=int)[0]  # [W, 3]
    assert np.abs(got - np.array(expected)).max() <= 1, got.tolist()  # compositing may round either way


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as stored:
        assert stored.mode in ("I;16", "I")  # really a 16-bit file
    image, cut_short = data.decode_image(str(path))
    assert image.mode == "RGB" and not cut_short
    assert np.asarray(image).tolist() == [[[v, v, v] for v in (0, 1, 128, 255)]]  # not all near white


def test_captions_are_tokenized_once_and_cuts_counted(cuhk, monkeypatch):
    entries = cuhk_entries()
    entries[0]["captions"][1] = "a " * 75  # 75 tokens: SOT and EOT make 77, nothing cut
    entries[1]["captions"][0] = "a " * 76  # one too many: cut
    entries[5]["captions"][1] = "a red coat and " * 30
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
    tokenizer, encoded = clip_min.default_tokenizer(), []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: encoded.append(text) or encode(text))

    dataset = data.load_dataset("CUHK-PEDES", str(cuhk))
    train_set = data.CaptionImageDataset(dataset.train, data.build_transform((32, 16)))
    _, queries = data.eval_loaders(dataset.test, (32, 16), batch_size=3)
    query_ids = torch.cat(list(queries))  # [4, 77]
    assert len(encoded) == 13  # every caption of every split, once
    monkeypatch.undo()

    assert (dataset.train.num_truncated, dataset.val.num_truncated, dataset.test.num_truncated) == (1, 0, 1)
    for split in (dataset.train, dataset.val, dataset.test):
        assert split.ids.shape == (len(split.captions), clip_min.CONTEXT_LENGTH) and split.ids.dtype == torch.long
        assert torch.equal(split.ids, clip_min.tokenize(split.captions, truncate=True))
    assert dataset.train.ids[1, 76] == EOT and dataset.train.ids[2, 76] == EOT  # full, and cut: EOT last
    assert train_set[1]["ids"].tolist() == dataset.train.ids[1].tolist()
    assert torch.equal(query_ids, dataset.test.ids)
    # A training split through the evaluation loaders (how the demo decodes its pretraining corpus
    # once): each image once, in order, so that indexing by image_index gives every pair's image.
    images, captions = data.eval_loaders(dataset.train, (32, 16), batch_size=3)
    pair_images = torch.cat([batch for batch, _ in images])[dataset.train.image_index]
    assert all(torch.equal(pair_images[i], train_set[i]["images"]) for i in range(len(train_set)))
    assert torch.equal(torch.cat(list(captions)), dataset.train.ids)


def run_check(root):
    return subprocess.run([sys.executable, "data.py", "--check", "CUHK-PEDES", "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv,message", [
    ([], "error: nothing to do: give --check NAME or --make-demo (see --help)"),
    (["--check", "CUHK"], "error: argument --check: invalid choice: 'CUHK'"),
])
def test_data_py_flag_errors_are_one_line_like_the_other_scripts(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        data.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_check_reports_every_problem(cuhk, capsys):
    assert data.check("CUHK-PEDES", str(cuhk)) == 0  # in this process: one start of Python is enough
    clean = capsys.readouterr().out
    assert re.search(r"\ntrain\s+3\s+4\s+7\s+11,003 / 34,054 / 68,126\n", clean), clean
    assert "\ncaptions cut to 77 tokens: train 0, val 0, test 0\n" in clean and clean.endswith("\nproblems: 0\n")

    entries = changed(1, captions=[])(cuhk_entries())
    entries[2]["captions"][1] = "\x00\x07"
    entries[6]["captions"][1] = "a man in white " * 20  # 80 tokens: cut, no problem
    entries += [entries[0], {**entries[6], "file_path": "../reid_raw.json", "id": 40}]  # entries 7, 8
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
    os.remove(cuhk / "CUHK-PEDES/imgs/CUHK03/012.png")
    (cuhk / "CUHK-PEDES/imgs/test_query/030.png").write_bytes(b"garbage")
    cut_short = [cuhk / "CUHK-PEDES/imgs/CUHK01/003.png", cuhk / "CUHK-PEDES/imgs/Market/020.png"]  # entries 2, 4
    for path in cut_short:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])  # the header intact: only decoding finds it
    report = run_check(cuhk)
    assert report.returncode == 1
    expected = ["entry 1: 'captions' is an empty list", "entry 3: image not found", "entry 5: unreadable image",
                "entry 8: image path '../reid_raw.json' is not inside"]
    lines = [line for line in report.stdout.splitlines() if line.startswith(str(cuhk / "CUHK-PEDES/reid_raw.json"))]
    assert len(lines) == len(expected) and all(e in line for e, line in zip(expected, lines)), report.stdout
    assert report.stdout.endswith("\nproblems: 4\n")
    for path, entry in zip(cut_short, (2, 4)):  # each file cut short, named by its path
        assert f"\n{path}: file cut short (entry {entry}); training and evaluation decode it" in report.stdout
    # The counts are those of the entries with every field right (not 1 and 8); the captions cut, of
    # the images that open (entry 6, not 5). What the authors' readers accept is reported, not counted.
    assert re.search(r"\ntest\s+2\s+2\s+4\s+1,000 / 3,074 / 6,156\n", report.stdout), report.stdout
    assert "\ncaptions cut to 77 tokens: train 0, val 0, test 1\n" in report.stdout
    assert "\nCUHK-PEDES train: entries repeating an earlier entry's image under the same id, each kept as IRRA's " \
           "reader keeps it: 1 (entry 7 = entry 0, 'cam_a/007_1.png')\n" in report.stdout
    assert "\nCUHK-PEDES train: captions with no words once cleaned, read as [SOT, EOT] as IRRA's tokenizer reads " \
           "them: 1 (entry 2 caption 1)\n" in report.stdout


def test_data_py_imports_neither_evaluate_nor_train():
    code = "import sys, data; print(sorted({'evaluate', 'train'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stderr


# ------------------------------------------------------------------------------------------------
# Transforms, samples and loaders

def test_transform_shapes_and_normalisation():
    image = Image.new("RGB", (20, 50), tuple(round(255 * m) for m in data.CLIP_MEAN))
    test = data.build_transform((64, 32))(image)
    assert test.shape == (3, 64, 32) and test.dtype == torch.float32
    assert test.abs().max() < 0.02  # the mean colour maps to 0 (up to 8-bit rounding)
    torch.manual_seed(0)
    assert data.build_transform((64, 32), train=True)(image).shape == (3, 64, 32)


def test_the_training_transform_gives_irras_numbers_from_the_same_random_draws():
    """Bit for bit IRRA's Compose (resize, flip, pad, crop, ToTensor, Normalize, erasing), seed for
    seed: the replica benchmark compares the two on the same files, and they must do the same work."""
    import torchvision.transforms as T
    irra = T.Compose([T.Resize((64, 32)), T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop((64, 32)),
                      T.ToTensor(), T.Normalize(mean=data.CLIP_MEAN, std=data.CLIP_STD),
                      T.RandomErasing(scale=(0.02, 0.4), value=data.CLIP_MEAN)])
    ours = data.build_transform((64, 32), train=True)
    rng = np.random.default_rng(0)
    for seed in range(20):
        image = Image.fromarray(rng.integers(0, 256, (rng.integers(40, 120), rng.integers(20, 60), 3), dtype=np.uint8))
        torch.manual_seed(seed)
        expected = irra(image)
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected), seed


def test_samples_and_loaders(cuhk, monkeypatch):
    torch.manual_seed(0)
    dataset = data.load_dataset("CUHK-PEDES", str(cuhk))
    transform = data.build_transform((32, 16), train=True)
    samples = data.CaptionImageDataset(dataset.train, transform, mask_captions=True)
    item = samples[6]
    assert item["images"].shape == (3, 32, 16) and item["ids"].shape == (clip_min.CONTEXT_LENGTH,)
    assert item["pids"].item() == 2 and item["image_index"].item() == 3
    masked = torch.stack([samples[6]["ids"] for _ in range(20)])  # [20, 77]
    assert (masked == data.MASK_TOKEN).any(dim=1).float().mean() > 0.5
    assert not (samples.ids == data.MASK_TOKEN).any()  # the stored ids stay clean

    def pid_order():
        loader = data.train_loader(dataset.train, (32, 16), batch_size=3, workers=0, mask_captions=True, seed=1)
        return [b["pids"].tolist() for b in loader]
    assert len(pid_order()) == 2  # 7 samples: the incomplete batch is dropped
    assert pid_order() == pid_order()  # the seed fixes the order
    batch = next(iter(data.train_loader(dataset.train, (32, 16), batch_size=3, workers=0)))
    assert batch["images"].shape == (3, 3, 32, 16) and batch["ids"].shape == (3, clip_min.CONTEXT_LENGTH)

    images, captions = data.eval_loaders(dataset.test, (32, 16), batch_size=3)
    assert [(b.shape, messages) for b, messages in images] == [((2, 3, 32, 16), ("", ""))]
    assert [b.shape for b in captions] == [(3, clip_min.CONTEXT_LENGTH), (1, clip_min.CONTEXT_LENGTH)]
    assert not (torch.cat(list(captions)) == data.MASK_TOKEN).any()  # queries are never masked

    # Page-locked memory only when asked (for a CUDA device), also where CUDA exists and --device cpu
    # was chosen; building a loader does not pin yet, so the fake CUDA is never touched.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not data.train_loader(dataset.train, (32, 16), batch_size=3, workers=0).pin_memory
    assert not data.eval_loaders(dataset.test, (32, 16))[0].pin_memory
    assert data.train_loader(dataset.train, (32, 16), batch_size=3, workers=0, pin_memory=True).pin_memory
    assert data.eval_loaders(dataset.test, (32, 16), pin_memory=True)[0].pin_memory


# ------------------------------------------------------------------------------------------------
# Caption masking

def random_captions(n, low, high, generator):
    """Token ids [n, 77]: SOT, between low and high - 1 ordinary tokens, EOT, zero padding."""
    lengths = torch.randint(low, high, (n,), generator=generator)
    ids = torch.zeros(n, clip_min.CONTEXT_LENGTH, dtype=torch.long)
    positions = torch.arange(clip_min.CONTEXT_LENGTH)
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
# What the readers and loaders promise, case by case

@pytest.mark.parametrize("name", ["validation", "gallery"])
def test_a_split_neither_train_nor_test_is_val(cuhk, name):
    entries = changed(4, split=name)(cuhk_entries())
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(entries))
    assert data.load_dataset("CUHK-PEDES", str(cuhk)).val.image_pids.tolist() == [20]


@pytest.mark.parametrize("case", ["no val entries", "id true", "id 2**63", "path beside imgs"])
def test_more_bad_input_raises_one_line(cuhk, case):
    spoiler, pattern = {
        "no val entries": (lambda entries: entries[:4] + entries[5:], r"reid_raw\.json: no valid 'val' entries"),
        "id true": (changed(0, id=True), r"entry 0: 'id' should be int, got bool"),  # JSON true is not an id
        "id 2**63": (changed(0, id=2**63), r"entry 0: 'id' 9223372036854775808 does not fit in 64 bits"),
        # imgs2/ starts with the characters of imgs/ but is not inside it
        "path beside imgs": (changed(2, file_path="../imgs2/003.png"), r"entry 2: image path '\.\./imgs2/003\.png' is not inside"),
    }[case]
    (cuhk / "CUHK-PEDES/imgs2").mkdir()
    Image.new("RGB", (12, 24)).save(cuhk / "CUHK-PEDES/imgs2/003.png")
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(spoiler(cuhk_entries())))
    with pytest.raises(data.DataError, match=pattern):
        data.load_dataset("CUHK-PEDES", str(cuhk))


def test_the_smallest_64_bit_id_is_accepted(cuhk):
    (cuhk / "CUHK-PEDES/reid_raw.json").write_text(json.dumps(changed(5, id=-2**63)(cuhk_entries())))
    assert data.load_dataset("CUHK-PEDES", str(cuhk)).test.image_pids.tolist() == [-2**63, 31]


def test_every_8_bit_grey_level_widened_to_16_bits_comes_back(tmp_path):
    # An 8-bit level v is 257 v in 16 bits (0 -> 0, 255 -> 65535): each of the 256 must return as v.
    levels = np.arange(256)
    path = tmp_path / "ramp16.png"
    Image.fromarray((levels * 257).astype(np.uint16)[None]).save(path)
    assert np.asarray(data.decode_image(str(path))[0])[0, :, 0].tolist() == levels.tolist()


def numbered_pairs(tmp_path, n=64):
    """A TrainSplit of n pairs that all show one small image; sample k has identity k."""
    Image.new("RGB", (4, 8)).save(tmp_path / "one.png")
    return data.TrainSplit([str(tmp_path / "one.png")], torch.zeros(n, dtype=torch.long), torch.arange(n),
                           ["a person."] * n, torch.zeros(n, clip_min.CONTEXT_LENGTH, dtype=torch.long), 0, n)


def test_the_training_order_is_shuffled_by_the_seed(tmp_path):
    split = numbered_pairs(tmp_path)

    def order(seed):
        loader = data.train_loader(split, (8, 4), batch_size=8, workers=0, augment=False, seed=seed)
        return torch.cat([batch["pids"] for batch in loader]).tolist()
    assert sorted(order(1)) == list(range(64)) and order(1) != list(range(64))  # every pair once, shuffled
    assert order(1) == order(1) and order(1) != order(2)


def test_ddp_ranks_share_each_epoch_shuffled(tmp_path, monkeypatch):
    # Each rank reads a disjoint half of the shuffled pairs; set_epoch draws another order.
    split = numbered_pairs(tmp_path)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *args: rank)
        loader = data.train_loader(split, (8, 4), batch_size=8, workers=0, augment=False, seed=1, distributed=True)
        halves.append(torch.cat([batch["pids"] for batch in loader]).tolist())
        loader.sampler.set_epoch(1)
        assert torch.cat([batch["pids"] for batch in loader]).tolist() != halves[-1]
    assert sorted(halves[0] + halves[1]) == list(range(64))
    assert halves[0] != list(range(0, 64, 2)) and halves[0] != list(range(32))
