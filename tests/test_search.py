"""evaluate.py beyond a split's table: searching a folder of images (with its feature cache),
DM-Adapter's routing drawn as a picture, and cross-dataset evaluation between the two demo sets.

One tiny DM-Adapter is trained for one step by train.py on each demo set (drawn at a tiny size):
the transfer table needs a checkpoint trained on each; the search and routing tests reuse the one
trained on `demo`."""

import colorsys
import dataclasses
import json
import os
import pathlib
import re
import types

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from test_clip_min import irra_checkpoint

import clip_min
import data
import dm_adapter
import evaluate
import train

TINY = clip_min.CLIPConfig(embed_dim=16, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=2, text_width=64, text_layers=2)
IMAGE_SIZE = ["32", "16"]
# Test splits of different sizes (6 and 4 images), so that an evaluation shows which set it ran on.
TINY_DEMO = {"demo": dict(train_ids=4, val_ids=1, test_ids=3, images_per_id=2, captions_per_image=1),
             "demo-pretrain": dict(train_ids=4, test_ids=2, images_per_id=2, captions_per_image=1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """root (the two demo sets, tiny), clip (a random tiny CLIP file), checkpoint[set] (a
    DM-Adapter trained on that set for one step)."""
    root = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)
    clip_path = root / "tiny-clip.pt"
    torch.save(clip_min.CLIP(TINY).state_dict(), clip_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "DEMO_SIZES", {name: dataclasses.replace(data.DEMO_SIZES[name], **size)
                                           for name, size in TINY_DEMO.items()})
        checkpoints = {}
        for name in TINY_DEMO:
            out = root / f"run-{name}"
            assert train.main(["--method", "dm_adapter", "--data", name, "--root", str(root), "--clip",
                               str(clip_path), "--image-size", *IMAGE_SIZE, "--stride", "8", "--epochs", "1",
                               "--warmup-epochs", "0", "--batch-size", "8", "--lr", "1e-3", "--workers", "0",
                               "--out", str(out)]) == 0
            checkpoints[name] = str(out / "best.pt")
        yield types.SimpleNamespace(root=str(root), clip=str(clip_path), checkpoint=checkpoints)


# -----------------------------------------------------------------------------
# Searching a folder of images


def write_image(path, size, seed, mode="RGB", **save_options):
    """Random pixels of `size` (W, H) in `mode`, saved in the format the extension names."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, **save_options)


def make_gallery(folder):
    """Every accepted extension, any case, nested folders, odd sizes and modes; one broken file and
    one that is not an image."""
    write_image(folder / "a.jpg", (40, 20), seed=1)
    write_image(folder / "sub" / "b.PNG", (17, 33), seed=2, mode="RGBA")
    write_image(folder / "sub" / "deeper" / "c.webp", (100, 50), seed=3)
    write_image(folder / "d.jpeg", (8, 8), seed=4, mode="L")
    # Uncompressed, so that a rewrite with other pixels has exactly the same size.
    write_image(folder / "sub" / "e.png", (12, 10), seed=5, compress_level=0)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("not an image")


def expected_ranking(model, folder, queries, topk):
    """The same search done directly: every readable image through the test transform and the model."""
    paths = sorted(os.path.join(d, n) for d, _, files in os.walk(folder) for n in files
                   if n.lower().endswith((".jpg", ".jpeg", ".png", ".webp")) and n != "broken.jpg")
    transform = data.build_transform(TINY.image_size)
    with torch.no_grad():
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])      # [N, 3, H, W]
        image_features = F.normalize(model.encode_image(images), dim=-1)                    # [N, E]
        text_features = F.normalize(model.encode_text(clip_min.tokenize(queries)), dim=-1)  # [Q, E]
    scores, rows = (text_features @ image_features.T).topk(topk, dim=1)
    return [[(paths[r], s) for r, s in zip(row, score)] for row, score in zip(rows.tolist(), scores.tolist())]


def printed_ranking(stdout):
    """[[(path, score), ...] per query] from the lines '  rank  score  path'."""
    blocks = stdout.split('\n"')[1:]
    return [[(m[3], float(m[2])) for m in re.finditer(r"^ +(\d+)  (-?\d\.\d{4})  (.+)$", block, re.M)] for block in blocks]


def assert_same_ranking(printed, expected):
    assert [[path for path, _ in query] for query in printed] == [[path for path, _ in query] for query in expected]
    for printed_query, expected_query in zip(printed, expected):
        for (_, printed_score), (_, expected_score) in zip(printed_query, expected_query):
            assert printed_score == pytest.approx(expected_score, abs=1.5e-4)


QUERIES = ["a man in a red shirt and black trousers", "a woman with a blue skirt"]


def test_search_a_folder_caches_features_and_reencodes_only_what_changed(runs, tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "photos", tmp_path / "out"
    make_gallery(folder)
    command = ["--checkpoint", runs.checkpoint["demo"], "--gallery", str(folder), "--out", str(out), "--topk", "3",
               "--workers", "0", "--query", QUERIES[0], "--query", QUERIES[1]]
    encoded = []  # the paths of each pass that decodes and encodes images
    image_loader = data.image_loader
    monkeypatch.setattr(data, "image_loader", lambda paths, *a: encoded.append(paths) or image_loader(paths, *a))
    model, _ = evaluate.load_checkpoint(runs.checkpoint["demo"])

    # First search: every file decoded in one pass shared by both queries.
    assert evaluate.main(command) == 0
    printed = capsys.readouterr()
    assert len(encoded) == 1 and len(encoded[0]) == 6
    assert "6 image files, 0 from the cache" in printed.out and "6 decoded now; 5 ranked, 1 unreadable; 1 other" in printed.out
    broken = os.path.join(str(folder), "broken.jpg")
    assert "1 unreadable file(s)" in printed.err and f"{broken}: unreadable image" in printed.err
    assert (out / "unreadable.txt").read_text().startswith(f"{broken}: unreadable image")
    assert_same_ranking(printed_ranking(printed.out), expected_ranking(model, folder, QUERIES, 3))
    for name in ["search_1.png", "search_2.png"]:
        with Image.open(out / name) as picture:
            assert picture.format == "PNG"
    assert os.listdir(out).count(evaluate.GALLERY_CACHE_FILE) == 1

    # Second search: no gallery image is decoded (only the few drawn in the pictures), and the
    # broken file is still counted and listed.
    def no_decoding(paths, *args):
        raise AssertionError(f"{paths} decoded again")
    with monkeypatch.context() as patch:
        patch.setattr(data, "image_loader", no_decoding)
        assert evaluate.main(command) == 0
    again = capsys.readouterr()
    assert len(encoded) == 1 and "6 image files, 6 from the cache" in again.out and "0 decoded now; 5 ranked, 1 unreadable" in again.out
    assert f"{broken}: unreadable image" in again.err
    assert printed_ranking(again.out) == printed_ranking(printed.out)

    # Changes: e.png rewritten with other pixels, same size, its mtime put back; a new file; one
    # deleted; the broken one repaired. Only the rewritten, new and repaired files are encoded.
    changed = folder / "sub" / "e.png"
    before = os.stat(changed)
    write_image(changed, (12, 10), seed=50, compress_level=0)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(changed).st_size == before.st_size and os.stat(changed).st_mtime_ns == before.st_mtime_ns
    write_image(folder / "sub" / "f.png", (30, 30), seed=6)
    os.remove(folder / "d.jpeg")
    write_image(folder / "broken.jpg", (20, 40), seed=7)
    assert evaluate.main(command) == 0
    third = capsys.readouterr()
    assert sorted(encoded[1]) == sorted([str(changed), str(folder / "sub" / "f.png"), broken])
    assert "6 image files, 3 from the cache" in third.out and "3 decoded now; 6 ranked, 0 unreadable" in third.out
    assert not (out / "unreadable.txt").exists()
    assert_same_ranking(printed_ranking(third.out), expected_ranking(model, folder, QUERIES, 3))


def test_search_with_zero_shot_clip_and_a_changed_model_reencodes_everything(runs, tmp_path, capsys):
    folder, out = tmp_path / "photos", tmp_path / "out"
    make_gallery(folder)
    clip_command = ["--method", "clip", "--clip", runs.clip, "--image-size", *IMAGE_SIZE, "--stride", "8",
                    "--gallery", str(folder), "--out", str(out), "--query", QUERIES[0], "--topk", "4", "--workers", "0"]
    assert evaluate.main(clip_command) == 0
    printed = capsys.readouterr().out
    clip_model = evaluate.build_method("clip", clip_min.load(runs.clip, TINY.image_size, 8), {})
    assert_same_ranking(printed_ranking(printed), expected_ranking(clip_model, folder, QUERIES[:1], 4))
    assert (out / "search.png").exists()

    # The same cache file, another model (another CLIP file, a checkpoint): nothing may be served
    # from the cache until the same model asks again.
    other_clip = tmp_path / "other-clip.pt"
    other_clip.write_bytes(open(runs.clip, "rb").read())
    other_clip_command = [*clip_command[:3], str(other_clip), *clip_command[4:]]
    checkpoint_command = ["--checkpoint", runs.checkpoint["demo"], *clip_command[9:]]
    for command, from_cache in [(clip_command, 6), (other_clip_command, 0), (other_clip_command, 6),
                                (checkpoint_command, 0), (checkpoint_command, 6)]:
        assert evaluate.main(command) == 0
        assert f"6 image files, {from_cache} from the cache" in capsys.readouterr().out

    # A damaged cache file is said to be ignored, and rebuilt.
    (out / evaluate.GALLERY_CACHE_FILE).write_bytes(b"not a cache")
    for from_cache in (0, 6):
        assert evaluate.main(checkpoint_command) == 0
        printed = capsys.readouterr()
        assert f"6 image files, {from_cache} from the cache" in printed.out
        assert ("ignoring the damaged gallery cache" in printed.err) == (from_cache == 0)


def test_model_identity_changes_with_the_checkpoint_file_and_the_input(runs, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(open(runs.checkpoint["demo"], "rb").read())
    identity = evaluate.model_identity(str(checkpoint), "ViT-B/16", (32, 16), 16)
    assert identity == evaluate.model_identity(str(checkpoint), "ViT-B/16", (32, 16), 16)
    assert identity != evaluate.model_identity(str(checkpoint), "ViT-B/16", (64, 32), 16)
    os.utime(checkpoint, ns=(0, 10**18))  # retrained in place
    assert identity != evaluate.model_identity(str(checkpoint), "ViT-B/16", (32, 16), 16)
    release = evaluate.model_identity(None, "ViT-B/16", (384, 128), 16)
    assert release != evaluate.model_identity(None, "ViT-B/16", (384, 128), 12)
    assert release != evaluate.model_identity(None, "ViT-L/14", (384, 128), 16)


def test_search_errors_are_one_clear_line(runs, tmp_path, capsys):
    common = ["--checkpoint", runs.checkpoint["demo"], "--out", str(tmp_path / "out"), "--workers", "0"]
    assert evaluate.main([*common, "--gallery", str(tmp_path / "nowhere"), "--query", "a man"]) == 1
    assert capsys.readouterr().err == f"error: --gallery: no such folder: {tmp_path / 'nowhere'}\n"
    with pytest.raises(SystemExit) as exit:
        evaluate.main([*common, "--gallery", str(tmp_path)])
    assert exit.value.code == 2 and "argument --gallery: needs at least one --query" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    assert evaluate.main([*common, "--gallery", str(tmp_path / "bad"), "--query", "a man"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad' / 'x.png'}: unreadable image" in err
    assert err.endswith(f"error: --gallery: no readable image under {tmp_path / 'bad'}\n")
    # A query longer than the context is cut, and says so.
    write_image(tmp_path / "one" / "a.png", (16, 32), seed=0)
    assert evaluate.main([*common, "--gallery", str(tmp_path / "one"), "--query", "a man in a red coat " * 20]) == 0
    assert "query cut to its first 75 tokens" in capsys.readouterr().err


def test_several_queries_on_a_dataset_split_draw_one_picture_each(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluate.main(["--checkpoint", runs.checkpoint["demo"], "--root", runs.root, "--workers", "0",
                          "--query", "a man", "--query", "a woman " * 40, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["query_1.png", "query_2.png"]
    assert "query cut to its first 75 tokens" in capsys.readouterr().err  # as when searching a folder


# -----------------------------------------------------------------------------
# DM-Adapter's routing


@pytest.fixture()
def routed_gates(monkeypatch):
    """Records the gates [T, E] that every MixtureOfAdapters really uses, keyed by the mixture."""
    gates = []
    route = dm_adapter.MixtureOfAdapters.route

    def recording_route(self, h):
        result = route(self, h)
        gates.append((self, result[0]))
        return result
    monkeypatch.setattr(dm_adapter.MixtureOfAdapters, "route", recording_route)
    return gates


def test_routing_shares_count_the_experts_the_model_uses(runs, routed_gates):
    model, checkpoint = evaluate.load_checkpoint(runs.checkpoint["demo"])
    split = data.load_dataset("demo", runs.root).test
    block_of = {id(m): ("image", b) for b, m in enumerate(model.vision_adapters)}
    block_of.update({id(m): ("text", b) for b, m in enumerate(model.text_adapters)})
    ids = clip_min.tokenize(split.captions, truncate=True)                      # [Q, L], one batch below
    words = (torch.arange(ids.shape[1]) <= ids.argmax(1, keepdim=True)).flatten()  # [Q * L]: not padding

    shares_by_padding = {}
    for include_padding in (False, True):
        routed_gates.clear()
        shares = evaluate.routing_shares(model, split, checkpoint["clip"]["image_size"], "cpu", batch_size=256,
                                         include_padding=include_padding)
        expected = {tower: torch.zeros(len(model.vision_adapters if tower == "image" else model.text_adapters), 6)
                    for tower in ("image", "text")}
        for mixture, gates in routed_gates:
            tower, block = block_of[id(mixture)]
            chosen = gates > 0                                                  # [T, E], two per token
            if tower == "text" and not include_padding:
                chosen = chosen[words]
            expected[tower][block] += chosen.sum(0)
        for tower in expected:
            percent = 100 * expected[tower] / expected[tower].sum(1, keepdim=True)
            assert torch.allclose(shares[tower].float(), percent, atol=1e-4), (tower, include_padding)
            assert torch.allclose(shares[tower].sum(1), torch.full((len(percent),), 100.0, dtype=torch.float64))
        shares_by_padding[include_padding] = shares
    # Padding is text only: counting it changes the text tower's shares, not the image tower's.
    assert torch.equal(shares_by_padding[True]["image"], shares_by_padding[False]["image"])
    assert not torch.equal(shares_by_padding[True]["text"], shares_by_padding[False]["text"])


def test_caption_routing_gives_each_tokens_two_experts_larger_weight_first(runs, routed_gates):
    model, _ = evaluate.load_checkpoint(runs.checkpoint["demo"])
    labels, experts = evaluate.caption_routing(model, "a woman in a striped top", "cpu")
    assert labels == ["SOT", "a", "woman", "in", "a", "striped", "top", "EOT"]
    assert experts.shape == (len(model.text_adapters), len(labels), 2)
    text_gates = [gates for mixture, gates in routed_gates if any(mixture is m for m in model.text_adapters)]
    for block, gates in enumerate(text_gates):                                   # [77, E] each
        for token in range(len(labels)):
            first, second = experts[block, token].tolist()
            assert gates[token, first] >= gates[token, second] > 0
            assert (gates[token] > 0).sum() == 2


def test_routing_picture_from_the_command_line(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    drawn = []                                     # every text the picture draws, word by word or whole
    draw_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *args, **kwargs: drawn.append(text) or draw_text(self, xy, text,
                                                                                                *args, **kwargs))
    checkpoint_path = os.path.abspath(runs.checkpoint["demo"])
    assert evaluate.main(["--checkpoint", checkpoint_path, "--routing", "--root", runs.root,
                          "--workers", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "image tower: each expert gets" in printed and "text tower: each expert gets" in printed
    # The picture is made to be shown: it names the checkpoint's file and the split, never a folder
    # of the machine it was made on.
    assert any("routing of best.pt on demo test" in text for text in drawn)
    assert not [text for text in drawn if os.sep in text or os.path.dirname(checkpoint_path) in text]
    with Image.open(out / "routing.png") as picture:
        assert picture.format == "PNG" and 400 < picture.width <= evaluate.ROUTING_MAX_WIDTH and picture.height > 200
        colours = {colour for _, colour in picture.convert("RGB").getcolors(1 << 20)}
    # Every heatmap cell's colour is in the picture ...
    model, checkpoint = evaluate.load_checkpoint(runs.checkpoint["demo"])
    split = data.load_dataset("demo", runs.root).test
    shares = evaluate.routing_shares(model, split, checkpoint["clip"]["image_size"], "cpu")
    for tower_shares in shares.values():
        for share in tower_shares.flatten().tolist():
            assert evaluate.share_colour(share, 100 / 6) in colours
    # ... and the pale hue of every expert a token of the caption picks (e / E round the colour wheel).
    _, experts = evaluate.caption_routing(model, split.captions[0], "cpu")
    palette = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(e / 6, 0.35, 1)) for e in range(6)]
    assert {palette[e] for e in experts.flatten().tolist()} <= colours


def test_routing_picture_of_a_full_size_model_fits_a_readme_with_the_caption_below(tmp_path):
    """ViT-B/16's 12 blocks a tower, 6 experts, top-2, and a caption of more than 40 tokens: at most
    ROUTING_MAX_WIDTH wide, the caption's rows under the two heatmaps, its first 40 tokens shown."""
    generator = torch.Generator().manual_seed(0)
    shares = {tower: 100 * torch.rand(12, 6, generator=generator, dtype=torch.float64).softmax(1)
              for tower in ("image", "text")}
    labels = ["SOT", *(["backpack", "woman"] * 30), "EOT"]                     # 62 tokens, long ones
    experts = torch.rand(12, len(labels), 6, generator=generator).topk(2, dim=-1).indices  # [blocks, n, k]
    drawn = []
    draw_text = ImageDraw.ImageDraw.text
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *args, **kwargs:
                      drawn.append((xy, text)) or draw_text(self, xy, text, *args, **kwargs))
        evaluate.save_routing_picture(str(tmp_path / "routing.png"), shares, " ".join(labels[1:-1]), labels,
                                      experts, "DM-Adapter routing of best.pt on demo test")
    with Image.open(tmp_path / "routing.png") as picture:
        assert picture.width <= evaluate.ROUTING_MAX_WIDTH
    # The towers' rows side by side: "block 11" twice at one height; every token's row below both.
    block_rows = [y for (_, y), text in drawn if text == "block 11"]
    assert len(block_rows) == 2 and block_rows[0] == block_rows[1]
    token_rows = {y for (_, y), text in drawn if text in ("SOT", "backpack", "woman") and y > block_rows[0]}
    assert len(token_rows) == evaluate.ROUTING_TOKENS_SHOWN  # the legend, above, quotes the caption too


