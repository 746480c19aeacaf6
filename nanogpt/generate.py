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


def sample(logits: Tensor, params: SamplingParams, noise: Tensor) -> Tensor:
    """One token id per row of `logits` (B, V), given Exponential(1) noise of the same shape.

    argmax(p / E) with E ~ Exponential(1) is a draw from p (a multinomial draw without a host sync).
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return (logits_to_probs(logits, params) / noise).argmax(dim=-1)


class Noise:
    """The random numbers of a generation: row b comes from its own generator seeded `seed + b`, so a
    sample does not depend on the batch it is in; drawn in chunks of steps, so there is one launch per
    row per chunk instead of per token."""

    CHUNK = 512

    def __init__(self, seed: int, num_samples: int, vocab_size: int, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed + b) for b in range(num_samples)]
        self.vocab_size, self.device = vocab_size, device
        self.chunk, self.start = torch.empty(0), 0

    def step(self, i: int) -> Tensor:
        """Noise (B, V) for new token i; steps must be asked for in increasing order."""
        if not self.start <= i < self.start + len(self.chunk):
            self.start = i
            self.chunk = torch.stack([torch.empty(self.CHUNK, self.vocab_size, device=self.device)
                                      .exponential_(generator=g) for g in self.generators], dim=1)
        return self.chunk[i - self.start]


@torch.no_grad()
def generate_reference(model: GPT, prompt: list[int], num_tokens: int, num_samples: int,
                       params: SamplingParams, seed: int) -> Tensor:
    """Recompute the whole context for every new token (nanoGPT's way): slow, simple, the yardstick."""
    device = model.lm_head.weight.device
    noise = Noise(seed, num_samples, model.vocab_size, device)
    seq = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    for i in range(num_tokens):
        w = context_length(seq.size(1), model.cfg.block_size)
        logits, _ = model(seq[:, -w:])
        seq = torch.cat([seq, sample(logits[:, -1], params, noise.step(i))[:, None]], dim=1)
    return seq[:, len(prompt):]


class _Decoder:
    """One cached step: the model on one new position, then sampling. On CUDA it is captured once as a
    graph and replayed, which removes the launch overhead of its ~100 small kernels."""

    def __init__(self, model: GPT, batch_size: int, params: SamplingParams, use_graph: bool,
                 compile: bool = False) -> None:
        device = model.lm_head.weight.device
        self.model, self.params = torch.compile(model, dynamic=False) if compile else model, params
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.noise = torch.ones(batch_size, model.vocab_size, device=device)
        self.graph = None
        if use_graph:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and allocator outside the capture
                    self._step()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_token = self._step()

    def _step(self) -> Tensor:
        logits = self.model(self.token[:, None], input_pos=self.pos)[0][:, -1]
        return sample(logits, self.params, self.noise)

    def __call__(self, token: Tensor, pos: int, noise: Tensor) -> Tensor:
        """The next token after `token`, which sits at cache position `pos`."""
        self.token.copy_(token)
        self.pos.fill_(pos)
        self.noise.copy_(noise)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.next_token.clone()


@torch.no_grad()
def generate(model: GPT, prompt: list[int], num_tokens: int, num_samples: int, params: SamplingParams,
             seed: int, on_tokens: Callable[[Tensor], None] | None = None, compile: bool = False) -> Tensor:
    """`num_samples` continuations of `prompt`, (num_samples, num_tokens) token ids, using a KV cache.

    The same tokens as generate_reference for the same seed. `on_tokens` receives each new column of
    tokens as it is produced (for streaming to a terminal). `compile` fuses the decode step's kernels with
    torch.compile (faster steps, slower start).
    """
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    device = model.lm_head.weight.device
    block_size = model.cfg.block_size
    noise = Noise(seed, num_samples, model.vocab_size, device)
    seq = torch.empty(num_samples, len(prompt) + num_tokens, dtype=torch.long, device=device)
    seq[:, : len(prompt)] = torch.tensor(prompt, device=device)
    model.setup_kv_cache(num_samples)
    try:
        decode = _Decoder(model, num_samples, params, use_graph=device.type == "cuda" and num_tokens > 1,
                          compile=compile)
        n = len(prompt)
        w = context_length(n, block_size)
        token = sample(_prefill(model, seq[:, n - w : n]), params, noise.step(0))
        for i in range(num_tokens):
            seq[:, n] = token
            n += 1
            if on_tokens is not None:
                on_tokens(token)
            if i == num_tokens - 1:
                break
            next_w = context_length(n, block_size)
            if next_w == w + 1:
                token = decode(token, w, noise.step(i + 1))
            else:
                token = sample(_prefill(model, seq[:, n - next_w : n]), params, noise.step(i + 1))
            w = next_w
    finally:
        model.drop_kv_cache()
    return seq[:, len(prompt):]


def _prefill(model: GPT, window: Tensor) -> Tensor:
    positions = torch.arange(window.size(1), device=window.device)
    return model(window, input_pos=positions)[0][:, -1]
