"""Hugging Face Accelerate, one process on the CPU: Accelerator.save_state
every SAVE_EVERY steps with automatic checkpoint naming
(CKPT_DIR/checkpoints/checkpoint_<i>/, total_limit=2 removing the older
ones); preemptd.Preemption says when to stop and the final save_state
follows. Check mode loads with Accelerator.load_state."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CHECK, CKPT_DIR, RESUME, SAVE_EVERY, STEP_SLEEP, WIDTH, checksum, say  # noqa: E402

import time  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration  # noqa: E402

import preemptd  # noqa: E402

stop = preemptd.Preemption()
acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=CKPT_DIR, automatic_checkpoint_naming=True,
                                                                total_limit=2))
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)])
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
model, opt = acc.prepare(model, opt)


def weights():
    return checksum(p.detach().double().sum() for p in model.parameters())


if CHECK:
    acc.load_state(CHECK)
    say("checksum", weights())
    sys.exit(0)

step = 0
if RESUME:
    acc.load_state(RESUME)
    step = int(open(os.path.join(RESUME, "step.txt")).read())
    # load_state(path) leaves automatic naming at checkpoint_0: the next save
    # would take the name of the run's first one again.
    acc.project_configuration.iteration = int(os.path.basename(RESUME).rsplit("_", 1)[1]) + 1


def save():
    name = "checkpoint_%d" % acc.project_configuration.iteration
    say("saving", name)
    acc.save_state()
    with open(os.path.join(CKPT_DIR, "checkpoints", name, "step.txt"), "w") as f:
        f.write(str(step))
    return name


while True:
    loss = model(torch.randn(16, WIDTH)).pow(2).mean()
    opt.zero_grad()
    acc.backward(loss)
    opt.step()
    step += 1
    time.sleep(STEP_SLEEP)
    if stop.should_stop():
        name = save()
        say("final", name, "checksum", weights())
        break
    if step % SAVE_EVERY == 0:
        say("saved", save())
