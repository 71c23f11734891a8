"""preemptd for Lightning 2.x: a Callback that saves and stops on
preemptd's notice, every rank at the same step, and saves when preemptd's
advice asks for a checkpoint:

    from preemptd.lightning import Preemptd

    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath="/data/ckpt", ...), Preemptd()])
    trainer.fit(model, ckpt_path=preemptd.restore())

At the end of every training batch the ranks agree (one small all_reduce
on each rank's own device; on a GPU it never waits for the step in
flight) whether any was signalled or preemptd published a fatal notice.
When so, Trainer.save_checkpoint writes <dirpath>/preempted-step=N.ckpt (the
ModelCheckpoint's dirpath, else <default_root_dir>/checkpoints) and the
trainer stops; preemptd uploads the file once it is complete (layout
lightning) and restore() brings it back on the next machine.

Lightning's own SIGTERM handler stays in place (it is called as well): it
ends fit() with SIGTERMException after the batch, once the checkpoint above
is written. In one process, a SIGTERM that lands after this batch's
agreement is saved for in on_exception. With several ranks, give preemptd
another signal (trainer.signal: SIGUSR1, and signals=(signal.SIGUSR1,)
here): Lightning 2.6 broadcasts from inside its SIGTERM handler, a
collective that ranks signalled at different moments do not reach together.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Iterable, Optional

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.exceptions import SIGTERMException
except ImportError:  # the package's older name
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment,unused-ignore]
    from pytorch_lightning.utilities.exceptions import SIGTERMException  # type: ignore[no-redef,assignment,unused-ignore]

from . import Preemption

__all__ = ["Preemptd"]


class Preemptd(Callback):  # type: ignore[misc,unused-ignore]
    """Save and stop on preemptd's notice; save when its advice asks.

    dirpath: where the checkpoint goes (default: the ModelCheckpoint's
    dirpath, else <default_root_dir>/checkpoints). filename: its name
    without .ckpt, formatted with step and epoch. signals: the signals that
    mean "stop" (preemptd's trainer.signal). checkpoint_signals: preemptd's
    trainer.checkpoint_signal, if set. advice: save when preemptd's advice
    asks for a checkpoint. path: preemptd's run_dir (default
    $PREEMPTD_RUN_DIR or /run/preemptd). The handlers are installed here,
    before fit() installs Lightning's, which then call them too.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "preempted-step={step}",
                 signals: Iterable[int] = (signal.SIGTERM,), checkpoint_signals: Iterable[int] = (),
                 advice: bool = True, path: Optional[str] = None, fallback_every: Optional[float] = None) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.advice = advice
        self.preemption = Preemption(path, signals=signals, checkpoint_signals=checkpoint_signals,
                                     fallback_every=fallback_every)
        self.last_path: Optional[str] = None  # the checkpoint this callback saved last
        self._saved_step = -1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # The agreement's tensor on this rank's own device.
        self.preemption.device = trainer.strategy.root_device

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stop, checkpoint = self.preemption.poll(checkpoint=self.advice)
        if stop or checkpoint:
            self._save(trainer)
        if stop:
            trainer.should_stop = True

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning's SIGTERM handling ends fit() at the next step boundary;
        # one process can still save there (several ranks would each have to
        # reach the save's collectives, which the exception does not promise).
        if (isinstance(exception, SIGTERMException) and trainer.world_size == 1
                and self._saved_step != trainer.global_step):
            self._save(trainer)

    def _dir(self, trainer: Any) -> str:
        if self.dirpath:
            return self.dirpath
        cb = getattr(trainer, "checkpoint_callback", None)
        if cb is not None and getattr(cb, "dirpath", None):
            return str(cb.dirpath)
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def _save(self, trainer: Any) -> None:
        name = self.filename.format(step=trainer.global_step, epoch=trainer.current_epoch) + ".ckpt"
        path = os.path.join(self._dir(trainer), name)
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step
        self.last_path = path
