"""CSKT on a tiny CLIP: its features equal a direct transcription of the paper's equations, the
prompts carry knowledge across the towers at every prompted layer, training touches only what CSKT
adds (also under bf16 and fp16 autocast), captions are laid out as the authors' loop does, CSKT
builds and trains from a folder holding only clip_min.py and cskt.py, and ViT-B/16 gets exactly
12,117,888 parameters."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_, trained_parameters

import clip_min
import cskt

TINY = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=3, text_width=64, text_layers=3)
CAPTIONS = ["a woman in a red coat carrying a black bag", "a man in a blue jacket",
            "a person " * 40, "child"]  # the third is over-long


def tiny_cskt(depth: int = 3, seed: int = 0) -> cskt.CSKT:
    torch.manual_seed(seed)
    return cskt.CSKT(clip_min.CLIP(TINY), depth=depth)


def batch(size: int = 4):
    images = torch.randn(size, 3, *TINY.image_size)
    ids = clip_min.tokenize((CAPTIONS * size)[:size], truncate=True)
    return images, ids, torch.tensor([0, 1, 0, 2][:size])


def test_training_step_changes_only_cskt_parameters():
    model = tiny_cskt()
    backbone = {k: v.clone() for k, v in model.clip.state_dict().items()}
    trainable = trained_parameters(model)
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    model.train()
    assert not model.clip.training and model.training
    out = model(*batch())
    assert torch.isfinite(out["loss"]) and out["loss"] > 0 and torch.equal(out["loss"], out["sdm"])
    out["loss"].backward()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name
    before = {k: v.detach().clone() for k, v in trainable.items()}
    optimizer.step()
    assert all(not torch.equal(before[k], v) for k, v in trainable.items())
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, backbone[key]), key


def slow_layout(ids: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """The authors' way, written plainly: one caption at a time."""
    result = torch.zeros_like(ids)
    for row, caption in enumerate(ids.tolist()):
        words = caption[1 : caption.index(clip_min.EOT_TOKEN)]
        words = words[: len(caption) - 2 - num_prompts]
        laid_out = [clip_min.SOT_TOKEN] + [0] * num_prompts + words + [clip_min.EOT_TOKEN]
        result[row, : len(laid_out)] = torch.tensor(laid_out)
    return result


def test_caption_layout_matches_a_per_caption_loop():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 76, (200,), generator=generator).tolist() + [0, 66, 67, 68, 75]
    ids = torch.zeros(len(lengths), clip_min.CONTEXT_LENGTH, dtype=torch.long)
    for row, length in enumerate(lengths):  # random words, as tokenize(truncate=True) lays them out
        words = torch.randint(1, 49405, (length,), generator=generator)
        ids[row, : length + 2] = torch.cat([torch.tensor([clip_min.SOT_TOKEN]), words, torch.tensor([clip_min.EOT_TOKEN])])
    original = ids.clone()
    laid_out, eot_index = cskt.layout_caption_ids(ids, num_prompts=8)
    assert torch.equal(laid_out, slow_layout(original, 8))
    assert torch.equal(ids, original), "the caller's ids must not change"
    assert torch.equal(eot_index, laid_out.argmax(dim=-1))
    assert eot_index.max() == 76 and laid_out[lengths.index(67), 76] == clip_min.EOT_TOKEN


def capture_inputs(modules) -> list:
    seen = []
    for module in modules:
        module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    return seen


