"""The order of an epoch and each rank's share of it: pure functions, no state, no communication.

    order = epoch_order(train_indices, seed, epoch)            # the same on every rank
    slots = micro_slots(len(order), batch_size, world_size)     # micro-batches of the epoch
    mine  = rank_batches(order, batch_size, rank, world_size)   # this rank's batch of each slot

The epoch's order is a permutation drawn from (seed, epoch) alone. It is cut into slots of
`batch_size * world_size` consecutive samples; slot m is micro-batch m of the epoch on every rank,
and rank r takes the r-th of `world_size` contiguous, balanced parts of it (sizes differ by at
most one). A full slot gives every rank exactly `batch_size` samples; the last slot of an epoch may
be short, and then its parts are uneven, down to empty parts when it holds fewer samples than there
are ranks. Nothing is repeated and nothing dropped: every training sample is met exactly once per
epoch across the ranks, and every rank has the same number of micro-batches (DDP needs the same
number of steps everywhere).

So that a short part does not weigh as much as a full one, the training step scales each rank's
loss by `slot_weight` (world_size * part / slot): DDP's mean over the ranks then weighs every
sample of the slot equally. With one rank the slots are the plain batches of the order and every
weight is 1.

The data position of a run is global: (epoch, slot). Each rank's batches follow from it, so one
checkpoint, written by rank 0, places every rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def epoch_order(indices: Sequence[int], seed: int, epoch: int) -> list[int]:
    """`indices` permuted by a generator seeded from (seed, epoch) alone."""
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [indices[i] for i in perm.tolist()]


def micro_slots(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Micro-batches per epoch: slots of batch_size * world_size samples, the last one possibly short."""
    return math.ceil(samples / (batch_size * world_size))


def part_bounds(slot_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's part of a slot of `slot_size` samples: contiguous, balanced."""
    return rank * slot_size // world_size, (rank + 1) * slot_size // world_size


def slot_size(samples: int, slot: int, batch_size: int, world_size: int) -> int:
    """How many samples slot `slot` of an epoch of `samples` holds."""
    per_slot = batch_size * world_size
    return max(0, min(per_slot, samples - slot * per_slot))


def rank_batches(order: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batch of each slot of `order` (an empty list where its part is empty)."""
    per_slot = batch_size * world_size
    batches = []
    for slot in range(micro_slots(len(order), batch_size, world_size)):
        chunk = order[slot * per_slot : (slot + 1) * per_slot]
        start, end = part_bounds(len(chunk), rank, world_size)
        batches.append(list(chunk[start:end]))
    return batches


def slot_weight(samples: int, slot: int, batch_size: int, rank: int, world_size: int) -> float:
    """The factor on rank's loss in slot `slot` that makes DDP's mean over ranks a mean over the
    slot's samples: world_size * (rank's part) / (slot size). 1.0 for a full slot; 0.0 for an empty part."""
    size = slot_size(samples, slot, batch_size, world_size)
    start, end = part_bounds(size, rank, world_size)
    return world_size * (end - start) / size if size else 0.0


def rank_share(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """A contiguous, balanced part of `indices` (validation: every sample evaluated once, in rank
    order, so gathering the parts by rank restores the order of `indices`)."""
    start, end = part_bounds(len(indices), rank, world_size)
    return list(indices[start:end])
