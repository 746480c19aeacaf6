"""Token tensors, the training data (random batches drawn on the device, no host sync) and the exact validation
pass."""

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nanogpt import files
from nanogpt.errors import UserError
from nanogpt.tokenizer import Tokenizer, fingerprint, load_tokenizer

IGNORE = -100  # F.cross_entropy's default ignore_index


def save_tokens(path: Path | str, tokens: Tensor, tokenizer: Tokenizer) -> None:
    """Token ids, with the fingerprint of the tokenizer that made them, so that they are never read with another."""
    files.torch_save({"tokens": tokens, "tokenizer": fingerprint(tokenizer)}, path)


def load_tokens(path: Path | str, tokenizer: Tokenizer, vocab: Path | str) -> Tensor:
    """The 1-D integer tensor of token ids that save_tokens wrote to `path` with `tokenizer` (read from `vocab`)."""
    saved = files.torch_load(path, "token file")
    tokens = saved.get("tokens") if isinstance(saved, dict) else saved
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise UserError(f"token file {path} does not hold a 1-D tensor of token ids: rerun `dvc repro encode`")
    if not isinstance(saved, dict) or "tokenizer" not in saved:
        raise UserError(
            f"token file {path} does not say which tokenizer made it (an older encode): rerun `dvc repro encode`"
        )
    if saved["tokenizer"] != fingerprint(tokenizer):
        raise UserError(
            f"token file {path} was encoded with another tokenizer than {vocab} (from another run of the encode "
            "stage): rerun `dvc repro encode`"
        )
    return tokens


