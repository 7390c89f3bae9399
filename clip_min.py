"""CLIP from scratch in one file: the tokenizer, the two towers, the losses, OpenAI's weights.

CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021, arXiv 2103.00020) embeds an image and a sentence into one space, E dimensions wide:

    image feature  v = ln_post(ViT(image)[CLS]) @ proj                     [E]
    text feature   t = ln_final(Transformer(tokens)[EOT]) @ text_projection [E]

and trains both towers so that cos(v_i, t_j) is high exactly when image i and caption j belong
together. Both towers (the image one a ViT: Dosovitskiy et al., arXiv 2010.11929) stack one block

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x)),      mlp(x) = c_proj(QuickGELU(c_fc(x))),  QuickGELU(x) = x σ(1.702 x)

OpenAI's checkpoints load strictly: same tensors, same names. Only mechanics differ: batch-first
tensors, scaled_dot_product_attention, fp32 weights under autocast, and person-shaped inputs
(384x128, the position grid resized). The losses: CLIP's InfoNCE (the demo pretrains with it)
and SDM, which every method here trains with (Jiang & Ye, "Cross-Modal Implicit Relation
Reasoning and Aligning for Text-to-Image Person Retrieval" (IRRA), CVPR 2023, arXiv 2303.12501).
"""

import contextlib
import functools
import gzip
import hashlib
import html
import math
import os
import sys
import urllib.request
import uuid
import warnings
import zipfile
from dataclasses import dataclass

import ftfy
import regex
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class CLIPError(Exception):
    """A file this module cannot use (the BPE vocabulary, weights): one line naming it."""


# ------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE exactly as OpenAI's simple_tokenizer.py
# ------------------------------------------------------------------------------------------------

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 48894  # lines 1..48894 of the vocabulary file (line 0 is a header)
SOT_TOKEN = 49406  # <|startoftext|>
EOT_TOKEN = 49407  # <|endoftext|>: the largest id, so argmax(ids) finds it
CONTEXT_LENGTH = 77

WORD_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                             r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, reversibly (no BPE symbol is whitespace), in id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + len(mapping) - len(printable))
    return mapping


class Tokenizer:
    def __init__(self, vocab_path: str = VOCAB_PATH):
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {char: byte for byte, char in self.byte_to_char.items()}
        if not os.path.isfile(vocab_path):
            raise CLIPError(f"{vocab_path} is missing; it ships beside clip_min.py and in the PyPI "
                            f"wheels of clip-anytorch and open_clip_torch (SHA-256 {VOCAB_SHA256})")
        with gzip.open(vocab_path, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
        symbols = list(self.byte_to_char.values())
        self.vocab = (symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
                      + ["<|startoftext|>", "<|endoftext|>"])
        self.encoder = {symbol: i for i, symbol in enumerate(self.vocab)}
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        # The special tokens written literally in a text become their ids, as in OpenAI's code.
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}
        if self.encoder["<|endoftext|>"] != EOT_TOKEN:
            raise ValueError(f"{vocab_path} is not CLIP's BPE vocabulary ({EOT_TOKEN + 1} ids)")

    def bpe(self, word: str) -> list[str]:
        """Merge the characters of one word, lowest-ranked pair first, until no pair is a merge."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.merge_rank.get(pair, math.inf))
            if best not in self.merge_rank:
                break
            merged = []
            for part in parts:  # every occurrence, left to right, without overlap:
                if merged and (merged[-1], part) == best:  # a merged symbol is never best[0]
                    merged[-1] += part
                else:
                    merged.append(part)
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        # OpenAI's cleaning: repair mojibake, unescape HTML twice, collapse whitespace, lowercase.
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for word in WORD_PATTERN.findall(text):
            chars = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(chars))
        return ids

    def decode(self, ids: list[int]) -> str:
        chars = "".join(self.vocab[i] for i in ids)
        text = bytearray(self.char_to_byte[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH,
             truncate: bool = False) -> torch.Tensor:
    """Texts -> [N, context_length] ids: [SOT, ids..., EOT, 0, ...]; `truncate` cuts long ones."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, L]
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN, *default_tokenizer().encode(text), EOT_TOKEN]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {row} has {len(ids)} tokens, more than the context "
                                 f"length {context_length}; shorten it or pass truncate=True: "
                                 f"{text[:80]!r}")
            ids = ids[: context_length - 1] + [EOT_TOKEN]
        result[row, : len(ids)] = torch.tensor(ids)
    return result


