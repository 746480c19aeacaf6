"""The fused Triton decode attention (nanogpt/kernels.py) against plain attention over the same cache, with and
without rotary positions (GPU only: part of the `pytest -m gpu` set)."""

import pytest
import torch
import torch.nn.functional as F

from nanogpt.kernels import decode_attention, decode_attention_supported
from nanogpt.model import Rotary

pytestmark = pytest.mark.gpu

BLOCK_SIZE = 256  # the default model's context; the kernel reads the cache in blocks of 64 keys
POSITIONS = [0, 1, 63, 64, 65, 200, BLOCK_SIZE - 1]  # the first, both sides of a block boundary, the last
# The kernel computes in fp32 from the cache's values and rounds its output once to the cache's dtype; the
# reference computes in fp64 from the same values. That rounding is at most 2^-8 of the value in bf16 and 2^-11
# in fp16 (rtol is twice that); in fp32 what remains is the order of the sums and Triton's approximate exp, about
# 1e-6 at these sizes. A key missed or one too many moves some output by over 100 times these (checked below).
TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}


def step_inputs(
    batch: int, n_head: int, head_size: int, position: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's qkv (B, 1, 3C) and a cache (2, B, nh, BLOCK_SIZE, hs) holding keys and values before
    `position` and stale entries from it on: values of 100, which would stand out in any output that saw one."""
    g = torch.Generator(device="cuda").manual_seed(position)
    qkv = torch.randn(batch, 1, 3 * n_head * head_size, device="cuda", generator=g)
    kv = torch.randn(2, batch, n_head, BLOCK_SIZE, head_size, device="cuda", generator=g)
    kv[1, :, :, position:] = 100.0
    return qkv.to(dtype), kv.to(dtype)


def reference(
    qkv: torch.Tensor, kv: torch.Tensor, position: int, last: int, rotary: Rotary | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in fp64: the new query and key rotated by model.Rotary when given (in fp32, rounded to
    their dtype), the new key and value written into a copy of the cache at `position`, then SDPA of the new
    query over the cache, seeing positions 0..last. Returns the output (B, 1, C) and the cache."""
    B, nh, hs = kv.size(1), kv.size(2), kv.size(4)
    q, k, v = qkv.view(B, 3, nh, 1, hs).unbind(1)  # each (B, nh, 1, hs): c_attn's layout, heads side by side
    if rotary is not None:
        q, k = (
            rotary(q, torch.tensor([position], device=q.device)),
            rotary(k, torch.tensor([position], device=q.device)),
        )
    q, k, v = q.double(), k.double()[:, :, 0], v.double()[:, :, 0]
    cache = kv.double().clone()
    cache[0, :, :, position], cache[1, :, :, position] = k, v
    seen = torch.arange(BLOCK_SIZE, device=kv.device) <= last
    out = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=seen.view(1, 1, 1, -1))
    return out.transpose(1, 2).reshape(B, 1, nh * hs), cache  # (B, nh, 1, hs) -> (B, 1, C)


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("batch", "n_head", "head_size"), [(3, 6, 64), (2, 4, 16)])  # the default model's heads
def test_decode_attention_matches_plain_attention(dtype, batch, n_head, head_size, rotate):
    rotary = Rotary(head_size, BLOCK_SIZE).cuda() if rotate else None
    tables = None if rotary is None else (rotary.cos, rotary.sin)
    for position in POSITIONS:
        qkv, kv = step_inputs(batch, n_head, head_size, position, dtype)
        assert decode_attention_supported(kv.device, dtype, head_size)  # Triton is there: generation takes this path
        expected, expected_cache = reference(qkv, kv, position, last=position, rotary=rotary)

        out = decode_attention(qkv, kv, torch.tensor([position], device="cuda"), tables)

        assert out.dtype == dtype and out.shape == (batch, 1, n_head * head_size)
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype], msg=f"position {position}")
        # the new key and value are written at `position` and nothing else in the cache changes; exactly, but for
        # a rotated key, which the kernel may round once differently from Rotary's separate products
        new_key = kv[0, :, :, position].double()
        torch.testing.assert_close(new_key, expected_cache[0, :, :, position], **TOLERANCE[dtype], msg=str(position))
        kv[0, :, :, position] = expected_cache[0, :, :, position].to(dtype)
        assert torch.equal(kv.double(), expected_cache), position
        # the comparison can tell an off-by-one: attention that misses the new position's own key is far outside
        # the tolerance (at position 0 it sees no key at all)
        missed, _ = reference(qkv, kv, position, last=position - 1, rotary=rotary)
        assert not torch.allclose(missed, expected, **TOLERANCE[dtype]), position
        if rotary is not None and position > 0:  # and a rotation by another position's angles (one key: no effect)
            elsewhere = decode_attention(
                qkv, kv.clone(), torch.tensor([position], device="cuda"), (rotary.cos.roll(1, 0), rotary.sin.roll(1, 0))
            )
            assert not torch.allclose(elsewhere.double(), expected, **TOLERANCE[dtype]), position
