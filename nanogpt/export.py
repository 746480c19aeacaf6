"""Export a checkpoint to the Hugging Face format: a folder that `transformers` loads as a GPT2LMHeadModel.

nanoGPT's GPT is GPT-2 without biases, so the export is a renaming: GPT-2's Conv1D layers hold the transpose of
nn.Linear's weight, and the biases GPT-2 has and this model lacks are written as zeros. Everything else is checked
rather than assumed: an option or a parameter with no GPT-2 equivalent stops the export with one line naming it,
because weights that load without error into a different model would be worse than no export.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nanogpt import files
from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import Config, SampleConfig
from nanogpt.errors import UserError
from nanogpt.model import GPT, NANOGPT_ARCHITECTURE
from nanogpt.model_card import model_card
from nanogpt.tokenizer import CharTokenizer, Tokenizer

# ModelConfig's options and what GPT-2 makes of them. An option missing here stops the export until someone maps
# it: even at a value that looks harmless, it may change what the weights mean. The architecture options
# (rotary embeddings, QK-norm, ...) export only at nanoGPT's values, model.NANOGPT_ARCHITECTURE.
GPT2_OPTIONS = {"block_size": "n_positions", "n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd"}
TRAINING_ONLY_OPTIONS = {"dropout", "gradient_checkpointing"}  # no effect on the function the weights compute

# this model's parameter names (per block: blocks.{i}.<name>) -> GPT-2's, and whether Conv1D stores the transpose
BLOCK_PARAMS = {
    "ln_1.weight": ("ln_1.weight", False),
    "attn.c_attn.weight": ("attn.c_attn.weight", True),
    "attn.c_proj.weight": ("attn.c_proj.weight", True),
    "ln_2.weight": ("ln_2.weight", False),
    "mlp.c_fc.weight": ("mlp.c_fc.weight", True),
    "mlp.c_proj.weight": ("mlp.c_proj.weight", True),
}
TOP_PARAMS = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
}
TIED = "lm_head.weight"  # the same tensor as wte.weight; GPT-2 ties it through tie_word_embeddings


def check_exportable(model: GPT) -> float:
    """Raise a one-line UserError naming the first option, parameter or layer that GPT-2 cannot represent.
    Returns the layer norms' epsilon (GPT-2 has one for all of them).

    What forward() computes (the GELU, the attention) is not visible here: tests/test_export.py compares the
    logits with transformers' own.
    """
    for option, value in dataclasses.asdict(model.cfg).items():
        if option in NANOGPT_ARCHITECTURE and value == NANOGPT_ARCHITECTURE[option]:
            continue
        if option in NANOGPT_ARCHITECTURE:
            gpt2 = NANOGPT_ARCHITECTURE[option]
            raise UserError(
                f"cannot export to GPT-2: model.{option} ({value!r}) has no GPT-2 equivalent: train with "
                f"`dvc exp run -S model.{option}={str(gpt2).lower()}` (nanoGPT's architecture) to export"
            )
        if option not in GPT2_OPTIONS and option not in TRAINING_ONLY_OPTIONS:
            raise UserError(f"cannot export to GPT-2: model.{option} ({value!r}) has no GPT-2 equivalent")
    if model.lm_head.weight is not model.wte.weight:
        raise UserError("cannot export to GPT-2: lm_head is not tied to the token embedding (wte)")
    expected = {TIED, *TOP_PARAMS, *(f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in BLOCK_PARAMS)}
    names = model.state_dict().keys()
    for name in names:
        if name not in expected:
            raise UserError(f"cannot export to GPT-2: parameter {name} has no GPT-2 equivalent")
    missing = sorted(expected - names)
    if missing:
        raise UserError(f"cannot export to GPT-2: this model has no {missing[0]}, which GPT-2 needs")
    norms = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(norms) != 1:
        raise UserError(f"cannot export to GPT-2: its layer norms share one epsilon, this model's are {sorted(norms)}")
    return norms.pop()


def gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """GPT2LMHeadModel's tensors (fp32, contiguous, none sharing memory), without lm_head.weight: tied to wte."""
    ours = model.state_dict()
    out: dict[str, Tensor] = {}

    def put(name: str, weight: Tensor, transpose: bool) -> None:
        weight = weight.detach().float().cpu()
        out[name] = (weight.t() if transpose else weight).contiguous().clone()
        if not name.endswith(("wte.weight", "wpe.weight")):
            # GPT-2's layer norms and Conv1Ds have biases, this model's do not: zeros leave the function unchanged
            out[name.removesuffix("weight") + "bias"] = torch.zeros(out[name].shape[-1])

    for name, hf_name in TOP_PARAMS.items():
        put(hf_name, ours[name], transpose=False)
    for i in range(len(model.blocks)):
        for name, (hf_name, transpose) in BLOCK_PARAMS.items():
            put(f"transformer.h.{i}.{hf_name}", ours[f"blocks.{i}.{name}"], transpose)
    return out