def decode(ids: torch.Tensor | list[int]) -> str | list[str]:
    """Token ids (as `tokenize` makes them) -> text, without SOT, EOT and padding. 2-D -> a list."""
    ids = torch.as_tensor(ids)
    if ids.dim() == 2:
        return [decode(row) for row in ids]
    ids = ids.tolist()
    if EOT_TOKEN in ids:
        ids = ids[: ids.index(EOT_TOKEN)]
    return default_tokenizer().decode([i for i in ids if i != SOT_TOKEN])


# ------------------------------------------------------------------------------------------------
# The losses: CLIP's symmetric InfoNCE, and similarity distribution matching (SDM, IRRA)
# ------------------------------------------------------------------------------------------------

def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's contrastive loss over B matching pairs (Radford et al. 2021, Figure 3):

        logits = exp(logit_scale) * v @ t.T          [B, B], v and t L2-normalised
        L = (cross_entropy(logits, i) + cross_entropy(logits.T, i)) / 2,   i = 0..B-1

    Every other pair is a negative, even of the same person: right for the demo's pretraining."""
    with torch.autocast(image_features.device.type, enabled=False):
        image_features = F.normalize(at_least_fp32(image_features), dim=-1)  # [B, E]
        text_features = F.normalize(at_least_fp32(text_features), dim=-1)  # [B, E]
        logits = at_least_fp32(logit_scale).exp() * image_features @ text_features.T  # [B, B]
        matching = torch.arange(len(logits), device=logits.device)  # pair i's caption is caption i
        return (F.cross_entropy(logits, matching) + F.cross_entropy(logits.T, matching)) / 2


def processes() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherShares(torch.autograd.Function):
    @staticmethod
    def forward(ctx, share: torch.Tensor) -> torch.Tensor:
        shares = [torch.empty_like(share) for _ in range(dist.get_world_size())]
        dist.all_gather(shares, share.contiguous())
        return torch.cat(shares)  # [N*B, ...]

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        # Every process computes the same loss from the same batch, so holds the same gradient: no
        # all-reduce. Own rows times N equal its sum of N copies, which DDP's average over N undoes.
        world_size = dist.get_world_size()
        return gradient.chunk(world_size)[dist.get_rank()] * world_size


def gather_shares(share: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [N*B, ...]: all processes' equal shares, rank order; gradients reach own rows."""
    return share if processes() == 1 else _GatherShares.apply(share)


def sdm_loss(image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor,
             temperature: float = 0.02, epsilon: float = 1e-8) -> torch.Tensor:
    """Similarity distribution matching over B image-caption pairs:

        q_ij = y_ij / sum_k y_ik,    y_ij = [pid_i == pid_j]
        p^{i2t}_i = softmax_j(s * cos(v_i, t_j)),   p^{t2i}_i = softmax_j(s * cos(t_i, v_j))
        L = mean_i KL(p^{i2t}_i || q_i) + mean_i KL(p^{t2i}_i || q_i),   s = 1 / temperature

    With one caption per identity q is the identity matrix, CLIP's setting (InfoNCE is KL(q || p);
    SDM measures KL(p || q), with log(q + epsilon)). 0.02 is IRRA's temperature and both methods'.
    Under torchrun the shares are gathered first: every process computes the whole batch's loss."""
    with torch.autocast(image_features.device.type, enabled=False):
        image_features = F.normalize(gather_shares(at_least_fp32(image_features)), dim=-1)  # [B, E]
        text_features = F.normalize(gather_shares(at_least_fp32(text_features)), dim=-1)  # [B, E]
        pids = gather_shares(pids)  # [B]
        same_identity = (pids[:, None] == pids[None, :]).to(image_features.dtype)  # [B, B]
        target = same_identity / same_identity.sum(dim=1, keepdim=True)  # [B, B]
        log_target = torch.log(target + epsilon)
        image_to_text = image_features @ text_features.T / temperature  # [B, B]

        def kl_to_target(logits: torch.Tensor) -> torch.Tensor:
            log_p = F.log_softmax(logits, dim=1)
            return (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()

        return kl_to_target(image_to_text) + kl_to_target(image_to_text.T)


# ------------------------------------------------------------------------------------------------
# The model; its pieces are public, as cskt.py and dm_adapter.py run their own loops over blocks
# ------------------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP was trained with it; nn.GELU would change every feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Batch-first self-attention with nn.MultiheadAttention's names, as in OpenAI's checkpoints."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"width {width} must be a positive multiple of the heads, {heads}")
        self.heads = heads
        self.causal = causal  # text: a token sees only itself and earlier tokens
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # [3D, D]: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads)  # [B, L, 3, H, D/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D/H]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, H, L, D/H]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        # Defined in OpenAI's order, so that state dicts list their keys in the same order.
        self.attn = Attention(width, heads, causal)
        self.ln_1 = nn.LayerNorm(width)  # eps 1e-5, as OpenAI's
        self.mlp = nn.Sequential()  # a Sequential only so the names read mlp.c_fc / mlp.c_proj
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, causal) for _ in range(layers))
        # OpenAI's initialisation, for training from scratch (loaded weights replace it).
        attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        self.grad_checkpointing = False  # set by CLIP.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
        return x


