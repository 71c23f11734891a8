"""Hugging Face Trainer, preemptd-aware: SIGTERM makes the callback ask the
Trainer to save and stop at the end of the step. The Trainer writes
checkpoint-N/ (no marker file), so preemptd waits for a quiet period before it
counts it complete (layout: hf in preemptd.yaml beside this file)."""
import os
import signal

import torch
from transformers import (AutoModelForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments)

OUT = os.environ.get("CKPT_DIR", "/data/ckpt")
requested = False


def on_term(*_):
    global requested
    requested = True


signal.signal(signal.SIGTERM, on_term)


class SaveOnSignal(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class Random(torch.utils.data.Dataset):
    def __len__(self):
        return 100000

    def __getitem__(self, i):
        return {"input_ids": torch.randint(0, 1000, (32,)), "labels": torch.tensor(i % 2)}


model = AutoModelForSequenceClassification.from_pretrained("prajjwal1/bert-tiny", num_labels=2)
args = TrainingArguments(output_dir=OUT, save_steps=500, save_total_limit=3, report_to=[])
resume = any(d.startswith("checkpoint-") for d in os.listdir(OUT)) if os.path.isdir(OUT) else False
Trainer(model=model, args=args, train_dataset=Random(), callbacks=[SaveOnSignal()]).train(resume_from_checkpoint=resume or None)
