"""Sampling: small pure functions, a full-context reference generator and the KV-cached generator.

Both generators see the same context for every new token (`context_length`), draw the same noise from
one seeded generator per sample, and so produce the same tokens; the cached one does a fraction of the work.
"""

import math
import weakref
from collections.abc import Callable, Iterator
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


def filtered_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Log-probabilities (B, V) up to a constant per row: logits / temperature, then top-k, then top-p
    (nucleus) filtering, the filtered-out tokens at -inf.

    top_k larger than the vocabulary keeps the whole vocabulary. top-p keeps the smallest set of most
    likely tokens whose probability reaches top_p.
    """
    logits = logits.float() / max(params.temperature, 1e-8)
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
        scores = torch.add(gumbel, logits, alpha=1 / params.temperature)  # logits / T + G in one kernel
    else:
        scores = filtered_logits(logits, params) + gumbel
    return torch.argmax(scores, dim=-1, out=out)


def _unfiltered(params: SamplingParams, vocab_size: int) -> bool:
    """Whether top-k and top-p keep every token."""
    return (params.top_k is None or params.top_k >= vocab_size) and (params.top_p is None or params.top_p >= 1.0)


class Noise:
    """The random numbers of a generation, standard Gumbel: row b comes from its own generator seeded
    `seed + b`, so a sample does not depend on the batch it is in. They are drawn in blocks of CHUNK steps
    (one launch per row per block), so step i gets the same numbers however the steps are asked for."""

    CHUNK = 512

    def __init__(self, seed: int, num_samples: int, vocab_size: int, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed + b) for b in range(num_samples)]
        self.vocab_size, self.device = vocab_size, device
        self.buffer = torch.empty(0, num_samples, vocab_size, device=device)
        self.start = 0  # the buffer holds steps start .. start + len(buffer) - 1: every step drawn and not dropped

    def steps(self, i: int, n: int) -> Tensor:
        """Noise (n, B, V) for new tokens i .. i + n - 1; steps must be asked for in increasing order."""
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
    Returns (num_samples, num_tokens) token ids on the CPU, as generate does."""
    device = model.lm_head.weight.device
    noise = Noise(seed, num_samples, model.vocab_size, device)
    seq = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    for i in range(num_tokens):
        w = context_length(seq.size(1), model.cfg.block_size)
        logits, _ = model(seq[:, -w:])
        seq = torch.cat([seq, sample(logits[:, -1], params, noise.steps(i, 1)[0])[:, None]], dim=1)
    return seq[:, len(prompt) :].cpu()


