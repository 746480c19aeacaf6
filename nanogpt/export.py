"""Export a checkpoint to the Hugging Face format: a folder that transformers' AutoModelForCausalLM loads without
remote code, and that computes what this project's model computes.

No one transformers class holds every architecture this project trains, so the position scheme picks the class
(tests/test_export.py measures each combination: logits and KV-cached greedy text against nanogpt/generate.py):
- learned positions: GPT2LMHeadModel. nanoGPT's GPT is GPT-2 without biases: GPT-2's Conv1D layers hold the
  transpose of nn.Linear's weight, and the biases GPT-2 has and this model lacks are written as zeros.
- rotary positions: Starcoder2ForCausalLM, which rotates the two halves of every head (model.Rotary's convention)
  over the whole head, with bias-free linears (`use_bias: false`) and LayerNorms whose biases are written as zeros.
  The fused c_attn splits into q_proj, k_proj and v_proj.
Both read the activation (the exact erf GELU or ReLU squared) and the tying of the embeddings from config.json.

Everything else is checked rather than assumed: an option value or a parameter that the class cannot express stops
the export with one line naming it, because weights that load without error into a different model would be worse
than no export. QK-norm is one: the classes that normalise queries and keys give the norm learned weights on a
different layout (Qwen3) or normalise the whole projection (OLMo2), and none pairs it with this model's blocks.
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

from nanogpt.checkpoint import load_checkpoint
from nanogpt.config import Config, ModelConfig, SampleConfig
from nanogpt.errors import UserError
from nanogpt.model import GPT, NANOGPT_ARCHITECTURE, ROPE_BASE
from nanogpt.model_card import model_card, refusal_card
from nanogpt.tokenizer import CharTokenizer, Tokenizer

# ModelConfig's options: the sizes every class takes, those with no effect on the function the weights compute,
# and the values of each architecture option that the export expresses. An option missing here stops the export
# until someone maps it: even at a value that looks harmless, it may change what the weights mean.
SIZES = ("block_size", "n_layer", "n_head", "n_embd")
TRAINING_ONLY = ("dropout", "gradient_checkpointing")
EXPRESSIBLE: dict[str, tuple[object, ...]] = {
    "rope": (False, True),
    "qk_norm": (False,),
    "mlp": ("gelu", "relu2"),  # transformers' ACT2FN names: "gelu" is the exact erf form, as F.gelu
    "tie_embeddings": (True, False),
}


def refusal(cfg: ModelConfig) -> str | None:
    """None if the export expresses a model made with `cfg`; else one line that names the first option it cannot
    and the way out."""
    for option, value in dataclasses.asdict(cfg).items():
        if option in SIZES or option in TRAINING_ONLY or value in EXPRESSIBLE.get(option, ()):
            continue
        if option in NANOGPT_ARCHITECTURE:
            way_out = f"train with `dvc exp run -S model.{option}={str(NANOGPT_ARCHITECTURE[option]).lower()}`"
        else:
            way_out = "map it in nanogpt/export.py"
        return (
            f"model.{option} ({value!r}) has no equivalent in a standard transformers class: {way_out} to export; "
            "python -m stages.sample samples from out/ckpt.pt either way"
        )
    return None


def hf_class(model: GPT) -> str:
    """The transformers class that the export of `model` loads as."""
    return "Starcoder2ForCausalLM" if model.cfg.rope else "GPT2LMHeadModel"


class _Weights:
    """This model's tensors, handed out once each by name, so that a parameter the export leaves behind is found."""

    def __init__(self, model: GPT, cls: str) -> None:
        self.left = dict(model.state_dict())
        self.cls = cls

    def take(self, name: str) -> Tensor:
        if name not in self.left:
            raise UserError(f"cannot export to {self.cls}: this model has no {name}, which {self.cls} needs")
        return self.left.pop(name).detach().float().cpu()

    def check_all_taken(self) -> None:
        for name in self.left:
            raise UserError(f"cannot export to {self.cls}: parameter {name} has no {self.cls} equivalent")