def patch_grid(image_size: tuple[int, int], patch_size: int, stride: int) -> tuple[int, int]:
    height, width = image_size
    if height < patch_size or width < patch_size:
        raise ValueError(f"image size {height}x{width} is smaller than the patch size {patch_size}")
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


class VisionTransformer(nn.Module):
    def __init__(self, image_size: tuple[int, int], patch_size: int, stride: int,
                 width: int, layers: int, output_dim: int):
        super().__init__()
        self.grid = patch_grid(image_size, patch_size, stride)  # (rows, columns) of patches
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=stride, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        positions = 1 + self.grid[0] * self.grid[1]
        self.positional_embedding = nn.Parameter(scale * torch.randn(positions, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads=width // 64)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + N, W]: class token and patches with positions (no ln_pre)."""
        patches = self.conv1(images).flatten(2).transpose(1, 2)  # [B, N, W], grid row-major
        class_token = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)
        return torch.cat([class_token, patches], dim=1) + self.positional_embedding  # [B, 1 + N, W]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, L, W] -> [B, E]
        return self.ln_post(tokens[:, 0]) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, E]
        return self.pool(self.transformer(self.ln_pre(self.embed(images))))


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # E, the joint image-text space
    image_size: tuple[int, int] = (224, 224)  # (H, W) of the input images
    patch_size: int = 16
    stride: int = 16  # the patch conv's stride: = patch_size in OpenAI's models
    vision_width: int = 768  # heads = width // 64 in both towers, as OpenAI's
    vision_layers: int = 12
    context_length: int = CONTEXT_LENGTH
    vocab_size: int = EOT_TOKEN + 1
    text_width: int = 512
    text_layers: int = 12


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.image_size, config.patch_size, config.stride,
                                        config.vision_width, config.vision_layers, config.embed_dim)
        self.transformer = Transformer(config.text_width, config.text_layers,
                                       config.text_width // 64, causal=True)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(
            torch.empty(config.context_length, config.text_width))
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        # CLIP's learned temperature: the methods fix theirs, but OpenAI's checkpoints hold it.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.text_width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers: the backward pass runs each block again
        rather than keep its activations; loss and gradients are the same (bit for bit on CPU)."""
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, E]
        return self.visual(images)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, w]
        return self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]

    def pool_text(self, tokens: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """[B, L, w] -> [B, E]: the token at each caption's EOT, normalised and projected (ln_final
        works per token, so normalising only the EOT token equals OpenAI's order)."""
        eot_tokens = tokens[torch.arange(len(tokens), device=tokens.device), eot_index]  # [B, w]
        return self.ln_final(eot_tokens) @ self.text_projection

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        return self.pool_text(self.transformer(self.embed_text(ids)), ids.argmax(dim=-1))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, pids: torch.Tensor,
                temperature: float = 0.02) -> dict:
        """Fine-tuning all of CLIP with SDM (IRRA's "CLIP fine-tuned" baseline)."""
        loss = sdm_loss(self.encode_image(images), self.encode_text(ids), pids, temperature)
        return {"loss": loss, "sdm": loss}


# ------------------------------------------------------------------------------------------------
# Weights: a model from a state dict (hyper-parameters read off shapes), OpenAI's and IRRA's files
# ------------------------------------------------------------------------------------------------

def resize_positional_embedding(positional: torch.Tensor, old_grid: tuple[int, int],
                                new_grid: tuple[int, int]) -> torch.Tensor:
    """[1 + h*w, W] -> [1 + H*W', W]: the patch part resized bilinearly as an image (as IRRA does:
    align_corners=False, no antialias), the class row kept."""
    if tuple(old_grid) == tuple(new_grid):
        return positional
    class_row, grid = positional[:1], positional[1:]  # [1, W], [h*w, W]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)  # [1, W, h, w]
    grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False)  # [1, W, H, W']
    return torch.cat([class_row, grid.permute(0, 2, 3, 1).flatten(0, 2)])  # [1 + H*W', W]