def test_prompts_sit_after_the_patches_and_at_text_positions_1_to_8():
    model = tiny_cskt(depth=2).eval()  # depth 2 of 3 layers: the last layer keeps what layer 1 made
    visual, n = model.clip.visual, 2 * model.n_ctx
    images, ids, _ = batch()
    vision_pre = capture_inputs([visual.ln_pre])
    vision_blocks = capture_inputs([b.ln_1 for b in visual.transformer.resblocks])
    text_blocks = capture_inputs([b.ln_1 for b in model.clip.transformer.resblocks])
    with torch.no_grad():
        model.encode_image(images)
        model.encode_text(ids)
        # The order inside each tower's 2n prompts: [T2V(T_l), V_l] in vision, [T_l, V2T(V_l)] in text.
        # (Attention is blind to the order of the vision prompts, which have no position: only
        # their place in the sequence shows it.)
        T, V = model.text_prompts, model.vision_prompts
        vision = [torch.cat([model.text_to_vision[layer](T[layer]), V[layer]]) for layer in range(2)]
        text = [torch.cat([T[layer], model.vision_to_text[layer](V[layer])]) for layer in range(2)]
    patches = visual.grid[0] * visual.grid[1]
    assert vision_pre[0].shape[1] == 1 + patches + n
    torch.testing.assert_close(vision_pre[0][:, 1 + patches:], vision[0].expand(4, -1, -1))  # layer 0
    torch.testing.assert_close(vision_blocks[1][:, -n:], vision[1].expand(4, -1, -1))  # layer 1
    assert not torch.allclose(vision_blocks[2][:, -n:], vision[1].expand(4, -1, -1))  # layer 2: not replaced
    positions = model.clip.positional_embedding[1 : 1 + n]
    torch.testing.assert_close(text_blocks[0][:, 1 : 1 + n], (text[0] + positions).expand(4, -1, -1))
    torch.testing.assert_close(text_blocks[1][:, 1 : 1 + n], text[1].expand(4, -1, -1))
    assert not torch.allclose(text_blocks[2][:, 1 : 1 + n], text[1].expand(4, -1, -1))


def test_first_text_prompts_start_as_a_photo_of_a():
    model = tiny_cskt()
    ids = clip_min.tokenize("a photo of a")[0, 1:5]
    assert torch.equal(model.text_prompts[0].data, model.clip.token_embedding.weight[ids])


def test_parameter_count_at_vit_b_16():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = cskt.CSKT(clip_min.CLIP(clip_min.CLIPConfig(image_size=(384, 128))))
    count = lambda parameters: sum(p.numel() for p in parameters)
    trainable = trained_parameters(model)
    assert count(trainable.values()) == 12_117_888
    prompts = [p for name, p in trainable.items() if "adapters" not in name]
    assert count(prompts) == 9_513_984  # the prompt learner: T_l, V_l and the projections
    assert count(model.vision_adapters.parameters()) == 1_798_272
    assert count(model.text_adapters.parameters()) == 805_632
    assert count(p for p in model.parameters() if p.requires_grad) == 12_117_888


def test_init_ids_are_the_tokens_of_a_photo_of_a_person_or_a_pedestrian():
    ids = clip_min.tokenize("a photo of a person or a pedestrian")[0]
    assert list(cskt.INIT_IDS[:4]) == ids[1:5].tolist()  # "a photo of a": T_0 at n_ctx = 4
    assert list(cskt.INIT_IDS) == ids[1:9].tolist() and ids[9] == clip_min.EOT_TOKEN
    assert cskt.INIT_TEXT == "a photo of a person or a pedestrian"
    # Past the sentence's 8 tokens T_0 is drawn like the other prompts, as the authors' code does.
    torch.manual_seed(0)
    wide = cskt.CSKT(clip_min.CLIP(TINY), n_ctx=9, depth=1)
    assert wide.text_prompts[0].shape == (9, 64) and wide.text_prompts[0].abs().max() < 0.2
    assert not torch.equal(wide.text_prompts[0][:4], wide.clip.token_embedding.weight[ids[1:5]])


# ------------------------------------------------------------------------------------------------
# The paper's equations, transcribed directly, on towers of different widths

UNEVEN = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=128,
                             vision_layers=3, text_width=64, text_layers=3)


def random_cskt(depth: int, seed: int = 0) -> cskt.CSKT:
    """Every tensor random, LayerNorm gains near 1: no zero bias or identity LayerNorm hides a bug."""
    torch.manual_seed(seed)
    model = cskt.CSKT(randomize_(clip_min.CLIP(UNEVEN), seed), depth=depth)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in trained_parameters(model).items():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if name.endswith("ln_3.weight") else 0.1 * noise)
    return model.eval()


