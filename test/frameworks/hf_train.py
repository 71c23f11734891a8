"""Hugging Face Trainer (transformers 5.x), one process on the CPU: a tiny
BERT built from a config (no download), save_steps=SAVE_EVERY with
save_total_limit=2 (older checkpoint-N/ folders removed while training
goes on). JIT=0: preemptd.hf.PreemptdCallback saves and stops on
preemptd's signal; JIT=1: the Trainer's own on-signal save
(enable_jit_checkpoint: 3 s after SIGTERM) does, without the callback."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CHECK, CKPT_DIR, RESUME, SAVE_EVERY, STEP_SLEEP, checksum, say  # noqa: E402

import time  # noqa: E402

import torch  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

from preemptd.hf import PreemptdCallback  # noqa: E402

JIT = os.environ.get("JIT") == "1"
HIDDEN = int(os.environ.get("HIDDEN", "256"))
config = BertConfig(vocab_size=4096, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=4 * HIDDEN, num_labels=2)


def weights(model):
    return checksum(p.detach().double().sum() for p in model.parameters())


if CHECK:
    # The Trainer's own loader: from_pretrained on the restored checkpoint-N/.
    say("checksum", weights(BertForSequenceClassification.from_pretrained(CHECK)))
    sys.exit(0)


class Random(torch.utils.data.Dataset):
    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 4096, (32,), generator=g), "labels": torch.tensor(i % 2)}


class Announce(TrainerCallback):
    """Says when the Trainer's saves begin and end, and the final one."""

    def __init__(self):
        self.saving = None

    def on_step_end(self, args, state, control, **kw):
        time.sleep(STEP_SLEEP)
        if control.should_save or state.global_step % SAVE_EVERY == 0:
            self.saving = "checkpoint-%d" % state.global_step
            say("saving", self.saving)

    def on_save(self, args, state, control, **kw):
        if self.saving:
            say("saved", self.saving)
            self.saving = None


torch.manual_seed(0)
model = BertForSequenceClassification(config)
args = TrainingArguments(output_dir=CKPT_DIR, save_steps=SAVE_EVERY, save_total_limit=2, report_to=[],
                         per_device_train_batch_size=8, logging_strategy="no", use_cpu=True,
                         enable_jit_checkpoint=JIT, dataloader_num_workers=0, disable_tqdm=True)
# With the Trainer's own on-signal save, preemptd's callback stays out: the
# save on SIGTERM is the Trainer's alone.
callbacks = [Announce()] if JIT else [Announce(), PreemptdCallback()]
trainer = Trainer(model=model, args=args, train_dataset=Random(), callbacks=callbacks)
trainer.train(resume_from_checkpoint=RESUME or None)
if JIT:
    # The Trainer's on-signal save runs before the step's optimizer update
    # and the loop ends after it: the checkpoint is the step before the last,
    # and what it holds is what the Trainer wrote.
    last = max((d for d in os.listdir(CKPT_DIR) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    say("final", last, "checksum", weights(BertForSequenceClassification.from_pretrained(os.path.join(CKPT_DIR, last))))
else:
    say("final", "checkpoint-%d" % trainer.state.global_step, "checksum", weights(trainer.model))
