"""clip_min against OpenAI's own code (clip-anytorch ships it unchanged), plus loading and the loss.

Parity: random weights in OpenAI's layout go into both models; image and text features must
agree in fp32 at a small configuration and at full ViT-B/16 shapes, at 224x224 and at 384x128.
The tokenizer must give the same ids on thousands of strings.
"""

import gzip
import hashlib
import io
import math
import os
import pickle
import random
import urllib.error

import pytest
import torch
from conftest import randomize_

import clip_min

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
            transformer_layers=2)
VIT_B_16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)
CAPTIONS = ["a woman in a red coat carrying a black bag",
            "The man wears a blue jacket, grey trousers and white shoes. He has short hair.",
            "a", "person with a backpack"]


def openai_reference(openai_model, config: dict, seed: int):
    return randomize_(openai_model.CLIP(**config), seed).eval()


def compare(name: str, ours: torch.Tensor, reference: torch.Tensor):
    print(f"\nparity {name}: max |ours - OpenAI| = {(ours - reference).abs().max().item():.2e}"
          f" (largest |feature| {reference.abs().max().item():.2e})")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def give_reference_grid(reference, model: clip_min.CLIP):
    """OpenAI's VisionTransformer adds whatever position table it holds to whatever the conv cuts:
    hand it our resized table (and our stride) and it computes the person-shaped forward pass."""
    reference.visual.positional_embedding = torch.nn.Parameter(model.visual.positional_embedding.detach().clone())
    reference.visual.conv1.stride = model.visual.conv1.stride


@pytest.mark.parametrize("config,image_size,stride", [
    (TINY, None, None), (TINY, (64, 32), 8), (TINY, (64, 32), 6),
    (VIT_B_16, None, None), (VIT_B_16, (384, 128), 16),
], ids=["tiny-32", "tiny-64x32", "tiny-64x32-stride6", "B16-224", "B16-384x128"])
def test_features_match_openai(openai_model, config, image_size, stride):
    torch.manual_seed(0)
    reference = openai_reference(openai_model, config, seed=1)
    model = clip_min.build_model(reference.state_dict(), image_size, stride).eval()
    give_reference_grid(reference, model)
    height, width = image_size or (config["image_resolution"],) * 2
    images = torch.randn(2, 3, height, width)
    ids = clip_min.tokenize(CAPTIONS)
    name = f"{config['vision_width']}-{height}x{width}-stride{stride}"
    with torch.no_grad():
        compare(f"image {name}", model.encode_image(images), reference.encode_image(images))
        compare(f"text {name}", model.encode_text(ids), reference.encode_text(ids))


def test_state_dict_round_trips_both_ways(openai_model):
    reference = openai_reference(openai_model, TINY, seed=2)
    model = clip_min.build_model(reference.state_dict())
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.state_dict(), strict=True)  # ours -> OpenAI's
    person_shaped = clip_min.build_model(reference.state_dict(), (64, 32), 8)
    again = clip_min.build_model(person_shaped.state_dict(), (64, 32), 8)  # a non-square grid reloads
    for key, value in person_shaped.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_stride_and_image_size_set_the_patch_grid(openai_model):
    """(H - P) // stride + 1 rows and columns: 64x32 at patch 8, stride 6 gives 10 x 5 patches."""
    reference = openai_reference(openai_model, TINY, seed=6)
    model = clip_min.build_model(reference.state_dict(), (64, 32), 6)
    assert model.visual.conv1.stride == (6, 6) and model.visual.grid == (10, 5)
    assert model.visual.positional_embedding.shape == (1 + 50, 64)
    assert clip_min.build_model(reference.state_dict()).visual.conv1.stride == (8, 8)  # default: the patch size


