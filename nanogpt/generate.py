"""Sampling: small pure functions, a full-context reference generator and the KV-cached generator.

Both generators see the same context for every new token (`context_length`), draw the same noise from
one seeded generator per sample, and so produce the same tokens; the cached one does a fraction of the work.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from nanogpt.model import GPT


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # 0 is greedy
    top_k: int | None
    top_p: float | None


def context_length(n: int, block_size: int) -> int:
    """How many of the last `n` tokens the model sees when predicting token n + 1.

    Up to block_size, all of them. Past it, positions are absolute and learned, so a cache cannot slide:
    when it is full the last `block_size // 2` tokens are re-read into it (one prefill) and it fills again.
    """
    if n <= block_size:
        return n
    keep = max(1, block_size // 2)
    return keep + (n - block_size - 1) % (block_size - keep + 1)


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities (B, V) after temperature, then top-k, then top-p (nucleus) filtering.

    top_k larger than the vocabulary keeps the whole vocabulary. top-p keeps the smallest set of most
    likely tokens whose probability reaches top_p.
    """
    logits = logits.float() / max(params.temperature, 1e-8)
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
        drop = before >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, params: SamplingParams, generators: list[torch.Generator]) -> Tensor:
    """One token id per row of `logits` (B, V); row b draws its noise from generators[b] only.

    Sampling is argmax(p / E) with E ~ Exponential(1) (a multinomial draw without a host sync), so each
    row's outcome does not depend on the batch it is in.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, params)
    noise = torch.stack([torch.empty(probs.size(-1), device=probs.device).exponential_(generator=g)
                         for g in generators])
    return (probs / noise).argmax(dim=-1)


def make_generators(seed: int, n: int, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


@torch.no_grad()
def generate_reference(model: GPT, prompt: list[int], num_tokens: int, num_samples: int,
                       params: SamplingParams, seed: int) -> Tensor:
    """Recompute the whole context for every new token (nanoGPT's way): slow, simple, the yardstick."""
    device = model.lm_head.weight.device
    generators = make_generators(seed, num_samples, device)
    seq = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    for _ in range(num_tokens):
        w = context_length(seq.size(1), model.cfg.block_size)
        logits, _ = model(seq[:, -w:])
        seq = torch.cat([seq, sample(logits[:, -1], params, generators)[:, None]], dim=1)
    return seq[:, len(prompt):]


class _Decoder:
    """One cached decode step; on CUDA captured once as a graph and replayed, to skip per-kernel launches."""

    def __init__(self, model: GPT, batch_size: int, use_graph: bool) -> None:
        device = model.lm_head.weight.device
        self.model = model
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        if use_graph:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and allocator outside the capture
                    self.logits = model(self.token, input_pos=self.pos)[0][:, -1]
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model(self.token, input_pos=self.pos)[0][:, -1]

    def __call__(self, token: Tensor, pos: int) -> Tensor:
        if self.graph is None:
            return self.model(token[:, None], input_pos=torch.tensor([pos], device=token.device))[0][:, -1]
        self.token.copy_(token[:, None])
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model: GPT, prompt: list[int], num_tokens: int, num_samples: int, params: SamplingParams,
             seed: int, on_tokens: Callable[[Tensor], None] | None = None) -> Tensor:
    """`num_samples` continuations of `prompt`, (num_samples, num_tokens) token ids, using a KV cache.

    The same tokens as generate_reference for the same seed. `on_tokens` receives each new column of
    tokens as it is produced (for streaming to a terminal).
    """
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    device = model.lm_head.weight.device
    block_size = model.cfg.block_size
    generators = make_generators(seed, num_samples, device)
    seq = torch.empty(num_samples, len(prompt) + num_tokens, dtype=torch.long, device=device)
    seq[:, : len(prompt)] = torch.tensor(prompt, device=device)
    model.setup_kv_cache(num_samples)
    try:
        decode = _Decoder(model, num_samples, use_graph=device.type == "cuda" and num_tokens > 1)
        n = len(prompt)
        w = context_length(n, block_size)
        logits = _prefill(model, seq[:, n - w : n])
        for i in range(num_tokens):
            token = sample(logits, params, generators)
            seq[:, n] = token
            n += 1
            if on_tokens is not None:
                on_tokens(token)
            if i == num_tokens - 1:
                break
            next_w = context_length(n, block_size)
            logits = decode(token, w) if next_w == w + 1 else _prefill(model, seq[:, n - next_w : n])
            w = next_w
    finally:
        model.drop_kv_cache()
    return seq[:, len(prompt):]


def _prefill(model: GPT, window: Tensor) -> Tensor:
    positions = torch.arange(window.size(1), device=window.device)
    return model(window, input_pos=positions)[0][:, -1]