def test_routing_needs_a_dm_adapter_model(runs, capsys):
    assert evaluate.main(["--method", "clip", "--clip", runs.clip, "--image-size", *IMAGE_SIZE, "--stride", "8",
                          "--data", "demo", "--root", runs.root, "--workers", "0", "--routing"]) == 1
    assert capsys.readouterr().err.startswith("error: --routing draws DM-Adapter's routers")


def test_share_colours_are_white_at_even_use_and_saturate_at_none_and_double():
    assert evaluate.share_colour(25.0, 25.0) == (255, 255, 255)
    none, double = evaluate.share_colour(0.0, 25.0), evaluate.share_colour(50.0, 25.0)
    assert none[0] > 2 * none[2] and double[2] > 2 * double[0]   # red for no picks, blue for twice the even share
    assert evaluate.share_colour(90.0, 25.0) == double
    halfway = evaluate.share_colour(12.5, 25.0)                  # paler than none, but not white
    assert all(saturated < paler < 255 for saturated, paler in zip(none, halfway) if saturated < 255)


# -----------------------------------------------------------------------------
# Cross-dataset evaluation


def test_a_checkpoint_evaluated_on_another_dataset_gives_the_library_s_numbers(runs, capsys):
    """Cross-dataset transfer: each demo set's checkpoint on both sets, in the library and from
    the command line's --data."""
    results = {}
    for trained_on, path in runs.checkpoint.items():
        model, checkpoint = evaluate.load_checkpoint(path)
        assert checkpoint["data"] == trained_on
        for evaluated_on in TINY_DEMO:
            split = data.load_dataset(evaluated_on, runs.root).test
            loaders = data.eval_loaders(split, checkpoint["clip"]["image_size"], 256, 0)
            metrics = evaluate.evaluate_loaders(model, loaders, split, "cpu")
            assert metrics["num_queries"] == len(split.captions)  # 6 on demo, 4 on demo-pretrain
            results[trained_on, evaluated_on] = metrics
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", runs.checkpoint["demo"], "--data", "demo-pretrain", "--root", runs.root,
                          "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "demo-pretrain test, 4 images:" in printed
    assert f"| dm_adapter | {results['demo', 'demo-pretrain']['R1']:6.2f} |" in printed


