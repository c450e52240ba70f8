"""CLIP-style causal text transformer of SAM 3, and the encoder wrapper that resizes its tokens to d_model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TextConfig
from .tokenizer import Sam3Tokenizer


class CausalSelfAttention(nn.Module):
    """Parameters laid out like `nn.MultiheadAttention` (packed in_proj), computed with SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, head_dim]
        return self.out_proj(x.transpose(1, 2).reshape(batch, length, dim))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(dim, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class TextTransformer(nn.Module):
    """Token ids [B, L] -> per-token features [B, L, width] (after the final LayerNorm)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.context_length = config.context_length
        self.width = config.width
        # nn.Embedding's own initialisation is skipped (`_weight`) and done below, for the meta device's sake
        self.token_embedding = nn.Embedding(
            config.vocab_size, config.width, _weight=torch.empty(config.vocab_size, config.width)
        )
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_length, config.width))
        self.transformer = Transformer(config.width, config.layers, config.heads, config.mlp_ratio)
        self.ln_final = nn.LayerNorm(config.width)
        # Kept so official checkpoints load one to one; SAM 3 uses every token, never the pooled projection.
        self.text_projection = nn.Parameter(torch.zeros(config.width, config.projection_dim))
        _normal_unless_meta(self.token_embedding.weight, std=1.0)
        _normal_unless_meta(self.positional_embedding, std=0.01)
        _normal_unless_meta(self.text_projection, std=config.width**-0.5)

    def forward(self, tokens: Tensor, token_embeds: Tensor | None = None) -> Tensor:
        if token_embeds is None:
            token_embeds = self.token_embedding(tokens)
        x = token_embeds + self.positional_embedding[: tokens.shape[1]]
        return self.ln_final(self.transformer(x))


def _normal_unless_meta(tensor: Tensor, std: float) -> None:
    """A normal initialisation, skipped on the meta device: `build_sam3_vl_backbone` assembles the model there and
    fills every weight afterwards, and `normal_` of a meta tensor runs through torch._refs, which imports
    torch._dynamo and inductor (a tiny model built in 1.10 s instead of 0.56, docs/benchmarks.md: time every eager
    model actor would pay for nothing)."""
    if not tensor.is_meta:
        nn.init.normal_(tensor, std=std)


class VETextEncoder(nn.Module):
    """Captions (strings or token ids) -> (padding mask [B, L], memory [L, B, d_model], embeds [L, B, width])."""

    def __init__(self, config: TextConfig, d_model: int, tokenizer: Sam3Tokenizer) -> None:
        super().__init__()
        self.context_length = config.context_length
        self.tokenizer = tokenizer
        self.encoder = TextTransformer(config)
        self.resizer = nn.Linear(config.width, d_model)

    def tokenize(self, captions: list[str] | Tensor) -> Tensor:
        if isinstance(captions, Tensor):
            if captions.ndim != 2 or captions.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"token ids must be an integer tensor [N, L], got {captions.dtype} {captions.shape}")
            if captions.shape[1] > self.context_length:
                raise ValueError(f"token ids are longer than the context length {self.context_length}")
            return captions.long()
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not a single string")
        return self.tokenizer(list(captions), context_length=self.context_length)

    def forward(self, text: list[str] | Tensor, input_boxes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if input_boxes is not None and len(input_boxes) > 0:
            raise ValueError("box placeholders in captions are not supported by the SAM 3 text encoder")
        device = self.resizer.weight.device
        tokens = self.tokenize(text).to(device)  # [B, L]
        padding_mask = tokens == 0  # True where padded
        token_embeds = self.encoder.token_embedding(tokens)  # [B, L, width]
        memory = self.encoder(tokens, token_embeds)  # [B, L, width]
        # Sequence first, as the SAM 3 fusion encoder and decoder expect.
        memory = self.resizer(memory.transpose(0, 1))  # [L, B, d_model]
        return padding_mask, memory, token_embeds.transpose(0, 1)
