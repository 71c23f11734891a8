"""PyTorch Lightning, preemptd-aware: on SIGUSR1 (preemptd's trainer.signal in
preemptd.yaml beside this file) the callback saves a .ckpt and stops cleanly;
preemptd uploads the file once it is complete and restores it next time."""
import os
import signal

import lightning as L
import torch

CKPT_DIR = os.environ.get("CKPT_DIR", "/data/ckpt")


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(32, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class SaveOnSignal(L.Callback):
    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "requested", True))

    def on_train_batch_end(self, trainer, *_):
        if self.requested:
            trainer.save_checkpoint(os.path.join(CKPT_DIR, f"step={trainer.global_step}.ckpt"))
            trainer.should_stop = True


data = torch.utils.data.TensorDataset(torch.randn(4096, 32), torch.randn(4096, 1))
ckpts = sorted((f for f in os.listdir(CKPT_DIR) if f.endswith(".ckpt")), key=os.path.getmtime) if os.path.isdir(CKPT_DIR) else []
trainer = L.Trainer(max_epochs=1000, callbacks=[SaveOnSignal()], enable_checkpointing=False)
trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=64),
            ckpt_path=os.path.join(CKPT_DIR, ckpts[-1]) if ckpts else None)
