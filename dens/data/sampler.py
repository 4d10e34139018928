"""A batch sampler that balances atoms across DDP ranks (OC20's ``load_balancing: atoms``).

Every rank builds the same seeded permutation, cuts it into global batches of ``batch_size *
num_replicas`` structures and splits each global batch into ``num_replicas`` parts with nearly equal
atom counts (greedy: largest structure first, to the rank with the fewest atoms). Rank ``r`` takes part
``r``. No communication is needed, and all ranks run the same number of steps. The per-rank number of
structures varies around ``batch_size``; the per-rank atom counts match closely, which is what the
step time depends on.

Examples
--------
>>> import numpy as np
>>> natoms = np.array([10, 90, 20, 80, 30, 70, 40, 60])
>>> s0 = BalancedBatchSampler(natoms, batch_size=2, num_replicas=2, rank=0, shuffle=False)
>>> s1 = BalancedBatchSampler(natoms, batch_size=2, num_replicas=2, rank=1, shuffle=False)
>>> [int(natoms[b].sum()) for b in s0], [int(natoms[b].sum()) for b in s1]
([100, 100], [100, 100])
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BalancedBatchSampler", "balanced_partition"]


def balanced_partition(sizes: Sequence[int] | np.ndarray, num_parts: int) -> list[list[int]]:
    """Split item indices into ``num_parts`` groups with nearly equal total size (greedy LPT).

    Every group gets at least one item when there are at least ``num_parts`` items.

    Examples
    --------
    >>> balanced_partition([5, 1, 4, 2], 2)
    [[0, 1], [2, 3]]
    """
    sizes = np.asarray(sizes)
    order = np.argsort(-sizes, kind="stable")
    heap = [(0, 0, p) for p in range(num_parts)]  # (load, count, part)
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for idx in order:
        load, count, p = heapq.heappop(heap)
        parts[p].append(int(idx))
        heapq.heappush(heap, (load + int(sizes[idx]), count + 1, p))
    return [sorted(p) for p in parts]


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices with atoms balanced across ranks.

    Parameters
    ----------
    natoms : array-like
        Atoms per structure (``dens.data.get_natoms(dataset)``; LMDB folders read ``metadata.npz``).
    batch_size : int
        Structures per rank per step (on average).
    num_replicas, rank : int, optional
        DDP world size and rank (default: from ``torch.distributed`` when initialised, else 1 and 0).
    shuffle : bool
        Reshuffle every epoch (seeded by ``seed + epoch``).
    seed : int
        Seed shared by all ranks.
    drop_last : bool
        Drop the last incomplete global batch; otherwise it is padded by wrapping around (as
        ``DistributedSampler``) so every rank gets at least one structure.
    """

    def __init__(
        self,
        natoms: Sequence[int] | np.ndarray,
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
            num_replicas = (
                num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            )
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.natoms = np.asarray(natoms, dtype=np.int64)
        if len(self.natoms) == 0:
            raise ValueError("BalancedBatchSampler: empty dataset")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_iteration = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def set_epoch_and_start_iteration(self, epoch: int, start_iteration: int) -> None:
        """Resume inside an epoch: skip its first ``start_iteration`` batches."""
        self.epoch = epoch
        self.start_iteration = start_iteration

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        n = len(self.natoms)
        steps = n // self.global_batch_size if self.drop_last else math.ceil(n / self.global_batch_size)
        return max(steps - self.start_iteration, 0)

    def _global_batches(self) -> list[np.ndarray]:
        n = len(self.natoms)
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(n)
        else:
            order = np.arange(n)
        g = self.global_batch_size
        if self.drop_last:
            order = order[: (n // g) * g]
        elif n % g and n % g < self.num_replicas:
            # pad the last global batch so that every rank gets a structure
            pad = self.num_replicas - n % g
            order = np.concatenate([order, order[np.arange(pad) % n]])
        return [order[i : i + g] for i in range(0, len(order), g)]

    def __iter__(self) -> Iterator[list[int]]:
        for step, chunk in enumerate(self._global_batches()):
            if step < self.start_iteration:
                continue
            parts = balanced_partition(self.natoms[chunk], self.num_replicas)
            yield [int(chunk[i]) for i in parts[self.rank]]
        self.start_iteration = 0
