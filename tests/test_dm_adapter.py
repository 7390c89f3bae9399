"""DM-Adapter: the sync-free dispatch equals the authors' per-expert loop, the balance loss equals
a hand computation, the model starts as CLIP, and ViT-B/16 gets exactly 15,669,528 parameters."""

import math

import pytest
import torch

import clip_min
import dm_adapter

TINY = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=64,
                           vision_layers=2, text_width=64, text_layers=2)


def randomize_experts_(mixture: dm_adapter.MixtureOfAdapters, generator: torch.Generator):
    """Zero-initialised up projections would make any dispatch look right: fill them."""
    with torch.no_grad():
        for expert in mixture.experts:
            for parameter in expert.parameters():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return mixture


def per_expert_loop(mixture: dm_adapter.MixtureOfAdapters, x: torch.Tensor) -> torch.Tensor:
    """The authors' dispatch: for each expert, find its tokens, run it on them, add weighted."""
    h = mixture.ln_3(x).flatten(0, 1)  # [T, d]
    top_logits, chosen = mixture.router(h).float().topk(mixture.top_k, dim=-1)
    weights = top_logits.softmax(dim=-1)  # [T, k]
    y = torch.zeros_like(h)
    for index, expert in enumerate(mixture.experts):
        tokens, slot = torch.where(chosen == index)
        if len(tokens):
            out = expert.up(torch.relu(expert.down(h[tokens]))) * weights[tokens, slot, None]
            y = y.index_add(0, tokens, out)
    return mixture.scale * y.view_as(x)


@pytest.mark.parametrize("num_experts,top_k", [(6, 2), (4, 1), (3, 3), (8, 3)])
def test_dispatch_equals_the_per_expert_loop(num_experts, top_k):
    generator = torch.Generator().manual_seed(num_experts * 10 + top_k)
    torch.manual_seed(0)
    mixture = randomize_experts_(dm_adapter.MixtureOfAdapters(48, num_experts, top_k, 4, 0.5), generator)
    x = torch.randn(3, 7, 48, generator=generator, requires_grad=True)
    grad_out = torch.randn(3, 7, 48, generator=generator)

    def outputs_and_gradients(run):
        mixture.zero_grad()
        x.grad = None
        y = run(x)
        y.backward(grad_out)
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in mixture.named_parameters()}
        return y.detach(), x.grad.clone(), grads

    y_fast, dx_fast, grads_fast = outputs_and_gradients(lambda x: mixture(x)[0])
    y_loop, dx_loop, grads_loop = outputs_and_gradients(lambda x: per_expert_loop(mixture, x))
    torch.testing.assert_close(y_fast, y_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_fast, dx_loop, rtol=1e-5, atol=1e-6)
    for name in grads_fast:
        torch.testing.assert_close(grads_fast[name], grads_loop[name], rtol=1e-5, atol=1e-6, msg=name)
    if top_k > 1:  # with k = 1 the single weight is softmax of one logit, 1: the router gets no gradient
        assert any(g.abs().sum() > 0 for n, g in grads_fast.items() if "router" in n)


def test_gates_are_the_top_k_softmax_and_sum_to_one():
    torch.manual_seed(1)
    mixture = dm_adapter.MixtureOfAdapters(32, num_experts=6, top_k=2, reduction=8, scale=1.0)
    gates, _ = mixture.route(torch.randn(50, 32))
    assert ((gates > 0).sum(dim=1) == 2).all()
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(50))


def test_balance_loss_by_hand():
    mixture = dm_adapter.MixtureOfAdapters(2, num_experts=3, top_k=2, reduction=1, scale=1.0)
    # alpha = 0, so logits = input_gate(h): the two tokens below get logits [2, 1, 0] and
    # [0, 1, 3]. Top-2 chooses {0, 1} and {2, 1}, so f = [1/2, 2/2, 1/2], and P is the mean of
    # softmax([2, 1, 0]) and softmax([0, 1, 3]).
    with torch.no_grad():
        mixture.router.alpha.zero_()
        mixture.router.input_gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.5, 3.0]]))
    h = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    e = math.e
    first = [e ** 2 / (e ** 2 + e + 1), e / (e ** 2 + e + 1), 1 / (e ** 2 + e + 1)]
    second = [1 / (1 + e + e ** 3), e / (1 + e + e ** 3), e ** 3 / (1 + e + e ** 3)]
    mean_probability = [(a + b) / 2 for a, b in zip(first, second)]
    expected = 0.5 * mean_probability[0] + 1.0 * mean_probability[1] + 0.5 * mean_probability[2]
    _, balance = mixture.route(h)
    assert math.isclose(balance.item(), expected, rel_tol=1e-6)  # 0.5897...
    # Perfectly even routing gives l = E * (1/E) * (k/E) = k/E, for each block.
    uniform = dm_adapter.MixtureOfAdapters(8, num_experts=6, top_k=2, reduction=1, scale=1.0)
    with torch.no_grad():
        uniform.router.input_gate.weight.zero_()
        uniform.router.task_gate.weight.zero_()
    _, balance = uniform.route(torch.randn(12, 8))
    assert math.isclose(balance.item(), 2 / 6, rel_tol=1e-6)


def tiny_model(seed: int = 0) -> dm_adapter.DMAdapter:
    torch.manual_seed(seed)
    return dm_adapter.DMAdapter(clip_min.CLIP(TINY))


def batch():
    images = torch.randn(4, 3, *TINY.image_size)
    ids = clip_min.tokenize(["a woman in a red coat", "a man with a bag", "a child", "red " * 80], truncate=True)
    return images, ids, torch.tensor([0, 1, 0, 2])


def test_at_initialisation_the_model_is_exactly_clip():
    model = tiny_model().eval()
    images, ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.clip.encode_image(images))
        assert torch.equal(model.encode_text(ids), model.clip.encode_text(ids))


def test_training_step_changes_only_adapters():
    model = tiny_model().train()
    backbone = {k: v.clone() for k, v in model.clip.state_dict().items()}
    trainable = dict(model.named_trainable_parameters())
    out = model(*batch())
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["aux"])
    torch.testing.assert_close(out["loss"], out["sdm"] + 0.5 * out["aux"])
    assert 0 < out["aux"] < 2 * (TINY.vision_layers + TINY.text_layers)  # each block's l is at most k
    out["loss"].backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(trainable[n].grad is not None for n in trainable if n.endswith("up.weight"))
    torch.optim.Adam(trainable.values(), lr=1e-2).step()
    assert all(torch.equal(v, backbone[k]) for k, v in model.clip.state_dict().items())


def test_parameter_count_at_vit_b_16():
    with torch.device("meta"):
        model = dm_adapter.DMAdapter(clip_min.CLIP(clip_min.CLIPConfig(image_size=(384, 128))))
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(model.vision_adapters[0]) == 901_441
    assert count(model.text_adapters[0]) == 404_353
    assert sum(p.numel() for _, p in model.named_trainable_parameters()) == 15_669_528
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 15_669_528
