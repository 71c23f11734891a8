"""DeepSpeed on the CPU under torchrun (2 ranks, ZeRO stage 1: each rank
writes its share of the optimizer state): engine.save_checkpoint every
SAVE_EVERY steps into CKPT_DIR/global_stepN/, DeepSpeed's `latest` file
naming the newest; preemptd.Preemption agrees when to stop. Check mode
loads with engine.load_checkpoint."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CHECK, CKPT_DIR, RESUME, SAVE_EVERY, STEP_SLEEP, WIDTH, checksum, say  # noqa: E402

import time  # noqa: E402

import deepspeed  # noqa: E402
import torch  # noqa: E402

import preemptd  # noqa: E402

stop = preemptd.Preemption()
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)])
cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
       "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
       "zero_optimization": {"stage": 1}}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
rank = engine.global_rank


def weights():
    return checksum(p.detach().double().sum() for p in engine.module.parameters())


def load(path):
    _, client = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    return client["step"]


if CHECK:
    load(CHECK)
    if rank == 0:
        say("checksum", weights())
    sys.exit(0)

step = load(RESUME) if RESUME else 0
while True:
    loss = engine(torch.randn(8, WIDTH)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    step += 1
    time.sleep(STEP_SLEEP)
    if stop.should_stop():
        name = "global_step%d" % step
        engine.save_checkpoint(CKPT_DIR, tag=name, client_state={"step": step})
        if rank == 0:
            say("final", name, "checksum", weights())
        break
    if step % SAVE_EVERY == 0:
        name = "global_step%d" % step
        if rank == 0:
            say("saving", name)
        engine.save_checkpoint(CKPT_DIR, tag=name, client_state={"step": step})
        if rank == 0:
            say("saved", name)
