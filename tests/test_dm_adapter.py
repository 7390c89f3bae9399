"""DM-Adapter: the router and the balance loss equal hand computations (the router in fp32 under
autocast), the sync-free dispatch equals the authors' per-expert loop, the whole model equals a
direct transcription of the paper's equations, it starts as CLIP, trains only its mixtures (also
under bf16 and fp16 autocast, and from a folder holding only clip_min.py and dm_adapter.py), and
ViT-B/16 gets exactly 15,669,528 parameters."""

import math
import os

import pytest
import torch
from conftest import randomize_, trained_parameters
from test_cskt import check_autocast_training_step, train_in_copied_folder

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
    balance = dm_adapter.balance_loss(mixture.route(h)[1][None])  # one block's [P, f]
    assert math.isclose(balance.item(), expected, rel_tol=1e-6)  # 0.5897...
    # Perfectly even routing gives l = E * (1/E) * (k/E) = k/E, for each block.
    uniform = dm_adapter.MixtureOfAdapters(8, num_experts=6, top_k=2, reduction=1, scale=1.0)
    with torch.no_grad():
        uniform.router.input_gate.weight.zero_()
        uniform.router.task_gate.weight.zero_()
    balance = dm_adapter.balance_loss(uniform.route(torch.randn(12, 8))[1][None])
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
    assert model.training and not model.clip.training  # the frozen backbone stays in evaluation mode
    backbone = {k: v.clone() for k, v in model.clip.state_dict().items()}
    trainable = trained_parameters(model)
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
    assert sum(p.numel() for p in trained_parameters(model).values()) == 15_669_528
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 15_669_528


# ------------------------------------------------------------------------------------------------
# The Domain-Aware Router

