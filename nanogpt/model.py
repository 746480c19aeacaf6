"""The GPT of Karpathy's nanoGPT: pre-norm blocks of causal self-attention and a GELU MLP, tied LM head.

Beyond nanoGPT: an optional key/value cache (static shapes, so a decode step can be compiled and
captured as a CUDA graph) and optional gradient checkpointing of the blocks.
"""

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nanogpt.config import ModelConfig
from nanogpt.kernels import decode_attention, decode_attention_supported


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated to the full context length, in one buffer
    (2, B, H, max_len, hs) so that a step writes both with one copy; and the attention mask of the positions.
    Both are in the model's dtype (the mask's); under autocast the attention converts.

    `mask` (max_len, max_len) is additive: row p is 0 for the keys a query at position p sees (0..p) and
    -inf for the rest, stale entries included. The caches of a model's layers share one.
    """

    kv: Tensor  # buffers, declared for the type checker (register_buffer sets them)
    mask: Tensor

    def __init__(self, batch_size: int, n_head: int, head_size: int, mask: Tensor) -> None:
        super().__init__()
        shape = (2, batch_size, n_head, len(mask), head_size)
        self.register_buffer("kv", torch.zeros(shape, dtype=mask.dtype, device=mask.device), persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.decodes_fused = decode_attention_supported(self.kv)  # settled once: the buffer never changes

    def fused(self, T: int) -> bool:
        """Whether T new positions go through the fused decode kernel, which needs no mask: one at a time,
        on a GPU with Triton."""
        return T == 1 and self.decodes_fused

    def update(self, input_pos: Tensor, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Write kv (2, B, H, T, hs) at positions `input_pos` (T,); return all keys and all values."""
        self.kv.index_copy_(3, input_pos, kv.to(self.kv.dtype))
        return self.kv[0], self.kv[1]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, input_pos: Tensor, mask: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        if self.kv_cache is not None and self.kv_cache.fused(T):
            kv = self.kv_cache.kv
            return self.resid_dropout(self.c_proj(decode_attention(self.c_attn(x).to(kv.dtype), kv, input_pos)))
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hs)
        q = qkv[0]
        if self.kv_cache is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, qkv[1], qkv[2], dropout_p=dropout, is_causal=True)
        else:
            k, v = self.kv_cache.update(input_pos, qkv[1:])
            # (type: ignore: with a cache that is not fused, GPT.forward always passes a mask)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.to(q.dtype))  # type: ignore[union-attr]
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, input_pos: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2 and nanoGPT
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, input_pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); the mean cross-entropy too when `targets` is given.

        With caches set up (`setup_kv_cache`), `input_pos` (T,) gives the positions of `idx` in the cache.
        """
        T = idx.size(1)
        if input_pos is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.cfg.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(input_pos))
        # (type: ignore: blocks[0] is a Block, which the type checker cannot know: ModuleList's items are Modules)
        cache: KVCache | None = self.blocks[0].attn.kv_cache  # type: ignore[union-attr,assignment]
        mask = None if cache is None or cache.fused(T) else cache.mask[input_pos][None, None]
        for block in self.blocks:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(block, x, input_pos, mask, use_reentrant=False)
            else:
                x = block(x, input_pos, mask)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def setup_kv_cache(self, batch_size: int) -> list[KVCache]:
        """Give every attention layer a cache for `batch_size` sequences of up to block_size positions; return them."""
        ref = self.lm_head.weight
        causal = torch.ones(self.cfg.block_size, self.cfg.block_size, dtype=torch.bool, device=ref.device).tril()
        mask = torch.zeros(causal.shape, dtype=ref.dtype, device=ref.device).masked_fill(~causal, -math.inf)
        caches = [KVCache(batch_size, self.cfg.n_head, self.cfg.head_size, mask) for _ in self.blocks]
        self.attach_kv_cache(caches)
        return caches

    def attach_kv_cache(self, caches: list[KVCache] | None) -> None:
        """Put caches made by setup_kv_cache back in place (None: remove them)."""
        slots: list[KVCache | None] = [*caches] if caches else [None] * len(self.blocks)
        for block, cache in zip(self.blocks, slots, strict=True):
            cast(Block, block).attn.kv_cache = cache

    def drop_kv_cache(self) -> None:
        self.attach_kv_cache(None)
