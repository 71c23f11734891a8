"""A multi-node torchrun job that stops, and saves, on the same step on every
node when any node is told to go.

Run on each of the 8 nodes, with preemptd (preemptd.yaml beside this file)
running there too:

  torchrun --nnodes 8 --node-rank $NODE_RANK --nproc-per-node 8 \
      --rdzv-backend c10d --rdzv-endpoint $HEAD:29400 train.py

A notice on one node reaches every node's preemptd within a second (through
the store; within milliseconds with job.listen), and each sends SIGTERM to
its own ranks. preemptd.py (clients/python in preemptd's repository: copy it
beside this file, or pip install that folder) turns "this rank was told" into
"the job stops now", agreed by every rank: a DCP save is collective, and a
rank that stopped alone would leave the others hanging in it.
"""
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import preemptd

CKPT_DIR = os.environ.get("CKPT_DIR", "/data/ckpt")
SAVE_EVERY = 500

stop = preemptd.Preemption()  # SIGTERM, and <run_dir>/notice.json ($PREEMPTD_RUN_DIR)
dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
model = build_model()  # noqa: F821 — your model, FSDP-wrapped or not
optim = build_optimizer(model)  # noqa: F821


def save(step):
    path = os.path.join(CKPT_DIR, f"step-{step}")
    os.makedirs(path, exist_ok=True)  # every node writes its ranks' shards into its own folder
    dcp.save(model_state(model, optim), checkpoint_id=path)  # noqa: F821; .metadata from rank 0, last


step = resume_step(CKPT_DIR)  # noqa: F821 — after `preemptd restore` on a new machine
while True:
    train_step(model, optim)  # noqa: F821
    step += 1
    if stop.should_stop():  # a collective: every rank, every step
        left = stop.seconds_left()
        if dist.get_rank() == 0:
            print(f"stopping at step {step}; {left} s to the deadline", flush=True)
        save(step)  # the job's final checkpoint: preemptd commits it once every node's part is uploaded
        break
    if step % SAVE_EVERY == 0:
        save(step)
dist.destroy_process_group()