def paper_block(block, adapter, x, scale):
    """x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + s * up(relu(down(ln_3(x))))."""
    x = x + block.attn(block.ln_1(x))
    return x + block.mlp(block.ln_2(x)) + scale * adapter.up(torch.relu(adapter.down(adapter.ln_3(x))))


def paper_image_features(model, images):
    clip, n = model.clip, model.n_ctx
    x = clip.visual.embed(images)  # [B, 1 + N, W]
    for layer, block in enumerate(clip.visual.transformer.resblocks):
        if layer < model.depth:
            T, V = model.text_prompts[layer], model.vision_prompts[layer]
            prompts = torch.cat([model.text_to_vision[layer](T), V]).expand(len(x), 2 * n, -1)  # [T2V(T), V]
            if layer == 0:
                x = clip.visual.ln_pre(torch.cat([x, prompts], dim=1))
            else:
                x = torch.cat([x[:, : -2 * n], prompts], dim=1)
        x = paper_block(block, model.vision_adapters[layer], x, scale=0.1)
    return clip.visual.ln_post(x[:, 0]) @ clip.visual.proj


def paper_text_features(model, ids):
    clip, n = model.clip, model.n_ctx
    ids = slow_layout(ids, 2 * n)
    x = clip.token_embedding(ids)
    for layer, block in enumerate(clip.transformer.resblocks):
        if layer < model.depth:
            T, V = model.text_prompts[layer], model.vision_prompts[layer]
            prompts = torch.cat([T, model.vision_to_text[layer](V)]).expand(len(x), 2 * n, -1)  # [T, V2T(V)]
            x = torch.cat([x[:, :1], prompts, x[:, 1 + 2 * n:]], dim=1)
            if layer == 0:
                x = x + clip.positional_embedding
        x = paper_block(block, model.text_adapters[layer], x, scale=4.0)
    eot = x[torch.arange(len(x)), ids.argmax(dim=-1)]
    return clip.ln_final(eot) @ clip.text_projection


@pytest.mark.parametrize("depth", [2, 3])  # 2 of 3 layers: the last one keeps what layer 1 made
def test_features_equal_the_paper_s_equations(depth):
    model = random_cskt(depth)
    images, ids, pids = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), paper_image_features(model, images))
        torch.testing.assert_close(model.encode_text(ids), paper_text_features(model, ids))
        loss = clip_min.sdm_loss(paper_image_features(model, images), paper_text_features(model, ids),
                                 pids, temperature=0.02)  # the papers' temperature is the default
        torch.testing.assert_close(model(images, ids, pids)["loss"], loss)


