"""The BPE tokenizer option end to end: a fair bits-per-character metric, DVC invalidation, prompts with unseen
characters, and a stream printer that never cuts a UTF-8 character.

Three layers, cheapest first:
- the stream printer (nanogpt.sample.TextStreamer) fed hand-picked token ids;
- a tiny project per tokenizer, encoded by the real encode stage and trained in-process for a few steps with
  every evaluation over the whole validation split, whose val_bpc is recomputed by hand from the checkpoint;
- the real `dvc` CLI on the session's reproduced char project, switched to BPE with `dvc exp run -S`.
"""

import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from tokenizers import Tokenizer as HfTokenizer

from conftest import (
    PROJECT_ROOT,
    STAGES,
    TINY_PARAMS,
    copy_project,
    dvc,
    make_corpus,
    output,
    ran_stages,
    restored_stages,
    skipped_stages,
    write_params,
)
from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import load_config
from nanogpt.sample import SampleRun, TextStreamer, run_sampling
from nanogpt.tokenizer import BpeTokenizer, load_tokenizer
from nanogpt.train import TrainPaths, train

LN2 = math.log(2)
VAL_FRACTION = 0.1
# Never in the corpus below: the BPE vocabulary has only their bytes, the char vocabulary lacks them.
UNSEEN_PROMPT = "Ωμέγα 😀 says"
UNSEEN_CHARS = "Ωμέγα😀"
# One thread per process: the models are tiny, and on a busy 2-core machine two threads each take 2-3x longer.
STAGE_ENV = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def read_tsv(path: Path) -> list[dict[str, float]]:
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    names = header.split("\t")
    return [dict(zip(names, map(float, row.split("\t")), strict=True)) for row in rows]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the stream printer


def byte_tokens() -> BpeTokenizer:
    """A BPE vocabulary learnt from ASCII only: any other character encodes as one token per UTF-8 byte."""
    return BpeTokenizer.fit("the cat sat on the mat, and the rat sat on the hat.\n" * 40, vocab_size=300)


