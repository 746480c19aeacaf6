"""Sampling: small pure functions, and the full-context reference generator (nanoGPT's way).

The fast generator, `nanogpt.generate.generate`, keeps a KV cache and replays CUDA graphs. Both generators see
the same context for every new token (`context_length`), draw the same noise from one seeded generator per
sample (`Noise`), and so produce the same tokens; the cached one does a fraction of the work.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nanogpt.model import GPT

# A guard for callers of these functions (the stages' params stop at config.MIN_TEMPERATURE before): temperatures
# below this one sample as this one does, the most likely token but for near-ties. 1 / T of a
# smaller one overflows float32 on the way to the logits (1e-40 cannot be divided by at all).
TEMPERATURE_FLOOR = 1e-8


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # 0 is greedy
    top_k: int | None
    top_p: float | None


def context_length(n: int, block_size: int) -> int:
    """How many of the last `n` tokens the model sees when predicting token n + 1.

    Up to block_size, all of them. Past it, the context restarts at position 0, as the model knows positions
    0..block_size-1 only (its rotary angles or learned embeddings), so a cache cannot slide: when it is full the
    last `block_size // 2` tokens are re-read into it (one prefill) and it fills again.
    """
    if n <= block_size:
        return n
    keep = max(1, block_size // 2)
    return keep + (n - block_size - 1) % (block_size - keep + 1)


def filtered_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Log-probabilities (B, V) up to a constant per row: logits / temperature, then top-k, then top-p
    (nucleus) filtering, the filtered-out tokens at -inf.

    top_k larger than the vocabulary keeps the whole vocabulary. top-p keeps the smallest set of most
    likely tokens whose probability reaches top_p.
    """
    logits = logits.float() / max(params.temperature, TEMPERATURE_FLOOR)
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
        drop = before >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The probabilities (B, V) that `sample` draws from."""
    return torch.softmax(filtered_logits(logits, params), dim=-1)


def sample(logits: Tensor, params: SamplingParams, gumbel: Tensor, out: Tensor | None = None) -> Tensor:
    """One token id per row of `logits` (B, V), given standard Gumbel noise of the same shape; into `out`
    (B,) when given.

    argmax(log p + G) with G ~ Gumbel(0, 1) is a draw from p (the Gumbel-max trick: no host sync, and
    no softmax, since log p needs no normalising constant).
    """
    if params.temperature == 0:
        scores = logits
    elif _unfiltered(params, logits.size(-1)):
        scores = torch.add(gumbel, logits, alpha=1 / max(params.temperature, TEMPERATURE_FLOOR))  # logits / T + G
    else:
        scores = filtered_logits(logits, params) + gumbel
    return torch.argmax(scores, dim=-1, out=out)


def _unfiltered(params: SamplingParams, vocab_size: int) -> bool:
    """Whether top-k and top-p keep every token."""
    return (params.top_k is None or params.top_k >= vocab_size) and (params.top_p is None or params.top_p >= 1.0)


class Noise:
    """The random numbers of a generation, standard Gumbel: row b comes from its own generator seeded
    `seed + b`, so a sample does not depend on the batch it is in. They are drawn in blocks of CHUNK tokens
    (one launch per row per block), so token i gets the same numbers however the tokens are asked for."""

    CHUNK = 512

    def __init__(self, seed: int, num_samples: int, vocab_size: int, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed + b) for b in range(num_samples)]
        self.vocab_size, self.device = vocab_size, device
        self.buffer = torch.empty(0, num_samples, vocab_size, device=device)
        self.start = 0  # the buffer holds tokens start .. start + len(buffer) - 1: all drawn and not dropped

    def for_tokens(self, i: int, n: int) -> Tensor:
        """Noise (n, B, V) for new tokens i .. i + n - 1; tokens must be asked for in increasing order."""
        while self.start + len(self.buffer) < i + n:
            drop = min(i - self.start, len(self.buffer))
            exponential = torch.stack(
                [
                    torch.empty(self.CHUNK, self.vocab_size, device=self.device).exponential_(generator=g)
                    for g in self.generators
                ],
                dim=1,
            )
            gumbel = exponential.clamp_(min=torch.finfo(exponential.dtype).tiny).log_().neg_()
            self.buffer = torch.cat([self.buffer[drop:], gumbel])
            self.start += drop
        return self.buffer[i - self.start : i - self.start + n]


@torch.no_grad()
def generate_reference(
    model: GPT, prompt: list[int], num_tokens: int, num_samples: int, params: SamplingParams, seed: int
) -> Tensor:
    """Recompute the whole context for every new token (nanoGPT's way): slow, simple, the yardstick.
    Returns (num_samples, num_tokens) token ids on the CPU, as generate.generate does."""
    noise = Noise(seed, num_samples, model.vocab_size, model.device)
    seq = torch.tensor([prompt] * num_samples, dtype=torch.long, device=model.device)
    for i in range(num_tokens):
        context = context_length(seq.size(1), model.cfg.block_size)
        logits, _ = model(seq[:, -context:])
        seq = torch.cat([seq, sample(logits[:, -1], params, noise.for_tokens(i, 1)[0])[:, None]], dim=1)
    return seq[:, len(prompt) :].cpu()
