"""DM-Adapter: a sparse mixture of adapters, routed with a learned domain prompt, on a frozen CLIP.

Liu et al., "DM-Adapter: Domain-Aware Mixture-of-Adapters for Text-Based Person Retrieval",
AAAI 2025, arXiv 2503.04144. Every block of both CLIP towers (24 for ViT-B/16) gets a Sparse
Mixture-of-Adapters (SMA) beside its MLP; CLIP stays frozen (15.7 M trained parameters):

    x = x + attn(ln_1(x))
    h = ln_3(x)
    x = x + mlp(ln_2(x)) + s * sum_{e in top-k(h)} w_e(h) * expert_e(h)      s = 0.1 vision, 4 text

Each expert is a bottleneck up(relu(down(h))), d -> d/8 -> d. The Domain-Aware Router (DR)
scores the E = 6 experts for every token from the token itself and from a learned domain
prompt p, with a learned mixing weight alpha:

    logits(h) = (1 - alpha) * input_gate(h) + alpha * task_gate(p)          [E]
    w(h) = softmax over the top k = 2 logits only (the other experts get 0)

A load-balancing loss keeps the router from collapsing onto a few experts. Per block, over all
tokens (padding included, as the authors do):

    P_e = mean_tokens softmax(logits)_e,   f_e = mean_tokens [e in top-k],   l = sum_e P_e f_e

and the training loss is SDM + 0.5 * (sum of l over the blocks). The up projections start at
zero, so at step 0 the model is exactly CLIP. This file imports only torch and clip_min.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import clip_min


class Expert(nn.Module):
    """up(relu(down(h))): one adapter of the mixture."""

    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.down = nn.Linear(width, width // reduction)  # weight: kaiming-uniform (a = sqrt 5)
        self.up = nn.Linear(width // reduction, width)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # every expert outputs 0 at first: the model starts as CLIP
        nn.init.zeros_(self.up.bias)


class DomainAwareRouter(nn.Module):
    """logits(h) = (1 - alpha) * input_gate(h) + alpha * task_gate(p): a token's own evidence
    mixed with a learned, input-independent preference of this domain."""

    def __init__(self, width: int, num_experts: int):
        super().__init__()
        self.input_gate = nn.Linear(width, num_experts, bias=False)
        self.task_gate = nn.Linear(width, num_experts, bias=False)
        nn.init.normal_(self.input_gate.weight, std=0.02)
        nn.init.normal_(self.task_gate.weight, std=0.02)
        self.domain_prompt = nn.Parameter(torch.randn(width))  # p
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E], fp32
        # In fp32 under any autocast: the router is tiny, and bf16 or fp16 rounding of its logits
        # would change which experts a token picks.
        with torch.autocast(h.device.type, enabled=False):
            h = clip_min.at_least_fp32(h)
            token_logits = F.linear(h, self.input_gate.weight.to(h.dtype))  # [T, E]
            domain_prompt = self.domain_prompt.to(h.dtype)
            domain_logits = F.linear(domain_prompt, self.task_gate.weight.to(h.dtype))  # [E]
            alpha = self.alpha.to(h.dtype)
            return (1 - alpha) * token_logits + alpha * domain_logits


class MixtureOfAdapters(nn.Module):
    """Sparse Mixture-of-Adapters with its router: x -> (s * y, the routing statistics [P, f])."""

    def __init__(self, width: int, num_experts: int, top_k: int, reduction: int, scale: float):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), "
                             f"got {top_k}")
        self.top_k, self.scale = top_k, scale
        self.ln_3 = nn.LayerNorm(width)
        self.experts = nn.ModuleList(Expert(width, reduction) for _ in range(num_experts))
        self.router = DomainAwareRouter(width, num_experts)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [T, d] -> (gates [T, E]: the top-k softmax weights, 0 elsewhere; [P, f] [2, E],
        the statistics of the balance loss)."""
        with torch.autocast(h.device.type, enabled=False):  # logits, top-k and softmax all in fp32
            logits = self.router(h)  # [T, E]
            top_logits, chosen = logits.topk(self.top_k, dim=-1)  # [T, k], [T, k]
            weights = top_logits.softmax(dim=-1)  # [T, k]
            gates = torch.zeros_like(logits).scatter(1, chosen, weights)  # [T, E]
            # Load balancing: P_e, the mean router probability, is differentiable; f_e, the
            # fraction of tokens that chose e, is a count. balance_loss multiplies them.
            mean_probability = logits.softmax(dim=-1).mean(dim=0)  # [E]
            chosen_fraction = torch.zeros_like(logits).scatter(1, chosen, 1.0).mean(dim=0)  # [E]
            return gates, torch.stack([mean_probability, chosen_fraction])  # [2, E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, L, d]
        h = self.ln_3(x).flatten(0, 1)  # [T, d], T = B * L tokens
        gates, statistics = self.route(h)  # [T, E], [2, E]
        # Dispatch without host synchronisation. The authors loop over experts, find each one's
        # tokens with torch.where (a device-to-host sync per expert per block) and run it on
        # them. Here all E experts run as one wide adapter: their down projections side by side
        # make one d -> E*r matrix, and each expert's r hidden units are scaled by its gate
        # before the shared up projection, so
        #     sum_e g_e * up_e(relu(down_e(h))) = (g * relu(h @ W_down)) @ W_up + g @ b_up
        # Unchosen experts have g_e = 0 and add exactly nothing (to the output or to any
        # gradient). Cost: E/k times the experts' FLOPs of the loop (3x for 6 and 2), a few
        # percent of a ViT-B/16 block, in two large matmuls instead of 2E small ones and no syncs.
        down_weight = torch.cat([e.down.weight for e in self.experts])  # [E*r, d]
        down_bias = torch.cat([e.down.bias for e in self.experts])  # [E*r]
        up_weight = torch.cat([e.up.weight for e in self.experts], dim=1)  # [d, E*r]
        up_bias = torch.stack([e.up.bias for e in self.experts])  # [E, d]
        hidden = F.relu(F.linear(h, down_weight, down_bias))  # [T, E*r]
        hidden = hidden.unflatten(1, (len(self.experts), -1))  # [T, E, r]
        gated = hidden * gates[:, :, None].to(hidden.dtype)  # [T, E, r]
        y = F.linear(gated.flatten(1), up_weight) + gates.to(up_bias.dtype) @ up_bias  # [T, d]
        return self.scale * y.view_as(x), statistics