def layer_counts(state_dict: dict) -> tuple[int, int]:
    vision = sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in state_dict)
    text = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    return vision, text


def config_from_state_dict(state_dict: dict, image_size: tuple[int, int] | None = None,
                           stride: int | None = None) -> tuple[CLIPConfig, tuple[int, int]]:
    """(config, stored position grid); a non-square grid needs the image_size and stride it had."""
    if "visual.proj" not in state_dict:
        if any(key.startswith("visual.layer1.") for key in state_dict):
            raise CLIPError("this is a ResNet CLIP checkpoint (RN50, RN101, ...), which is not "
                            "supported: use a ViT model such as ViT-B/16")
        raise CLIPError("not a CLIP ViT state dict: the key 'visual.proj' is missing "
                        f"(first keys: {', '.join(list(state_dict)[:5]) or 'none'})")
    patch_size = state_dict["visual.conv1.weight"].shape[-1]
    stride = stride or patch_size
    positions = state_dict["visual.positional_embedding"].shape[0] - 1
    side = math.isqrt(positions)
    if side * side == positions:
        stored_grid = (side, side)
        image_size = tuple(image_size or (side * patch_size, side * patch_size))
    elif image_size and math.prod(patch_grid(tuple(image_size), patch_size, stride)) == positions:
        stored_grid = patch_grid(tuple(image_size), patch_size, stride)
    else:
        raise CLIPError(f"the position embedding holds {positions} patches, not a square grid, "
                        f"and image_size={image_size}, stride={stride} does not give {positions} "
                        "patches: pass the image size and stride this checkpoint was trained with")
    vision_layers, text_layers = layer_counts(state_dict)
    config = CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        image_size=image_size, patch_size=patch_size, stride=stride,
        vision_width=state_dict["visual.conv1.weight"].shape[0], vision_layers=vision_layers,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_width=state_dict["ln_final.weight"].shape[0], text_layers=text_layers)
    return config, stored_grid


def build_model(state_dict: dict, image_size: tuple[int, int] | None = None,
                stride: int | None = None) -> CLIP:
    """A CLIP with these weights in fp32 (OpenAI's are fp16), at `image_size` (H, W; default: the
    checkpoint's own square size) and patch `stride` (default: the patch size)."""
    extras = ("input_resolution", "context_length", "vocab_size")  # numbers in OpenAI's files
    state_dict = {k: v for k, v in state_dict.items() if k not in extras}
    try:
        config, stored_grid = config_from_state_dict(state_dict, image_size, stride)
        with torch.device("meta"):  # no memory and no random init for weights replaced at once
            model = CLIP(config)
    except KeyError as missing:
        raise CLIPError(f"not a CLIP ViT state dict: the key {missing} is missing") from None
    except ValueError as error:  # an image smaller than a patch, heads that do not divide the width
        raise CLIPError(f"these weights do not make a CLIP model: {error}") from None
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    positional = state_dict["visual.positional_embedding"]
    if positional.ndim == 2:  # a wrong shape is reported by load_state_dict
        state_dict["visual.positional_embedding"] = resize_positional_embedding(
            positional, stored_grid, model.visual.grid)
    try:  # reports missing keys, unexpected keys and wrong shapes, all at once
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise CLIPError(" ".join(str(error).split())) from None
    return model


RELEASES = {  # name -> (SHA-256 of the file, file name); the URL holds the hash
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                       "ViT-L-14-336px.pt"),
}
RELEASE_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{file}"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "clip")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file to write that appears at `path` only once complete and on the disk. Until
    then it has a random name, created exclusively, so that machines sharing a file system never
    write into one file; an error or Ctrl-C in the block leaves the old file and no temporary."""
    temporary = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(temporary, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    with contextlib.suppress(OSError):  # folders cannot be opened on Windows
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def download(name: str, cache_dir: str = DEFAULT_CACHE) -> str:
    """A release's path in `cache_dir`, downloaded if needed; its SHA-256 is checked every time."""
    sha256, file_name = RELEASES[name]
    target = os.path.join(cache_dir, file_name)
    if os.path.isfile(target):
        actual = file_sha256(target)
        if actual != sha256:
            raise CLIPError(f"{target} is corrupt: SHA-256 {actual}, expected {sha256}; "
                            "delete the file and run again to download it anew")
        return target
    url = RELEASE_URL.format(sha256=sha256, file=file_name)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            os.makedirs(cache_dir, exist_ok=True)  # only now, when there is a file to write
            with atomic_file(target) as out:  # in place only once complete and verified
                total, done = int(response.headers.get("Content-Length") or 0), 0
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    percent = f" {100 * done / total:3.0f}%" if total else ""
                    print(f"\rdownloading {file_name}: {done / 1e6:7.1f} / {total / 1e6:.1f} MB"
                          f"{percent}", end="", file=sys.stderr, flush=True)
                print(file=sys.stderr)
                if digest.hexdigest() != sha256:
                    raise CLIPError(f"the download of {url} is corrupt: SHA-256 "
                                    f"{digest.hexdigest()}, expected {sha256}; run again")
    except OSError as error:  # urllib's URLError is an OSError too
        raise CLIPError(f"could not download {name} from {url} ({error}). Without a network, "
                        f"fetch it elsewhere and put it at {target} (SHA-256 {sha256})") from None
    return target


