"""The decode engine behind `generate`: the KV cache's life, the decode phases, CUDA graphs, the launch pipeline.

generate.py has the sampling maths and the full-context reference generator, whose tokens this one matches.
A generation is a series of windows (generate.context_length): `prefill` reads a window's context into the
cache and samples one token, then `decode_n_tokens` decodes one position at a time (`decode_one_token`) until
the cache is full or the tokens are all there. On CUDA the decode steps go in runs, each run length captured
once as a CUDA graph and replayed; the whole generation is launched ahead of the device, and the tokens come
back a run at a time. BENCHMARKS.md says what each of these is worth.
"""

import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from nanogpt.generate import Noise, SamplingParams, context_length, sample
from nanogpt.model import GPT, KVCache


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
    # inference mode: lighter than no_grad on each operator a step runs, which counts on the CPU (BENCHMARKS.md)
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
    num_tokens = seq.size(1) - prompt_len
    noise = Noise(seed, num_samples, model.vocab_size, model.device)
    # the same tokens, written there as they are sampled: prefills read them (on the CPU this is seq itself)
    on_device = seq.to(model.device)
    decoder = _ready_decoder(model, num_samples, params, compile)

    def launches() -> Iterator[tuple[int, int]]:
        """Launch the whole generation, window by window, without waiting for the device: fill the cache with
        the context (the prompt, or after a slide the last half block), then decode one position at a time
        until the cache is full or the tokens are all there."""
        n = prompt_len  # tokens launched so far
        while n < seq.size(1):
            context = context_length(n, model.cfg.block_size)
            i = n - prompt_len  # index of the token to sample
            yield decoder.prefill(model, on_device[:, n - context : n], noise.for_tokens(i, 1)[0], out=on_device[:, n])
            steps = min(model.cfg.block_size - context, num_tokens - i - 1)
            gumbel = noise.for_tokens(i + 1, steps)
            yield from decoder.decode_n_tokens(model, context, gumbel, out=on_device[:, n + 1 : n + 1 + steps])
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
        model.use_kv_cache(None)


def setup_kv_cache(model: GPT, batch_size: int) -> KVCache:
    """Put a new cache for `batch_size` sequences of up to block_size positions in place in the model; return it."""
    cache = KVCache(model.cfg, batch_size, model.lm_head.weight.dtype, model.device)
    model.use_kv_cache(cache)
    return cache


class _Decoder:
    """The decode phases with the KV cache they use: each decode step feeds the model the previous step's token
    at the next cache position and samples the next token. Steps go in runs of a power of two, up to MAX_STEPS.
    On CUDA each run length is captured once as a CUDA graph and replayed: one launch for all the small kernels
    of a run, where launching them one by one would leave the GPU waiting on the host."""

    MAX_STEPS = 32

    def __init__(self, model: GPT, batch_size: int, params: SamplingParams, compile: bool) -> None:
        device = model.device
        # the model is passed to each call, never stored: a kept decoder must not keep its model alive
        self.forward, self.params = torch.compile(_next_logits, dynamic=False) if compile else _next_logits, params
        self.cache = setup_kv_cache(model, batch_size)
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
        """Fill the cache with `window` (B, T) at positions 0..T-1 and sample the token after it, the input of
        the next `decode_n_tokens`; write it into `out` (B,) on the device too. Returns the token's handle for
        `fetch`."""
        positions = torch.arange(window.size(1), device=window.device)
        sample(_next_logits(model, window, positions), self.params, gumbel, out=self.tokens[0])
        out.copy_(self.tokens[0])
        return self._send(self.tokens[:1])

    def decode_n_tokens(self, model: GPT, pos: int, gumbel: Tensor, out: Tensor) -> Iterator[tuple[int, int]]:
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
                self._decode_run(model, n)
            out[:, done : done + n] = self.tokens[1 : n + 1].T
            handle = self._send(self.tokens[1 : n + 1])
            self.tokens[0].copy_(self.tokens[n])  # the input of the next run
            done += n
            yield handle

    def _decode_run(self, model: GPT, n: int) -> None:
        """Steps 0..n-1 of a run, from the graphs' static inputs to their static outputs."""
        for j in range(n):
            self._decode_one_token(model, j)

    def _decode_one_token(self, model: GPT, j: int) -> None:
        """Step j of a run: the token after tokens[j], at cache position positions[j], into tokens[j + 1]."""
        logits = self.forward(model, self.tokens[j, :, None], self.positions[j : j + 1])
        sample(logits, self.params, self.gumbel[j], out=self.tokens[j + 1])

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
                self._decode_run(model, min(n, 2))
            # capture_begin/end rather than torch.cuda.graph(), which runs gc.collect() for every graph
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool)
            self._decode_run(model, n)
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = graph.pool()
        return graph


def _next_logits(model: GPT, tokens: Tensor, positions: Tensor) -> Tensor:
    """Next-token logits (B, V) after `tokens` (B, T) at cache positions `positions` (T,)."""
    return model(tokens, input_pos=positions)[0][:, -1]


# On CUDA the last decoder of each model is kept, so that its next generation with the same batch size and
# settings replays the graphs this one captured. The key holds the weights' addresses: graphs read them there.
_kept_decoders: weakref.WeakKeyDictionary[GPT, tuple[tuple, _Decoder]] = weakref.WeakKeyDictionary()


def _ready_decoder(model: GPT, batch_size: int, params: SamplingParams, compile: bool) -> _Decoder:
    """A decoder, the kept one where it fits, whose KV cache is in place in the model."""
    key = (batch_size, params, compile, tuple((p.data_ptr(), p.dtype, p.shape) for p in model.parameters()))
    kept = _kept_decoders.get(model)
    if kept is not None and kept[0] == key:
        model.use_kv_cache(kept[1].cache)
        return kept[1]
    decoder = _Decoder(model, batch_size, params, compile)
    if decoder.use_graphs:
        _kept_decoders[model] = (key, decoder)
    return decoder


def _run_lengths(steps: int, max_steps: int) -> list[int]:
    """Powers of two up to max_steps that add up to steps, shortest first: a window's first tokens come out
    soon, and its last run is a long one, behind which the next prefill is launched."""
    rest = steps % max_steps
    return [1 << b for b in range(rest.bit_length()) if rest >> b & 1] + [max_steps] * (steps // max_steps)
