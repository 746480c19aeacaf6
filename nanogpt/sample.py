"""The sample stage's work: load the checkpoint, check the prompt, generate, stream, write samples and speed."""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

import torch

from nanogpt import files, runtime
from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import SampleConfig
from nanogpt.errors import UserError, out_of_memory, warn
from nanogpt.generate import generate
from nanogpt.model import GPT
from nanogpt.quantize import quantize_int8, uses_int8
from nanogpt.sampling import SamplingParams
from nanogpt.tokenizer import Tokenizer, load_tokenizer

QUIET_TOKENS = 100_000  # a generation this long that does not stream to the terminal gets a warning


@dataclass(frozen=True)
class SampleRun:
    checkpoint: Path
    vocab: Path | None  # when given, the checkpoint's vocabulary must equal this one
    output: Path | None
    metrics: Path | None
    device: str


class Writable(Protocol):
    """Where text streams to: a terminal, or the samples file as it is written."""

    def write(self, text: str, /) -> object: ...
    def flush(self) -> object: ...


class TextStreamer:
    """Prints the text of a growing token sequence; holds back a cut-off UTF-8 character (BPE) until complete."""

    def __init__(self, tokenizer: Tokenizer, out: Writable) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.pending: list[int] = []  # tokens since the last point where the text ended on a whole character
        self.printed = 0  # characters of decode(pending) already written

    def __call__(self, tokens: torch.Tensor) -> None:
        """Print the new tokens (B, k) of the first sample."""
        self.pending.extend(tokens[0].tolist())
        text = self.tokenizer.decode(self.pending)
        # a cut-off final character decodes to U+FFFD; the whole characters before it are final, so print those
        whole = text.rstrip("\ufffd")
        if len(whole) > self.printed:
            self.out.write(whole[self.printed :])
            self.out.flush()
        self.printed = max(self.printed, len(whole))
        if whole == text:  # nothing cut off: later tokens start on a character boundary
            self.pending, self.printed = [], 0

    def finish(self) -> None:
        """Print what is held back, as decode has it: the text ends with the sequence."""
        self.out.write(self.tokenizer.decode(self.pending)[self.printed :])


def run_sampling(cfg: SampleConfig, run: SampleRun, stream: TextIO | None) -> list[str]:
    """Generate cfg.num_samples texts; stream the first to `stream`, write all to run.output. Return them.

    The output is written as it is generated (one sample; several are written once they are all there), into a
    temporary file beside run.output that takes its place at the end: a failed write stops the run with a
    UserError and leaves the old output as it was.
    """
    device = runtime.resolve_device(run.device, setting="--device")
    for path, what in ((run.output, "--output"), (run.metrics, "--metrics")):
        if path is not None:
            files.check_writable(path, what)  # now, not after the generation
    model, tokenizer = _load(run, device)
    if not cfg.prompt:
        raise UserError('sample.prompt is empty: give at least one character, e.g. --prompt "\\n"')
    prompt = tokenizer.encode(cfg.prompt)
    top_k = cfg.top_k
    if top_k is not None and top_k > tokenizer.vocab_size:
        print(f"note: sample.top_k ({top_k}) is larger than the vocabulary; clamped to {tokenizer.vocab_size}")
        top_k = tokenizer.vocab_size
    dtype = runtime.resolve_dtype("auto", device)  # bf16 (or fp16) on CUDA, fp32 elsewhere
    model = model.to(dtype)
    int8 = uses_int8(cfg.quantize, device)
    if int8:
        quantize_int8(model)
    params = SamplingParams(cfg.temperature, top_k, cfg.top_p)
    listeners: list[TextStreamer] = []
    if stream is not None and cfg.num_samples == 1:
        stream.write(cfg.prompt)
        listeners.append(TextStreamer(tokenizer, stream))
    elif cfg.num_tokens >= QUIET_TOKENS:
        warn(
            f"sample.num_tokens is {cfg.num_tokens:,} and nothing shows until all are generated (minutes to hours): "
            "lower sample.num_tokens for a quick look"
        )
    with _writing(run.output) as output:
        saver = None
        if output is not None and cfg.num_samples == 1:
            output.write(cfg.prompt)
            saver = TextStreamer(tokenizer, output)
            listeners.append(saver)
        clock = _ArrivalClock(listeners)
        launched = runtime.seconds_since_launch()
        with out_of_memory(
            f"generating {cfg.num_samples:,} samples of {cfg.num_tokens:,} tokens on {device}",
            "lower sample.num_samples (or sample.num_tokens)",
        ):
            tokens = generate(
                model, prompt, cfg.num_tokens, cfg.num_samples, params, cfg.seed, on_tokens=clock, compile=cfg.compile
            )
        runtime.synchronize(device)
        clock.finish()
        texts = [cfg.prompt + tokenizer.decode(row) for row in tokens.tolist()]
        if stream is not None:
            stream.write("\n" if cfg.num_samples == 1 else _join(texts))
        if saver is not None:
            saver.finish()
            saver.out.write("\n")
        elif output is not None:
            output.write(_join(texts))
    if run.metrics is not None:
        weights = "int8" if int8 else str(dtype).removeprefix("torch.")  # which path ran (sample.quantize: auto)
        files.write_json(run.metrics, {**clock.metrics(cfg.num_tokens, cfg.num_samples, launched), "weights": weights})
    return texts