def test_each_tower_s_prompts_reach_the_other_tower_at_every_prompted_layer():
    """V2T: changing V_l changes the text features; T2V: changing T_l changes the image features."""
    depth = 2
    model = random_cskt(depth)
    images, ids, _ = batch()

    def features():
        with torch.no_grad():
            return model.encode_image(images), model.encode_text(ids)
    image_before, text_before = features()
    assert len(model.text_prompts) == len(model.vision_prompts) == depth  # nothing past the depth
    for layer in range(depth):
        for prompts, other_tower in ((model.text_prompts, 0), (model.vision_prompts, 1)):
            saved = prompts[layer].detach().clone()
            with torch.no_grad():
                prompts[layer].add_(torch.randn_like(saved))
            image_after, text_after = features()
            changed = ((image_after - image_before).abs().max(), (text_after - text_before).abs().max())
            assert changed[0] > 1e-4 and changed[1] > 1e-4, (layer, other_tower, changed)
            with torch.no_grad():
                prompts[layer].copy_(saved)
    torch.testing.assert_close(features()[0], image_before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Mixed precision: one step under bf16 autocast, and under fp16 autocast with a grad scaler

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_step_under_autocast(precision):
    model = tiny_cskt().train()
    check_autocast_training_step(model, trained_parameters(model), batch(), precision)


def check_autocast_training_step(model, trainable, inputs, precision: str, must_move=lambda name: True):
    """One optimizer step under CPU autocast: finite losses, fp32 master weights and gradients,
    every trained tensor with a gradient moves (and each one `must_move` names), CLIP does not. fp16 goes through a grad scaler; it starts at 256,
    not at its default 65536, which a tiny random CLIP's large gradients would overflow for the
    first eight steps (each skipped, the scale halved, as on a GPU)."""
    trainable = dict(trainable)
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    before = {k: v.detach().clone() for k, v in trainable.items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-3)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=precision == "fp16")
    for attempt in range(4):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            out = model(*inputs)
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.values()), out
        scaler.scale(out["loss"]).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() == scale:  # no inf or NaN in the gradients: the step was taken
            break
    assert scaler.get_scale() == scale, "every fp16 step overflowed"
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name  # master weights stay fp32
    for name, parameter in trainable.items():
        assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
        if must_move(name) or parameter.grad.any():
            assert not torch.equal(parameter, before[name]), name
    assert all(torch.equal(v, frozen[k]) for k, v in model.clip.state_dict().items())


# ------------------------------------------------------------------------------------------------
# The copy promise: clip_min.py + cskt.py alone, in an empty folder, without the BPE vocabulary

COPIED_FOLDER_SCRIPT = """
import os, sys, torch
import clip_min, {method}
assert os.path.dirname(os.path.abspath({method}.__file__)) == os.getcwd()
assert not os.path.exists(clip_min.VOCAB_PATH)
try:
    clip_min.tokenize("a person")
    raise SystemExit("tokenize worked without the vocabulary file")
except clip_min.CLIPError as error:
    assert "bpe_simple_vocab_16e6.txt.gz" in str(error), error
torch.manual_seed(0)
config = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8,
                             vision_width=64, vision_layers=2, text_width=64, text_layers=2)
model = {build}.train()
ids = torch.zeros(2, clip_min.CONTEXT_LENGTH, dtype=torch.long)  # [SOT, words..., EOT, 0...], made by hand
ids[:, 0] = clip_min.SOT_TOKEN
ids[0, 1:4] = torch.tensor([320, 2533, 530])
ids[0, 4] = ids[1, 2] = clip_min.EOT_TOKEN
ids[1, 1] = 1125
trainable = [p for p in model.parameters() if p.requires_grad]
before = [p.detach().clone() for p in trainable]
out = model(torch.randn(2, 3, 32, 16), ids, torch.tensor([0, 1]))
out["loss"].backward()
torch.optim.Adam(trainable, lr=1e-3).step()
moved = sum(not torch.equal(a, b) for a, b in zip(before, trainable))
assert torch.isfinite(out["loss"]) and moved > 0, (out, moved, len(trainable))
print(f"trained one step: loss {{out['loss'].item():.4f}}, {{moved}} of {{len(trainable)}} tensors moved")
"""


def train_in_copied_folder(folder, method: str, build: str) -> subprocess.CompletedProcess:
    """Copies clip_min.py and the method's file into `folder` and trains a step there, in a new Python."""
    for name in ("clip_min.py", f"{method}.py"):
        shutil.copy(os.path.join(os.path.dirname(clip_min.__file__), name), folder)
    (folder / "check.py").write_text(textwrap.dedent(COPIED_FOLDER_SCRIPT.format(method=method, build=build)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "check.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cskt_trains_from_a_folder_with_only_clip_min_and_cskt(tmp_path):
    result = train_in_copied_folder(tmp_path, "cskt", "cskt.CSKT(clip_min.CLIP(config), depth=2)")
    assert result.returncode == 0 and "trained one step" in result.stdout, result.stderr[-3000:]
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == {"check.py", "clip_min.py", "cskt.py"}
