"""The fused Triton decode attention (nanogpt/kernels.py) against plain attention over the same cache (GPU only:
part of the `pytest -m gpu` set)."""

import pytest
import torch
import torch.nn.functional as F

from nanogpt.kernels import decode_attention, decode_attention_supported

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


def reference(qkv: torch.Tensor, kv: torch.Tensor, position: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in fp64: the new key and value written into a copy of the cache at `position`, then SDPA
    of the new query over the cache, seeing positions 0..last. Returns the output (B, 1, C) and the cache."""
    B, nh, hs = kv.size(1), kv.size(2), kv.size(4)
    q, k, v = qkv.double().view(B, 3, nh, hs).unbind(1)  # each (B, nh, hs): c_attn's layout, heads side by side
    cache = kv.double().clone()
    cache[0, :, :, position], cache[1, :, :, position] = k, v
    seen = torch.arange(BLOCK_SIZE, device=kv.device) <= last
    out = F.scaled_dot_product_attention(q[:, :, None], cache[0], cache[1], attn_mask=seen.view(1, 1, 1, -1))
    return out.transpose(1, 2).reshape(B, 1, nh * hs), cache  # (B, nh, 1, hs) -> (B, 1, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("batch", "n_head", "head_size"), [(3, 6, 64), (2, 4, 16)])  # the default model's heads
def test_decode_attention_matches_plain_attention(dtype, batch, n_head, head_size):
    for position in POSITIONS:
        qkv, kv = step_inputs(batch, n_head, head_size, position, dtype)
        assert decode_attention_supported(kv.device, dtype, head_size)  # Triton is there: generation takes this path
        expected, expected_cache = reference(qkv, kv, position, last=position)

        out = decode_attention(qkv, kv, torch.tensor([position], device="cuda"))

        assert out.dtype == dtype and out.shape == (batch, 1, n_head * head_size)
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype], msg=f"position {position}")
        # the new key and value are written at `position`, exactly, and nothing else in the cache changes
        assert torch.equal(kv.double(), expected_cache), position
        # the comparison can tell an off-by-one: attention that misses the new position's own key is far outside
        # the tolerance (at position 0 it sees no key at all)
        missed, _ = reference(qkv, kv, position, last=position - 1)
        assert not torch.allclose(missed, expected, **TOLERANCE[dtype]), position