class Recorder(io.StringIO):
    """A text stream that remembers what had been written after each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


@pytest.mark.parametrize("char", ["é", "€", "😀"], ids=["2 bytes", "3 bytes", "4 bytes"])
def test_streamer_holds_back_a_character_until_its_last_byte(char: str) -> None:
    tok = byte_tokens()
    start, split = tok.encode("at "), tok.encode(char)
    assert len(split) == len(char.encode("utf-8")), "the character should need one token per byte"
    ids = start + split + tok.encode(" on")
    out = io.StringIO()
    streamer = TextStreamer(tok, out)
    written = []

    for token in ids:
        streamer(torch.tensor([[token]]))
        written.append(out.getvalue())

    # after "at " and each byte but the last, nothing of the character is out; after its last byte, all of it
    assert written[len(start) - 1 : len(start) + len(split) - 1] == ["at "] * len(split)
    assert written[len(start) + len(split) - 1] == f"at {char}"
    assert written[-1] == f"at {char} on"
    for text in written:
        assert "\ufffd" not in text
        text.encode("utf-8", errors="strict")


def test_streamer_writes_whole_characters_of_a_multibyte_word() -> None:
    tok = byte_tokens()
    word = "Ωμέγα 😀"
    out = Recorder()
    streamer = TextStreamer(tok, out)

    for token in tok.encode(word):
        streamer(torch.tensor([[token]]))

    assert out.getvalue() == word
    # every flush left whole characters, one more each time: Ω, Ωμ, Ωμέ, ... (never a replacement character)
    assert out.flushed == [word[:i] for i in range(1, len(word) + 1)]


def test_streamer_prints_whole_characters_that_share_a_token_with_a_cut_off_one() -> None:
    # one merge, the most frequent pair: a space and the first byte of the accented letter after it
    tok = BpeTokenizer.fit("a à b é c è d ê e ô f â g î h û " * 20, vocab_size=257)
    space_and_lead_byte, last_byte = tok.encode(" à")
    assert tok.decode([space_and_lead_byte]) == " \ufffd"
    out = io.StringIO()
    streamer = TextStreamer(tok, out)

    for token in tok.encode("la"):
        streamer(torch.tensor([[token]]))
    streamer(torch.tensor([[space_and_lead_byte]]))
    assert out.getvalue() == "la "  # the space is whole: out now, not held back with the cut-off "à"
    streamer(torch.tensor([[last_byte]]))
    assert out.getvalue() == "la à"


def test_streamer_output_is_always_a_prefix_of_the_decoded_text() -> None:
    """Random token ids (invalid byte sequences included): what is written never has to be taken back, and
    it lags the decoded text by at most a run of trailing replacement characters."""
    tok = byte_tokens()
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(40)]
        out = io.StringIO()
        streamer = TextStreamer(tok, out)
        for i, token in enumerate(ids):
            streamer(torch.tensor([[token]]))
            decoded, written = tok.decode(ids[: i + 1]), out.getvalue()
            assert decoded.startswith(written)
            assert set(decoded[len(written) :]) <= {"\ufffd"}
        assert tok.decode(ids).startswith(out.getvalue())


# ---------------------------------------------------------------- tiny projects, one per tokenizer


def corpus_text() -> str:
    """~12 KB of the Shakespeare-like test corpus with non-ASCII words (2-, 3- and 4-byte UTF-8) throughout, so
    that characters, bytes and tokens all differ; none of UNSEEN_CHARS occurs."""
    text = make_corpus(size=12_000, seed=1).decode("ascii")
    for word, foreign in (("sweet", "süße"), ("heart", "cœur"), ("death", "смерть"), ("crown", "👑")):
        text = text.replace(word, foreign)
    assert not set(UNSEEN_CHARS) & set(text)
    return text


class TinyRun(NamedTuple):
    root: Path
    kind: str
    text: str


def tiny_run(root: Path, kind: str) -> TinyRun:
    """data/ from the real encode stage (300-token BPE or characters), then 4 training steps in-process with
    an evaluation every 2 steps over the whole validation split (train.eval_iters null), with the default
    architecture's rotary embeddings and the weights' average."""
    text = corpus_text()
    (root / "data").mkdir(parents=True)
    (root / "data/input.txt").write_text(text, encoding="utf-8")
    write_params(
        root / "params.yaml",
        {
            **TINY_PARAMS,
            "encode.val_fraction": VAL_FRACTION,
            "encode.tokenizer": kind,
            "encode.vocab_size": 300,
            "train.max_iters": 4,
            "train.warmup_iters": 1,
            "train.eval_interval": 2,
            "train.eval_iters": None,
            "train.resume_interval": 0,
            "model.rope": True,  # the default architecture
            "train.ema": 0.5,
        },
    )
    encoded = subprocess.run(
        [sys.executable, "-m", "stages.encode"], cwd=root, env=STAGE_ENV, capture_output=True, text=True, check=False
    )
    assert encoded.returncode == 0, encoded.stderr
    train(
        load_config(root / "params.yaml"),
        TrainPaths(
            data_dir=root / "data",
            checkpoint=root / "out/ckpt.pt",
            resume_dir=root / "out/resume",
            metrics_dir=root / "metrics",
            tensorboard_dir=root / "out/tensorboard",
        ),
        show_progress=False,
    )
    return TinyRun(root, kind, text)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_run(tmp_path_factory.mktemp("bpe"), "bpe")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_run(tmp_path_factory.mktemp("char"), "char")


@pytest.fixture(params=["bpe", "char"])
def any_run(request: pytest.FixtureRequest) -> TinyRun:
    return request.getfixturevalue(f"{request.param}_run")


def validation_text(text: str) -> str:
    """The last 10% of the characters (a character split, whatever the tokenizer)."""
    return text[int(len(text) * (1 - VAL_FRACTION)) :]


def first_token_chars(run: TinyRun, val_text: str, val_ids: list[int]) -> int:
    """How many characters of the validation text its first token covers (from the tokenizer's own offsets)."""
    if run.kind == "char":
        return 1
    hf = HfTokenizer.from_str(json.dumps(read_json(run.root / "data/vocab.json")["tokenizer"]))
    encoding = hf.encode(val_text)
    assert encoding.ids == val_ids
    return encoding.offsets[0][1]


def total_nats(model: torch.nn.Module, tokens: list[int], block_size: int) -> float:
    """-ln p summed over every validation target (tokens 1..n-1), each predicted once, from the context the
    evaluation gives it: windows of block_size tokens starting at 0, block_size, 2 block_size, ...; the targets
    left over after the last whole window are scored from the window that ends at the split's last token."""
    n, total = len(tokens), 0.0
    for start in range(0, n - 1, block_size):
        scored = min(block_size, n - 1 - start)
        first = min(start, n - 1 - block_size)
        x = torch.tensor([tokens[first : first + block_size]])
        y = torch.tensor(tokens[first + 1 : first + block_size + 1])
        with torch.no_grad():
            logits, _ = model(x)
        logp = logits[0].double().log_softmax(-1)[torch.arange(block_size), y]
        total -= float(logp[block_size - scored :].sum())
    return total


@pytest.mark.slow
def test_val_bpc_is_total_nats_over_predicted_characters(any_run: TinyRun) -> None:
    """val_bpc = (total nats over every target of the validation split) / (characters predicted) / ln 2.

    "Characters predicted" is every character of the validation text except those of the first validation
    token, which is only ever context, never a target: for characters, all but the first one; for BPE, all but
    the characters the first token covers (a token cut inside a character counts the character once, with the
    token that starts it). nanogpt/train.py computes it as len(decode(val)) - len(decode(val[:1])).
    """
    run = any_run
    val_text = validation_text(run.text)
    tokenizer = load_tokenizer(run.root / "data/vocab.json")
    val_ids = torch.load(run.root / "data/val.pt", weights_only=True)["tokens"].tolist()
    assert tokenizer.decode(val_ids) == val_text
    summary = read_json(run.root / "metrics/train.json")
    rows = {int(r["step"]): r for r in read_tsv(run.root / "metrics/val_loss.tsv")}
    assert sorted(rows) == [2, 4]
    model, _, meta = load_checkpoint(run.root / "out/ckpt.pt")
    assert meta["step"] == summary["best_step"]
    assert not model.training and next(model.parameters()).dtype == torch.float32

    nats = total_nats(model, val_ids, model.cfg.block_size)
    chars = len(val_text) - first_token_chars(run, val_text, val_ids)

    best = rows[summary["best_step"]]
    assert best["val_loss"] == pytest.approx(nats / (len(val_ids) - 1), rel=1e-4)
    assert best["val_bpc"] == pytest.approx(nats / chars / LN2, rel=1e-4)
    assert summary["best_val_bpc"] == pytest.approx(nats / chars / LN2, rel=1e-4)


@pytest.mark.slow
def test_char_val_bpc_is_val_loss_in_bits(char_run: TinyRun) -> None:
    for row in read_tsv(char_run.root / "metrics/val_loss.tsv"):
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / LN2, rel=1e-5)


