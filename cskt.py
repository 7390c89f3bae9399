"""CSKT: prompts and adapters that carry knowledge across CLIP's two towers, CLIP itself frozen.

Liu et al., "CLIP-based Synergistic Knowledge Transfer for Text-based Person Retrieval",
ICASSP 2024, arXiv 2309.09496. Two trainable parts on a frozen CLIP (ViT-B/16: 12.1 M trained
parameters, 7.5 % of the model):

Bidirectional Prompts Transferring (BPT), the input side. At every layer l < depth each tower
sees 2n prompt tokens (n = 4): its own n, and n projected from the other tower's prompts,

    text prompts at layer l   = [T_l,       V2T_l(V_l)]   at positions 1..2n, after SOT
    vision prompts at layer l = [T2V_l(T_l), V_l       ]   appended after the patches

with T_l [n, w], V_l [n, W] learned and V2T_l: W -> w, T2V_l: w -> W linear maps. Layer 0 inserts
the prompts into the embedded input (the text ones get positions 1..2n; the vision ones get no
position and go through ln_pre with the rest); each later layer replaces the prompt tokens that
the previous layer output with its own. T_0 starts as CLIP's embedding of "a photo of a".

Dual Adapters Transferring (DAT), the output side of attention. Every block of both towers gets
a bottleneck adapter beside its MLP, reading the stream after the attention residual:

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x)) + s * up(relu(down(ln_3(x))))      s = 0.1 (vision), 4 (text)

Loss: SDM (clip_min.sdm_loss). This file imports only torch and clip_min: copy both and use it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import clip_min

# T_0's initial words. Their ids are written out so that building CSKT needs neither the tokenizer
# nor its vocabulary file: clip_min.tokenize(INIT_TEXT)[0, 1:9].
INIT_TEXT = "a photo of a person or a pedestrian"
INIT_IDS = (320, 1125, 539, 320, 2533, 541, 320, 18256)


class Adapter(nn.Module):
    """s * up(relu(down(ln_3(x)))): a bottleneck d -> d/reduction -> d with its own LayerNorm."""

    def __init__(self, width: int, reduction: int, scale: float):
        super().__init__()
        self.scale = scale
        self.ln_3 = nn.LayerNorm(width)  # starts as the identity map (weight 1, bias 0), trained
        self.down = nn.Linear(width, width // reduction)
        self.up = nn.Linear(width // reduction, width)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, L, d]
        return self.scale * self.up(F.relu(self.down(self.ln_3(x))))


def adapted_block(block: clip_min.ResidualAttentionBlock, adapter: Adapter,
                  x: torch.Tensor) -> torch.Tensor:
    """One frozen CLIP block with DAT's adapter beside its MLP."""
    x = x + block.attn(block.ln_1(x))
    return x + block.mlp(block.ln_2(x)) + adapter(x)