def test_positional_grid_is_resized_bilinearly_row_major():
    table = torch.arange(1 + 4, dtype=torch.float32)[:, None].repeat(1, 3)  # CLS row 0, a 2x2 grid 1..4
    resized = clip_min.resize_positional_embedding(table, (2, 2), (4, 2))
    assert resized.shape == (1 + 8, 3) and resized[0, 0] == 0
    grid = resized[1:, 0].reshape(4, 2)
    # rows stretched 2 -> 4 with align_corners=False: weights 1, 0.75/0.25, 0.25/0.75, 1
    expected = torch.tensor([[1, 2], [1.5, 2.5], [2.5, 3.5], [3, 4]])
    torch.testing.assert_close(grid, expected)


def test_model_sizes_at_vit_b_16(openai_model):
    reference = openai_reference(openai_model, VIT_B_16, seed=3)
    model = clip_min.build_model(reference.state_dict(), (384, 128), 16)
    assert model.visual.grid == (24, 8)
    assert model.visual.positional_embedding.shape == (193, 768)
    vision = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total - vision + sum(p.numel() for p in reference.visual.parameters()) == 149_620_737  # ViT-B/16
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

def tokenizer_strings(count: int = 2400) -> list[str]:
    rng = random.Random(0)
    colours = ["red", "dark blue", "light-grey", "black", "white", "navy", "khaki", "beige", "maroon"]
    garments = ["coat", "t-shirt", "jacket", "hoodie", "dress", "skirt", "jeans", "trousers", "shorts"]
    extras = ["carrying a black bag", "with a backpack", "holding an umbrella", "wearing sneakers",
              "and glasses", "talking on the phone", "pushing a bike", "with long hair"]
    special = [
        "He's wearing a hat; she'll carry it, they've gone, I'm here, we'd go, it'd rain, don't!",
        "WOMAN IN RED COAT... (carrying) [a] {bag}?! -- yes/no: 50% #1 @home & co.",
        "3 people, 1,234.56 kg, 2nd floor, 10:45am, +44 (0)20 7946 0958, 1999-12-31",
        "café naïve résumé Zoë São Paulo Øresund Ångström façade crème brûlée",
        "穿红色外套的女人拿着黑色的包", "赤いコートを着た女性", "빨간 코트를 입은 여자", "Ελληνικά και русский текст",
        "👩‍🦰 with 🎒 and 👟 🇬🇧🇫🇷 ❤️ ✨", "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;hi&quot; &#39;x&#39; &amp;amp; &nbsp;",
        "a  \t\n  woman \u00a0\u2003 in   red\r\n", "cafÃ© naÃ¯ve", "", "   ", "\t\n",
        "<|startoftext|> a person <|endoftext|>", "<|STARTOFTEXT|>x<|EndOfText|>", "it’s a man’s bag",
        "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３", "x" * 300, "supercalifragilisticexpialidocious " * 5,
        "a" + " b" * 200, "\u0000\u0007 control \u200b zero-width \ufeff bom",
    ]
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?'\"()-_/\\&#%@*+=<>[]{}|~^`$ "
                "éèêëàâäôöüçñßøåæœ 中文字符日本語한국어 αβγδ абвгд 😀🎒👟 \t\n&amp;&lt;")
    strings = list(special)
    while len(strings) < count:
        kind = rng.randrange(4)
        if kind == 0:
            strings.append(f"A {rng.choice(['woman', 'man', 'girl', 'boy', 'person'])} in a "
                           f"{rng.choice(colours)} {rng.choice(garments)} {rng.choice(extras)}.")
        elif kind == 1:
            sentences = [f"The {rng.choice(['man', 'lady'])} wears {rng.choice(colours)} {rng.choice(garments)}."
                         for _ in range(rng.randrange(1, 12))]  # up to ~110 tokens: over-long ones too
            strings.append(" ".join(sentences))
        elif kind == 2:
            strings.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120))))
        else:
            strings.append(" ".join(rng.sample(special[:12], 2)))
    return strings


