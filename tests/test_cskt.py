"""CSKT on a tiny CLIP: training touches only what CSKT adds, prompts sit where the paper puts them,
captions are laid out as the authors' loop does, and ViT-B/16 gets exactly 12,117,888 parameters."""

import torch

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
    trainable = dict(model.named_trainable_parameters())
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
    ids = torch.zeros(len(lengths), 77, dtype=torch.long)
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
        vision = [model.vision_layer_prompts(layer) for layer in range(2)]
        text = [model.text_layer_prompts(layer) for layer in range(2)]
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
    trainable = dict(model.named_trainable_parameters())
    assert count(trainable.values()) == 12_117_888
    prompts = [p for name, p in trainable.items() if "adapters" not in name]
    assert count(prompts) == 9_513_984  # SPEC 3.3: the prompt learner
    assert count(model.vision_adapters.parameters()) == 1_798_272
    assert count(model.text_adapters.parameters()) == 805_632
    assert count(p for p in model.parameters() if p.requires_grad) == 12_117_888