def _norm(prefix: str, weight: Tensor) -> dict[str, Tensor]:
    """A LayerNorm without bias as one with a zero bias: the same function."""
    return {f"{prefix}.weight": weight, f"{prefix}.bias": torch.zeros_like(weight)}


def _gpt2_tensors(model: GPT, w: _Weights) -> dict[str, Tensor]:
    def conv1d(prefix: str, weight: Tensor) -> dict[str, Tensor]:  # Conv1D: the transpose, and a bias
        return {f"{prefix}.weight": weight.t(), f"{prefix}.bias": torch.zeros(weight.shape[0])}

    out = {"transformer.wte.weight": w.take("wte.weight"), "transformer.wpe.weight": w.take("wpe.weight")}
    for i in range(len(model.blocks)):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        out |= _norm(hf + "ln_1", w.take(ours + "ln_1.weight"))
        out |= conv1d(hf + "attn.c_attn", w.take(ours + "attn.c_attn.weight"))
        out |= conv1d(hf + "attn.c_proj", w.take(ours + "attn.c_proj.weight"))
        out |= _norm(hf + "ln_2", w.take(ours + "ln_2.weight"))
        out |= conv1d(hf + "mlp.c_fc", w.take(ours + "mlp.c_fc.weight"))
        out |= conv1d(hf + "mlp.c_proj", w.take(ours + "mlp.c_proj.weight"))
    return out | _norm("transformer.ln_f", w.take("ln_f.weight"))


def _starcoder2_tensors(model: GPT, w: _Weights) -> dict[str, Tensor]:
    out = {"model.embed_tokens.weight": w.take("wte.weight")}
    for i in range(len(model.blocks)):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        # c_attn's rows: every head's queries, then every head's keys, then values (CausalSelfAttention's view)
        q, k, v = w.take(ours + "attn.c_attn.weight").chunk(3)
        out |= _norm(hf + "input_layernorm", w.take(ours + "ln_1.weight"))
        out |= {hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v}
        out[hf + "self_attn.o_proj.weight"] = w.take(ours + "attn.c_proj.weight")
        out |= _norm(hf + "post_attention_layernorm", w.take(ours + "ln_2.weight"))
        out[hf + "mlp.c_fc.weight"] = w.take(ours + "mlp.c_fc.weight")
        out[hf + "mlp.c_proj.weight"] = w.take(ours + "mlp.c_proj.weight")
    return out | _norm("model.norm", w.take("ln_f.weight"))


def hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """The tensors of hf_class(model) (fp32, contiguous, none sharing memory); lm_head.weight only if untied.
    Raises a one-line UserError naming a parameter that the class has no place for."""
    cls = hf_class(model)
    w = _Weights(model, cls)
    out = _starcoder2_tensors(model, w) if model.cfg.rope else _gpt2_tensors(model, w)
    head = w.take("lm_head.weight")
    if not tied(model):
        out["lm_head.weight"] = head
    w.check_all_taken()
    return {name: t.contiguous().clone() for name, t in out.items()}


def tied(model: GPT) -> bool:
    return model.lm_head.weight is model.wte.weight


def layer_norm_epsilon(model: GPT) -> float:
    """The layer norms' one epsilon (both classes have one for all of them)."""
    norms = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(norms) != 1:
        raise UserError(f"cannot export: the layer norms need one epsilon, this model's are {sorted(norms)}")
    return norms.pop()


def hf_config(model: GPT) -> dict[str, Any]:
    """config.json of a hf_class(model) that computes what `model` computes."""
    cfg = model.cfg
    common = {
        "architectures": [hf_class(model)],
        "vocab_size": model.vocab_size,
        "tie_word_embeddings": tied(model),
        "initializer_range": 0.02,
        # no special tokens: the classes' defaults (50256 for both) would point past this vocabulary
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if not cfg.rope:
        return common | {
            "model_type": "gpt2",
            "n_positions": cfg.block_size,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "n_inner": 4 * cfg.n_embd,
            "activation_function": cfg.mlp,
            "layer_norm_epsilon": layer_norm_epsilon(model),
            "scale_attn_weights": True,  # scores / sqrt(head_size), as scaled_dot_product_attention does
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            # the training dropout, for whoever fine-tunes; eval mode turns all three off
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
        }
    return common | {
        "model_type": "starcoder2",
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,  # every head has its own keys and values
        "hidden_act": cfg.mlp,
        "max_position_embeddings": cfg.block_size,
        "norm_epsilon": layer_norm_epsilon(model),
        "use_bias": False,
        "sliding_window": None,
        # transformers 4.x reads rope_theta, 5.x rope_parameters
        "rope_theta": ROPE_BASE,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE},
        "attention_dropout": cfg.dropout,
        "residual_dropout": cfg.dropout,
        "embedding_dropout": cfg.dropout,
    }