def load_file(path: str):
    """What torch.save wrote at `path`, read with weights_only=True (no code from the file runs)."""
    if not os.path.isfile(path):
        raise CLIPError(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise CLIPError(f"{path} is empty (0 bytes), not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling fails in many ways; all mean the same to a user
        raise CLIPError(f"could not read {path}: not a file saved with torch.save, or one that "
                        f"would run code when loaded ({type(error).__name__})") from None


def is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files that carry code (`code/`, `constants.pkl`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in name or name.endswith("constants.pkl") for name in names)


# IRRA's released models (github.com/anosorae/IRRA) are dicts whose "model" holds the CLIP under
# "base_model." ("module.base_model." from DDP; fp16 linear and conv weights, no logit_scale: IRRA's
# temperature is fixed) beside heads used only in training. IRRA evaluates that CLIP alone.
IRRA_PREFIX = "base_model."


def read_state_dict(path: str, trust_jit: bool = False) -> tuple[dict, str]:
    """(a checkpoint file's CLIP tensors, a line saying what else it held, or ""). TorchScript runs
    code from the file when loaded: only a known release's loads, or any with trust_jit."""
    if is_torchscript(path):
        sha256 = file_sha256(path)
        if not trust_jit and sha256 not in {h for h, _ in RELEASES.values()}:
            raise CLIPError(f"{path} is a TorchScript archive whose SHA-256 ({sha256}) is not an "
                            "OpenAI release; loading it runs code from the file. If you trust it, "
                            "pass trust_jit=True; otherwise save its state dict with torch.save")
        with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's files are TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(path, map_location="cpu").state_dict()), ""
    state_dict = load_file(path)
    if not isinstance(state_dict, dict):
        raise CLIPError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    if not isinstance(state_dict.get("model"), dict):
        return state_dict, ""
    model = {key.removeprefix("module."): value for key, value in state_dict["model"].items()}
    clip = {key.removeprefix(IRRA_PREFIX): value
            for key, value in model.items() if key.startswith(IRRA_PREFIX)}
    if not clip:
        first_keys = ", ".join(list(model)[:5]) or "none"
        raise CLIPError(f"{path} holds a 'model' entry, as IRRA's checkpoints do, but no CLIP "
                        f"under '{IRRA_PREFIX}' in it (first keys: {first_keys})")
    heads = len(model) - len(clip)
    clip.setdefault("logit_scale", torch.tensor(math.log(1 / 0.02)))  # unused by the methods
    return clip, (f"{path}: IRRA's checkpoint: its CLIP is used; {heads:,} tensors of IRRA's "
                  "training heads are left out")


def load(name_or_path: str = "ViT-B/16", image_size: tuple[int, int] = (384, 128),
         stride: int = 16, device: str | torch.device = "cpu", trust_jit: bool = False,
         cache_dir: str = DEFAULT_CACHE) -> CLIP:
    """A CLIP in fp32 on `device` from a release name (downloaded to `cache_dir`) or a file: an
    OpenAI TorchScript archive, a state dict or IRRA's model (its CLIP; the rest said on stderr)."""
    if name_or_path in RELEASES:
        path = download(name_or_path, cache_dir)
    elif os.path.exists(name_or_path) or os.path.splitext(name_or_path)[1]:  # a file name
        path = name_or_path
    else:
        raise CLIPError(f"unknown model name {name_or_path!r} (and no file of that name): the "
                        f"released models are {', '.join(RELEASES)}; or pass a checkpoint's path")
    state_dict, left_out = read_state_dict(path, trust_jit)
    if left_out:
        print(left_out, file=sys.stderr)
    return build_model(state_dict, image_size, stride).to(device)
