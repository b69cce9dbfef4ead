"""Splitting one clip's DiT windows/tiles across the ranks of an initialised process group.

Used by ``predict_noise(..., distributed=True)``: every rank holds the same noisy latents, computes the eps of its
contiguous block of crops, and ``gather_eps`` all-gathers the blocks so that every rank blends all of them and steps
the scheduler identically. Nothing here runs, and torch.distributed is not touched, without an initialised group of
two or more ranks.
"""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` as rank 0 holds it, on every rank: the ranks then start from bit-identical inputs even where their own
    upstream kernels (the encoder, the condition's resize) differ in rounding."""
    import torch.distributed as dist

    x = x.clone(memory_format=torch.contiguous_format)   # the caller's tensor is left as it was
    dist.broadcast(x, src=0)
    return x


def share(items: list, rank: int, size: int) -> list:
    """This rank's contiguous block of ``items``, ceil(len / size) long on every rank: the last block is padded by
    repeating the last item (its results are dropped by ``gather_eps``), so that every rank gathers one shape."""
    if not items:
        raise ValueError("share needs at least one item")
    n = -(-len(items) // size)
    padded = items + items[-1:] * (n * size - len(items))
    return padded[rank * n:(rank + 1) * n]


def gather_eps(mine: list[torch.Tensor], total: int, size: int) -> list[torch.Tensor]:
    """All ranks' eps, in crop order: ``mine`` is this rank's block of equal-shaped (B, C, T, H, W) crops from
    ``share``; returns the ``total`` crops' eps (the padding dropped), the same list on every rank."""
    import torch.distributed as dist

    stacked = torch.stack(mine).contiguous()                    # n b c t h w
    blocks = [torch.empty_like(stacked) for _ in range(size)]
    dist.all_gather(blocks, stacked)
    return list(torch.cat(blocks).unbind())[:total]
