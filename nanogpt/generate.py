"""Generation with a KV cache: `generate`, and the Engine behind it (the cache's life, the decode phases, CUDA
graphs, the launch pipeline).

sampling.py has the sampling maths and the full-context reference generator, whose tokens these match.
A generation is a series of windows (sampling.context_length): `prefill` reads a window's context into the
cache and samples one token, then `decode_n_tokens` decodes one position at a time (`decode_one_token`) until
the cache is full or the tokens are all there. On CUDA the decode steps go in runs, each run length captured
once as a CUDA graph and replayed; the whole generation is launched ahead of the device, and the tokens come
back a run at a time. BENCHMARKS.md says what each of these is worth.
"""

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from nanogpt import runtime
from nanogpt.kernels import FusedDecodeCache, decode_attention_supported
from nanogpt.model import GPT, KVCache
from nanogpt.sampling import Noise, SamplingParams, context_length, sample


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

    The same tokens as sampling.generate_reference for the same seed. `on_tokens` receives the new tokens
    (num_samples, k) as they are produced, a few at a time (for streaming to a terminal). `compile` fuses
    the decode step's kernels with torch.compile (faster steps, slower start). To generate again without
    capturing the CUDA graphs again, keep an Engine and call its `generate`.
    """
    return Engine(model, num_samples, params, compile).generate(prompt, num_tokens, seed, on_tokens)


def new_kv_cache(model: GPT, batch_size: int) -> KVCache:
    """An empty cache for `batch_size` sequences of up to block_size positions of `model`, in its dtype on its
    device: one whose decode steps take the fused kernel (kernels.py) where it runs, a plain KVCache elsewhere."""
    dtype = model.lm_head.weight.dtype
    fused = decode_attention_supported(model.device, dtype, model.cfg.head_size)
    return (FusedDecodeCache if fused else KVCache)(model.cfg, batch_size, dtype, model.device)


class Launched(NamedTuple):
    """Tokens launched and on their way to the host: `length` tokens per sample, arriving in host buffer `slot`."""

    slot: int
    length: int


class Engine:
    """Generates from one model, at one batch size and sampling setting, with the KV cache it owns; each decode
    step feeds the model the previous step's token at the next cache position and samples the next token.

    Steps go in runs of a power of two, up to MAX_STEPS. On CUDA each run length is captured once as a CUDA
    graph and replayed, by this generation and the engine's later ones: one launch for all the small kernels of
    a run, where launching them one by one would leave the GPU waiting on the host. The graphs read the weights
    where they were at the capture: weights changed in place are seen, weights moved (model.to) make the engine
    start afresh.
    """

    MAX_STEPS = 32

    def __init__(self, model: GPT, batch_size: int, params: SamplingParams, compile: bool = False) -> None:
        self.model, self.batch_size, self.params = model, batch_size, params
        self.forward = runtime.compile(next_logits, dynamic=False) if compile else next_logits
        self._start_afresh()

    def _start_afresh(self) -> None:
        """A new cache and new static buffers, no graphs: for the model's weights as they are now, where they are."""
        self.device, self.use_graphs = self.model.device, self.model.device.type == "cuda"
        B, device = self.batch_size, self.device
        self.weights = self._weights()
        self.cache = new_kv_cache(self.model, B)
        # static inputs and outputs of the graphs: tokens[j] is step j's input, tokens[j + 1] its output
        self.tokens = torch.zeros(self.MAX_STEPS + 1, B, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.MAX_STEPS, dtype=torch.long, device=device)
        self.gumbel = torch.zeros(self.MAX_STEPS, B, self.model.vocab_size, device=device)
        # two host buffers for the tokens coming back, used in turn, and CUDA events that say they arrived
        self.host = [torch.empty(self.MAX_STEPS, B, dtype=torch.long, pin_memory=self.use_graphs) for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)] if self.use_graphs else []
        self.slot = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # one memory pool for all graphs: they never run at the same time
        self.pool: torch.cuda._POOL_HANDLE | None = None

    def _weights(self) -> tuple:
        """Where the model's weights are, and as what: what the graphs captured."""
        return tuple((p.data_ptr(), p.dtype, p.shape) for p in self.model.parameters())

    def generate(
        self, prompt: list[int], num_tokens: int, seed: int, on_tokens: Callable[[Tensor], None] | None = None
    ) -> Tensor:
        """batch_size continuations of `prompt`, (batch_size, num_tokens) token ids on the CPU: as the function
        `generate` promises."""
        if not prompt:
            raise ValueError("generation needs a prompt of at least one token")
        if self._weights() != self.weights:
            self._start_afresh()
        seq = torch.empty(self.batch_size, len(prompt) + num_tokens, dtype=torch.long)  # on the CPU, ordinary
        seq[:, : len(prompt)] = torch.tensor(prompt)
        # inference mode: lighter than no_grad on each operator a step runs, which counts on the CPU (BENCHMARKS.md)
        with torch.inference_mode():
            # fetch each launch's tokens after the next launch, so that the device always has work queued: at a
            # slide the prefill is launched while the last run of the window still decodes
            n, ahead = len(prompt), None  # tokens in seq so far, the launch not yet received
            for launched in self._launch(seq, len(prompt), seed):
                if ahead is not None:
                    n += self._receive(ahead, seq[:, n:], on_tokens)
                ahead = launched
            if ahead is not None:
                self._receive(ahead, seq[:, n:], on_tokens)
        return seq[:, len(prompt) :]

    def _launch(self, seq: Tensor, prompt_len: int, seed: int) -> Iterator[Launched]:
        """Launch the generation of seq[:, prompt_len:], window by window, without waiting for the device: fill
        the cache with the context (the prompt, or after a slide the last half block), then decode one position
        at a time until the cache is full or the tokens are all there."""
        block_size, num_tokens = self.model.cfg.block_size, seq.size(1) - prompt_len
        noise = Noise(seed, self.batch_size, self.model.vocab_size, self.device)
        # the same tokens, written there as they are sampled: prefills read them (on the CPU this is seq itself)
        on_device = seq.to(self.device)
        n = prompt_len  # tokens launched so far
        while n < seq.size(1):
            context = context_length(n, block_size)
            i = n - prompt_len  # index of the token to sample
            yield self.prefill(on_device[:, n - context : n], noise.for_tokens(i, 1)[0], out=on_device[:, n])
            steps = min(block_size - context, num_tokens - i - 1)
            gumbel = noise.for_tokens(i + 1, steps)
            yield from self.decode_n_tokens(context, gumbel, out=on_device[:, n + 1 : n + 1 + steps])
            n += 1 + steps

    def prefill(self, window: Tensor, gumbel: Tensor, out: Tensor) -> Launched:
        """Fill the cache with `window` (B, T) at positions 0..T-1 and sample the token after it, the input of
        the next `decode_n_tokens`; write it into `out` (B,) on the device too."""
        positions = torch.arange(window.size(1), device=window.device)
        sample(next_logits(self.model, window, positions, self.cache), self.params, gumbel, out=self.tokens[0])
        out.copy_(self.tokens[0])
        return self._send(self.tokens[:1])

    def decode_n_tokens(self, pos: int, gumbel: Tensor, out: Tensor) -> Iterator[Launched]:
        """Launch len(gumbel) decode steps from the last sampled token at cache position `pos`, in runs; write
        their tokens into `out` (B, len(gumbel)) on the device. Yields each run once it is launched, before it
        is done."""
        done = 0
        for n in _run_lengths(len(gumbel), self.MAX_STEPS):
            torch.arange(pos + done, pos + done + n, out=self.positions[:n])
            self.gumbel[:n].copy_(gumbel[done : done + n])
            if self.use_graphs:
                self._graph(n).replay()
            else:
                self._decode_run(n)
            out[:, done : done + n] = self.tokens[1 : n + 1].T
            launched = self._send(self.tokens[1 : n + 1])
            self.tokens[0].copy_(self.tokens[n])  # the input of the next run
            done += n
            yield launched

    def _decode_run(self, n: int) -> None:
        """Steps 0..n-1 of a run, from the graphs' static inputs to their static outputs."""
        for j in range(n):
            self.decode_one_token(j)

    def decode_one_token(self, j: int) -> None:
        """Step j of a run: the token after tokens[j], at cache position positions[j], into tokens[j + 1]."""
        logits = self.forward(self.model, self.tokens[j, :, None], self.positions[j : j + 1], self.cache)
        sample(logits, self.params, self.gumbel[j], out=self.tokens[j + 1])

    def _send(self, tokens: Tensor) -> Launched:
        """Start copying tokens (n, B) to a host buffer. The two buffers are used in turn, so a run's tokens can
        arrive while the caller still reads the last run's."""
        slot, self.slot = self.slot, 1 - self.slot
        self.host[slot][: len(tokens)].copy_(tokens, non_blocking=self.use_graphs)  # CUDA: the event says when
        if self.use_graphs:
            self.copied[slot].record(torch.cuda.current_stream(self.device))
        return Launched(slot, len(tokens))

    def _receive(self, launched: Launched, rest: Tensor, on_tokens: Callable[[Tensor], None] | None) -> int:
        """Wait for launched tokens to arrive, put them at the start of `rest` (B, L), the part of the sequence
        after the tokens received so far, and pass them on; return how many per sample. Receive in launch order,
        each before the launch after next (which reuses its host buffer)."""
        if self.use_graphs:
            self.copied[launched.slot].synchronize()
        new = rest[:, : launched.length]  # (B, length)
        new.copy_(self.host[launched.slot][: launched.length].T)
        if on_tokens is not None:
            on_tokens(new)  # a view of seq, an ordinary tensor outside inference mode too
        return launched.length

    def _graph(self, n: int) -> torch.cuda.CUDAGraph:
        if n not in self.graphs:
            with torch.cuda.device(self.device):  # the model's GPU, which need not be the current one
                self.graphs[n] = self._capture(n)
        return self.graphs[n]

    def _capture(self, n: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()  # captures run on a side stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # warm up outside the capture (kernels compiled and loaded, allocator and cuBLAS set up). Two steps
            # where the run has them: Triton specialises on the alignment of positions[j], which differs for odd
            # j. The inputs are set, so the steps write what the replay will write.
            for _ in range(1 if self.graphs else 2):
                self._decode_run(min(n, 2))
            # capture_begin/end rather than torch.cuda.graph(), which runs gc.collect() for every graph
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool)
            self._decode_run(n)
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = graph.pool()
        return graph


def next_logits(model: GPT, tokens: Tensor, positions: Tensor, kv_cache: KVCache) -> Tensor:
    """Next-token logits (B, V) after `tokens` (B, T) at cache positions `positions` (T,), through `kv_cache`."""
    return model(tokens, input_pos=positions, kv_cache=kv_cache)[0][:, -1]


def _run_lengths(steps: int, max_steps: int) -> list[int]:
    """Powers of two up to max_steps that add up to steps, shortest first: a window's first tokens come out
    soon, and its last run is a long one, behind which the next prefill is launched."""
    rest = steps % max_steps
    return [1 << b for b in range(rest.bit_length()) if rest >> b & 1] + [max_steps] * (steps // max_steps)