def get_batch(tokens: Tensor, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch_size` random windows of `block_size` tokens and their next-token targets, on tokens' device."""
    return windows(tokens, sample_starts(len(tokens), batch_size, block_size, generator), block_size)


def sample_starts(num_tokens: int, count: int, block_size: int, generator: torch.Generator) -> Tensor:
    """`count` random window starts, drawn on the generator's device (no host sync)."""
    return torch.randint(num_tokens - block_size, (count,), device=generator.device, generator=generator)


def windows(tokens: Tensor, starts: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets of the windows beginning at `starts`."""
    window = tokens[starts[:, None] + torch.arange(block_size + 1, device=tokens.device)].long()
    return window[:, :-1], window[:, 1:]


@dataclass(frozen=True)
class EvalSet:
    """Every target of a token split exactly once, as (N, block_size) inputs and targets."""

    x: Tensor
    y: Tensor

    @property
    def num_targets(self) -> int:
        return int((self.y != IGNORE).sum())


def eval_windows(tokens: Tensor, block_size: int) -> EvalSet:
    """Non-overlapping windows over `tokens`; a last window ending at the split's end scores only the tail
    the others missed, so each of the len(tokens) - 1 targets counts once."""
    n = len(tokens)
    if n < block_size + 1:
        raise UserError(
            f"model.block_size ({block_size}) needs at least {block_size + 1} tokens in the split, "
            f"which has {n}: lower model.block_size or raise encode.val_fraction"
        )
    full = (n - 1) // block_size
    starts = list(range(0, full * block_size, block_size))
    tail = (n - 1) - full * block_size
    if tail:
        starts.append(n - 1 - block_size)
    idx = torch.tensor(starts)[:, None] + torch.arange(block_size + 1)
    window = tokens[idx].long()
    x, y = window[:, :-1], window[:, 1:].clone()
    if tail:
        y[-1, : block_size - tail] = IGNORE
    return EvalSet(x, y)


@dataclass(frozen=True)
class TrainData:
    """The encoded splits: training tokens and validation windows on the device, and the tokenizer."""

    tokenizer: Tokenizer
    train_tokens: Tensor
    evalset: EvalSet
    tokens_per_char: float  # for bits per character: validation tokens over the characters they spell

    @staticmethod
    def files(folder: Path) -> list[Path]:
        """The files `load` reads: the encode stage's outputs."""
        return [folder / name for name in ("train.pt", "val.pt", "vocab.json")]

    @classmethod
    def load(cls, folder: Path, block_size: int, device: torch.device) -> "TrainData":
        """The splits in `folder`, checked against the vocabulary and `block_size` (a UserError naming the fix)."""
        train_path, val_path, vocab = cls.files(folder)
        tokenizer = load_tokenizer(vocab)
        train_tokens = load_tokens(train_path, tokenizer, vocab)
        val_tokens = load_tokens(val_path, tokenizer, vocab)
        _check_tokens(train_tokens, val_tokens, tokenizer.vocab_size, block_size, folder)
        evalset = eval_windows(val_tokens, block_size)
        first = tokenizer.decode(val_tokens[:1].tolist())
        predicted_chars = len(tokenizer.decode(val_tokens.tolist())) - len(first)
        tokens_per_char = evalset.num_targets / predicted_chars
        evalset = EvalSet(evalset.x.to(device), evalset.y.to(device))  # once, not a copy at every evaluation
        return cls(tokenizer, train_tokens.to(device), evalset, tokens_per_char)

    def batches(
        self, rng: torch.Generator, batch_size: int, micro_steps: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[Tensor, Tensor]]:
        """This rank's micro-batches of one optimizer step's random training windows.

        Every rank draws the whole step's windows from the same generator and takes its own slice, so N ranks
        x k micro-steps x batch b see exactly the windows of one process with batch N*k*b.
        """
        block_size = self.evalset.x.size(1)
        count = batch_size * micro_steps * world_size
        starts = sample_starts(len(self.train_tokens), count, block_size, rng)
        firsts = [(micro * world_size + rank) * batch_size for micro in range(micro_steps)]
        return [windows(self.train_tokens, starts[first : first + batch_size], block_size) for first in firsts]


def _check_tokens(train_tokens: Tensor, val_tokens: Tensor, vocab_size: int, block_size: int, data_dir: Path) -> None:
    for name, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise UserError(
                f"{data_dir}/{name}.pt has token ids beyond the {vocab_size}-token vocabulary in "
                f"{data_dir}/vocab.json: rerun `dvc repro encode`"
            )
    if len(train_tokens) <= block_size:
        raise UserError(
            f"model.block_size ({block_size}) needs more than {block_size} training tokens, the train "
            f"split has {len(train_tokens)}: lower model.block_size or use a longer text"
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: EvalSet,
    batch_size: int,
    autocast: contextlib.AbstractContextManager,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Sum of the loss in nats and the number of targets, over this rank's share of `data`.

    `max_batches` counts batches per rank, so N ranks with batch b cover the windows one process covers
    with batch N*b. Deterministic: the same windows in the same order every call. The caller all-reduces
    across ranks.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    batches = range(0, len(data.x), batch_size)
    if max_batches is not None:
        batches = batches[: max_batches * world_size]
    for i in batches[rank::world_size]:
        x, y = data.x[i : i + batch_size], data.y[i : i + batch_size]
        if len(x) < batch_size:  # pad the last batch: one shape for every batch, so nothing recompiles
            pad = batch_size - len(x)
            x = torch.cat([x, x.new_zeros(pad, x.size(1))])
            y = torch.cat([y, y.new_full((pad, y.size(1)), IGNORE)])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            _, loss = model(x, y)
        n = (y != IGNORE).sum()
        total += loss.double() * n
        count += n
    model.train(was_training)
    return total, count


def bits_per_char(loss_per_token: float, tokens_per_char: float) -> float:
    """Val loss in nats per token expressed as bits per character of the original text."""
    return loss_per_token * tokens_per_char / math.log(2)


def read_corpus(path: Path | str) -> str:
    """The UTF-8 text at `path`; an empty or non-UTF-8 file is a UserError."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro download` first") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not valid UTF-8 (byte {exc.start}): give a UTF-8 text file") from None
    if not text:
        raise UserError(f"{path} is empty: check data.url")
    return text
