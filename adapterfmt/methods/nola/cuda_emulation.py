"""CPU emulation of torch's CUDA ``uniform_(-1, 1)`` on a fresh fp32 tensor (UNVERIFIED here).

The official NOLA GPT-2/LLaMA code reseeds the CUDA generator (offset 0) and fills a
contiguous ``(k, out, in)`` tensor with ``uniform_(-1, 1)``. What torch's CUDA kernel does
(``aten/src/ATen/native/cuda/DistributionTemplates.h``, ``Distributions.cuh``; see
``/work/shared/reference/nola-official.md`` §11.1):

* blocks of 256 threads; ``grid = min(ceil(numel/256), sm_count * (threads_per_sm // 256))``;
  T = 256 * grid threads in total;
* thread ``t`` runs ``curand_init(seed, subsequence=t, offset=0)``: Philox4x32-10 with key
  (lo32(seed), hi32(seed)) and counter (draw lo, draw hi, lo32(t), hi32(t)), since curand's
  ``skipahead_sequence`` adds the subsequence to the counter's high 64 bits;
* draw ``d`` of thread ``t`` (one ``curand_uniform4``) covers elements
  ``t + T*(4d + j)``, j = 0..3, with output word j; so element ``n`` takes word
  ``(n // T) % 4`` of draw ``n // (4T)`` of thread ``n % T``;
* ``curand_uniform``: ``float(u) * 2**-32 + 2**-33`` in fp32 (u -> float rounds to nearest;
  the product is exact so FMA contraction does not matter), a value in (0, 1];
* torch: ``v = fl32(rand * 2 + (-1))`` (again exact product, one rounding), and ``v == 1``
  is replaced by ``-1`` (the "reverse bounds" step). Older torch releases instead mapped
  ``rand == 1`` to 0 before the affine step; for fp32 U(-1, 1) both give the same values
  (fl32(2r - 1) < 1 for every fp32 r < 1).

Uncertainties (why imports using this are marked unverified): not checked against a GPU
here; torch versions may change the grid (pytorch/pytorch#194828 divides it by the unroll
factor); tensors over 2**31 elements are split into several launches with advancing
offsets (not emulated: refused); bf16 generation (LLaMA ``--bf16``) casts before the clamp
and is not emulated (the fp32 values are used, an approximation).

Example:
    >>> cuda_uniform_range(1, 0, 4, 4, sm_count=1, threads_per_sm=256).shape
    torch.Size([4])
"""
from __future__ import annotations

import torch

from .generator import MASK32, philox4x32_10

BLOCK = 256
MAX_32BIT_INDEX = 2**31 - 1


def total_threads(numel: int, sm_count: int, threads_per_sm: int) -> int:
    """Threads torch launches for ``numel`` elements on a GPU with this geometry."""
    if sm_count < 1 or threads_per_sm < BLOCK:
        raise ValueError(f"bad GPU geometry sm_count={sm_count}, threads_per_sm={threads_per_sm}")
    grid = min(-(-numel // BLOCK), sm_count * (threads_per_sm // BLOCK))
    return max(1, grid) * BLOCK


def cuda_uniform_range(seed: int, start: int, stop: int, numel: int, sm_count: int,
                       threads_per_sm: int, chunk: int = 1 << 18) -> torch.Tensor:
    """Elements ``[start, stop)`` of ``torch.empty(numel, device='cuda').uniform_(-1, 1)`` after
    ``torch.manual_seed(seed)`` on a GPU with ``sm_count`` SMs and ``threads_per_sm``, as fp32."""
    if numel > MAX_32BIT_INDEX:
        raise ValueError(f"{numel} elements exceed torch's 32-bit launch; the split launch is not emulated")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is not a uint64")
    threads = total_threads(numel, sm_count, threads_per_sm)
    key = torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64)
    out = torch.empty(stop - start, dtype=torch.float32)
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        n = torch.arange(lo, hi, dtype=torch.int64)
        thread, lane = n % threads, n // threads
        draw, word = lane // 4, lane % 4
        counter = torch.stack([draw & MASK32, draw >> 32, thread & MASK32, thread >> 32], dim=-1)
        words = philox4x32_10(counter, key).gather(1, word.view(-1, 1)).view(-1)
        out[lo - start:hi - start] = _torch_cuda_uniform_m1_1(words)
    return out


def _torch_cuda_uniform_m1_1(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64) -> torch CUDA fp32 uniform_(-1, 1) values (see module docstring)."""
    as_float = words.to(torch.float64).to(torch.float32)  # exact, then one round-to-nearest
    rand = (as_float.double() * 2.0**-32 + 2.0**-33).to(torch.float32)  # exact sum, one rounding
    value = (rand.double() * 2.0 - 1.0).to(torch.float32)
    return torch.where(value == 1.0, torch.tensor(-1.0), value)