def test_test_metrics_say_what_the_checkpoint_was_selected_on(runs):
    # demo has a val split (best val R1); demo-pretrain has none, so its last epoch is reported.
    for name, path in runs.checkpoint.items():
        reported = json.loads((pathlib.Path(path).parent / "test_metrics.json").read_text())
        best = torch.load(path, weights_only=True)["best"]
        expected = (f"val R1 {best['R1']:.2f} at epoch 1 of 1" if name == "demo"
                    else "the last epoch (epoch 1 of 1): demo-pretrain has no val split")
        assert reported["selected_on"] == expected


def test_irra_s_released_model_runs_on_the_demo_set_and_a_model_without_clip_is_one_line(runs, tmp_path, capsys):
    irra = str(tmp_path / "irra-best.pth")
    torch.save(irra_checkpoint(clip_min.load(runs.clip, tuple(map(int, IMAGE_SIZE)), 8)), irra)
    command = ["--method", "clip", "--clip", irra, "--data", "demo", "--root", runs.root, "--image-size",
               *IMAGE_SIZE, "--stride", "8", "--workers", "0"]
    assert evaluate.main(command) == 0
    printed = capsys.readouterr()
    assert "demo test, 6 images:" in printed.out and f"| {irra} zero-shot |" in printed.out
    assert "IRRA's checkpoint: its CLIP is used" in printed.err
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}}, irra)
    assert evaluate.main(command) == 1
    assert capsys.readouterr().err == (f"error: {irra} holds a 'model' entry, as IRRA's checkpoints do, but no "
                                       "CLIP under 'base_model.' in it (first keys: encoder.weight)\n")
