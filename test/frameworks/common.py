"""What every framework trial script shares: the lines the Go test reads
(test/e2e/frameworks_test.go) and a checksum of weights.

A script prints, flushed, one line per event:
  saving NAME              a periodic save begins (before the framework's call)
  saved NAME               it is complete (for an async save: seen done)
  final NAME checksum X    the save after preemptd's signal, and its weights
  checksum X               in check mode (CHECK=path): the weights the
                           framework itself loaded from path
"""
import os
import sys

CKPT_DIR = os.environ.get("CKPT_DIR", "")
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "10"))
STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0.02"))
CHECK = os.environ.get("CHECK", "")  # a checkpoint to load and sum, then exit
RESUME = os.environ.get("RESUME", "")  # a checkpoint to resume from
WIDTH = int(os.environ.get("WIDTH", "1024"))

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python"))


def say(*words):
    print(*words, flush=True)


def checksum(values):
    """The sum of every value, in float64, as the Go test compares it."""
    return "%.6f" % sum(float(v) for v in values)