def test_router_logits_by_hand():
    router = dm_adapter.DomainAwareRouter(width=2, num_experts=3)
    assert router.alpha.item() == 0.5  # the authors' initial alpha
    with torch.no_grad():
        router.input_gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        router.task_gate.weight.copy_(torch.tensor([[0.0, 1.0], [3.0, 0.0], [-1.0, -1.0]]))
        router.domain_prompt.copy_(torch.tensor([2.0, -1.0]))
    h = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    # input_gate(h) = [[1, 2, 0], [2, -2, 3]]; task_gate(p) = [-1, 6, -1]
    expected = 0.5 * torch.tensor([[1.0, 2.0, 0.0], [2.0, -2.0, 3.0]]) + 0.5 * torch.tensor([-1.0, 6.0, -1.0])
    torch.testing.assert_close(router(h), expected)
    with torch.no_grad():
        router.alpha.fill_(0.25)  # (1 - alpha) weighs the token, alpha the domain prompt
    expected = 0.75 * torch.tensor([[1.0, 2.0, 0.0], [2.0, -2.0, 3.0]]) + 0.25 * torch.tensor([-1.0, 6.0, -1.0])
    torch.testing.assert_close(router(h), expected)
    router(h).sum().backward()  # alpha, both gates and the prompt all learn
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def test_router_picks_the_same_experts_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    mixture = dm_adapter.MixtureOfAdapters(64, num_experts=6, top_k=2, reduction=8, scale=1.0)
    h = torch.randn(4096, 64)  # enough tokens that some have near-tied logits, which bf16 would flip
    gates, balance = mixture.route(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_gates, autocast_balance = mixture.route(h)
        assert mixture.router(h).dtype == torch.float32
    assert autocast_gates.dtype == autocast_balance.dtype == torch.float32
    assert torch.equal(autocast_gates > 0, gates > 0)
    torch.testing.assert_close(autocast_gates, gates, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(autocast_balance, balance, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# The whole model against the paper's equations, with every expert random

UNEVEN = clip_min.CLIPConfig(embed_dim=32, image_size=(32, 16), patch_size=8, stride=8, vision_width=128,
                             vision_layers=2, text_width=64, text_layers=2)


def random_model(seed: int = 0) -> dm_adapter.DMAdapter:
    torch.manual_seed(seed)
    model = dm_adapter.DMAdapter(randomize_(clip_min.CLIP(UNEVEN), seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in trained_parameters(model).items():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("ln_3.weight"):
                parameter.copy_(1 + 0.1 * noise)
            elif name.endswith("alpha"):
                parameter.copy_(0.3 + 0.1 * noise)  # away from 0.5, where 1 - alpha = alpha
            else:
                parameter.copy_(0.3 * noise)
    return model.eval()


def paper_mixture(mixture, x, scale):
    """(s * sum over the top-k experts of w_e * expert_e(h), sum_e P_e f_e) with h = ln_3(x), one
    token at a time."""
    router = mixture.router
    h = mixture.ln_3(x).flatten(0, 1)  # [T, d]
    y, probabilities, chosen_counts = torch.zeros_like(h), [], torch.zeros(len(mixture.experts))
    for t, token in enumerate(h):
        logits = (1 - router.alpha) * (router.input_gate.weight @ token) + router.alpha * (
            router.task_gate.weight @ router.domain_prompt)  # [E]
        top = logits.topk(2).indices  # k = 2
        weights = logits[top].softmax(dim=0)
        for weight, e in zip(weights, top.tolist()):
            expert = mixture.experts[e]
            y[t] = y[t] + weight * expert.up(torch.relu(expert.down(token)))
            chosen_counts[e] += 1
        probabilities.append(logits.softmax(dim=0))
    balance = (torch.stack(probabilities).mean(dim=0) * chosen_counts / len(h)).sum()
    return scale * y.view_as(x), balance


def paper_tower(blocks, mixtures, x, scale):
    """x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + s * SMA(ln_3(x)), and the sum of l over blocks."""
    balances = []
    for block, mixture in zip(blocks, mixtures):
        x = x + block.attn(block.ln_1(x))
        adapted, balance = paper_mixture(mixture, x, scale)
        x = x + block.mlp(block.ln_2(x)) + adapted
        balances.append(balance)
    return x, sum(balances)


def test_whole_model_equals_the_paper_s_equations():
    model = random_model()
    clip = model.clip
    images = torch.randn(2, 3, *UNEVEN.image_size)
    ids = clip_min.tokenize(["a woman in a red coat", "a man"])[:, :12]  # short: the loop is per token
    pids = torch.tensor([0, 1])
    with torch.no_grad():
        x, image_balance = paper_tower(clip.visual.transformer.resblocks, model.vision_adapters,
                                       clip.visual.ln_pre(clip.visual.embed(images)), scale=0.1)
        image_features = clip.visual.ln_post(x[:, 0]) @ clip.visual.proj
        x, text_balance = paper_tower(clip.transformer.resblocks, model.text_adapters,
                                      clip.token_embedding(ids) + clip.positional_embedding[:12], scale=4.0)
        text_features = clip.ln_final(x[torch.arange(2), ids.argmax(dim=-1)]) @ clip.text_projection
        torch.testing.assert_close(model.encode_image(images), image_features)
        torch.testing.assert_close(model.encode_text(ids), text_features)
        out = model(images, ids, pids)
    sdm = clip_min.sdm_loss(image_features, text_features, pids, temperature=0.02)
    torch.testing.assert_close(out["sdm"], sdm)
    torch.testing.assert_close(out["aux"], image_balance + text_balance)  # summed over both towers
    torch.testing.assert_close(out["loss"], sdm + 0.5 * (image_balance + text_balance))


def test_balance_loss_is_the_sum_over_every_block_of_both_towers():
    model = random_model(seed=1)
    images, ids, pids = torch.randn(2, 3, *UNEVEN.image_size), clip_min.tokenize(["a red coat", "a man"]), torch.tensor([0, 1])
    per_block = {}
    for tower in ("vision_adapters", "text_adapters"):
        for index, mixture in enumerate(getattr(model, tower)):
            mixture.register_forward_hook(lambda module, args, out, key=(tower, index): per_block.__setitem__(
                key, dm_adapter.balance_loss(out[1][None])))
    with torch.no_grad():
        out = model(images, ids, pids)
        image_balance = dm_adapter.balance_loss(model.image_features_and_routing(images)[1])
        text_balance = dm_adapter.balance_loss(model.text_features_and_routing(ids)[1])
    assert len(per_block) == UNEVEN.vision_layers + UNEVEN.text_layers
    vision = sum(v for (tower, _), v in per_block.items() if tower == "vision_adapters")
    text = sum(v for (tower, _), v in per_block.items() if tower == "text_adapters")
    torch.testing.assert_close(image_balance, vision)
    torch.testing.assert_close(text_balance, text)
    torch.testing.assert_close(out["aux"], image_balance + text_balance)
    assert min(image_balance, text_balance) > 0.1  # both towers count


# ------------------------------------------------------------------------------------------------
# Mixed precision, and the copy promise

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_step_under_autocast(precision):
    model = tiny_model().train()
    with torch.no_grad():  # experts that output something, so that the autocast dispatch matters
        for mixture in (*model.vision_adapters, *model.text_adapters):
            for expert in mixture.experts:
                expert.up.weight.normal_(std=0.02)
    # An expert that no token chose gets no gradient and rightly stays; routers and ln_3 always move.
    check_autocast_training_step(model, trained_parameters(model), batch(), precision,
                                 must_move=lambda name: "experts" not in name)


def test_dm_adapter_trains_from_a_folder_with_only_clip_min_and_dm_adapter(tmp_path):
    result = train_in_copied_folder(tmp_path, "dm_adapter", "dm_adapter.DMAdapter(clip_min.CLIP(config))")
    assert result.returncode == 0 and "trained one step" in result.stdout, result.stderr[-3000:]
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == {"check.py", "clip_min.py", "dm_adapter.py"}
