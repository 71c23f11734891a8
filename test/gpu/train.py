"""A real PyTorch training loop on the GPU for preemptd's GPU check: it trains
until SIGTERM, then saves a checkpoint and exits, releasing the GPU."""
import os
import signal
import sys
import time

import torch

ckpt = sys.argv[1]
stop = False


def on_term(signum, _frame):
    global stop
    stop = True
    print(f"trainer: got signal {signum} at {time.time():.3f}", flush=True)


signal.signal(signal.SIGTERM, on_term)
model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096)).cuda()
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(512, 4096, device="cuda")
step = 0
print(f"trainer: pid {os.getpid()} training on {torch.cuda.get_device_name(0)}", flush=True)
while not stop:
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if step % 50 == 0:
        torch.cuda.synchronize()
torch.cuda.synchronize()
torch.save({"step": step, "model": model.state_dict()}, ckpt)
print(f"trainer: saved checkpoint at step {step} to {ckpt} ({os.path.getsize(ckpt)} bytes)", flush=True)
