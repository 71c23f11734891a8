"""A training loop that checkpoints when preemptd advises (the helper's
should_checkpoint(), fed by advice.json and trainer.checkpoint_signal
SIGUSR1) and stops on SIGTERM, saving torch-DCP-shaped folders (two shards,
then .metadata) whose save takes as long as the control file says.

usage: advised_trainer.py CKPT_DIR PID_FILE LOG CONTROL
"""

import json
import os
import signal
import sys
import time

import preemptd

ckpt_dir, pid_file, log_path, control = sys.argv[1:5]


def save(step, why):
    with open(control) as f:
        save_s = float(f.read())
    start = time.time()
    d = os.path.join(ckpt_dir, "step-%06d" % step)
    os.makedirs(d)
    with open(os.path.join(d, "__0_0.distcp"), "wb") as f:
        f.write(os.urandom(64 << 10))
    time.sleep(save_s)
    with open(os.path.join(d, "__1_0.distcp"), "wb") as f:
        f.write(os.urandom(64 << 10))
    with open(os.path.join(d, ".metadata"), "wb") as f:
        f.write(os.urandom(512))
    advice = p.advice() or {}
    with open(log_path, "a") as f:
        f.write(json.dumps({"step": step, "start": start, "end": time.time(), "save_s": save_s, "why": why,
                            "every_s": advice.get("checkpoint_every_s")}) + "\n")


p = preemptd.Preemption(checkpoint_signals=(signal.SIGUSR1,))
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)
save(0, "start")
step = 0
while True:
    step += 1
    time.sleep(0.02)
    if p.should_stop():
        save(step, "stop")
        break
    if p.should_checkpoint():
        save(step, "advised")
