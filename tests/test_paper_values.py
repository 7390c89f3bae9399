"""The numbers the papers, the authors' run scripts and OpenAI's release give, written here as those
sources write them (never read back from the code under test), so that an edit that changes one
fails here: constructor defaults, initialisations, CLIP's constants, the SDM temperature, and the
training augmentation measured over many draws.

Sources: CSKT (Liu et al., ICASSP 2024, arXiv 2309.09496) and its run script (n_ctx 4, depth 12);
DM-Adapter (Liu et al., AAAI 2025, arXiv 2503.04144); IRRA (Jiang & Ye, CVPR 2023, arXiv
2303.12501), whose SDM loss, transforms and caption masking both methods reuse; OpenAI's CLIP.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import clip_min
import cskt
import data
import dm_adapter

# ViT-B/16 at the person-retrieval input size, built on the meta device: shapes only, no memory.
VIT_B_16_PERSON = dict(image_size=(384, 128))


def meta_model(method):
    with torch.device("meta"):
        return method(clip_min.CLIP(clip_min.CLIPConfig(**VIT_B_16_PERSON)))


# ------------------------------------------------------------------------------------------------
# CLIP (OpenAI's release)

def test_clip_constants_and_vit_b_16_shape():
    assert (clip_min.SOT_TOKEN, clip_min.EOT_TOKEN, clip_min.CONTEXT_LENGTH) == (49406, 49407, 77)
    config = clip_min.CLIPConfig()
    assert (config.embed_dim, config.vision_width, config.vision_layers, config.patch_size) == (512, 768, 12, 16)
    assert (config.text_width, config.text_layers, config.vocab_size, config.context_length) == (512, 12, 49408, 77)
    with torch.device("meta"):
        model = clip_min.CLIP(clip_min.CLIPConfig(**VIT_B_16_PERSON))
    assert model.visual.grid == (24, 8)  # 384x128 at stride 16
    assert model.visual.transformer.resblocks[0].attn.heads == 12  # width / 64
    assert model.transformer.resblocks[0].attn.heads == 8
    assert model.transformer.resblocks[0].attn.causal and not model.visual.transformer.resblocks[0].attn.causal
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, clip_min.QuickGELU)


def test_clip_initialisation_from_scratch_is_openai_s():
    """OpenAI's initialize_parameters, for training from scratch (the demo's tiny CLIP)."""
    torch.manual_seed(0)
    width, layers = 256, 4
    model = clip_min.CLIP(clip_min.CLIPConfig(embed_dim=64, image_size=(32, 32), patch_size=8, vision_width=width,
                                              vision_layers=1, text_width=width, text_layers=layers))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert_normal([model.token_embedding.weight], 0.02, "token_embedding")
    assert_normal([model.positional_embedding], 0.01, "positional_embedding")
    assert_normal([model.text_projection], width ** -0.5, "text_projection")
    blocks = model.transformer.resblocks
    assert_normal([b.attn.in_proj_weight for b in blocks], width ** -0.5, "in_proj")
    assert_normal([b.attn.out_proj.weight for b in blocks], width ** -0.5 * (2 * layers) ** -0.5, "out_proj")
    assert_normal([b.mlp.c_fc.weight for b in blocks], (2 * width) ** -0.5, "c_fc")
    assert_normal([b.mlp.c_proj.weight for b in blocks], width ** -0.5 * (2 * layers) ** -0.5, "c_proj")
    visual = model.visual
    assert_normal([visual.class_embedding, visual.positional_embedding, visual.proj], width ** -0.5, "visual")


def test_quick_gelu_is_x_sigmoid_1_702_x():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(clip_min.QuickGELU()(x), x * torch.sigmoid(1.702 * x), rtol=0, atol=0)


def test_release_table():
    assert clip_min.RELEASES["ViT-B/16"] == (
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt")
    assert clip_min.RELEASES["ViT-B/32"] == (
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt")
    assert clip_min.RELEASES["ViT-L/14"] == (
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt")
    assert clip_min.RELEASES["ViT-L/14@336px"] == (
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt")
    url = clip_min.RELEASE_URL.format(sha256="abc", file="ViT-B-16.pt")
    assert url == "https://openaipublic.azureedge.net/clip/models/abc/ViT-B-16.pt"


def test_sdm_temperature_is_0_02_everywhere():
    """IRRA and both methods fix tau = 0.02 (s = 50): the default of the loss and of every forward."""
    torch.manual_seed(0)
    image_features, text_features = torch.randn(6, 8), torch.randn(6, 8)
    pids = torch.tensor([0, 0, 1, 2, 2, 3])
    v = image_features / image_features.norm(dim=1, keepdim=True)
    t = text_features / text_features.norm(dim=1, keepdim=True)
    target = (pids[:, None] == pids[None, :]).float()
    target = target / target.sum(dim=1, keepdim=True)
    expected = sum((logits.softmax(1) * (logits.log_softmax(1) - torch.log(target + 1e-8))).sum(1).mean()
                   for logits in (50 * v @ t.T, 50 * t @ v.T))
    torch.testing.assert_close(clip_min.sdm_loss(image_features, text_features, pids), expected)

    config = clip_min.CLIPConfig(embed_dim=16, image_size=(16, 16), patch_size=8, vision_width=64,
                                 vision_layers=1, text_width=64, text_layers=1)
    images = torch.randn(2, 3, 16, 16)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = clip_min.SOT_TOKEN, torch.tensor([320, 1125]), clip_min.EOT_TOKEN
    pids = torch.tensor([0, 1])
    for model in (clip_min.CLIP(config), cskt.CSKT(clip_min.CLIP(config), depth=1),
                  dm_adapter.DMAdapter(clip_min.CLIP(config))):
        with torch.no_grad():
            loss = clip_min.sdm_loss(model.encode_image(images), model.encode_text(ids), pids, temperature=0.02)
            torch.testing.assert_close(model(images, ids, pids)["sdm"], loss, msg=type(model).__name__)


# ------------------------------------------------------------------------------------------------
# CSKT: n_ctx 4, depth 12, adapters d -> d/8 -> d, s = 0.1 (vision) and 4 (text)

def test_cskt_defaults():
    model = meta_model(cskt.CSKT)
    assert model.n_ctx == 4 and model.depth == 12
    assert [tuple(p.shape) for p in model.text_prompts] == [(4, 512)] * 12
    assert [tuple(p.shape) for p in model.vision_prompts] == [(4, 768)] * 12
    assert [(m.in_features, m.out_features) for m in model.text_to_vision] == [(512, 768)] * 12
    assert [(m.in_features, m.out_features) for m in model.vision_to_text] == [(768, 512)] * 12
    assert [(a.down.out_features, a.scale) for a in model.vision_adapters] == [(96, 0.1)] * 12
    assert [(a.down.out_features, a.scale) for a in model.text_adapters] == [(64, 4.0)] * 12


MEDIUM = clip_min.CLIPConfig(embed_dim=64, image_size=(32, 16), patch_size=8, stride=8, vision_width=384,
                             vision_layers=4, text_width=256, text_layers=4)


def assert_normal(tensors, std, name):
    values = torch.cat([t.detach().flatten() for t in tensors])
    assert len(values) >= 1000, name  # std known to about 2 %
    assert abs(values.mean()) < 4 * std / math.sqrt(len(values)), name
    assert abs(values.std() / std - 1) < 0.1, (name, values.std().item())


def test_cskt_initialisation():
    torch.manual_seed(0)
    clip = clip_min.CLIP(MEDIUM)
    model = cskt.CSKT(clip, depth=4)  # every layer of this CLIP
    # T_0: CLIP's own embeddings of "a photo of a" (token ids 320, 1125, 539, 320)
    assert torch.equal(model.text_prompts[0], clip.token_embedding.weight[[320, 1125, 539, 320]])
    assert_normal(model.text_prompts[1:], 0.02, "T_l, l >= 1")
    assert_normal(model.vision_prompts, 0.02, "V_l")
    assert_normal([m.weight for m in model.text_to_vision], 0.02, "T2V weights")
    assert_normal([m.weight for m in model.vision_to_text], 0.02, "V2T weights")
    adapters = [*model.vision_adapters, *model.text_adapters]
    assert_normal([a.down.weight for a in adapters], 0.02, "adapter down")
    assert_normal([a.up.weight for a in adapters], 0.02, "adapter up")
    for linear in (*model.text_to_vision, *model.vision_to_text, *(a.down for a in adapters), *(a.up for a in adapters)):
        assert not linear.bias.any()
    for adapter in adapters:  # ln_3 starts as the identity map
        assert (adapter.ln_3.weight == 1).all() and not adapter.ln_3.bias.any()


# ------------------------------------------------------------------------------------------------
# DM-Adapter: 6 experts, top-2, d -> d/8 -> d, aux weight 0.5, s = 0.1 and 4

def test_dm_adapter_defaults():
    model = meta_model(dm_adapter.DMAdapter)
    assert model.aux_weight == 0.5
    for mixtures, width, scale in ((model.vision_adapters, 768, 0.1), (model.text_adapters, 512, 4.0)):
        assert len(mixtures) == 12
        for mixture in mixtures:
            assert len(mixture.experts) == 6 and mixture.top_k == 2 and mixture.scale == scale
            assert all(e.down.out_features == width // 8 for e in mixture.experts)
            assert mixture.router.input_gate.out_features == 6 and mixture.router.input_gate.bias is None
            assert mixture.router.task_gate.bias is None and mixture.router.domain_prompt.shape == (width,)


def test_dm_adapter_initialisation():
    torch.manual_seed(0)
    model = dm_adapter.DMAdapter(clip_min.CLIP(MEDIUM))
    mixtures = [*model.vision_adapters, *model.text_adapters]
    experts = [e for m in mixtures for e in m.experts]
    for expert in experts:  # up = 0: every expert outputs 0, the model starts as CLIP
        assert not expert.up.weight.any() and not expert.up.bias.any() and not expert.down.bias.any()
    for expert in experts[::7]:  # down: PyTorch's Linear default, kaiming-uniform with a = sqrt(5)
        bound = 1 / math.sqrt(expert.down.in_features)
        assert expert.down.weight.abs().max() <= bound and expert.down.weight.abs().max() > 0.95 * bound
    routers = [m.router for m in mixtures]
    assert all(r.alpha.item() == 0.5 for r in routers)
    assert_normal([r.input_gate.weight for r in routers], 0.02, "input_gate")
    assert_normal([r.task_gate.weight for r in routers], 0.02, "task_gate")
    assert_normal([r.domain_prompt for r in routers], 1.0, "domain prompt")
    for mixture in mixtures:
        assert (mixture.ln_3.weight == 1).all() and not mixture.ln_3.bias.any()


# ------------------------------------------------------------------------------------------------
# Transforms (IRRA's, used by both methods): CLIP's pixel statistics, bilinear resize; for training
# a horizontal flip p = 0.5, 10 pixels of zero padding and a random crop back to size, then random
# erasing p = 0.5, scale 0.02-0.4, ratio 0.3-3.3, filled with the mean values

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def test_test_transform_is_a_bilinear_resize_and_clip_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    transform = data.build_transform((64, 32))
    resized = np.asarray(image.resize((32, 64), Image.BILINEAR), dtype=np.float32) / 255  # PIL size is (W, H)
    expected = (torch.from_numpy(resized).permute(2, 0, 1) - MEAN) / STD
    torch.testing.assert_close(transform(image), expected, rtol=0, atol=3e-7)  # about 1 ulp
    assert torch.equal(transform(image), transform(image))  # nothing random at test time


def test_training_augmentation_measured_over_many_draws():
    # Each pixel names its own place: red = 8 * column, green = 4 * row, blue = 255. After the
    # transform every output pixel is one of: an image pixel (blue 255), padding (black) or erased.
    height, width, draws = 64, 32, 2000
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = 8 * np.arange(width)[None, :]
    pixels[..., 1] = 4 * np.arange(height)[:, None]
    pixels[..., 2] = 255
    transform = data.build_transform((height, width), train=True)
    torch.manual_seed(0)
    out = torch.stack([transform(Image.fromarray(pixels)) for _ in range(draws)])  # [N, 3, H, W]
    assert out.shape == (draws, 3, height, width)

    erased = (out == MEAN).all(dim=1)  # [N, H, W]: erasing writes the mean values after Normalize
    rgb = 255 * (out * STD + MEAN)  # [N, 3, H, W]
    padding = ((out - (0 - MEAN) / STD).abs() < 1e-5).all(dim=1) & ~erased  # zeros, normalised
    from_image = ((rgb[:, 2] - 255).abs() < 0.01) & ~erased
    assert (erased.int() + padding.int() + from_image.int() == 1).all(), "a pixel that is none of the three"

    # Where each image pixel came from: a shift (dy, dx) in [-10, 10], the columns maybe mirrored.
    rows, columns = torch.arange(height)[:, None], torch.arange(width)[None, :]
    source_row, source_column = (rgb[:, 1] / 4).round(), (rgb[:, 0] / 8).round()

    def constant(values):  # [N, H, W] -> per-draw value, or NaN where it varies over image pixels
        low = torch.where(from_image, values, math.inf).amin(dim=(1, 2))
        high = torch.where(from_image, values, -math.inf).amax(dim=(1, 2))
        return torch.where(low == high, low, math.nan)
    dy = constant(source_row - rows)
    unflipped_dx = constant(source_column - columns)
    flipped_dx = width - 1 - constant(source_column + columns)
    assert not dy.isnan().any()
    flipped = unflipped_dx.isnan()
    assert (flipped != flipped_dx.isnan()).all(), "each draw is either mirrored or not"
    dx = torch.where(flipped, flipped_dx, unflipped_dx)
    assert abs(flipped.float().mean() - 0.5) < 0.045  # p = 0.5
    assert set(dy.int().tolist()) == set(range(-10, 11)) == set(dx.int().tolist())  # pad 10, crop anywhere
    # Every pixel whose source lies outside the image is padding (unless erased), and only those.
    source_row = rows + dy[:, None, None]
    source_column = torch.where(flipped[:, None, None], width - 1 - columns - dx[:, None, None],
                                columns + dx[:, None, None])
    outside = (source_row < 0) | (source_row >= height) | (source_column < 0) | (source_column >= width)
    assert torch.equal(padding, outside & ~erased)

    # Random erasing: one rectangle in half of the draws, 2-40 % of the image, aspect 0.3-3.3.
    has_erasing = erased.any(dim=(1, 2))
    assert abs(has_erasing.float().mean() - 0.5) < 0.045
    rectangles = erased[has_erasing]
    area = rectangles.sum(dim=(1, 2)).float() / (height * width)
    rect_height = rectangles.any(dim=2).sum(dim=1)
    rect_width = rectangles.any(dim=1).sum(dim=1)
    assert torch.equal(rect_height * rect_width, rectangles.sum(dim=(1, 2))), "erasing is one rectangle"
    # Bounds allow for rounding the sides to whole pixels on a 64x32 image.
    assert area.min() > 0.015 and area.min() < 0.03 and area.max() > 0.36 and area.max() < 0.42
    aspect = rect_height / rect_width
    assert aspect.min() > 0.24 and aspect.min() < 0.42 and aspect.max() > 2.7 and aspect.max() < 4.0


def test_caption_masking_token_and_probability():
    """IRRA's masked-token augmentation: id 49405 (the last merge's slot) for 80 % of the 15 %
    chosen, a random id for 10 %, unchanged for 10 %."""
    assert data.MASK_TOKEN == 49405
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(3000, 77, dtype=torch.long)
    ids[:, 0], ids[:, 1:61], ids[:, 61] = 49406, torch.randint(1, 49405, (3000, 60), generator=generator), 49407
    out = data.mask_caption_ids(ids, generator)
    words = out[:, 2:61]  # position 1 also takes the mask when nothing else was chosen
    original = ids[:, 2:61]
    masked = (words == 49405).float().mean()
    replaced = ((words != original) & (words != 49405)).float().mean()
    assert abs(masked - 0.15 * 0.8) < 0.004 and abs(replaced - 0.15 * 0.1) < 0.0015
