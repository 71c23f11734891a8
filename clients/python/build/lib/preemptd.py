"""preemptd's trainer-side helper: one file, Python's standard library only.

preemptd signals the training process (SIGTERM by default) and writes
<run_dir>/notice.json when a machine is about to go. In a distributed job
the signal reaches each rank at a slightly different moment — on another
node, up to a second later — so a rank that stops on its own signal leaves
the others waiting in a collective, and a DCP save (itself collective) hangs.
This helper turns "this rank was told" into "the job stops now", agreed by
every rank at the same step:

    import preemptd

    stop = preemptd.Preemption()           # SIGTERM handler + notice.json
    for step in range(start, steps):
        train_step()
        if stop.should_stop():             # every rank, every step: agreed
            save_checkpoint(step)          # all ranks save the same step
            break

should_stop() is a collective when torch.distributed is initialised (an
all_reduce of the flag with MAX, a few microseconds on gloo/NCCL): call it
on every rank at the same point of the step. Without a process group it
answers for this process alone.

Copy this file next to your script, or `pip install` the folder holding it
(clients/python in preemptd's repository). It reads:

  PREEMPTD_RUN_DIR  where notice.json and preemptd.sock are (default
                    /run/preemptd; preemptd's run_dir)
"""

import http.client
import json
import os
import signal
import socket
import threading
import time

__all__ = ["Preemption", "read_notice", "wait_notice", "seconds_left", "run_dir"]

NOTICE_FILE = "notice.json"
SOCKET_FILE = "preemptd.sock"


def run_dir(path=None):
    """preemptd's run_dir: path, else $PREEMPTD_RUN_DIR, else /run/preemptd."""
    return path or os.environ.get("PREEMPTD_RUN_DIR") or "/run/preemptd"


def read_notice(path=None):
    """The current notice (notice.json as a dict), or None when there is none.

    The file is replaced atomically by preemptd, so a read never sees half of
    one; a file that is not JSON counts as no notice.
    """
    try:
        with open(os.path.join(run_dir(path), NOTICE_FILE), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _fatal(notice):
    return bool(notice) and notice.get("class") == "fatal" and not notice.get("withdrawn")


def seconds_left(notice, now=None):
    """Seconds from now to the notice's deadline (never negative); None
    without a deadline."""
    if not notice or not notice.get("deadline"):
        return None
    deadline = _parse_time(notice["deadline"])
    return max(0.0, deadline - (time.time() if now is None else now))


def _parse_time(s):
    # RFC 3339 with nanoseconds (Go's format): keep microseconds for fromisoformat.
    from datetime import datetime

    s = s.replace("Z", "+00:00")
    if "." in s:
        head, rest = s.split(".", 1)
        frac = "".join(c for c in rest if c.isdigit())
        tz = rest[len(frac):]
        s = head + "." + (frac + "000000")[:6] + tz
    return datetime.fromisoformat(s).timestamp()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def wait_notice(timeout=30.0, path=None):
    """Long-poll preemptd's socket for a notice: the notice (a dict) as soon
    as there is one, or None after timeout seconds. Raises OSError when no
    daemon answers."""
    conn = _UnixHTTPConnection(os.path.join(run_dir(path), SOCKET_FILE), timeout=timeout + 10)
    try:
        conn.request("GET", "/v1/notice?wait=%ds" % max(0, int(timeout)))
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 204:
            return None
        if resp.status != 200:
            raise OSError("preemptd answered %d: %s" % (resp.status, body[:200]))
        return json.loads(body)
    finally:
        conn.close()


class Preemption:
    """Whether the job must stop: this process was signalled, or preemptd's
    notice.json holds a fatal notice — agreed across ranks by should_stop().

    signals: the signals that mean "stop" (preemptd's trainer.signal);
    the previous handlers are replaced while the object lives (the signal
    must not kill the process before it saves). install=False leaves the
    handlers alone (notice.json only). group: the torch.distributed process
    group to agree in (default: the world).
    """

    def __init__(self, path=None, signals=(signal.SIGTERM,), install=True, group=None):
        self._dir = run_dir(path)
        self._signalled = threading.Event()
        self._group = group
        self._mtime = None
        self._notice = None
        self.signal_received = None
        if install:
            for s in signals:
                signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal_received = signum
        self._signalled.set()

    def notice(self):
        """The notice preemptd published, re-read only when the file changed."""
        p = os.path.join(self._dir, NOTICE_FILE)
        try:
            mtime = os.stat(p).st_mtime_ns
        except OSError:
            self._mtime, self._notice = None, None
            return None
        if mtime != self._mtime:
            self._mtime, self._notice = mtime, read_notice(self._dir)
        return self._notice

    def requested(self):
        """This process alone: signalled, or a fatal notice published."""
        return self._signalled.is_set() or _fatal(self.notice())

    def seconds_left(self):
        """Seconds to the notice's deadline, or None."""
        return seconds_left(self.notice())

    def should_stop(self):
        """requested(), agreed by every rank (a collective when
        torch.distributed is initialised): True on every rank at the same
        step as soon as any rank was told."""
        mine = self.requested()
        return _agree(mine, self._group)


def _agree(flag, group=None):
    """MAX of flag over the ranks of group, when there is a process group."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return bool(flag)
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    backend = dist.get_backend(group)
    device = "cpu"
    if backend == "nccl":
        device = "cuda"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
