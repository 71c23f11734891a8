"""preemptd for the Hugging Face Trainer: a TrainerCallback that saves and
stops on preemptd's notice, every rank at the same step, and saves when
preemptd's advice asks for a checkpoint:

    from preemptd.hf import PreemptdCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PreemptdCallback()])
    trainer.train(resume_from_checkpoint=preemptd.restore())

At the end of every step the ranks agree (one small all_reduce on each
rank's own device, args.device; on a GPU it never waits for the step in
flight) whether any was signalled or preemptd published a fatal notice.
When so, the callback sets control.should_save and
control.should_training_stop: the Trainer writes checkpoint-N/ (its
trainer_state.json last, which preemptd's hf layout waits for) and
returns from train(). preemptd uploads it and restore() brings it back.

Transformers' own on-signal save (TrainingArguments(enable_jit_checkpoint=
True), 5.x) replaces the SIGTERM handler installed here: with it, this
callback still stops on notice.json and on the advice, and preemptd takes
the Trainer's checkpoint-N/ (its checkpoint-is-incomplete.txt sentinel
keeps it from counting as complete too early).
"""

from __future__ import annotations

import signal
from typing import Any, Iterable, Optional

from transformers import TrainerCallback

from . import Preemption

__all__ = ["PreemptdCallback"]


class PreemptdCallback(TrainerCallback):  # type: ignore[misc,unused-ignore]
    """Save and stop on preemptd's notice; save when its advice asks.

    signals: the signals that mean "stop" (preemptd's trainer.signal).
    checkpoint_signals: preemptd's trainer.checkpoint_signal, if set.
    advice: save when preemptd's advice asks for a checkpoint. path:
    preemptd's run_dir (default $PREEMPTD_RUN_DIR or /run/preemptd).
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), checkpoint_signals: Iterable[int] = (),
                 advice: bool = True, path: Optional[str] = None, fallback_every: Optional[float] = None) -> None:
        self.advice = advice
        self.preemption = Preemption(path, signals=signals, checkpoint_signals=checkpoint_signals,
                                     fallback_every=fallback_every)
        self.stopped_at: Optional[int] = None  # the global step it stopped training at

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # The agreement's tensor on this rank's own device.
        self.preemption.device = args.device
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        stop, checkpoint = self.preemption.poll(checkpoint=self.advice)
        if stop or checkpoint:
            control.should_save = True
        if stop:
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