@pytest.mark.slow
def test_bpe_val_bpc_is_below_bits_per_token(bpe_run: TinyRun) -> None:
    """A BPE token spans more than one character, so bits per character is the smaller number."""
    for row in read_tsv(bpe_run.root / "metrics/val_loss.tsv"):
        assert row["val_bpc"] < 0.9 * row["val_loss"] / LN2


@pytest.mark.slow
def test_encode_stage_learns_bpe_from_the_training_split_only(bpe_run: TinyRun) -> None:
    train_text = bpe_run.text[: len(bpe_run.text) - len(validation_text(bpe_run.text))]
    written = read_json(bpe_run.root / "data/vocab.json")

    assert written == BpeTokenizer.fit(train_text, vocab_size=300).to_dict()
    assert written != BpeTokenizer.fit(bpe_run.text, vocab_size=300).to_dict()


@pytest.mark.slow
def test_both_tokenizers_validate_on_the_same_characters(bpe_run: TinyRun, char_run: TinyRun) -> None:
    texts = [
        load_tokenizer(run.root / "data/vocab.json").decode(
            torch.load(run.root / "data/val.pt", weights_only=True)["tokens"].tolist()
        )
        for run in (bpe_run, char_run)
    ]

    assert texts[0] == texts[1] == validation_text(bpe_run.text)


