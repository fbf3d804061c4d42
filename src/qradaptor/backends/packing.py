"""Exact bit packing for 2- to 8-bit codes, in plain PyTorch (any device, no custom kernels).

``n`` codes of ``b`` bits take exactly ``ceil(n·b/8)`` bytes. Layout of the packed uint8 vector:

- The first ``m = 8·floor(n/8)`` codes (the *body*) are split into **bit planes** of 4, 2 and 1 bits
  (``PLANES``: 3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; the widest plane holds the high bits). A plane of
  width ``w`` puts ``k = 8/w`` codes in a byte the way HQQ's own 4-bit packer does: the plane is cut into
  ``k`` equal slices of the flat code array and slice ``j`` goes to bits ``8-w·(j+1) .. 8-w·j-1`` of each
  byte. A plane of ``m`` codes takes ``m·w/8`` bytes; the planes follow one another, widest first.
- The last ``n mod 8`` codes (the *tail*, at most 7) follow as a plain big-endian bit stream, padded
  with zero bits to a whole byte. Weight matrices split into groups of 8·j weights never have a tail;
  it exists so that any ``n`` packs exactly.

Unpacking a plane is one broadcast shift and one mask over its bytes (the ``k`` slices come out already
in order); planes are combined with a shift and an or per extra plane, all in uint8, so a 5-bit unpack
costs a few uint8 passes more than HQQ's 4-bit one and the same float work.
"""

from __future__ import annotations

import functools
import math

import torch

#: Plane widths per bit-width, widest (high bits) first.
PLANES: dict[int, tuple[int, ...]] = {
    2: (2,),
    3: (2, 1),
    4: (4,),
    5: (4, 1),
    6: (4, 2),
    7: (4, 2, 1),
    8: (8,),
}
PACKABLE_BITS = tuple(PLANES)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take: ``ceil(n·bits/8)``."""
    return math.ceil(n * bits / 8)


@functools.lru_cache(maxsize=None)
def _shifts(width: int, device: torch.device) -> torch.Tensor:
    """Bit offset of each of the ``8/width`` slices inside a byte, as a ``(k, 1)`` column. Made once per device:
    building it from a Python list on every call would copy it from host memory in every forward on a GPU."""
    k = 8 // width
    return torch.tensor([8 - width * (j + 1) for j in range(k)], dtype=torch.uint8, device=device).view(k, 1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2**bits)``) into ``ceil(numel·bits/8)`` uint8 bytes."""
    if bits not in PLANES:
        raise ValueError(f"cannot pack {bits}-bit codes; packable bit-widths are {list(PACKABLE_BITS)}")
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    m = n - n % 8
    body, parts, shift = codes[:m], [], bits
    for width in PLANES[bits]:
        shift -= width
        if width == 8:
            parts.append(body.clone())
            continue
        plane = (body >> shift) & ((1 << width) - 1)
        k = 8 // width
        plane = plane.view(k, m // k) << _shifts(width, codes.device)
        packed = plane[0].clone()
        for j in range(1, k):
            packed |= plane[j]
        parts.append(packed)
    if n > m:  # the tail: a big-endian bit stream of at most 7 codes, zero-padded to a byte
        tail = codes[m:]
        bit_idx = torch.arange(bits - 1, -1, -1, device=codes.device, dtype=torch.uint8)
        stream = ((tail.view(-1, 1) >> bit_idx) & 1).reshape(-1)
        stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
        weights = torch.arange(7, -1, -1, device=codes.device, dtype=torch.uint8)
        parts.append((stream.view(-1, 8) << weights).sum(dim=1, dtype=torch.uint8))
    out = torch.cat(parts) if parts else codes.new_zeros(0)
    assert out.numel() == packed_bytes(n, bits)
    return out


def unpack(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The ``n`` uint8 codes stored by :func:`pack` (a flat vector)."""
    m = n - n % 8
    codes, offset = None, 0
    for width in PLANES[bits]:
        nbytes = m * width // 8
        chunk = packed[offset : offset + nbytes]
        offset += nbytes
        if width == 8:
            plane = chunk
        else:
            # (k, m/k): row j is slice j of the flat code array, so the flat view is already in order.
            plane = (chunk.unsqueeze(0) >> _shifts(width, packed.device)).bitwise_and_((1 << width) - 1).view(m)
        codes = plane if codes is None else codes.bitwise_left_shift_(width).bitwise_or_(plane)
    if n == m:
        return codes if codes is not None else packed.new_zeros(0)
    tail_bytes = packed[offset:]
    stream = (tail_bytes.view(-1, 1) >> torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)) & 1
    stream = stream.reshape(-1)[: (n - m) * bits].view(n - m, bits)
    bit_idx = torch.arange(bits - 1, -1, -1, device=packed.device, dtype=torch.uint8)
    tail = (stream << bit_idx).sum(dim=1, dtype=torch.uint8)
    return tail if codes is None else torch.cat([codes, tail])
