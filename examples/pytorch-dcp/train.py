"""PyTorch + torch.distributed.checkpoint under torchrun, preemptd-aware.

Run:  torchrun --nproc-per-node=8 train.py
preemptd (preemptd.yaml beside this file) sends SIGTERM to the workers
themselves (trainer.gpu_processes), not only to torchrun, so every rank stops
on the same step and saves at once; DCP writes .metadata last, which is
preemptd's sign that the checkpoint is complete. On a new machine,
`preemptd restore` brings the latest committed checkpoint back first.
"""
import json
import os
import signal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

CKPT_DIR = os.environ.get("CKPT_DIR", "/data/ckpt")
NOTICE = os.environ.get("PREEMPTD_NOTICE_FILE", "/run/preemptd/notice.json")
stop = torch.zeros(1)


def on_term(signum, frame):
    stop.fill_(1)  # checked at the next step boundary


signal.signal(signal.SIGTERM, on_term)
dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4096, 4096).cuda())
opt = torch.optim.AdamW(model.parameters())

step = 0
latest = sorted((d for d in os.listdir(CKPT_DIR) if d.startswith("step-")), key=lambda d: int(d[5:])) if os.path.isdir(CKPT_DIR) else []
if latest:
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(CKPT_DIR, latest[-1]))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    step = int(latest[-1][5:])


def save(step):
    dcp.save({"model": model.state_dict(), "opt": opt.state_dict()},
             checkpoint_id=os.path.join(CKPT_DIR, f"step-{step}"))


while True:
    x = torch.randn(64, 4096, device="cuda")
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    # Every rank must agree to stop on the same step.
    flag = stop.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        if rank == 0 and os.path.exists(NOTICE):
            print("preempted:", json.load(open(NOTICE))["seconds_left"], "s left", flush=True)
        save(step)
        break
    if step % 1000 == 0:
        save(step)
dist.destroy_process_group()
