"""The model card (README.md) of a Hugging Face export: YAML metadata the Hub reads, then what a reader needs to
know before using the model: what it is, its data, its settings, its scores, how to run it, where it falls short."""

import dataclasses
import math
from typing import Any

import yaml

from nanogpt.config import Config
from nanogpt.model import GPT
from nanogpt.tokenizer import Tokenizer

# the Hub's copy of the text that params.yaml downloads by default, recognised by its checksum
TINY_SHAKESPEARE = ("karpathy/tiny_shakespeare", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")


def model_card(cfg: Config, model: GPT, tokenizer: Tokenizer, info: dict[str, Any], val_bpc: float) -> str:
    """README.md for the export of `model` trained with `cfg`; `info` is the checkpoint's step and val loss."""
    kind = "character-level" if tokenizer.kind == "char" else "byte-level BPE"
    val_loss = float(info["val_loss"])
    known = cfg.data.sha256 == TINY_SHAKESPEARE[1]
    data_name = "Tiny Shakespeare" if known else "the text at data.url"
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gpt2", "nanogpt", "dvc", "text-generation", "char-level" if tokenizer.kind == "char" else "bpe"],
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
    prompt = cfg.sample.prompt
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip()}
---

# nanogpt-dvc ({kind})

A {kind} GPT with the architecture of Karpathy's [nanoGPT](https://github.com/karpathy/nanoGPT), trained by the
nanogpt-dvc DVC pipeline (`download -> encode -> train -> sample`) and exported by `python -m stages.export` as a
`GPT2LMHeadModel`: {model.num_params():,} parameters, {m.n_layer} layers, {m.n_head} heads, {m.n_embd}-wide embeddings,
a context of {m.block_size} tokens and a vocabulary of {model.vocab_size} tokens.

nanoGPT's GPT is GPT-2 without biases: the export writes GPT-2's biases as zeros, and sets the exact (erf) GELU
(`activation_function: gelu`) that this model uses in place of GPT-2's tanh approximation. In fp32 the exported
model gives the same logits as the project's own, to within rounding.

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

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
inputs = tokenizer({prompt!r}, return_tensors="pt")
out = model.generate(**inputs)  # generation_config.json: the pipeline's sample settings
print(tokenizer.decode(out[0]))
```

`generation_config.json` holds the sample stage's settings (temperature {cfg.sample.temperature}, top_k
{cfg.sample.top_k}, top_p {cfg.sample.top_p}); pass `do_sample=False` for greedy decoding.

## Limitations

- A toy: {m.n_layer} layers trained on about a megabyte of one author's plays. It imitates the look of the
  text (speakers, line breaks, archaic words) and has no knowledge, facts or instruction following.
{_tokenizer_limitation(tokenizer)}
- Positions are learned for {m.block_size} tokens only: with transformers, prompt and new tokens together must
  fit in {m.block_size} (`generate` fails past it); the project's own sampler slides the window to write longer
  texts.
- No special tokens: nothing marks the start or end of a text, so generation runs to its length limit.
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
