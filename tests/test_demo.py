"""data.py's synthetic demo sets: drawn the same for a seed, drawn again only when their version or
size changes, two domains that differ as designed, read back by the ordinary reader."""

import importlib.util
import json
import os
import re

import pytest
from PIL import Image

import data

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


def test_demo_is_drawn_again_only_when_its_version_or_size_changes(tmp_path, monkeypatch):
    folder = data.make_demo("demo", str(tmp_path), SMALL)
    marker = os.path.join(folder, "marker")
    open(marker, "w").close()
    data.make_demo("demo", str(tmp_path), SMALL)
    assert os.path.exists(marker)  # up to date: reused

    # data.py with an edited comment still finds the set up to date: the stamp is not the file's hash.
    # The copy lives in a folder of its own, where Python may leave its __pycache__.
    (tmp_path / "code").mkdir()
    edited = tmp_path / "code" / "edited_data.py"
    with open(data.__file__) as f:
        edited.write_text(f.read().replace("# The synthetic demo sets", "# The synthetic demo sets (edited)"))
    spec = importlib.util.spec_from_file_location("edited_data", edited)
    edited_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edited_data)
    edited_data.make_demo("demo", str(tmp_path), edited_data.DemoSize(**SMALL.__dict__))
    assert os.path.exists(marker)

    monkeypatch.setattr(data, "DEMO_VERSION", data.DEMO_VERSION + 1)
    data.make_demo("demo", str(tmp_path), SMALL)
    assert not os.path.exists(marker)  # another version: drawn again
    open(marker, "w").close()
    data.make_demo("demo", str(tmp_path), data.DemoSize(**{**SMALL.__dict__, "test_ids": 3}))
    assert not os.path.exists(marker)  # another size: drawn again
    assert sorted(os.listdir(tmp_path)) == ["code", "demo"]  # no temporary folder left behind
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
    demo = [tuple(p.values()) for p in data.demo_people("demo", data.DEMO_SIZES["demo"])]
    assert not {tuple(p.values()) for p in pretrain} & set(demo)  # no identity of the corpus returns
    size = data.DEMO_SIZES["demo"]
    assert len(set(demo)) == len(demo) == size.train_ids + size.val_ids + size.test_ids
    assert not data.HELD_OUT & {value for p in pretrain for value in p.values()}


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


def test_the_demo_pipeline_pretrains_its_clip_once_and_reuses_it(tmp_path, monkeypatch, capsys):
    """`python train.py` at a tiny size: the demo's CLIP is pretrained, cached as an OpenAI-layout
    state dict, evaluated zero-shot and adapted; a second run reuses the cached CLIP."""
    import clip_min
    import train
    monkeypatch.setitem(data.DEMO_SIZES, "demo", data.DemoSize(4, 2, 2, images_per_id=2, seed=3))
    monkeypatch.setitem(data.DEMO_SIZES, "demo-pretrain", data.DemoSize(8, 0, 1, images_per_id=2, seed=4))
    tiny = clip_min.CLIPConfig(embed_dim=16, image_size=(64, 32), patch_size=8, stride=8, vision_width=64,
                               vision_layers=4, text_width=64, text_layers=4)
    monkeypatch.setattr(train, "DEMO_CLIP", tiny)
    monkeypatch.setattr(train, "DEMO_PRETRAINING", dict(epochs=2, batch_size=8, lr=1e-3, warmup_steps=2))
    argv = ["--root", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "8", "--log-every", "1"]
    assert train.main([*argv, "--out", str(tmp_path / "first")]) == 0
    printed = capsys.readouterr().out
    assert "pretraining epoch 2/2  InfoNCE" in printed and "saved the tiny CLIP to" in printed
    table = printed.split("demo test split:")[1]
    assert all(row in table for row in ("| chance (random scores)", "| frozen CLIP, zero-shot", "| cskt, CLIP frozen"))

    cached = [name for name in os.listdir(tmp_path / "data" / "demo-pretrain") if name.startswith("clip-")]
    assert len(cached) == 1 and not cached[0].endswith(".tmp")
    path = str(tmp_path / "data" / "demo-pretrain" / cached[0])
    assert clip_min.load(path, (64, 32), 8).config == tiny  # every size read back off the tensors
    assert train.main([*argv, "--out", str(tmp_path / "second")]) == 0
    printed = capsys.readouterr().out
    assert f"using the tiny CLIP cached at {path}" in printed and "pretraining epoch" not in printed