def layout_caption_ids(ids: torch.Tensor, num_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids as clip_min.tokenize makes them -> ([SOT, prompt slots, caption, EOT, 0...], EOT index).

    The caption moves right to make room for the prompt slots (whose ids do not matter: their
    embeddings are replaced) and is cut to what fits, L - 2 - num_prompts tokens (67 for 77 and
    8), with EOT after it. A new tensor: the caller's ids are not changed."""
    # The authors rewrite each caption in a Python loop, in place on the batch; this is the same
    # layout for the whole batch at once.
    batch, length = ids.shape
    room = length - 2 - num_prompts
    caption_length = (ids.argmax(dim=-1) - 1).clamp(max=room)  # [B]: tokens between SOT and EOT
    positions = torch.arange(length, device=ids.device)  # [L]
    source = (positions - num_prompts).clamp(min=0).expand(batch, length)  # [B, L]
    shifted = ids.gather(1, source)  # [B, L]: the caption moved right
    first = 1 + num_prompts
    is_caption = (positions >= first) & (positions < first + caption_length[:, None])
    laid_out = torch.where(is_caption, shifted, 0)  # [B, L]
    laid_out[:, 0] = clip_min.SOT_TOKEN
    eot_index = first + caption_length  # [B]
    laid_out.scatter_(1, eot_index[:, None], clip_min.EOT_TOKEN)
    return laid_out, eot_index


class CSKT(nn.Module):
    def __init__(self, clip_model: clip_min.CLIP, n_ctx: int = 4, depth: int = 12,
                 reduction: int = 8, vision_scale: float = 0.1, text_scale: float = 4.0):
        super().__init__()
        self.clip = clip_model.requires_grad_(False).eval()
        visual = clip_model.visual
        vision_width = visual.conv1.out_channels
        text_width = clip_model.ln_final.normalized_shape[0]
        layers = min(len(visual.transformer.resblocks), len(clip_model.transformer.resblocks))
        if not 1 <= depth <= layers:
            raise ValueError(f"depth must be between 1 and the number of layers ({layers}), "
                             f"got {depth}")
        self.n_ctx, self.depth = n_ctx, depth

        # BPT. T_0 starts from the pretrained embeddings of the first n_ctx tokens of INIT_TEXT
        # ("a photo of a" for n_ctx = 4); beyond its 8 tokens, from N(0, 0.02) as the authors do.
        # The authors build their prompts before loading CLIP, so their T_0 reads random
        # embeddings; here it reads the loaded ones.
        embedding = clip_model.token_embedding.weight
        if n_ctx <= len(INIT_IDS):
            init_ids = torch.tensor(INIT_IDS[:n_ctx], device=embedding.device)  # [n]
            first_text_prompts = embedding[init_ids].detach().clone()  # T_0 [n, w]
        else:
            first_text_prompts = 0.02 * torch.randn(n_ctx, text_width)
        self.text_prompts = nn.ParameterList(
            [nn.Parameter(first_text_prompts)]
            + [nn.Parameter(0.02 * torch.randn(n_ctx, text_width)) for _ in range(depth - 1)])
        self.vision_prompts = nn.ParameterList(  # V_l [n, W]
            nn.Parameter(0.02 * torch.randn(n_ctx, vision_width)) for _ in range(depth))
        self.text_to_vision = nn.ModuleList(
            nn.Linear(text_width, vision_width) for _ in range(depth))
        self.vision_to_text = nn.ModuleList(
            nn.Linear(vision_width, text_width) for _ in range(depth))
        for linear in (*self.text_to_vision, *self.vision_to_text):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

        # DAT: one adapter per block of each tower.
        self.vision_adapters = nn.ModuleList(
            Adapter(vision_width, reduction, vision_scale) for _ in visual.transformer.resblocks)
        self.text_adapters = nn.ModuleList(
            Adapter(text_width, reduction, text_scale) for _ in clip_model.transformer.resblocks)
        self.grad_checkpointing = False
        self.to(embedding.device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's forward in the backward pass instead of keeping its activations
        (which the frozen blocks keep too: prompts and adapters sit in every one)."""
        self.grad_checkpointing = enable

    def run_block(self, block: clip_min.ResidualAttentionBlock, adapter: Adapter,
                  x: torch.Tensor) -> torch.Tensor:
        # Checkpointing keeps only the block's input; the backward pass runs the block again.
        if self.grad_checkpointing:
            return checkpoint(adapted_block, block, adapter, x, use_reentrant=False)
        return adapted_block(block, adapter, x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the backbone is frozen: it stays in evaluation mode
        return self

    # --- BPT: the 2n prompt tokens of each tower at layer l ---------------------------------------

    def text_layer_prompts(self, layer: int) -> torch.Tensor:  # [2n, w] = [T_l, V2T_l(V_l)]
        projected = self.vision_to_text[layer](self.vision_prompts[layer])
        return torch.cat([self.text_prompts[layer], projected])

    def vision_layer_prompts(self, layer: int) -> torch.Tensor:  # [2n, W] = [T2V_l(T_l), V_l]
        projected = self.text_to_vision[layer](self.text_prompts[layer])
        return torch.cat([projected, self.vision_prompts[layer]])

    # --- the two towers ------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, E]
        visual, num_prompts = self.clip.visual, 2 * self.n_ctx
        # Patches at clip_min's configured stride (the authors' CSKT conv strode by the patch size).
        x = visual.embed(images)  # [B, 1 + N, W]: class token and patches, with positions
        blocks = zip(visual.transformer.resblocks, self.vision_adapters)
        for layer, (block, adapter) in enumerate(blocks):
            if layer < self.depth:
                prompts = self.vision_layer_prompts(layer).to(x.dtype).expand(len(x), -1, -1)
                if layer == 0:  # appended after the patches, without a position, then ln_pre
                    x = visual.ln_pre(torch.cat([x, prompts], dim=1))  # [B, 1 + N + 2n, W]
                else:  # replace what the previous layer made of the prompts
                    x = torch.cat([x[:, :-num_prompts], prompts], dim=1)
            x = self.run_block(block, adapter, x)
        return visual.pool(x)  # the class token

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        num_prompts = 2 * self.n_ctx
        ids, eot_index = layout_caption_ids(ids, num_prompts)
        x = self.clip.token_embedding(ids)  # [B, L, w]
        blocks = zip(self.clip.transformer.resblocks, self.text_adapters)
        for layer, (block, adapter) in enumerate(blocks):
            if layer < self.depth:
                prompts = self.text_layer_prompts(layer).to(x.dtype).expand(len(x), -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1 + num_prompts:]], dim=1)  # at 1..2n
                if layer == 0:  # the prompts get positions like the words
                    x = x + self.clip.positional_embedding[: x.shape[1]]
            x = self.run_block(block, adapter, x)  # causal: words see the prompts, not vice versa
        return self.clip.pool_text(x, eot_index)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, pids: torch.Tensor,
                temperature: float = 0.02) -> dict:
        image_features, text_features = self.encode_image(images), self.encode_text(ids)
        loss = clip_min.sdm_loss(image_features, text_features, pids, temperature)
        return {"loss": loss, "sdm": loss}
