"""The door to the fast decode attention: one Triton kernel that rotates a decode step's new query and key (rotary
positions), writes the key and value into the KV cache and attends, fused; and FusedDecodeCache, the KV cache
whose decode steps take it.

A decode step at batch 1 is a chain of tiny kernels, each bound by its launch and start-up latency rather
than by its work; per layer this kernel takes the place of most of them (the rotation's, the cache write, SDPA
and the copies between them). BENCHMARKS.md
has the timings. `decode_attention_supported` says where it runs: on a GPU with Triton. Elsewhere (CPU-only
installs, macOS, Windows, older GPUs) it is False, and generation uses model.KVCache, which writes the cache
and calls SDPA.
"""

import functools

import torch
from torch import Tensor

from nanogpt.model import KVCache, Rotary

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None


def decode_attention_supported(device: torch.device, dtype: torch.dtype, head_size: int) -> bool:
    """Whether `decode_attention` can run on a cache on `device` in `dtype` with heads of `head_size`: a CUDA
    device that Triton supports, 16 or 32-bit floats, a power-of-two head size."""
    return (
        triton is not None
        and device.type == "cuda"
        and _triton_supports(device.index or 0)
        and head_size & (head_size - 1) == 0
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


class FusedDecodeCache(KVCache):
    """A KVCache whose decode steps (one position per sequence) rotate, write and attend in one `decode_attention`
    kernel; longer steps (a prefill) take KVCache's path. A QK-norm model's decode steps come through `attend`,
    their queries and keys normalised and rotated, and take the kernel without its rotation. For the devices,
    dtypes and head sizes for which decode_attention_supported holds."""

    def decodes_fused(self, T: int) -> bool:
        return T == 1

    def decode(self, layer: int, qkv: Tensor, input_pos: Tensor, rotary: Rotary | None) -> Tensor:
        return decode_attention(qkv, self.kv[layer], input_pos, None if rotary is None else (rotary.cos, rotary.sin))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        B, nh, T, hs = q.shape
        if T != 1:
            return super().attend(layer, q, k, v, input_pos)
        qkv = torch.stack((q, k, v), dim=1).view(B, 1, 3 * nh * hs)  # (B, 3, nh, 1, hs) -> (B, 1, 3C): c_attn's layout
        y = decode_attention(qkv, self.kv[layer], input_pos)  # (B, 1, C), heads side by side
        return y.view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)


BLOCK_T = 64  # cached positions a program reads at a time


@functools.cache
def _triton_supports(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (7, 0)  # as torch.compile requires


def decode_attention(qkv: Tensor, kv: Tensor, position: Tensor, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Attention of one new position per sequence, writing its key and value into the cache first.

    qkv (B, 1, 3C): the new position's query, key and value, heads side by side (c_attn's output); converted
    to the cache's dtype.
    kv (2, B, H, max_len, hs): the cache, contiguous, for which decode_attention_supported holds; position (1,): where
    the new key and value go. Each query sees the keys at positions 0..position.
    rotary: model.Rotary's cos and sin tables (max_len, hs/2), to rotate the query and key by first as
    Rotary does (in fp32, the result in the cache's dtype).
    Returns (B, 1, C), heads side by side, in the cache's dtype.
    """
    qkv = qkv.to(kv.dtype)
    B, _, three_c = qkv.shape
    H, hs = kv.size(2), kv.size(4)
    cos, sin = rotary if rotary is not None else (kv, kv)  # any tensors: the kernel reads the tables only with ROTARY
    out = torch.empty(B, 1, three_c // 3, dtype=qkv.dtype, device=qkv.device)
    with torch.cuda.device(kv.device):  # Triton launches on the current device, which need not be the cache's
        _decode_attention[(B, H)](
            qkv,
            kv,
            position,
            cos.contiguous(),
            sin.contiguous(),
            out,
            qkv.stride(0),
            kv.stride(0),
            kv.stride(1),
            kv.stride(2),
            hs**-0.5,
            H=H,
            HS=hs,
            ROTARY=rotary is not None,
            BLOCK_T=BLOCK_T,
            num_warps=4,
        )
    return out


if triton is not None:

    @triton.jit
    def _rotated(x_ptr, cos_ptr, sin_ptr, position, d, HS: tl.constexpr):
        """Rotary's rotation of the head vector x at x_ptr, in fp32: channel i < HS/2 is x_i cos - x_(i+HS/2) sin,
        channel i >= HS/2 is x_i cos + x_(i-HS/2) sin, with the angles of `position`."""
        angle = position * (HS // 2) + d % (HS // 2)
        cos = tl.load(cos_ptr + angle).to(tl.float32)
        sin = tl.load(sin_ptr + angle).to(tl.float32)
        partner = tl.load(x_ptr + (d + HS // 2) % HS).to(tl.float32)
        return tl.load(x_ptr + d).to(tl.float32) * cos + tl.where(d < HS // 2, -partner, partner) * sin

    @triton.jit
    def _decode_attention(
        qkv_ptr,
        kv_ptr,
        position_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        stride_qkv_b,
        stride_kv,
        stride_kv_b,
        stride_kv_h,
        scale,
        H: tl.constexpr,
        HS: tl.constexpr,
        ROTARY: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """One program per (sequence, head): the new query and key rotated when ROTARY, the new key and value
        stored, then an online softmax over the cached keys in blocks of BLOCK_T."""
        b, h = tl.program_id(0), tl.program_id(1)
        position = tl.load(position_ptr).to(tl.int32)
        d = tl.arange(0, HS)
        new = qkv_ptr + b * stride_qkv_b + h * HS  # this head's query; its key and value follow C and 2C later
        dtype = out_ptr.dtype.element_ty
        if ROTARY:  # rounded to the cache's dtype, as Rotary's output is
            q = _rotated(new, cos_ptr, sin_ptr, position, d, HS).to(dtype)
            new_key = _rotated(new + H * HS, cos_ptr, sin_ptr, position, d, HS).to(dtype)
        else:
            q = tl.load(new + d)
            new_key = tl.load(new + H * HS + d)
        q = (q.to(tl.float32) * scale).to(tl.float32)  # under torch.compile scale comes as fp64
        keys = kv_ptr + b * stride_kv_b + h * stride_kv_h
        values = keys + stride_kv
        tl.store(keys + position * HS + d, new_key)
        tl.store(values + position * HS + d, tl.load(new + 2 * H * HS + d))
        tl.debug_barrier()  # the stores above are read back below, by other threads of this program
        m = tl.full((), float("-inf"), tl.float32)  # running max of the scores
        total = tl.zeros((), tl.float32)  # running sum of exp(score - m)
        acc = tl.zeros((HS,), tl.float32)  # running sum of exp(score - m) * value
        for start in range(0, position + 1, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            seen = t <= position
            k = tl.load(keys + t[:, None] * HS + d[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
            s = tl.where(seen, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            rescale = tl.exp(m - m_new)
            v = tl.load(values + t[:, None] * HS + d[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            total = total * rescale + tl.sum(p, axis=0)
            m = m_new
        tl.store(out_ptr + b * H * HS + h * HS + d, (acc / total).to(dtype))
