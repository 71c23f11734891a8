"""torchrun + torch.distributed.checkpoint (torch 2.x) with preemptd: a DCP
checkpoint every SAVE_EVERY steps (dcp.async_save: the save goes on while
training does), and on preemptd's signal (SIGTERM, sent to the ranks
themselves) or notice every rank stops on the same step and saves once
more. On a new machine preemptd.restore() brings the run's latest
checkpoint back (rank 0 chooses, one rank per node fetches) and every rank
loads it.

  pip install preemptd-*.whl     # `make wheel` in preemptd's repository
  torchrun --nproc-per-node=8 train.py

NCCL on GPUs, gloo on the CPU (it runs on a laptop as it is). DCP writes
.metadata last: preemptd's sign that the checkpoint is complete.
"""
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import preemptd

CKPT_DIR = os.environ.get("CKPT_DIR", "/data/ckpt")
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "1000"))
STEPS = int(os.environ.get("STEPS", "1000000000"))

stop = preemptd.Preemption()  # SIGTERM, and <run_dir>/notice.json ($PREEMPTD_RUN_DIR)
backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()
device = torch.device("cpu")
if backend == "nccl":
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1024, 1024).to(device))
opt = torch.optim.AdamW(model.parameters())
# async_save's collectives run in a background thread: a gloo group of their own.
save_group = dist.new_group(backend="gloo")


def state(step):
    m, o = get_state_dict(model, opt)
    return {"model": m, "optim": o, "step": torch.tensor(step)}


step = 0
resume = preemptd.restore()  # every rank: the same folder, or None on the first start
if resume:
    sd = state(0)
    dcp.load(sd, checkpoint_id=resume)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    step = int(sd["step"])
if rank == 0:
    print("resuming from", resume, flush=True)

pending = None  # the async save in flight
while step < STEPS:
    loss = model(torch.randn(64, 1024, device=device)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if stop.should_stop():  # agreed by every rank
        if pending:
            pending.result()
        if rank == 0:
            print("preempted,", stop.seconds_left(), "s left; saving step", step, flush=True)
        dcp.save(state(step), checkpoint_id=os.path.join(CKPT_DIR, f"step-{step}"))
        break
    if step % SAVE_EVERY == 0:
        if pending:
            pending.result()  # one save at a time
        pending = dcp.async_save(state(step), checkpoint_id=os.path.join(CKPT_DIR, f"step-{step}"),
                                 process_group=save_group)
if pending:
    pending.result()
if rank == 0:
    print("stopped at step", step, flush=True)
dist.destroy_process_group()
