"""The GPT of Karpathy's nanoGPT: pre-norm blocks of causal self-attention and a GELU MLP, tied LM head.

Beyond nanoGPT: optional rotary positions, QK-norm, a ReLU² MLP and untied embeddings (ModelConfig), optional
gradient checkpointing of the blocks, and a key/value cache for generation (KVCache), which
`forward` is given and each attention layer attends through. The model holds no generation state: the cache
is the caller's (nanogpt/generate.py), and so is the choice of a faster cache (nanogpt/kernels.py's fused
decode step on a GPU).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nanogpt.config import ModelConfig

# The architecture options (ModelConfig) at the values that make this model nanoGPT's GPT, which is GPT-2's
# architecture: a checkpoint saved before an option existed was made with this value.
NANOGPT_ARCHITECTURE = {"rope": False, "qk_norm": False, "mlp": "gelu", "tie_embeddings": True}
ROPE_BASE = 10000.0  # Rotary's base: the angle of channel pair i at position p is p * ROPE_BASE ** (-2i / hs)


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer): each pair of a head's channels (i, i + hs/2) is rotated by an angle
    proportional to the position, so that a query-key product depends on their distance, not their positions."""

    def __init__(self, head_size: int, block_size: int, base: float = ROPE_BASE) -> None:
        super().__init__()
        frequencies = base ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)  # (block_size, hs/2)
        self.cos: Tensor
        self.sin: Tensor
        self.register_buffer("cos", angles.cos(), persistent=False)  # computed, not learned: not in checkpoints
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, input_pos: Tensor) -> Tensor:
        """x (..., T, hs) at positions input_pos (T,), rotated."""
        cos, sin = self.cos[input_pos], self.sin[input_pos]  # (T, hs/2)
        x1, x2 = x.float().chunk(2, dim=-1)  # (..., T, hs/2) each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class KVCache:
    """The keys and values of every position seen so far, in every layer, preallocated to the full context length
    (static shapes, so that a decode step can be compiled and captured as a CUDA graph); and the attention mask
    of the positions. Both in the model's dtype; under autocast the attention converts.

    Layer i's keys and values share one buffer `kv[i]` (2, B, nh, block_size, hs), so that a step writes both
    with one copy. `mask` (block_size, block_size) is additive: row p is 0 for the keys a query at position p
    sees (0..p) and -inf for the rest, stale entries included.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        causal = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool, device=device).tril()
        self.mask = torch.zeros(causal.shape, dtype=dtype, device=device).masked_fill(~causal, -math.inf)
        shape = (2, batch_size, cfg.n_head, cfg.block_size, cfg.head_size)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write keys and values k, v (B, nh, T, hs) of `layer` at positions `input_pos` (T,); return the layer's
        keys and values (B, nh, block_size, hs) to attend over."""
        kv = self.kv[layer]
        kv.index_copy_(3, input_pos, torch.stack((k, v)).to(kv.dtype))  # (2, B, nh, T, hs) into (2, .., block_size, hs)
        return kv[0], kv[1]

    def decodes_fused(self, T: int) -> bool:
        """Whether `decode` takes a step of T positions: never here; kernels.FusedDecodeCache's one-position
        steps on a GPU."""
        return False

    def decode(self, layer: int, qkv: Tensor, input_pos: Tensor, rotary: Rotary | None) -> Tensor:
        """Attention (B, T, C) of the raw queries, keys and values qkv (B, T, 3C), rotated by `rotary` when
        given: for a cache whose decodes_fused holds."""
        raise NotImplementedError

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        """Attention (B, nh, T, hs) of queries q (B, nh, T, hs) at positions `input_pos` (T,) over the cache,
        the new keys and values k, v written into it first (update)."""
        k, v = self.update(layer, input_pos, k, v)  # each (B, nh, block_size, hs)
        mask = self.mask.index_select(0, input_pos)  # (T, block_size), the same for every sequence and head
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.to(q.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which of a KVCache's layers is this one's
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # query, key and value of every head
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(cfg.head_size, cfg.block_size) if cfg.rope else None
        self.qk_norm = cfg.qk_norm

    def forward(self, x: Tensor, input_pos: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """x (B, T, C) at positions `input_pos` (T,). Without a cache each position attends to itself and the
        positions before it; with one, to the positions in the cache up to its own, its key and value added."""
        qkv = self.c_attn(x)  # (B, T, 3C): the queries, keys and values of every head, side by side
        if kv_cache is not None and not self.qk_norm and kv_cache.decodes_fused(x.size(1)):
            y = kv_cache.decode(self.layer, qkv, input_pos, self.rotary)  # the rotation too, in one kernel
        else:
            y = self.attention(qkv, input_pos, kv_cache)
        return self.resid_dropout(self.c_proj(y))

    def attention(self, qkv: Tensor, input_pos: Tensor, kv_cache: KVCache | None) -> Tensor:
        """The attention (B, T, C) of the queries, keys and values qkv (B, T, 3C) at positions `input_pos`."""
        B, T, C = qkv.size(0), qkv.size(1), qkv.size(2) // 3  # batch size, sequence length, embedding size
        heads = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        qk, v = heads[:2], heads[2]  # queries and keys together: the options below treat them alike, in one go
        if self.qk_norm:
            qk = F.rms_norm(qk, (qk.size(-1),))
        if self.rotary is not None:
            qk = self.rotary(qk, input_pos)
        q, k = qk  # each (B, nh, T, hs)
        if kv_cache is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, nh, T, hs)
        else:
            y = kv_cache.attend(self.layer, q, k, v, input_pos)  # (B, nh, T, hs)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again


def relu_squared(x: Tensor) -> Tensor:
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu2": relu_squared}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = ACTIVATIONS[cfg.mlp]

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, input_pos: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = None if cfg.rope else nn.Embedding(cfg.block_size, cfg.n_embd)  # rope: positions in attention
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
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

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return self.wte.weight.device

    def num_params(self) -> int:
        """Number of distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        input_pos: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); the mean cross-entropy too when `targets` is given.

        With a `kv_cache` (generation), `input_pos` (T,) gives the positions of `idx`: their keys and values
        join the cache there, and each attends to the cache's positions up to its own.
        """
        T = idx.size(1)
        if input_pos is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.cfg.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(input_pos)
        x = self.drop(x)
        for block in self.blocks:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(block, x, input_pos, kv_cache, use_reentrant=False)
            else:
                x = block(x, input_pos, kv_cache)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))  # (B*T, vocab), (B*T,)
        return logits, loss
