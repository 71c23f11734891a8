"""A real torchrun + torch.distributed.checkpoint training loop for
preemptd's trials: CPU (gloo), Debian's python3-torch 1.13.

Every rank trains the same small MLP (DDP), saves a DCP checkpoint every
SAVE_EVERY steps into CKPT_DIR/step-N (shards first, .metadata last), and on
SIGTERM finishes the step (and any save in progress), agrees with the other
ranks to stop (all_reduce MAX), saves once more and exits 0. Run it as users
do, under torchrun, and point preemptd at its workers.

  torchrun --nproc_per_node 2 --redirects 2 --tee 2 train_dcp.py
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from dcp_compat import dcp  # noqa: E402

CKPT_DIR = os.environ["CKPT_DIR"]
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "20"))
WIDTH = int(os.environ.get("WIDTH", "1024"))
STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0.02"))

stop = torch.zeros(1)


def on_term(signum, frame):
    stop.fill_(1)  # acted on at the next step boundary, by every rank


signal.signal(signal.SIGTERM, on_term)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)]))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)


def state():
    # DDP keeps the ranks' weights equal; DCP writes the replicated tensors
    # once and .metadata last, from the coordinator.
    return model.state_dict()


def save(step):
    path = os.path.join(CKPT_DIR, f"step-{step}")
    t0 = time.time()
    dcp.save_state_dict(state(), storage_writer=dcp.FileSystemWriter(path))
    if rank == 0:
        print(f"saved step-{step} in {time.time() - t0:.2f}s", flush=True)


def load(path):
    sd = state()
    dcp.load_state_dict(sd, storage_reader=dcp.FileSystemReader(path))
    model.load_state_dict(sd)


if os.environ.get("CHECK_DIR"):
    # Verification mode: load CHECK_DIR and print a checksum of the weights.
    load(os.environ["CHECK_DIR"])
    total = sum(float(p.double().sum()) for p in model.parameters())
    if rank == 0:
        print(f"checksum {total:.6f}", flush=True)
    dist.destroy_process_group()
    sys.exit(0)

step = int(os.environ.get("START_STEP", "0"))
while True:
    x = torch.randn(32, WIDTH)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    time.sleep(STEP_SLEEP)
    flag = stop.clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        save(step)  # the final checkpoint
        if rank == 0:
            total = sum(float(p.double().sum()) for p in model.parameters())
            print(f"final step-{step} checksum {total:.6f}", flush=True)
        break
    if step % SAVE_EVERY == 0:
        save(step)
dist.destroy_process_group()