def test_vocabulary_file_is_openai_s():
    with open(clip_min.VOCAB_PATH, "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == clip_min.VOCAB_SHA256
    tokenizer = clip_min.default_tokenizer()
    assert len(tokenizer.vocab) == 49408 and tokenizer.vocab[clip_min.SOT_TOKEN] == "<|startoftext|>"


def test_tokenizer_matches_openai_id_for_id(openai_tokenizer):
    strings = tokenizer_strings()
    ours = clip_min.Tokenizer()
    mismatches = [s for s in strings if ours.encode(s) != openai_tokenizer.encode(s)]
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, e.g. {mismatches[:3]}"
    # tokenize = [SOT] + ids + [EOT], padded or truncated (EOT kept) to 77, as OpenAI's clip.tokenize
    batch = clip_min.tokenize(strings, truncate=True)
    expected = torch.zeros(len(strings), 77, dtype=torch.long)
    over_long = 0
    for row, text in enumerate(strings):
        ids = [49406, *openai_tokenizer.encode(text), 49407]
        if len(ids) > 77:
            over_long += 1
            ids = ids[:76] + [49407]
        expected[row, :len(ids)] = torch.tensor(ids)
    assert torch.equal(batch, expected)
    assert over_long >= 100, "the corpus must exercise truncation"
    print(f"\ntokenizer: {len(strings)} strings compared id for id, {over_long} over-long")


def test_decode(openai_tokenizer):
    ids = clip_min.tokenize(["A woman in a RED coat,  carrying a black bag", "café 中文 👟 it's 3 o'clock"])
    # Words separated by spaces come back as cleaned text; elsewhere decode ends every word with a
    # space ("it 's"), as OpenAI's does.
    assert clip_min.decode(ids[0]) == "a woman in a red coat , carrying a black bag"
    row = ids[1][1:ids[1].argmax()].tolist()
    assert clip_min.decode(ids)[1] == openai_tokenizer.decode(row).strip() == "café 中文 👟 it 's 3 o ' clock"


def test_missing_vocabulary_file_is_a_clip_error_naming_it(tmp_path):
    missing = str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(clip_min.CLIPError, match=f"{missing} is missing.*clip-anytorch") as error:
        clip_min.Tokenizer(missing)
    assert "\n" not in str(error.value)


def test_over_long_text_raises_unless_truncated():
    text = "red " * 100
    with pytest.raises(ValueError, match="context length 77.*truncate=True"):
        clip_min.tokenize(text)
    ids = clip_min.tokenize(text, truncate=True)[0]
    assert ids[0] == clip_min.SOT_TOKEN and ids[76] == clip_min.EOT_TOKEN and (ids[1:76] != 0).all()


# ------------------------------------------------------------------------------------------------
# Loading files, and every error a user can meet
# ------------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_reference(openai_model):
    return openai_reference(openai_model, TINY, seed=4)


def features(model, image_size=(32, 32)):
    torch.manual_seed(5)
    images = torch.randn(2, 3, *image_size)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(clip_min.tokenize(CAPTIONS[:2]))


def save_torchscript(reference, path):
    images, ids = torch.randn(1, 3, 32, 32), clip_min.tokenize(CAPTIONS[:1])
    traced = torch.jit.trace_module(reference, {"encode_image": images, "encode_text": ids})
    torch.jit.save(traced, path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace/save are deprecated
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # about OpenAI's shape checks
def test_torchscript_archive_gives_the_state_dict_s_model(tiny_reference, tmp_path, monkeypatch):
    path = str(tmp_path / "tiny-jit.pt")
    save_torchscript(tiny_reference, path)
    with pytest.raises(clip_min.CLIPError, match="TorchScript archive.*trust_jit=True"):
        clip_min.load(path, image_size=(32, 32), stride=8)
    from_jit = clip_min.load(path, image_size=(32, 32), stride=8, trust_jit=True)
    from_state_dict = clip_min.build_model(tiny_reference.state_dict())
    for ours, theirs in zip(features(from_jit), features(from_state_dict)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # A file whose hash is a known release is trusted without the flag.
    monkeypatch.setitem(clip_min.RELEASES, "tiny", (clip_min.file_sha256(path), "tiny-jit.pt"))
    clip_min.load(path, image_size=(32, 32), stride=8)


def test_fp16_state_dict_gives_fp32_model(tiny_reference, tmp_path):
    half = {k: v.half() for k, v in tiny_reference.state_dict().items()}
    half.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = str(tmp_path / "half.pt")
    torch.save(half, path)
    model = clip_min.load(path, image_size=(32, 32), stride=8)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.visual.proj, half["visual.proj"].float())


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}

    def __exit__(self, *args):
        self.close()


def test_download_verifies_the_hash(tiny_reference, tmp_path, monkeypatch, capsys):
    buffer = io.BytesIO()
    torch.save(tiny_reference.state_dict(), buffer)
    payload = buffer.getvalue()
    good = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(clip_min.RELEASES, "tiny", (good, "tiny.pt"))
    monkeypatch.setattr(clip_min.urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    model = clip_min.load("tiny", image_size=(32, 32), stride=8, cache_dir=str(tmp_path))
    assert "downloading tiny.pt" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["tiny.pt"]
    clip_min.load("tiny", image_size=(32, 32), stride=8, cache_dir=str(tmp_path))  # a verified cache hit

    with open(tmp_path / "tiny.pt", "ab") as file:  # the cached file is damaged
        file.write(b"x")
    with pytest.raises(clip_min.CLIPError, match=f"corrupt: SHA-256 [0-9a-f]{{64}}, expected {good}.*delete"):
        clip_min.load("tiny", cache_dir=str(tmp_path))

    monkeypatch.setitem(clip_min.RELEASES, "tiny", ("0" * 64, "other.pt"))  # the download is damaged
    with pytest.raises(clip_min.CLIPError, match="download .* is corrupt: SHA-256 .* expected 0{64}"):
        clip_min.load("tiny", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == ["tiny.pt"]  # neither other.pt nor its partial download
    assert model.visual.grid == (4, 4)


def test_no_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(clip_min.urllib.request, "urlopen", offline)
    expected_path = os.path.join(str(tmp_path), "ViT-B-16.pt")
    with pytest.raises(clip_min.CLIPError, match=f"could not download ViT-B/16.*put it at {expected_path}"):
        clip_min.load("ViT-B/16", cache_dir=str(tmp_path))


def test_cache_folder_is_made_only_when_a_download_writes(tiny_reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "clip"

    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(clip_min.urllib.request, "urlopen", offline)
    with pytest.raises(clip_min.CLIPError, match="could not download"):
        clip_min.load("ViT-B/16", cache_dir=str(cache))
    assert not (tmp_path / "cache").exists()
    with pytest.raises(clip_min.CLIPError):  # loading a file or a bad name never touches the cache
        clip_min.load(str(tmp_path / "missing.pt"), cache_dir=str(cache))
    assert not (tmp_path / "cache").exists()

    buffer = io.BytesIO()
    torch.save(tiny_reference.state_dict(), buffer)
    monkeypatch.setitem(clip_min.RELEASES, "tiny", (hashlib.sha256(buffer.getvalue()).hexdigest(), "tiny.pt"))
    monkeypatch.setattr(clip_min.urllib.request, "urlopen", lambda url, timeout: FakeResponse(buffer.getvalue()))
    clip_min.load("tiny", image_size=(32, 32), stride=8, cache_dir=str(cache))
    assert os.listdir(cache) == ["tiny.pt"]


@pytest.mark.parametrize("content,reason", [
    (b"", "is empty"), (b"PK\x03\x04" + bytes(300), "not a file saved with torch.save"),
    # torch's weights_only refusal runs over several lines of advice: its type is said instead
    (random.Random(0).randbytes(4096), "would run code when loaded (UnpicklingError)"),
], ids=["empty", "broken-zip", "random-bytes"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(clip_min.CLIPError) as error:
        clip_min.load(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message and reason in message and len(message) < 300, message


def test_unknown_name_and_missing_file():
    with pytest.raises(clip_min.CLIPError, match="unknown model name 'ViT-B/15'.*ViT-B/16, ViT-B/32"):
        clip_min.load("ViT-B/15")
    with pytest.raises(clip_min.CLIPError, match="no such file: weights/missing.pt"):
        clip_min.load("weights/missing.pt")


def test_bad_state_dicts_raise_clip_errors(tiny_reference, tmp_path):
    good = tiny_reference.state_dict()
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(1), "text_projection": torch.zeros(2, 2)}
    with pytest.raises(clip_min.CLIPError, match="ResNet CLIP checkpoint.*not supported"):
        clip_min.build_model(resnet)
    # load_state_dict(strict=True) names every missing, unexpected and misshapen key, in one line
    missing = {k: v for k, v in good.items() if k != "visual.ln_post.bias"}
    wrong = {**missing, "extra.weight": torch.zeros(1), "visual.proj": torch.zeros(64, 31)}
    with pytest.raises(clip_min.CLIPError) as error:
        clip_min.build_model(wrong)
    message = str(error.value)
    assert "\n" not in message, message
    assert all(name in message for name in ("visual.ln_post.bias", "extra.weight", "visual.proj", "[64, 31]"))
    person_shaped = clip_min.build_model(good, (64, 32), 8).state_dict()
    with pytest.raises(clip_min.CLIPError, match="32 patches, not a square grid"):
        clip_min.build_model(person_shaped)
    with pytest.raises(clip_min.CLIPError, match="key 'token_embedding.weight' is missing"):
        clip_min.build_model({k: v for k, v in good.items() if k != "token_embedding.weight"})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_or_foreign_files_raise_clip_errors(tmp_path):
    pickled = tmp_path / "pickled.pt"
    with open(pickled, "wb") as file:  # an arbitrary pickle: weights_only refuses it, no code runs
        pickle.dump(gzip.GzipFile, file)
    with pytest.raises(clip_min.CLIPError, match="could not read .*pickled.pt: not a file saved with"):
        clip_min.load(str(pickled))
    # A torch.save file whose unpickling would run code (here: make a folder). weights_only refuses it.
    marker = tmp_path / "code-ran"
    class RunsCode:
        def __reduce__(self):
            return os.makedirs, (str(marker),)
    torch.save({"visual.proj": RunsCode()}, tmp_path / "runs-code.pt")
    with pytest.raises(clip_min.CLIPError, match="could not read .*runs-code.pt: not a file saved with"):
        clip_min.load(str(tmp_path / "runs-code.pt"))
    assert not marker.exists()
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(clip_min.CLIPError, match="holds a list, not a state dict"):
        clip_min.load(str(a_list))


# ------------------------------------------------------------------------------------------------
# The losses, checked by hand
# ------------------------------------------------------------------------------------------------

def test_clip_loss_by_hand():
    # Two pairs, scale s = exp(log 2) = 2. Caption 1 is given unnormalised ([3, 4] is [0.6, 0.8]
    # times 5), so cos = [[1, 0.6], [0, 0.8]] (images x captions), logits = 2 cos. With two
    # candidates, the cross-entropy of the right one at logit a against the other at b is
    # log(1 + e^(b - a)). Image rows: 2 - 1.2 = 0.8 and 1.6 - 0 = 1.6 apart; caption rows
    # (the columns): 2 - 0 = 2 and 1.6 - 1.2 = 0.4 apart.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    captions = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    ce = lambda gap: math.log(1 + math.exp(-gap))
    by_hand = ((ce(0.8) + ce(1.6)) / 2 + (ce(2.0) + ce(0.4)) / 2) / 2  # = 0.2926...
    loss = clip_min.clip_loss(images, captions, torch.tensor(math.log(2)))
    assert math.isclose(loss.item(), by_hand, rel_tol=1e-6)
    # The captions swapped: each image's own caption is now the farther one.
    swapped = clip_min.clip_loss(images, captions.flip(0), torch.tensor(math.log(2)))
    assert math.isclose(swapped.item(), ((ce(-0.8) + ce(-1.6)) / 2 + (ce(-2.0) + ce(-0.4)) / 2) / 2, rel_tol=1e-6)


def test_clip_loss_trains_the_temperature_and_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    images, texts = torch.randn(6, 16), torch.randn(6, 16)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    exact = clip_min.clip_loss(images, texts, logit_scale)
    exact.backward()
    assert logit_scale.grad is not None and logit_scale.grad != 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = clip_min.clip_loss(images, texts, logit_scale)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=1e-6)


def test_sdm_loss_by_hand():
    # Two identities; image i and caption i share a feature; cos(v_1, t_2) = 0.98, so every row
    # of logits is [50, 49] (own caption first): p = [e, 1] / (e + 1), q = [1, 0], and
    # KL(p || q) = p_1 (log p_1 - log(1 + 1e-8)) + p_2 (log p_2 - log 1e-8), the same for all four
    # rows (two per direction).
    features = torch.tensor([[1.0, 0.0], [0.98, math.sqrt(1 - 0.98 ** 2)]])
    p_1, p_2 = math.e / (math.e + 1), 1 / (math.e + 1)
    per_row = p_1 * (math.log(p_1) - math.log(1 + 1e-8)) + p_2 * (math.log(p_2) - math.log(1e-8))
    loss = clip_min.sdm_loss(features, features, torch.tensor([0, 1]))
    assert math.isclose(loss.item(), 2 * per_row, rel_tol=1e-5)  # = 8.7438...
    # One identity, identical features: p = [1/2, 1/2] = q, so KL = 0 up to the epsilon.
    same = torch.ones(2, 2)
    assert clip_min.sdm_loss(same, same, torch.tensor([3, 3])).item() == pytest.approx(0, abs=1e-6)
    # Swapped captions: each row of logits is [49, 50] against the target [1, 0].
    per_row = p_2 * (math.log(p_2) - math.log(1 + 1e-8)) + p_1 * (math.log(p_1) - math.log(1e-8))
    loss = clip_min.sdm_loss(features, features.flip(0), torch.tensor([0, 1]))
    assert math.isclose(loss.item(), 2 * per_row, rel_tol=1e-5)


def test_sdm_loss_is_computed_in_fp32_under_autocast():
    torch.manual_seed(1)
    images, texts, pids = torch.randn(16, 32), torch.randn(16, 32), torch.arange(16) % 5
    exact = clip_min.sdm_loss(images, texts, pids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = clip_min.sdm_loss(images, texts, pids)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=1e-6)
    half_inputs = clip_min.sdm_loss(images.bfloat16(), texts.bfloat16(), pids)
    torch.testing.assert_close(half_inputs, clip_min.sdm_loss(images.bfloat16().float(), texts.bfloat16().float(), pids))


def test_sdm_loss_matches_a_direct_transcription():
    torch.manual_seed(0)
    images, texts = torch.randn(8, 16), torch.randn(8, 16)
    pids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    v, t = images / images.norm(dim=1, keepdim=True), texts / texts.norm(dim=1, keepdim=True)
    labels = (pids[:, None] == pids[None, :]).float()
    q = labels / labels.sum(dim=1)  # IRRA divides by column sums; the label matrix is symmetric
    loss = 0
    for logits in (50 * v @ t.T, 50 * t @ v.T):
        p = logits.softmax(dim=1)
        loss = loss + (p * (logits.log_softmax(dim=1) - torch.log(q + 1e-8))).sum(dim=1).mean()
    torch.testing.assert_close(clip_min.sdm_loss(images, texts, pids), loss)



# ------------------------------------------------------------------------------------------------
# IRRA's released models: the CLIP inside them is what IRRA evaluates

IRRA_HEADS = ("classifier.weight", "classifier.bias", "cross_attn.in_proj_weight", "ln_pre_t.weight",
              "ln_pre_i.weight", "ln_post.weight", "cross_modal_transformer.resblocks.0.attn.in_proj_weight",
              "mlm_head.dense.weight")


def irra_converts(name: str) -> bool:
    """What IRRA's convert_weights makes fp16: conv and linear weights and biases, attention's
    in_proj, and the two projections; LayerNorms and embeddings stay fp32."""
    return (name.endswith(("in_proj_weight", "in_proj_bias", "visual.proj", "text_projection", "conv1.weight"))
            or ".out_proj." in name or ".mlp.c_" in name)


def irra_checkpoint(clip_model: clip_min.CLIP, ddp: bool = False) -> dict:
    """What IRRA's utils/checkpoint.py saves for a model around `clip_model`."""
    model = {clip_min.IRRA_PREFIX + name: value.half() if irra_converts(name) else value
             for name, value in clip_model.state_dict().items() if name != "logit_scale"}
    generator = torch.Generator().manual_seed(7)
    model.update({name: torch.randn(8, 8, generator=generator) for name in IRRA_HEADS})
    if ddp:
        model = {f"module.{name}": value for name, value in model.items()}
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    return {"model": model, "optimizer": optimizer.state_dict(), "num_epoch": 60, "iteration": 32_000,
            "epoch": 60, "scheduler": {"last_epoch": 60, "base_lrs": [1e-5], "mode": "cosine"}}


def person_clip(seed: int = 3) -> clip_min.CLIP:
    """A tiny CLIP at a person-shaped size, as IRRA's at 384x128 (a 4x2 grid: not square)."""
    torch.manual_seed(0)
    config = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                                 vision_layers=2, text_width=64, text_layers=2)
    return randomize_(clip_min.CLIP(config), seed).eval()


@pytest.mark.parametrize("ddp", [False, True], ids=["saved-plain", "saved-from-ddp"])
def test_irra_s_checkpoint_gives_the_features_of_its_clip(tmp_path, capsys, ddp):
    original = person_clip()
    path = str(tmp_path / "best.pth")
    torch.save(irra_checkpoint(original, ddp), path)
    model = clip_min.load(path, image_size=(32, 16), stride=8)
    assert capsys.readouterr().err == f"{path}: IRRA's checkpoint: its CLIP is used; 8 tensors of IRRA's " \
                                      "training heads are left out\n"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The CLIP it was made from, with the weights that IRRA keeps in fp16 rounded as it rounds them.
    rounded = {name: value.half().float() if irra_converts(name) else value
               for name, value in original.state_dict().items()}
    expected = clip_min.build_model(rounded, image_size=(32, 16), stride=8).eval()
    images, ids = torch.randn(2, 3, 32, 16), clip_min.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            ours, theirs = getattr(model, encode), getattr(expected, encode)
            assert torch.equal(ours(images if encode == "encode_image" else ids),
                               theirs(images if encode == "encode_image" else ids))
        unrounded = original.encode_image(images)  # fp16 weights: about 3 significant digits
        torch.testing.assert_close(model.encode_image(images), unrounded, rtol=1e-2, atol=1e-2)


def test_a_dict_with_a_model_that_holds_no_clip_is_one_line(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 3}, path)
    with pytest.raises(clip_min.CLIPError, match=f"^{path} holds a 'model' entry, as IRRA's checkpoints do, but no "
                                                 r"CLIP under 'base_model\.' in it \(first keys: encoder\.weight\)$"):
        clip_min.load(path)
