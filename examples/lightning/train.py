"""PyTorch Lightning 2.x with preemptd: ModelCheckpoint saves every
SAVE_EVERY steps (preemptd syncs each one to the store as it completes),
and the preemptd.lightning.Preemptd callback saves preempted-step=N.ckpt and
stops on preemptd's signal (SIGTERM) or notice, every rank at the same step.
On a new machine preemptd.restore() brings the run's latest checkpoint
back and fit() resumes from it.

  pip install preemptd-*.whl     # `make wheel` in preemptd's repository
  python train.py                # preemptd runs beside it (preemptd.yaml)

It runs on the CPU as it is (accelerator="auto" takes the GPUs where there
are some). With several ranks, give preemptd another signal than SIGTERM
(trainer.signal: SIGUSR1 and Preemptd(signals=(signal.SIGUSR1,))): see
preemptd.lightning.
"""
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

import preemptd
from preemptd.lightning import Preemptd

CKPT_DIR = os.environ.get("CKPT_DIR", "/data/ckpt")
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "500"))
STEPS = int(os.environ.get("STEPS", "-1"))  # -1: until preempted


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


resume = preemptd.restore()  # the latest committed checkpoint, or None on the first start
print("resuming from", resume, flush=True)
data = torch.utils.data.TensorDataset(torch.randn(1 << 14, 256), torch.randn(1 << 14, 1))
trainer = L.Trainer(max_steps=STEPS, max_epochs=-1, accelerator="auto", devices=1, logger=False,
                    enable_progress_bar=False,
                    callbacks=[ModelCheckpoint(dirpath=CKPT_DIR, filename="{step}", every_n_train_steps=SAVE_EVERY,
                                               save_top_k=2, monitor="step", mode="max"),
                               Preemptd()])
try:
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=64, shuffle=True), ckpt_path=resume)
except SIGTERMException:
    pass  # Lightning's own SIGTERM handling ends fit() so, after Preemptd has saved
print("stopped at step", trainer.global_step, flush=True)
