"""The model card (README.md) of a Hugging Face export: YAML metadata the Hub reads, then what a reader needs to
know before using the model: what it is, its data, its settings, its scores, how to run it, where it falls short."""

import dataclasses
import math
from typing import Any

import yaml

from nanogpt.config import Config
from nanogpt.model import GPT, ROPE_BASE
from nanogpt.tokenizer import Tokenizer

# the Hub's copy of the text that params.yaml downloads by default, recognised by its checksum
TINY_SHAKESPEARE = ("karpathy/tiny_shakespeare", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")


def model_card(
    cfg: Config, model: GPT, tokenizer: Tokenizer, info: dict[str, Any], val_bpc: float, hf_class: str
) -> str:
    """README.md for the export of `model` trained with `cfg` as transformers' `hf_class`; `info` is the
    checkpoint's step and val loss."""
    kind = "character-level" if tokenizer.kind == "char" else "byte-level BPE"
    val_loss = float(info["val_loss"])
    known = cfg.data.sha256 == TINY_SHAKESPEARE[1]
    data_name = "Tiny Shakespeare" if known else "the text at data.url"
    model_type = "starcoder2" if model.cfg.rope else "gpt2"
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [model_type, "nanogpt", "dvc", "text-generation", "char-level" if tokenizer.kind == "char" else "bpe"],
        **({"datasets": [TINY_SHAKESPEARE[0]]} if known else {}),
        "metrics": ["loss", "bits_per_character"],
        "model-index": [
            {
                "name": f"nanogpt-dvc-{tokenizer.kind}",
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Text generation"},
                        "dataset": {
                            "type": TINY_SHAKESPEARE[0] if known else "text",
                            "name": f"{data_name}, validation split (last {cfg.encode.val_fraction:.0%})",
                        },
                        "metrics": [
                            {"type": "loss", "name": "Validation loss (nats per token)", "value": round(val_loss, 4)},
                            {"type": "bits_per_character", "name": "Validation bits per character", "value": val_bpc},
                        ],
                    }
                ],
            }
        ],
    }
    m = model.cfg
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip()}
---

# nanogpt-dvc ({kind})

A {kind} GPT trained by the nanogpt-dvc DVC pipeline (`download -> encode -> train -> sample -> export`),
loaded by transformers as `{hf_class}`: {model.num_params():,} parameters, {m.n_layer} layers, {m.n_head} heads,
{m.n_embd}-wide embeddings, a context of {m.block_size} tokens and a vocabulary of {model.vocab_size} tokens. In fp32
the exported model gives the same logits as the project's own, to within rounding.

## Architecture

{_architecture(model, hf_class)}

## Training data

{_data_section(cfg, data_name, tokenizer)}

## Hyperparameters

From `params.yaml` (the checkpoint is from step {info["step"]}, the one with the best validation loss):

| setting | value |
|---|---|
{_params_table(cfg)}

## Evaluation

On the validation split ({_coverage(cfg)}):

| metric | value |
|---|---|
| loss (nats per token) | {val_loss:.4f} |
| bits per character | {val_bpc:.4f} |
| perplexity per token | {math.exp(val_loss):.2f} |

## How to use