def _load(run: SampleRun, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The checkpoint's model on `device` and its tokenizer, checked against run.vocab."""
    if not run.checkpoint.exists():
        raise UserError(
            f"checkpoint {run.checkpoint} not found: train a model first (`dvc repro`), "
            "or give the path of one with --checkpoint"
        )
    model, tokenizer, _ = load_checkpoint(run.checkpoint, device)
    if run.vocab is not None and load_tokenizer(run.vocab).to_dict() != tokenizer.to_dict():
        raise UserError(
            f"checkpoint {run.checkpoint} was trained with another vocabulary than {run.vocab}: rerun `dvc repro train`"
        )
    return model, tokenizer


@contextlib.contextmanager
def _writing(path: Path | None) -> Iterator[files.AtomicTextFile | None]:
    """The samples file being written (None: no file), in place once the block ends without an exception."""
    if path is None:
        yield None
        return
    with files.AtomicTextFile(path) as output:
        yield output


class _ArrivalClock:
    """Passes new tokens on (to the streamer, if any) and notes when they arrive, so that the metrics can tell
    the generation's set-up (caches, CUDA-graph capture, the first runs) from its steady decoding."""

    def __init__(self, listeners: list[TextStreamer]) -> None:
        self.listeners = listeners
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, tokens per sample) of the first arrival
        self.ended = self.started

    def __call__(self, tokens: torch.Tensor) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), tokens.size(1))
        for listener in self.listeners:
            listener(tokens)

    def finish(self) -> None:
        self.ended = time.perf_counter()

    def metrics(self, num_tokens: int, num_samples: int, launched: float | None) -> dict[str, float | int | None]:
        """tokens_per_sec: the whole generation (set-up included); decode_tokens_per_sec: the tokens after the
        first ones to arrive, over the time after their arrival; first_tokens_s: generation start to the first
        tokens; startup_s: process launch to generation start (Python, torch, checkpoint)."""
        total = self.ended - self.started
        first_time, first_count = self.first or (self.ended, num_tokens)
        rest = (num_tokens - first_count) * num_samples
        return {
            "tokens_per_sec": round(num_tokens * num_samples / max(total, 1e-9)),
            "decode_tokens_per_sec": round(rest / (self.ended - first_time))
            if rest and self.ended > first_time
            else None,
            "first_tokens_s": round(first_time - self.started, 3),
            "startup_s": round(launched, 3) if launched is not None else None,
            "num_tokens": num_tokens,
            "num_samples": num_samples,
        }


def _join(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0] + "\n"
    return "".join(f"=== sample {i + 1} ===\n{text}\n" for i, text in enumerate(texts))
