"""A multi-node torchrun job that resumes from the run's latest checkpoint
on new machines, and stops, and saves, on the same step on every node when
any node is told to go.

Run on each of the 8 nodes, with preemptd (preemptd.yaml beside this file)
running there too:

  torchrun --nnodes 8 --node-rank $NODE_RANK --nproc-per-node 8 \
      --rdzv-backend c10d --rdzv-endpoint $HEAD:29400 train.py

On start, preemptd.restore() fetches the run's latest committed checkpoint
into CKPT_DIR: rank 0 chooses it, the first rank of every node fetches it
(every byte checked against the manifest, files already there kept), and
every rank loads the same one; on the run's first start there is none and
training begins at step 0. (preemptd-restore.service, or the Helm chart's
init container, can fetch it before the trainer starts instead; restore()
then finds every file in place and fetches nothing.)

A notice on one node reaches every node's preemptd within a second (through
the store; within milliseconds with job.listen), and each sends SIGTERM to
its own ranks. The preemptd package (clients/python in preemptd's repository:
pip install the wheel `make wheel` builds, or copy the folder beside this
file) turns "this rank was told" into
"the job stops now", agreed by every rank: a DCP save is collective, and a
rank that stopped alone would leave the others hanging in it.

Written for torch 2.2 or later (torch.distributed.checkpoint.save/load). The
model is a stand-in: put yours in build_model(), and your optimizer's state
in state() (torch.distributed.checkpoint.state_dict.get_state_dict gives
both, FSDP-aware).
"""
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import preemptd

CKPT_DIR = os.environ.get("CKPT_DIR", "/data/ckpt")
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "500"))
STEPS = int(os.environ.get("STEPS", "1000000"))
WIDTH = int(os.environ.get("WIDTH", "1024"))


def build_model():
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)])


stop = preemptd.Preemption()  # SIGTERM, and <run_dir>/notice.json ($PREEMPTD_RUN_DIR)
backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()
device = torch.device("cpu")
if backend == "nccl":
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(build_model().to(device))
optim = torch.optim.SGD(model.parameters(), lr=1e-3)


def state(step):
    return {"model": model.state_dict(), "step": torch.tensor(step)}


def save(step):
    path = os.path.join(CKPT_DIR, f"step-{step}")
    os.makedirs(path, exist_ok=True)  # every node writes its ranks' shards into its own folder
    dcp.save(state(step), checkpoint_id=path)  # .metadata from rank 0, last


def checksum():
    return sum(float(p.double().sum()) for p in model.parameters())


# A replicated (DDP) model needs the whole checkpoint on every node; with
# sharded state (FSDP) at the same world size, part=<this node's job.node>
# fetches only this node's shards and the markers.
step = 0
path = preemptd.restore(to=CKPT_DIR)
if path:
    sd = state(0)
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd["model"])
    step = int(sd["step"])
    if rank == 0:
        print(f"resumed from {path} at step {step}, checksum {checksum():.6f}", flush=True)
elif rank == 0:
    print("no checkpoint committed yet: starting at step 0", flush=True)

start = step
while step < STEPS:
    x = torch.randn(32, WIDTH, device=device)
    loss = model(x).pow(2).mean()
    optim.zero_grad()
    loss.backward()
    optim.step()
    step += 1
    if step == start + 1 and rank == 0:
        print(f"step {step} done: training again at {time.time():.3f}", flush=True)
    if stop.should_stop():  # a collective: every rank, every step
        if rank == 0:
            print(f"stopping at step {step}; {stop.seconds_left()} s to the deadline", flush=True)
        save(step)  # the job's final checkpoint: preemptd commits it once every node's part is uploaded
        break
    if step % SAVE_EVERY == 0:
        save(step)
        if rank == 0:
            print(f"saved step-{step}, checksum {checksum():.6f}", flush=True)
dist.destroy_process_group()
