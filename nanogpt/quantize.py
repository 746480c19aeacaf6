"""Int8 weight-only quantisation, for sampling on the CPU.

Decoding one token reads every weight once and does little arithmetic with it, so on a CPU its speed is
set by how many bytes the weights take: int8 weights (a quarter of fp32) fit in the cache of a small CPU.
Each output row of a linear layer keeps one scale (its largest |weight| / 127); activations stay fp32
between layers and meet the weights in bf16.
"""

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogpt.errors import UserError
from nanogpt.model import GPT, MLP, Block

# up to this many rows the fused int8 kernel wins (decoding); above it a bf16 matrix product does (prefill)
_FUSED_MAX_ROWS = 8


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights and one bf16 scale per output feature."""

    weight: Tensor  # buffers, declared for the type checker (register_buffer sets them)
    scale: Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free linear layers only")
        weight = linear.weight.detach().float()  # (out_features, in_features)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        return _in_bf16(self.matmul, x)

    def matmul(self, rows: Tensor) -> Tensor:
        """bf16 (N, in_features) -> bf16 (N, out_features)."""
        if len(rows) <= _FUSED_MAX_ROWS:
            return torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)
        return F.linear(rows, self.weight.to(torch.bfloat16)) * self.scale


class Int8MLP(nn.Module):
    """The block's MLP with int8 weights, for inference: its hidden activations stay bf16 between the two
    products, which saves two conversions per layer."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Int8Linear(mlp.c_fc), Int8Linear(mlp.c_proj)
        self.activation = mlp.activation

    def forward(self, x: Tensor) -> Tensor:
        return _in_bf16(lambda rows: self.c_proj.matmul(self.activation(self.c_fc.matmul(rows))), x)


def _in_bf16(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn applied to x (..., features) as bf16 rows; the result in x's dtype and leading shape."""
    y = fn(x.reshape(-1, x.size(-1)).to(torch.bfloat16))
    return y.view(*x.shape[:-1], -1).to(x.dtype)


def quantize_int8(model: GPT) -> GPT:
    """Give every block int8 weights, in place, for sampling (the quantized model does not train); the
    embeddings and the LM head, a small share of the weights, stay as they are."""
    for module in model.blocks:
        block = cast(Block, module)
        # (type: ignore: the int8 layers stand in for the Linear and MLP modules the model's attributes are typed as)
        block.attn.c_attn, block.attn.c_proj = Int8Linear(block.attn.c_attn), Int8Linear(block.attn.c_proj)  # type: ignore[assignment]
        block.mlp = Int8MLP(block.mlp)  # type: ignore[assignment]
    return model


def uses_int8(setting: str | None, device: torch.device) -> bool:
    """Whether to sample with int8 weights, from sample.quantize: `auto` on a CPU, where a token's time is set by the
    bytes of the weights, and never on a GPU (bf16 there, and its graphs and kernels are fast already); `int8`
    always, a UserError off the CPU; None never."""
    if setting == "int8" and device.type != "cpu":
        raise UserError(
            f"sample.quantize int8 is for sampling on the CPU, and this run is on {device}: "
            "set sample.quantize to auto or null, or sample with --device cpu"
        )
    return setting == "int8" or (setting == "auto" and device.type == "cpu")