def sample_tool(run: TinyRun, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m stages.sample` in the tiny project, with the checkpoint's own tokenizer (no --vocab)."""
    return subprocess.run(
        [sys.executable, "-m", "stages.sample", "--checkpoint", "out/ckpt.pt", *args],
        cwd=run.root,
        env=STAGE_ENV,
        capture_output=True,
        text=True,
        check=False,
        encoding="utf-8",
    )


@pytest.mark.slow
def test_bpe_sample_tool_accepts_characters_never_seen_in_training(bpe_run: TinyRun) -> None:
    result = sample_tool(bpe_run, "--prompt", UNSEEN_PROMPT, "--num_tokens", "30", "--output", "out/prompted.txt")

    assert result.returncode == 0, result.stderr
    text = (bpe_run.root / "out/prompted.txt").read_bytes().decode("utf-8", errors="strict")
    assert text.startswith(UNSEEN_PROMPT)


@pytest.mark.slow
def test_char_sample_tool_refuses_unseen_characters_and_names_them(char_run: TinyRun) -> None:
    result = sample_tool(char_run, "--prompt", UNSEEN_PROMPT, "--num_tokens", "30", "--output", "out/prompted.txt")

    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert "outside the vocabulary" in result.stderr
    for char in UNSEEN_CHARS:
        assert char in result.stderr
    assert not (char_run.root / "out/prompted.txt").exists()


@pytest.mark.slow
def test_streamed_sample_matches_the_written_one_but_never_cuts_a_character(bpe_run: TinyRun) -> None:
    """A barely trained BPE model samples stray byte tokens often: the stream and the file stay valid text, and
    the stream lacks at most the replacement characters of a cut-off final character."""
    cfg = load_config(bpe_run.root / "params.yaml", {"sample.prompt": UNSEEN_PROMPT, "sample.num_tokens": 200}).sample
    output_path = bpe_run.root / "out/streamed.txt"
    stream = io.StringIO()

    [sample] = run_sampling(cfg, SampleRun(bpe_run.root / "out/ckpt.pt", None, output_path, None, "cpu"), stream)

    streamed = stream.getvalue()
    written = output_path.read_bytes().decode("utf-8", errors="strict")
    assert written == sample + "\n" and streamed.endswith("\n")
    assert sample.startswith(streamed[:-1])
    assert set(sample[len(streamed) - 1 :]) <= {"\ufffd"}


# ---------------------------------------------------------------- the DVC pipeline, char -> BPE


class Experiments(NamedTuple):
    project: Path
    to_bpe: subprocess.CompletedProcess[str]  # dvc exp run -n bpe-512 -S encode.tokenizer=bpe
    to_300: subprocess.CompletedProcess[str]  # then: dvc exp run -n bpe-300 -S encode.vocab_size=300


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory, _reproduced_template: Path) -> Experiments:
    """A private copy of the session's reproduced char project (committed at HEAD), switched to BPE and then to a
    300-token BPE vocabulary by two experiments; the workspace holds the last one's results."""
    project = copy_project(_reproduced_template, tmp_path_factory.mktemp("experiments") / "project")
    to_bpe = dvc(project, "exp", "run", "-n", "bpe-512", "-S", "encode.tokenizer=bpe")
    to_300 = dvc(project, "exp", "run", "-n", "bpe-300", "-S", "encode.vocab_size=300")
    return Experiments(project, to_bpe, to_300)


def assert_reran_all_but_download(result: subprocess.CompletedProcess[str]) -> None:
    log = output(result)
    assert ran_stages(result) == {"validate", "encode", "train", "sample", "export"}, log
    assert skipped_stages(result) == set(STAGES) - ran_stages(result) == {"download"}, log
    assert not restored_stages(result), log


@pytest.mark.slow
def test_switching_to_bpe_reruns_encode_train_sample_not_download(experiments: Experiments) -> None:
    assert_reran_all_but_download(experiments.to_bpe)


@pytest.mark.slow
def test_changing_bpe_vocab_size_reruns_encode_train_sample_not_download(experiments: Experiments) -> None:
    assert_reran_all_but_download(experiments.to_300)
    vocab = load_tokenizer(experiments.project / "data/vocab.json")
    assert (vocab.kind, vocab.vocab_size) == ("bpe", 300)
    _, ckpt_tokenizer, _ = load_checkpoint(experiments.project / "out/ckpt.pt")
    assert ckpt_tokenizer.to_dict() == vocab.to_dict()  # the checkpoint carries the tokenizer it was trained with


@pytest.mark.slow
def test_bpe_pipeline_writes_valid_utf8_samples(experiments: Experiments) -> None:
    samples = (experiments.project / "out/samples.txt").read_bytes()

    text = samples.decode("utf-8", errors="strict")
    assert text.strip()
    assert text.startswith(yaml.safe_load((experiments.project / "params.yaml").read_text())["sample"]["prompt"])


@pytest.mark.slow
def test_char_and_bpe_runs_compare_on_best_val_bpc(experiments: Experiments) -> None:
    project = experiments.project
    char_bpc = json.loads(
        subprocess.run(
            ["git", "show", "HEAD:metrics/train.json"], cwd=project, check=True, capture_output=True, text=True
        ).stdout
    )["best_val_bpc"]
    bpe_summary = read_json(project / "metrics/train.json")
    bpe_bpc = bpe_summary["best_val_bpc"]
    assert 0 < char_bpc < 8 and 0 < bpe_bpc < 8
    assert bpe_bpc < bpe_summary["best_val_loss"] / LN2  # per character, not per token

    # the workspace holds the BPE experiment; HEAD holds the committed char run
    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)["metrics/train.json"]["best_val_bpc"]
    assert (diff["old"], diff["new"]) == (char_bpc, bpe_bpc)
    assert diff["diff"] == pytest.approx(bpe_bpc - char_bpc)

    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    runs = {}
    for row in shown:
        runs.setdefault("baseline" if row["rev"] != "workspace" else "workspace", row["data"])
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                runs[rev["name"]] = rev["data"]
    assert {"baseline", "bpe-512", "bpe-300"} <= runs.keys()
    expected = {"baseline": ("char", char_bpc), "bpe-300": ("bpe", bpe_bpc)}
    for name, (kind, bpc) in expected.items():
        data = runs[name]
        assert data["params"]["params.yaml"]["data"]["encode"]["tokenizer"] == kind
        assert data["metrics"]["metrics/train.json"]["data"]["best_val_bpc"] == bpc
    assert runs["bpe-512"]["params"]["params.yaml"]["data"]["encode"]["vocab_size"] == TINY_PARAMS["encode.vocab_size"]
    assert runs["bpe-300"]["params"]["params.yaml"]["data"]["encode"]["vocab_size"] == 300