class _Decoder:
    """Cached decode steps with the KV caches they use: each step feeds the model the previous step's token at
    the next cache position and samples the next token. Steps go in runs of a power of two, up to MAX_STEPS.
    On CUDA each run length is captured once as a CUDA graph and replayed: one launch for up to
    MAX_STEPS x ~80 small kernels, where launching them one by one would leave the GPU waiting on the host."""

    MAX_STEPS = 32

    def __init__(self, model: GPT, batch_size: int, params: SamplingParams, compile: bool) -> None:
        device = model.lm_head.weight.device
        # the model is passed to each call, never stored: a kept decoder must not keep its model alive
        self.forward, self.params = torch.compile(_next_logits, dynamic=False) if compile else _next_logits, params
        self.caches = model.setup_kv_cache(batch_size)
        # static inputs and outputs of the graphs: tokens[j] is step j's input, tokens[j + 1] its output
        self.tokens = torch.zeros(self.MAX_STEPS + 1, batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.MAX_STEPS, dtype=torch.long, device=device)
        self.gumbel = torch.zeros(self.MAX_STEPS, batch_size, model.vocab_size, device=device)
        self.device, self.use_graphs = device, device.type == "cuda"
        self.host = [
            torch.empty(self.MAX_STEPS, batch_size, dtype=torch.long, pin_memory=self.use_graphs) for _ in range(2)
        ]
        self.copied = [torch.cuda.Event() for _ in range(2)] if self.use_graphs else []
        self.slot = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # one memory pool for all graphs: they never run at the same time
        self.pool: torch.cuda._POOL_HANDLE | None = None

    def prefill(self, model: GPT, window: Tensor, gumbel: Tensor, out: Tensor) -> tuple[int, int]:
        """Fill the caches with `window` (B, w) at positions 0..w-1 and sample the token after it, the input of
        the next `steps`; write it into `out` (B,) on the device too. Returns the token's handle for `fetch`."""
        positions = torch.arange(window.size(1), device=window.device)
        sample(_next_logits(model, window, positions), self.params, gumbel, out=self.tokens[0])
        out.copy_(self.tokens[0])
        return self._send(self.tokens[:1])

    def steps(self, model: GPT, pos: int, gumbel: Tensor, out: Tensor) -> Iterator[tuple[int, int]]:
        """Launch len(gumbel) decode steps from the last sampled token at cache position `pos`, in runs; write
        their tokens into `out` (B, len(gumbel)) on the device. Yields each run's handle for `fetch` once the
        run is launched, before it is done."""
        done = 0
        for n in _run_lengths(len(gumbel), self.MAX_STEPS):
            torch.arange(pos + done, pos + done + n, out=self.positions[:n])
            self.gumbel[:n].copy_(gumbel[done : done + n])
            if self.use_graphs:
                self._graph(model, n).replay()
            else:
                self._steps(model, n)
            out[:, done : done + n] = self.tokens[1 : n + 1].T
            handle = self._send(self.tokens[1 : n + 1])
            self.tokens[0].copy_(self.tokens[n])  # the input of the next run
            done += n
            yield handle

    def _send(self, tokens: Tensor) -> tuple[int, int]:
        """Start copying tokens (n, B) to a host buffer; return (buffer, n). The two buffers are used in turn, so
        a run's tokens can arrive while the caller still reads the last run's."""
        slot, self.slot = self.slot, 1 - self.slot
        self.host[slot][: len(tokens)].copy_(tokens, non_blocking=self.use_graphs)  # CUDA: the event says when
        if self.use_graphs:
            self.copied[slot].record(torch.cuda.current_stream(self.device))
        return slot, len(tokens)

    def fetch(self, handle: tuple[int, int]) -> Tensor:
        """The tokens (n, B) of a handle, on the CPU, once they are there; fetch each handle in launch order,
        before the launch after next."""
        slot, n = handle
        if self.use_graphs:
            self.copied[slot].synchronize()
        return self.host[slot][:n].clone()

    def _steps(self, model: GPT, n: int) -> None:
        for j in range(n):
            logits = self.forward(model, self.tokens[j, :, None], self.positions[j : j + 1])
            sample(logits, self.params, self.gumbel[j], out=self.tokens[j + 1])

    def _graph(self, model: GPT, n: int) -> torch.cuda.CUDAGraph:
        if n not in self.graphs:
            with torch.cuda.device(self.device):  # the model's GPU, which need not be the current one
                self.graphs[n] = self._capture(model, n)
        return self.graphs[n]

    def _capture(self, model: GPT, n: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()  # captures run on a side stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # warm up outside the capture (kernels compiled and loaded, allocator and cuBLAS set up). Two steps
            # where the run has them: Triton specialises on the alignment of positions[j], which differs for odd
            # j. The inputs are set, so the steps write what the replay will write.
            for _ in range(1 if self.graphs else 2):
                self._steps(model, min(n, 2))
            # capture_begin/end rather than torch.cuda.graph(), which runs gc.collect() for every graph
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool)
            self._steps(model, n)
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = graph.pool()
        return graph


def _next_logits(model: GPT, tokens: Tensor, positions: Tensor) -> Tensor:
    """Next-token logits (B, V) after `tokens` (B, T) at cache positions `positions` (T,)."""
    return model(tokens, input_pos=positions)[0][:, -1]


# On CUDA the last decoder of each model is kept, so that its next generation with the same batch size and
# settings replays the graphs this one captured. The key holds the weights' addresses: graphs read them there.
_kept: weakref.WeakKeyDictionary[GPT, tuple[tuple, _Decoder]] = weakref.WeakKeyDictionary()