def generation_config(sample: SampleConfig, block_size: int) -> dict[str, Any]:
    """generation_config.json: the sample stage's sampling settings, in transformers' terms.

    transformers does not slide the context past block_size as this project's sampler does: where the sample
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
        # null top_k and top_p 1.0 switch the filters off (transformers 4's own default top_k is 50); a 0 would make
        # transformers warn at every greedy call, which ignores it
        "top_k": sample.top_k,
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
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, no class of its own
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,  # " ," and " ." are real text here
        # no token_type_ids: GPT-2 would add their embedding (wte's row 0) to every position
        "model_input_names": ["input_ids", "attention_mask"],
    }


def export_checkpoint(checkpoint: Path | str, train_metrics: Path | str, cfg: Config, dest: Path | str) -> str | None:
    """Export the checkpoint that the train stage wrote with `cfg` (its metrics summary gives the model card's
    bits per character) to the Hugging Face folder `dest`, and return None. A model that no standard transformers
    class expresses (see refusal) is not an error: `dest` then holds only a README.md that says why, and the
    returned line says it too."""
    model, tokenizer, info = load_checkpoint(checkpoint, "cpu")
    if tokenizer.kind != cfg.encode.tokenizer:
        raise UserError(
            f"checkpoint {checkpoint} has a {tokenizer.kind} tokenizer and params.yaml encode.tokenizer "
            f"{cfg.encode.tokenizer}: rerun `dvc repro train`"
        )
    trained = dataclasses.asdict(model.cfg)
    for key, value in dataclasses.asdict(cfg.model).items():
        if key not in TRAINING_ONLY and trained.get(key) != value:
            raise UserError(
                f"checkpoint {checkpoint} has model.{key}={trained.get(key)} and params.yaml {value}: "
                "rerun `dvc repro train`"
            )
    reason = refusal(model.cfg)
    if reason is not None:
        _write_folder(dest, {"README.md": refusal_card(reason)})
        return reason
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
    card = model_card(cfg, model, tokenizer, info, val_bpc, hf_class(model))
    export_hf(model, tokenizer, cfg.sample, card, dest)
    return None


def export_hf(model: GPT, tokenizer: Tokenizer, sample: SampleConfig, card: str, dest: Path | str) -> None:
    """Write the Hugging Face folder `dest` (config, safetensors weights, tokenizer, generation config, model card),
    or raise a one-line UserError naming what hf_class(model) cannot express, writing nothing."""
    from safetensors.torch import save as safetensors_bytes

    reason = refusal(model.cfg)
    if reason is not None:
        raise UserError(f"cannot export: {reason}")
    config = hf_config(model)
    weights = safetensors_bytes(hf_state_dict(model), metadata={"format": "pt"})
    block_size = model.cfg.block_size
    _write_folder(
        dest,
        {
            "config.json": _json(config),
            "model.safetensors": weights,
            "generation_config.json": _json(generation_config(sample, block_size)),
            "tokenizer.json": hf_tokenizer_json(tokenizer),
            "tokenizer_config.json": _json(tokenizer_config(block_size)),
            "README.md": card,
        },
    )


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _write_folder(dest: Path | str, contents: dict[str, str | bytes]) -> None:
    """Make `dest` a folder of exactly `contents` (file name -> text or bytes).

    The files are written into a temporary folder beside `dest` that then takes its place: `dest` is never
    half-written, and a failed export leaves the previous one.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"export folder {dest} is a file: give the path of a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for name, content in contents.items():
            (tmp / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
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