def gpt2_config(model: GPT, layer_norm_epsilon: float) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel that computes what `model` computes."""
    cfg = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        **{hf: getattr(cfg, ours) for ours, hf in GPT2_OPTIONS.items()},
        "n_inner": 4 * cfg.n_embd,
        "activation_function": "gelu",  # F.gelu, the exact erf form (GPT-2's own is the tanh "gelu_new")
        "layer_norm_epsilon": layer_norm_epsilon,
        "scale_attn_weights": True,  # scores / sqrt(head_size), as scaled_dot_product_attention does
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        # the training dropout, for whoever fine-tunes; eval mode turns all three off
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        # no special tokens: GPT2Config's defaults (50256) would point past this vocabulary
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def generation_config(sample: SampleConfig, block_size: int) -> dict[str, Any]:
    """generation_config.json: the sample stage's sampling settings, in transformers' terms.

    transformers does not slide the context past n_positions as this project's sampler does: where the sample
    stage writes more tokens than fit, max_length caps prompt + new tokens at block_size instead.
    """
    gen: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if sample.num_tokens < block_size:
        gen["max_new_tokens"] = sample.num_tokens
    else:
        gen["max_length"] = block_size
    if sample.temperature == 0:
        return {**gen, "do_sample": False}
    return {
        **gen,
        "do_sample": True,
        "temperature": sample.temperature,
        # top_k 0 and top_p 1.0 switch the filters off (transformers' own default top_k is 50)
        "top_k": sample.top_k or 0,
        "top_p": sample.top_p if sample.top_p is not None else 1.0,
    }


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json for the `tokenizers` library: the BPE tokenizer as it is; the character vocabulary as a
    word-level model over single characters (newlines included), decoded by plain concatenation."""
    if not isinstance(tokenizer, CharTokenizer):
        return json.dumps(tokenizer.to_dict()["tokenizer"], ensure_ascii=False)
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HfTokenizer

    # no unknown token: like CharTokenizer, encoding a character outside the vocabulary is an error
    tok = HfTokenizer(models.WordLevel({ch: i for i, ch in enumerate(tokenizer.chars)}))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # `.` would not match "\n"
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def tokenizer_config(block_size: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, not GPT-2's vocabulary
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,  # " ," and " ." are real text here
    }


def export_checkpoint(checkpoint: Path | str, train_metrics: Path | str, cfg: Config, dest: Path | str) -> None:
    """Export the checkpoint that the train stage wrote with `cfg` (its metrics summary gives the model card's
    bits per character) to the Hugging Face folder `dest`."""
    model, tokenizer, info = load_checkpoint(checkpoint, "cpu")
    if tokenizer.kind != cfg.encode.tokenizer:
        raise UserError(
            f"checkpoint {checkpoint} has a {tokenizer.kind} tokenizer and params.yaml encode.tokenizer "
            f"{cfg.encode.tokenizer}: rerun `dvc repro train`"
        )
    trained = dataclasses.asdict(model.cfg)
    for key, value in dataclasses.asdict(cfg.model).items():
        if key in GPT2_OPTIONS and trained.get(key) != value:
            raise UserError(
                f"checkpoint {checkpoint} has model.{key}={trained.get(key)} and params.yaml {value}: "
                "rerun `dvc repro train`"
            )
    try:
        summary = json.loads(Path(train_metrics).read_text(encoding="utf-8"))
        val_bpc = float(summary["best_val_bpc"])
        same_run = abs(float(summary["best_val_loss"]) - info["val_loss"]) < 1e-4
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"training summary {train_metrics} is missing or corrupt ({exc}): rerun `dvc repro train`"
        ) from None
    if not same_run:
        raise UserError(f"{train_metrics} is not the summary of {checkpoint}'s run: rerun `dvc repro train`")
    card = model_card(cfg, model, tokenizer, info, val_bpc)
    export_hf(model, tokenizer, cfg.sample, card, dest)


def export_hf(model: GPT, tokenizer: Tokenizer, sample: SampleConfig, card: str, dest: Path | str) -> None:
    """Write the Hugging Face folder `dest` (config, safetensors weights, tokenizer, generation config, model card).

    The files are written into a temporary folder beside `dest` that then takes its place: `dest` is never
    half-written, and a failed export leaves the previous one.
    """
    from safetensors.torch import save as safetensors_bytes

    epsilon = check_exportable(model)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"export folder {dest} is a file: give the path of a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        files.write_json(tmp / "config.json", gpt2_config(model, epsilon))
        with files.atomic_open(tmp / "model.safetensors") as f:
            f.write(safetensors_bytes(gpt2_state_dict(model), metadata={"format": "pt"}))
        files.write_json(tmp / "generation_config.json", generation_config(sample, model.cfg.block_size))
        files.write_text(tmp / "tokenizer.json", hf_tokenizer_json(tokenizer))
        files.write_json(tmp / "tokenizer_config.json", tokenizer_config(model.cfg.block_size))
        files.write_text(tmp / "README.md", card)
        tmp.chmod(0o755)  # mkdtemp's folder is private; the export is meant to be shared
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, dest: Path) -> None:
    """Put folder `new` at `dest`, replacing what is there (rename(2) does not replace a non-empty folder)."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
