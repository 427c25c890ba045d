"""One torchrun rank: start the process group as the trainer does, stream this rank's cache batches
as `trainer distill` does, and gather every rank's window ids on rank 0 (written as JSON).

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --node-rank R ... ddp_read_worker.py CACHE OUT STEPS
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from logitcache.read.reader import CacheReader
from trainer.data import CacheBatches
from trainer.loop import init_distributed


def main() -> None:
    cache, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    env = init_distributed("cpu")
    batches = CacheBatches(CacheReader(cache), batch_size=8, seed=5, rank=env.rank, world=env.world,
                           shuffle_buffer=128)
    ids = [w for b in batches.stream(0, steps) for w in b["window_id"].tolist()]
    gathered = [None] * env.world
    dist.all_gather_object(gathered, {"rank": env.rank, "node": int(os.environ["GROUP_RANK"]),
                                      "local_rank": env.local_rank, "windows": ids})
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
