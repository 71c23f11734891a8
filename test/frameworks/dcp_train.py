"""torch 2.x: torchrun (gloo, CPU) + torch.distributed.checkpoint, each rank
holding the same DDP model and Adam state; a checkpoint every SAVE_EVERY
steps into CKPT_DIR/step-N with dcp.save (MODE=sync) or dcp.async_save
(MODE=async: the save goes on while training does). preemptd.Preemption
agrees across ranks when to stop; the final save is synchronous, after any
async save in flight has finished."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CHECK, CKPT_DIR, RESUME, SAVE_EVERY, STEP_SLEEP, WIDTH, checksum, say  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

import preemptd  # noqa: E402

MODE = os.environ.get("MODE", "sync")
stop = preemptd.Preemption()  # SIGTERM (preemptd's default trainer.signal)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)]))
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
# async_save's collectives run in a thread of their own: on a group of
# their own, or they interleave with DDP's on the default group.
save_group = dist.new_group(backend="gloo") if MODE == "async" else None


def state(step=0):
    m, o = get_state_dict(model, opt)
    return {"model": m, "optim": o, "step": torch.tensor(step)}


def load(path):
    sd = state()
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return int(sd["step"])


def weights():
    return checksum(p.detach().double().sum() for p in model.parameters())


if CHECK:
    load(CHECK)
    if rank == 0:
        say("checksum", weights())
    dist.destroy_process_group()
    sys.exit(0)

step = load(RESUME) if RESUME else 0
pending = None  # (name, future) of an async save in flight
while True:
    loss = model(torch.randn(16, WIDTH)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    time.sleep(STEP_SLEEP)
    if pending and pending[1].done():
        pending[1].result()
        if rank == 0:
            say("saved", pending[0])
        pending = None
    if stop.should_stop():
        if pending:
            pending[1].result()  # the save in flight first: dcp saves one at a time
            if rank == 0:
                say("saved", pending[0])
        name = "step-%d" % step
        dcp.save(state(step), checkpoint_id=os.path.join(CKPT_DIR, name))
        if rank == 0:
            say("final", name, "checksum", weights())
        break
    if step % SAVE_EVERY == 0:
        name = "step-%d" % step
        if rank == 0:
            say("saving", name)
        if MODE == "async":
            if pending:
                pending[1].result()
                if rank == 0:
                    say("saved", pending[0])
            pending = (name, dcp.async_save(state(step), checkpoint_id=os.path.join(CKPT_DIR, name), process_group=save_group))
        else:
            dcp.save(state(step), checkpoint_id=os.path.join(CKPT_DIR, name))
            if rank == 0:
                say("saved", name)
dist.destroy_process_group()