def balance_loss(statistics: torch.Tensor) -> torch.Tensor:
    """[blocks, 2, E]: each block's P and f -> the sum over blocks of l = sum_e P_e * f_e
    (= E * mean_e P_e f_e).

    Under torchrun P and f are means over the tokens of the whole batch, as with one process:
    every process holds as many tokens, so they are the means of the processes' means (l, a
    product of two means, is not the mean of the l's). All blocks are gathered at once."""
    statistics = clip_min.gather_shares(statistics[None]).mean(dim=0)  # [N, blocks, 2, E] -> mean
    mean_probability, chosen_fraction = statistics.unbind(1)  # [blocks, E] each
    return (mean_probability * chosen_fraction).sum()  # [blocks, E] -> []


def adapted_block(block: clip_min.ResidualAttentionBlock, mixture: MixtureOfAdapters,
                  x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One frozen CLIP block with the mixture beside its MLP; returns its routing statistics too."""
    x = x + block.attn(block.ln_1(x))
    adapted, statistics = mixture(x)
    return x + block.mlp(block.ln_2(x)) + adapted, statistics


class DMAdapter(nn.Module):
    def __init__(self, clip_model: clip_min.CLIP, num_experts: int = 6, top_k: int = 2,
                 reduction: int = 8, aux_weight: float = 0.5, vision_scale: float = 0.1,
                 text_scale: float = 4.0):
        super().__init__()
        self.clip = clip_model.requires_grad_(False).eval()
        self.aux_weight = aux_weight
        visual = clip_model.visual
        vision_width = visual.conv1.out_channels
        text_width = clip_model.ln_final.normalized_shape[0]
        # The authors' code also registers parameters that its forward pass never uses (395,776
        # at ViT-B/16); they are left out here.
        self.vision_adapters = nn.ModuleList(
            MixtureOfAdapters(vision_width, num_experts, top_k, reduction, vision_scale)
            for _ in visual.transformer.resblocks)
        self.text_adapters = nn.ModuleList(
            MixtureOfAdapters(text_width, num_experts, top_k, reduction, text_scale)
            for _ in clip_model.transformer.resblocks)
        self.grad_checkpointing = False
        self.to(clip_model.token_embedding.weight.device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's forward in the backward pass instead of keeping its activations.
        The recomputation routes every token to the same experts: routing is a deterministic
        function of the block's input (no random draw), and checkpointing restores the autocast
        state, so the fp32 router sees the same numbers and picks the same top-k."""
        self.grad_checkpointing = enable

    def run_block(self, block: clip_min.ResidualAttentionBlock, mixture: MixtureOfAdapters,
                  x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Checkpointing keeps only the block's input; the backward pass runs the block again.
        if self.grad_checkpointing:
            return checkpoint(adapted_block, block, mixture, x, use_reentrant=False)
        return adapted_block(block, mixture, x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the backbone is frozen: it stays in evaluation mode
        return self

    def image_features_and_routing(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (features [B, E], routing statistics [blocks, 2, E])."""
        visual = self.clip.visual
        x = visual.ln_pre(visual.embed(images))  # [B, 1 + N, W]
        statistics = []
        for block, mixture in zip(visual.transformer.resblocks, self.vision_adapters):
            x, block_statistics = self.run_block(block, mixture, x)
            statistics.append(block_statistics)
        return visual.pool(x), torch.stack(statistics)

    def text_features_and_routing(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] -> (features [B, E], routing statistics [blocks, 2, E])."""
        x = self.clip.embed_text(ids)  # [B, L, w]
        statistics = []
        for block, mixture in zip(self.clip.transformer.resblocks, self.text_adapters):
            x, block_statistics = self.run_block(block, mixture, x)
            statistics.append(block_statistics)
        return self.clip.pool_text(x, ids.argmax(dim=-1)), torch.stack(statistics)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, E]
        return self.image_features_and_routing(images)[0]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        return self.text_features_and_routing(ids)[0]

    def forward(self, images: torch.Tensor, ids: torch.Tensor, pids: torch.Tensor,
                temperature: float = 0.02) -> dict:
        image_features, image_routing = self.image_features_and_routing(images)
        text_features, text_routing = self.text_features_and_routing(ids)
        sdm = clip_min.sdm_loss(image_features, text_features, pids, temperature)
        aux = balance_loss(torch.cat([image_routing, text_routing]))  # every block, both towers
        return {"loss": sdm + self.aux_weight * aux, "sdm": sdm, "aux": aux}
