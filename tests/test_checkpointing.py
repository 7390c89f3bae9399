"""Activation checkpointing changes nothing but memory: with it, the loss and every gradient of
CLIP fine-tuning, CSKT and DM-Adapter are bit for bit those without it, in fp32 and under bf16 and
fp16 autocast on the CPU; the blocks really are recomputed and keep far fewer tensors; DM-Adapter's
recomputed forward routes every token exactly as the first; evaluation is unaffected."""

import pytest
import torch
from conftest import randomize_

import clip_min
import evaluate

TINY = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=2, text_width=64, text_layers=2)
METHODS = ["finetune", "cskt", "dm_adapter"]


def random_method(method: str, seed: int = 0) -> torch.nn.Module:
    """The method on a random tiny CLIP, every trained tensor random too (DM-Adapter's up
    projections start at zero, which would hide the experts from the gradients)."""
    torch.manual_seed(seed)
    method_args = {"depth": TINY.vision_layers} if method == "cskt" else {}
    model = evaluate.build_method(method, randomize_(clip_min.CLIP(TINY), seed), method_args)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and method != "finetune":
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(1 + 0.1 * noise if name.endswith("ln_3.weight") else 0.1 * noise)
    return model.train()


def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, *TINY.image_size, generator=generator)
    ids = clip_min.tokenize(["a woman in a red coat", "a man with a bag", "a child", "red " * 80], truncate=True)
    return images, ids, torch.tensor([0, 1, 0, 2])


def losses_and_gradients(model, precision: str) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        losses = model(*batch())
    losses["loss"].backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in losses.items()}, gradients


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_loss_and_every_gradient_are_bit_identical(method, precision):
    model = random_method(method)
    losses, gradients = losses_and_gradients(model, precision)
    model.set_grad_checkpointing()
    checkpointed_losses, checkpointed_gradients = losses_and_gradients(model, precision)
    assert losses.keys() == checkpointed_losses.keys() and gradients.keys() == checkpointed_gradients.keys()
    for name in losses:
        assert torch.equal(losses[name], checkpointed_losses[name]), name
    # Every gradient means something (an expert that no token chose rightly gets none).
    assert all(g.any() for name, g in gradients.items() if "experts" not in name)
    assert any(g.any() for name, g in gradients.items() if "experts" in name) or method != "dm_adapter"
    for name in gradients:
        assert torch.equal(gradients[name], checkpointed_gradients[name]), name
    model.set_grad_checkpointing(False)
    assert all(torch.equal(gradients[k], v) for k, v in losses_and_gradients(model, precision)[1].items())


def saved_bytes_and_attention_calls(model) -> tuple[int, int]:
    """(bytes of the tensors autograd keeps during the forward pass, calls of CLIP's attention
    during forward and backward)."""
    saved, calls = [0], [0]

    def keep(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    hooks = [module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for module in model.modules() if isinstance(module, clip_min.Attention)]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        losses = model(*batch())
    losses["loss"].backward()
    for hook in hooks:
        hook.remove()
    return saved[0], calls[0]


@pytest.mark.parametrize("method", METHODS)
def test_blocks_are_recomputed_and_keep_a_fraction_of_the_tensors(method):
    model = random_method(method)
    blocks = TINY.vision_layers + TINY.text_layers
    saved, calls = saved_bytes_and_attention_calls(model)
    assert calls == blocks  # once each, in the forward pass
    model.set_grad_checkpointing()
    checkpointed_saved, checkpointed_calls = saved_bytes_and_attention_calls(model)
    assert checkpointed_calls == 2 * blocks  # again in the backward pass
    # Each block keeps its input instead of everything inside it (about 30 tensors of its width).
    assert checkpointed_saved < saved / 4, (checkpointed_saved, saved)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dm_adapter_recomputation_routes_exactly_as_the_forward_pass(precision):
    model = random_method("dm_adapter")
    model.set_grad_checkpointing()
    logits = {}
    mixtures = [*model.vision_adapters, *model.text_adapters]
    for index, mixture in enumerate(mixtures):
        mixture.router.register_forward_hook(
            lambda module, args, out, index=index: logits.setdefault(index, []).append(out.detach().clone()))
    losses_and_gradients(model, precision)
    assert sorted(logits) == list(range(len(mixtures)))
    for index, (first, recomputed) in logits.items():
        assert first.dtype == torch.float32
        assert torch.equal(first, recomputed), index  # the same logits, so the same top-k and gates
        assert torch.equal(first.topk(2).indices, recomputed.topk(2).indices), index


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_is_unchanged(method):
    model = random_method(method).eval()
    images, ids, _ = batch()
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(ids)
        model.set_grad_checkpointing()
        assert torch.equal(model.encode_image(images), image_features)
        assert torch.equal(model.encode_text(ids), text_features)

