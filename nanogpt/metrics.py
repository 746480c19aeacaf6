"""Metric series and summary in the layout DVC reads: TSV series for `dvc plots`, JSON for `dvc metrics`."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogpt import files

TRAIN_SERIES = "train_loss.tsv"  # step, train_loss, lr: one row per optimizer step
VAL_SERIES = "val_loss.tsv"  # step, val_loss, val_bpc, elapsed_s: one row per evaluation
SUMMARY = "train.json"


@dataclass
class MetricsLog:
    """Rows of the per-step and per-evaluation series; saved in the resume state so a resumed run continues them."""

    train_rows: list[tuple[int, float, float]] = field(default_factory=list)
    val_rows: list[tuple[int, float, float, float]] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return {"train_rows": self.train_rows, "val_rows": self.val_rows}

    @classmethod
    def from_state(cls, state: dict[str, Any], step: int) -> "MetricsLog":
        """The series up to and including `step`: rows past it were logged after the state was saved."""
        return cls(
            [tuple(r) for r in state["train_rows"] if r[0] <= step],
            [tuple(r) for r in state["val_rows"] if r[0] <= step],
        )

    def write(self, folder: Path | str, summary: dict[str, Any]) -> None:
        folder = Path(folder)
        files.write_text(folder / TRAIN_SERIES, _tsv(("step", "train_loss", "lr"), self.train_rows))
        files.write_text(folder / VAL_SERIES, _tsv(("step", "val_loss", "val_bpc", "elapsed_s"), self.val_rows))
        files.write_json(folder / SUMMARY, summary)


def _tsv(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["\t".join(header)]
    lines += ["\t".join(_fmt(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
