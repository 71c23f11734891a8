"""One node's share of a multi-node torchrun job for preemptd's trials: CPU
(gloo), Debian's python3-torch 1.13, torch.distributed.checkpoint.

Each node runs torchrun with --nnodes N --node_rank R and its own CKPT_DIR.
The state is a replicated MLP (DDP; DCP has the coordinator write it) and a
table sharded across the ranks (a ShardedTensor: each rank writes its own
rows, to its own node's folder), so that every node holds a part of each
checkpoint and rank 0's node the .metadata. The loop asks preemptd's helper
(clients/python) every step whether to stop: the ranks agree
(all_reduce MAX), all save the same step, and exit 0.

  torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --master_addr ... \\
      --redirects 2 --tee 2 train_job.py --node nodeR

--node only names the node on the command line (preemptd's trainer.match
tells the nodes' workers apart on one machine). With CHECK_DIR set, it
loads that checkpoint instead and prints each rank's checksums.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from dcp_compat import dcp  # first: it patches what the imports below load

from torch.distributed._shard import sharded_tensor  # noqa: E402
from torch.distributed._shard.sharding_spec import ChunkShardingSpec  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python"))
import preemptd  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--node", default="")
ap.parse_args()

CKPT_DIR = os.environ["CKPT_DIR"]
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "0"))
WIDTH = int(os.environ.get("WIDTH", "256"))
ROWS = int(os.environ.get("ROWS", "4096"))
STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0.05"))

stop = preemptd.Preemption()  # SIGTERM and notice.json, agreed across ranks
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
START_STEP = int(os.environ.get("START_STEP", "0"))
torch.manual_seed(START_STEP)  # each run its own weights (a load replaces them)
model = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(3)]))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
table = sharded_tensor.zeros(spec, ROWS * world, WIDTH)
gen = torch.Generator().manual_seed(START_STEP + 1000 + rank)
table.local_shards()[0].tensor.normal_(generator=gen)


def state():
    sd = dict(model.state_dict())
    sd["table"] = table
    return sd


def checksums():
    m = sum(float(p.double().sum()) for p in model.parameters())
    t = float(table.local_shards()[0].tensor.double().sum())
    return f"model {m:.6f} table {t:.6f}"


def save(step):
    path = os.path.join(CKPT_DIR, f"step-{step}")
    os.makedirs(path, exist_ok=True)  # torch 1.13 makes it on the coordinator only: a shared folder
    t0 = time.time()
    dcp.save_state_dict(state(), storage_writer=dcp.FileSystemWriter(path))
    print(f"rank {rank}: saved step-{step} in {time.time() - t0:.2f}s", flush=True)


if os.environ.get("CHECK_DIR"):
    sd = state()
    table.local_shards()[0].tensor.zero_()
    dcp.load_state_dict(sd, storage_reader=dcp.FileSystemReader(os.environ["CHECK_DIR"]))
    model.load_state_dict({k: v for k, v in sd.items() if k != "table"})
    print(f"check rank {rank} {checksums()}", flush=True)
    dist.destroy_process_group()
    sys.exit(0)

step = START_STEP
while True:
    x = torch.randn(16, WIDTH)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    table.local_shards()[0].tensor.add_(torch.randn(ROWS, WIDTH, generator=gen), alpha=1e-3)
    step += 1
    time.sleep(STEP_SLEEP)
    if stop.should_stop():
        save(step)  # every rank, the same step
        print(f"final step-{step} rank {rank} {checksums()}", flush=True)
        break
    if SAVE_EVERY and step % SAVE_EVERY == 0:
        save(step)
dist.destroy_process_group()
