"""Lightning 2.x, one process on the CPU: ModelCheckpoint every SAVE_EVERY
steps keeping the 2 newest (save_top_k deletes the older files while
training goes on), save_last True or "link" (SAVE_LAST), and Lightning's
own SIGTERM handling, with preemptd.lightning.Preemptd saving
preempted-step=N.ckpt and stopping on preemptd's signal."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CHECK, CKPT_DIR, RESUME, SAVE_EVERY, STEP_SLEEP, WIDTH, checksum, say  # noqa: E402

import time  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from preemptd.lightning import Preemptd  # noqa: E402

SAVE_LAST = {"true": True, "link": "link"}[os.environ.get("SAVE_LAST", "true")]


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)])

    def training_step(self, batch, _):
        time.sleep(STEP_SLEEP)
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def weights(model):
    return checksum(p.detach().double().sum() for p in model.parameters())


if CHECK:
    # Lightning's own loader: the module's weights from the restored file.
    model = Model.load_from_checkpoint(CHECK, map_location="cpu")
    say("checksum", weights(model))
    sys.exit(0)


class Announce(ModelCheckpoint):
    """ModelCheckpoint that says when its saves begin and end."""

    def _save_checkpoint(self, trainer, filepath):
        name = os.path.basename(filepath)
        say("saving", name)
        super()._save_checkpoint(trainer, filepath)
        say("saved", name)


class Final(L.Callback):
    def __init__(self, p):
        self.p = p

    def on_fit_end(self, trainer, module):
        if self.p.last_path:
            say("final", os.path.basename(self.p.last_path), "checksum", weights(module))

    def on_exception(self, trainer, module, exc):
        self.on_fit_end(trainer, module)


pre = Preemptd()
data = torch.utils.data.TensorDataset(torch.randn(1 << 16, WIDTH))
ckpt = Announce(dirpath=CKPT_DIR, filename="{step}", every_n_train_steps=SAVE_EVERY, save_top_k=2,
                monitor="step", mode="max", save_last=SAVE_LAST)
trainer = L.Trainer(max_epochs=1000, accelerator="cpu", devices=1, callbacks=[ckpt, pre, Final(pre)],
                    logger=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=RESUME or None)
