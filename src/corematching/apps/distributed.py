"""Evaluation across processes: `torchrun --nproc-per-node N -m corematching eval ...`.

One evaluation's answers may lie in several JSON-lines files next to each other: the output file itself
(written by single-process runs) and one file per rank of each distributed run, `<output>.rank<r>-of-<n>`.
They all start with the same settings line, and together they hold each question at most once:

  - rank 0 reads every existing file (dropping a torn last line), lists the questions none of them has
    answered, and sends that list to all ranks;
  - rank r answers every n-th of those (r, r + n, ...) and appends to its own file;
  - the summary reads all the files.

So a run interrupted at any point and resumed with any number of processes answers each remaining question
exactly once. Ranks talk over torch.distributed: gloo on CPU, nccl on CUDA (RANK, WORLD_SIZE and LOCAL_RANK
come from the environment torchrun sets).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

RANK_FILE = re.compile(r"\.rank(\d+)-of-(\d+)$")


@dataclass
class Shard:
    """This process's place in an evaluation: rank `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast(self, value):
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def share(self, pending: list[int]) -> list[int]:
        """This rank's part of `pending` (the list as rank 0 computed it)."""
        return self.broadcast(pending)[self.rank :: self.world_size]

    def result_file(self, output: Path) -> Path:
        """Where this process appends its answers."""
        if not self.distributed:
            return output
        return output.with_name(f"{output.name}.rank{self.rank}-of-{self.world_size}")


def shard_from_env() -> Shard:
    """The shard torchrun describes in the environment (a single process when it does not)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} do not describe a process of the run")
    return Shard(rank, world_size, local_rank)


def start(shard: Shard, device: str | None) -> str:
    """Join the process group (gloo on CPU, nccl on CUDA); returns the device this rank evaluates on."""
    if device is None:
        device = f"cuda:{shard.local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{shard.local_rank}"
    if shard.distributed:
        import torch.distributed as dist

        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return device


def stop(shard: Shard) -> None:
    if shard.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def result_files(output: Path) -> list[Path]:
    """The output file and every rank file of it that exists, in a fixed order."""
    files = [output] if output.exists() else []
    if output.parent.exists():
        ranks = [p for p in output.parent.glob(f"{output.name}.rank*-of-*") if RANK_FILE.search(p.name)]
        files.extend(sorted(ranks, key=lambda p: tuple(int(x) for x in RANK_FILE.search(p.name).groups())[::-1]))
    return files