Plain transformers, no `trust_remote_code`: load, generate greedily, print.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = "path/to/this/folder"
tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
ids = model.generate(**tokenizer({cfg.sample.prompt!r}, return_tensors="pt"), do_sample=False)
print(tokenizer.decode(ids[0]))
```

`generation_config.json` holds the pipeline's sample settings: {_length(cfg, m.block_size)}, and, without
`do_sample=False`, temperature {cfg.sample.temperature}, top_k {cfg.sample.top_k} and top_p {cfg.sample.top_p}.
Greedy, the text is the one `python stages/sample.py --temperature 0 --quantize none --device cpu` writes for the
same prompt and length: both in fp32 (the sample stage's int8 weights on a CPU or bf16 on a GPU can change a few
choices).

## Limitations

- A toy: {m.n_layer} layers trained on about a megabyte of one author's plays. It imitates the look of the
  text (speakers, line breaks, archaic words) and has no knowledge, facts or instruction following.
{_tokenizer_limitation(tokenizer)}
- {_context_limitation(model)}
- No special tokens: nothing marks the start or end of a text, so generation runs to its length limit.
"""


def _length(cfg: Config, block_size: int) -> str:
    if cfg.sample.num_tokens < block_size:
        return f"{cfg.sample.num_tokens} new tokens"
    # transformers does not slide the context as the project's sampler does
    return f"{block_size} tokens in all, prompt included (the context; the sample stage writes {cfg.sample.num_tokens})"


def _architecture(model: GPT, hf_class: str) -> str:
    m = model.cfg
    positions = (
        f"rotary position embeddings (RoPE, base {ROPE_BASE:g}, the two halves of each head rotated, "
        "over the whole head)"
        if m.rope
        else f"learned position embeddings ({m.block_size} positions)"
    )
    activation = "the exact (erf) GELU" if m.mlp == "gelu" else "ReLU squared (`relu2`)"
    head = "tied to the token embedding" if m.tie_embeddings else "a matrix of its own (untied embeddings)"
    if m.rope:
        mapping = (
            "StarCoder2 expresses it exactly with `use_bias: false` and zero LayerNorm biases; the fused "
            "query/key/value matrix is split into `q_proj`, `k_proj` and `v_proj`"
        )
    else:
        mapping = "this is GPT-2 without biases: the export writes GPT-2's biases as zeros"
    return (
        f"Pre-norm transformer blocks (LayerNorm with a weight and no bias, bias-free linear layers), {positions}, "
        f"causal self-attention with {m.n_head} heads, an MLP of width {4 * m.n_embd} with {activation}, and an "
        f"LM head {head}. Loaded as `{hf_class}`: {mapping}."
    )


def _context_limitation(model: GPT) -> str:
    if model.cfg.rope:
        return (
            f"Trained on contexts of {model.cfg.block_size} tokens: transformers keeps generating past them "
            "(rotary positions extend), with text of unknown quality and unlike the project's own sampler, which "
            "slides the window."
        )
    return (
        f"Positions are learned for {model.cfg.block_size} tokens only: with transformers, prompt and new tokens "
        f"together must fit in {model.cfg.block_size} (`generate` fails past it); the project's own sampler slides "
        "the window to write longer texts."
    )


def refusal_card(reason: str) -> str:
    """README.md of an export folder that holds no model, because `reason` (refusal's one line)."""
    return f"""# No Hugging Face export

This checkpoint has no Hugging Face export: {reason}.

A model that loads without error but computes something else would be worse than none, so the export writes only
this file; the pipeline goes on.
"""


def _data_section(cfg: Config, data_name: str, tokenizer: Tokenizer) -> str:
    tokens = (
        "one token per character of the training split"
        if tokenizer.kind == "char"
        else f"a byte-level BPE of {tokenizer.vocab_size} tokens learned on the training split"
    )
    return (
        f"{data_name}: `{cfg.data.url}` (sha256 `{cfg.data.sha256}`). The first "
        f"{1 - cfg.encode.val_fraction:.0%} of the text trains, the last {cfg.encode.val_fraction:.0%} validates "
        f"(nanoGPT's split, without shuffling). Tokenizer: {tokens}."
    )


def _coverage(cfg: Config) -> str:
    if cfg.train.eval_iters is None:
        return "the whole split"
    return f"{cfg.train.eval_iters} batches of {cfg.train.batch_size} windows"


def _params_table(cfg: Config) -> str:
    rows = []
    for section in ("encode", "model", "train"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            rows.append(f"| `{section}.{key}` | {value} |")
    return "\n".join(rows)


def _tokenizer_limitation(tokenizer: Tokenizer) -> str:
    if tokenizer.kind == "char":
        return (
            f"- The vocabulary is the {tokenizer.vocab_size} characters of the training text; any other character "
            "cannot be encoded (the tokenizer raises an error)."
        )
    return "- The BPE merges were learned on this text alone; other text encodes into many short tokens."