def _decoder(model: GPT, batch_size: int, params: SamplingParams, compile: bool) -> _Decoder:
    """A decoder whose KV caches are in place in the model."""
    key = (batch_size, params, compile, tuple((p.data_ptr(), p.dtype, p.shape) for p in model.parameters()))
    kept = _kept.get(model)
    if kept is not None and kept[0] == key:
        model.attach_kv_cache(kept[1].caches)
        return kept[1]
    decoder = _Decoder(model, batch_size, params, compile)
    if decoder.use_graphs:
        _kept[model] = (key, decoder)
    return decoder


def generate(
    model: GPT,
    prompt: list[int],
    num_tokens: int,
    num_samples: int,
    params: SamplingParams,
    seed: int,
    on_tokens: Callable[[Tensor], None] | None = None,
    compile: bool = False,
) -> Tensor:
    """`num_samples` continuations of `prompt`, (num_samples, num_tokens) token ids on the CPU, using a KV cache.

    The same tokens as generate_reference for the same seed. `on_tokens` receives the new tokens
    (num_samples, k) as they are produced, a few at a time (for streaming to a terminal). `compile` fuses
    the decode step's kernels with torch.compile (faster steps, slower start).
    """
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    seq = torch.empty(num_samples, len(prompt) + num_tokens, dtype=torch.long)  # on the CPU, an ordinary tensor
    seq[:, : len(prompt)] = torch.tensor(prompt)
    # inference mode is lighter than no_grad on each of the ~200 operators a CPU step runs: ~10% faster there
    with torch.inference_mode():
        _generate(model, seq, len(prompt), num_samples, params, seed, on_tokens, compile)
    return seq[:, len(prompt) :]


def _generate(
    model: GPT,
    seq: Tensor,
    prompt_len: int,
    num_samples: int,
    params: SamplingParams,
    seed: int,
    on_tokens: Callable[[Tensor], None] | None,
    compile: bool,
) -> None:
    """Fill seq[:, prompt_len:] with new tokens."""
    device = model.lm_head.weight.device
    num_tokens = seq.size(1) - prompt_len
    noise = Noise(seed, num_samples, model.vocab_size, device)
    # the same tokens, written there as they are sampled: prefills read them (on the CPU this is seq itself)
    on_device = seq.to(device)
    decoder = _decoder(model, num_samples, params, compile)

    def launches() -> Iterator[tuple[int, int]]:
        """Launch the whole generation, window by window, without waiting for the device: fill the cache with
        the context (the prompt, or after a slide the last half block), then decode one position at a time
        until the cache is full or the tokens are all there."""
        n = prompt_len  # tokens launched so far
        while n < seq.size(1):
            w = context_length(n, model.cfg.block_size)
            i = n - prompt_len  # index of the token to sample
            yield decoder.prefill(model, on_device[:, n - w : n], noise.steps(i, 1)[0], out=on_device[:, n])
            steps = min(model.cfg.block_size - w, num_tokens - i - 1)
            yield from decoder.steps(model, w, noise.steps(i + 1, steps), out=on_device[:, n + 1 : n + 1 + steps])
            n += 1 + steps

    n = prompt_len  # tokens in seq so far

    def emit(handle: tuple[int, int]) -> None:
        nonlocal n
        tokens = decoder.fetch(handle).T  # (num_samples, k)
        k = tokens.size(1)
        seq[:, n : n + k] = tokens
        if on_tokens is not None:
            on_tokens(seq[:, n : n + k])  # a view of seq, an ordinary tensor outside inference mode too
        n += k

    try:
        # fetch each launch's tokens after the next launch, so that the device always has work queued: at a
        # slide the prefill is launched while the last run of the window still decodes
        ahead = None
        for handle in launches():
            if ahead is not None:
                emit(ahead)
            ahead = handle
        if ahead is not None:
            emit(ahead)
    finally:
        model.drop_kv_cache()


def _run_lengths(steps: int, max_steps: int) -> list[int]:
    """Powers of two up to max_steps that add up to steps, shortest first: a window's first tokens come out
    soon, and its last run is a long one, behind which the next prefill is launched."""
    rest = steps % max_steps
    return [1 << b for b in range(rest.bit_length()) if rest >> b & 1] + [max_steps] * (steps // max_steps)
