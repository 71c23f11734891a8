"""preemptd's trainer-side helper: one package, Python's standard library only, typed.

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

preemptd also says *when* to checkpoint (<run_dir>/advice.json: the
Young/Daly interval from the measured save time and interruption rate, and
checkpoint_now at once on a risk signal such as a rebalance
recommendation). should_checkpoint() is True, on every rank at the same
step, once per request:

    ckpt = preemptd.Preemption(checkpoint_signals=(signal.SIGUSR1,))
    for step in range(start, steps):
        train_step()
        if ckpt.should_stop():
            save_checkpoint(step)
            break
        if ckpt.should_checkpoint():       # agreed, like should_stop()
            save_checkpoint(step)

checkpoint_signals are preemptd's trainer.checkpoint_signal, if set: the
signal also asks for a checkpoint, without a read of the file.

On a new machine, restore() fetches the run's latest checkpoint (through
the `preemptd` command, with every byte checked) and returns the folder to
load, or None on a fresh start; in a distributed job rank 0 chooses the
checkpoint and one rank per node fetches it, so every rank loads the same:

    dist.init_process_group(...)
    path = preemptd.restore()              # "/data/ckpt/step-500" or None
    if path:
        load_checkpoint(path)

Install it from the wheel (`make wheel` in preemptd's repository builds
dist/python/preemptd-<version>-py3-none-any.whl, which `pip install` takes
offline), or copy this package folder next to your script. It reads:

  PREEMPTD_RUN_DIR  where notice.json and preemptd.sock are (default
                    /run/preemptd; preemptd's run_dir)
  PREEMPTD_BIN      the preemptd command restore() and latest() run
                    (default: preemptd on the PATH)
  PREEMPTD_CONFIG   its configuration (read by preemptd itself)
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from types import FrameType
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

Notice = Dict[str, Any]
"""A notice: notice.json as a dict (provider, kind, id, class, deadline, …)."""
Advice = Dict[str, Any]
"""Checkpoint advice: advice.json as a dict (checkpoint_every_s, checkpoint_now, request, …)."""

__all__ = ["Preemption", "read_notice", "read_advice", "wait_notice", "wait_advice", "seconds_left", "run_dir",
           "latest", "restore", "RestoreError"]

NOTICE_FILE = "notice.json"
ADVICE_FILE = "advice.json"
SOCKET_FILE = "preemptd.sock"


def run_dir(path: Optional[str] = None) -> str:
    """preemptd's run_dir: path, else $PREEMPTD_RUN_DIR, else /run/preemptd."""
    return path or os.environ.get("PREEMPTD_RUN_DIR") or "/run/preemptd"


def read_notice(path: Optional[str] = None) -> Optional[Notice]:
    """The current notice (notice.json as a dict), or None when there is none.

    The file is replaced atomically by preemptd, so a read never sees half of
    one; a file that is not JSON counts as no notice.
    """
    return _read_json(os.path.join(run_dir(path), NOTICE_FILE))


def read_advice(path: Optional[str] = None) -> Optional[Advice]:
    """preemptd's checkpoint advice (advice.json as a dict: checkpoint_every_s,
    checkpoint_now, request, reason, inputs), or None when there is none."""
    return _read_json(os.path.join(run_dir(path), ADVICE_FILE))


def _read_json(p: str) -> Optional[Dict[str, Any]]:
    """The JSON object in file p, or None (missing, unreadable, not an object)."""
    try:
        with open(p, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _fatal(notice: Optional[Notice]) -> bool:
    return notice is not None and notice.get("class") == "fatal" and not notice.get("withdrawn")


def seconds_left(notice: Optional[Notice], now: Optional[float] = None) -> Optional[float]:
    """Seconds from now to the notice's deadline (never negative); None
    without a deadline."""
    if not notice or not notice.get("deadline"):
        return None
    deadline = _parse_time(notice["deadline"])
    return max(0.0, deadline - (time.time() if now is None else now))


def _parse_time(s: str) -> float:
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
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def wait_advice(timeout: float = 30.0, path: Optional[str] = None) -> Advice:
    """Long-poll preemptd's socket until it asks for a checkpoint
    (checkpoint_now) or timeout seconds pass; the advice (a dict) either way.
    Raises OSError when no daemon answers (or advice is off)."""
    body = _get(path, "/v1/advice?wait=%ds" % max(0, int(timeout)), timeout)
    if body is None:
        raise OSError("preemptd answered with no advice")
    result: Advice = json.loads(body)
    return result


def _get(path: Optional[str], url: str, timeout: float) -> Optional[bytes]:
    conn = _UnixHTTPConnection(os.path.join(run_dir(path), SOCKET_FILE), timeout=timeout + 10)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 204:
            return None
        if resp.status != 200:
            raise OSError("preemptd answered %d: %s" % (resp.status, body[:200].decode(errors="replace")))
        return bytes(body)
    finally:
        conn.close()


def wait_notice(timeout: float = 30.0, path: Optional[str] = None) -> Optional[Notice]:
    """Long-poll preemptd's socket for a notice: the notice (a dict) as soon
    as there is one, or None after timeout seconds. Raises OSError when no
    daemon answers."""
    body = _get(path, "/v1/notice?wait=%ds" % max(0, int(timeout)), timeout)
    return None if body is None else json.loads(body)


class Preemption:
    """Whether the job must stop: this process was signalled, or preemptd's
    notice.json holds a fatal notice — agreed across ranks by should_stop().

    signals: the signals that mean "stop" (preemptd's trainer.signal);
    the previous handlers are replaced while the object lives (the signal
    must not kill the process before it saves). install=False leaves the
    handlers alone (notice.json only). group: the torch.distributed process
    group to agree in (default: the world). checkpoint_signals: preemptd's
    trainer.checkpoint_signal ("checkpoint, keep training"), if set.
    fallback_every: seconds between checkpoints when preemptd publishes no
    advice (no daemon, advice off); None: no checkpoint asked for then.
    device: where the agreement's tensor lives — this rank's own device
    (Lightning's pl_module.device, the Trainer's args.device); by default
    the CPU for gloo and torch.cuda.current_device() for NCCL (each rank
    must have called torch.cuda.set_device, as NCCL itself needs).

    On a GPU the agreement never waits for the step in flight: poll()
    starts a non-blocking all_reduce and reads, one call later, the answer
    of the call before (copied to pinned host memory behind a CUDA event),
    so every rank still acts at the same step, one step after it was told,
    and the host waits at most for the previous step's kernels. On the CPU
    (gloo) the answer is immediate.
    """

    def __init__(self, path: Optional[str] = None, signals: Iterable[int] = (signal.SIGTERM,), install: bool = True,
                 group: Any = None, checkpoint_signals: Iterable[int] = (), fallback_every: Optional[float] = None,
                 device: Any = None) -> None:
        self._dir = run_dir(path)
        self._agreement = _Agreement(group, device)
        self._stale = 0  # answers still to come from before the last checkpoint
        # Set by the signal handlers, which do nothing else: a handler runs
        # in the main thread between any two bytecodes, even inside another
        # handler, so one that took a lock (threading.Event.set does) hangs
        # when a second signal lands while the first holds it.
        self._signalled = False
        self._ckpt_signalled = False
        self._group = group
        self._files: Dict[str, Tuple[Optional[int], Optional[Dict[str, Any]]]] = {}  # name → (mtime, doc)
        self._acted: Any = None  # the advice request last acted on
        self._fallback = fallback_every
        self._last_ckpt = time.monotonic()
        self.signal_received: Optional[int] = None
        if install:
            for s in signals:
                signal.signal(s, self._on_signal)
            for s in checkpoint_signals:
                signal.signal(s, self._on_checkpoint_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signal_received = signum
        self._signalled = True

    def _on_checkpoint_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self._ckpt_signalled = True

    @property
    def device(self) -> Any:
        """The device of the agreement's tensor (None: chosen by backend);
        set it to this rank's own device once it is known."""
        return self._agreement._device

    @device.setter
    def device(self, device: Any) -> None:
        self._agreement._device = device

    def _cached(self, name: str) -> Optional[Dict[str, Any]]:
        """The JSON object in run_dir/name, re-read only when the file changed."""
        try:
            mtime = os.stat(os.path.join(self._dir, name)).st_mtime_ns
        except OSError:
            self._files[name] = (None, None)
            return None
        seen, doc = self._files.get(name, (None, None))
        if mtime != seen:
            doc = _read_json(os.path.join(self._dir, name))
            self._files[name] = (mtime, doc)
        return doc

    def advice(self) -> Optional[Advice]:
        """preemptd's advice, re-read only when advice.json changed."""
        return self._cached(ADVICE_FILE)

    def checkpoint_requested(self) -> bool:
        """This process alone: a checkpoint was asked for (checkpoint_now on a
        request not acted on yet, or the checkpoint signal, or fallback_every
        seconds without advice)."""
        if self._ckpt_signalled:
            return True
        a = self.advice()
        if a is None:
            return self._fallback is not None and time.monotonic() - self._last_ckpt >= self._fallback
        return bool(a.get("checkpoint_now")) and a.get("request") != self._acted

    def should_checkpoint(self) -> bool:
        """checkpoint_requested(), agreed by every rank (a collective when
        torch.distributed is initialised): True on every rank at the same step,
        once per request. Save a checkpoint when it is; preemptd sees it
        complete and stops asking."""
        return self.poll(stop=False)[1]

    def _checkpointed(self) -> None:
        a = self.advice()
        self._acted = a.get("request") if a else self._acted
        self._ckpt_signalled = False
        self._last_ckpt = time.monotonic()

    def poll(self, stop: bool = True, checkpoint: bool = True) -> Tuple[bool, bool]:
        """(should_stop, should_checkpoint) in one collective: call it on
        every rank at the same point of each step, and act on the answer
        (stop wins: save, then stop)."""
        # Both flags go into every call, whichever the caller acts on: on a
        # GPU each call answers with the call before, which may have been the
        # other method's (should_stop, then should_checkpoint, each step).
        agreed = self._agreement.agree((self.requested(), self.checkpoint_requested()))
        ckpt = agreed[1] and checkpoint
        if self._stale > 0:
            # The answer in flight was asked before the last checkpoint was
            # acted on: it still carries that request.
            self._stale -= 1
            ckpt = False
        if ckpt:
            self._checkpointed()
            self._stale = self._agreement.lag
        return agreed[0] and stop, ckpt

    def checkpoint_every(self) -> Optional[float]:
        """The advised interval in seconds, or None without advice."""
        a = self.advice()
        return a.get("checkpoint_every_s") if a else None

    def notice(self) -> Optional[Notice]:
        """The notice preemptd published, re-read only when the file changed."""
        return self._cached(NOTICE_FILE)

    def requested(self) -> bool:
        """This process alone: signalled, or a fatal notice published."""
        return self._signalled or _fatal(self.notice())

    def seconds_left(self) -> Optional[float]:
        """Seconds to the notice's deadline, or None."""
        return seconds_left(self.notice())

    def should_stop(self) -> bool:
        """requested(), agreed by every rank (a collective when
        torch.distributed is initialised): True on every rank at the same
        step as soon as any rank was told."""
        return self.poll(checkpoint=False)[0]


class _Agreement:
    """The MAX of a few flags over the ranks of a process group: immediate
    on the CPU; on an accelerator, lagged by one call so that no call waits
    for the work in flight (see Preemption)."""

    def __init__(self, group: Any = None, device: Any = None, lagged: Optional[bool] = None) -> None:
        self._group = group
        self._device = device
        self._lagged = lagged  # None: lagged on an accelerator only
        self._pending: Any = None  # (work, host tensor, event) of the last call, on a GPU
        self.lag = 0  # calls between a rank's flag and the answer that carries it

    def _dist(self) -> Any:
        try:
            import torch.distributed as dist
        except ImportError:
            return None
        return dist if dist.is_available() and dist.is_initialized() else None

    def device(self) -> Any:
        """The agreement tensor's device: the one given, else by backend."""
        import torch

        if self._device is not None:
            return torch.device(self._device)
        dist = self._dist()
        if dist is not None and dist.get_backend(self._group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, flags: Sequence[bool]) -> Tuple[bool, ...]:
        dist = self._dist()
        if dist is None:
            return tuple(bool(f) for f in flags)
        import torch

        device = self.device()
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
        if not (device.type != "cpu" if self._lagged is None else self._lagged):
            self.lag = 0
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            return tuple(bool(v) for v in t.tolist())
        # Start this call's reduction; answer with the previous call's.
        self.lag = 1
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        work.wait()  # orders the stream after the collective; the host does not block
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=device.type == "cuda")
        host.copy_(t, non_blocking=True)
        event = _event(device)
        before, self._pending = self._pending, (work, host, event)
        if before is None:
            return tuple(False for _ in flags)
        _, prev_host, prev_event = before
        if prev_event is not None:
            prev_event.synchronize()  # the previous step's reduction: long done
        return tuple(bool(v) for v in prev_host.tolist())


def _event(device: Any) -> Any:
    """An event recorded on device's current stream, or None where there is none."""
    import torch

    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "Event"):
        return None
    e = mod.Event()
    e.record()
    return e



class RestoreError(RuntimeError):
    """`preemptd restore` (or `ls`) failed: the store could not be read, a
    checkpoint failed verification, a file did not match its SHA-256."""


def _preemptd(args: Sequence[str], config: Optional[str] = None, run: Optional[str] = None) -> "subprocess.CompletedProcess[str]":
    cmd = [os.environ.get("PREEMPTD_BIN", "preemptd")] + list(args)
    if config:
        cmd += ["--config", config]
    if run:
        cmd += ["--run", run]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise RestoreError("cannot run %s: %s (set PREEMPTD_BIN)" % (cmd[0], e)) from e
    return p


def latest(config: Optional[str] = None, run: Optional[str] = None) -> Optional[str]:
    """The name of the run's latest committed checkpoint, or None when it
    has none yet (`preemptd ls --json`)."""
    p = _preemptd(["ls", "--json"], config, run)
    if p.returncode == 4:
        return None  # no store yet: nothing was ever committed (a fresh start)
    if p.returncode != 0:
        raise RestoreError("preemptd ls failed (exit %d): %s" % (p.returncode, p.stderr.strip()))
    out = json.loads(p.stdout)
    if not out.get("checkpoints"):
        if out.get("hidden"):
            raise RestoreError("the run's checkpoints fail verification: %s" % out["hidden"])
        return None
    name: str = out.get("latest") or out["checkpoints"][-1]["name"]
    return name


def _restore_here(to: Optional[str], name: Optional[str], part: Optional[str], wait: Optional[float],
                  config: Optional[str], run: Optional[str]) -> Dict[str, Any]:
    args = ["restore", "--json", "--none-ok"]
    if to:
        args += ["--to", to]
    if name:
        args += ["--name", name]
    if part:
        args += ["--part", part]
    if wait:
        args += ["--wait", "%ds" % int(wait)]
    p = _preemptd(args, config, run)
    try:
        out: Dict[str, Any] = json.loads(p.stdout)
    except ValueError:
        out = {}
    if p.returncode != 0:
        raise RestoreError("preemptd restore failed (exit %d): %s" % (p.returncode, p.stderr.strip()))
    return out


def restore(to: Optional[str] = None, name: Optional[str] = None, part: Optional[str] = None, wait: Optional[float] = None,
            config: Optional[str] = None, run: Optional[str] = None, group: Any = None) -> Optional[str]:
    """Fetch the run's latest checkpoint (or name) into to (default:
    preemptd's checkpoint.dir) and return its folder, or None when the run
    has nothing committed yet (a fresh start). Files already there with the
    right SHA-256 are kept; an interrupted restore continues.

    With torch.distributed initialised, every rank must call it: rank 0
    chooses the checkpoint, the first rank of each node (LOCAL_RANK 0)
    fetches it — only that node's part when part names the node (job.node)
    — and every rank returns the same folder. part: this node's name in a
    multi-node job, to fetch its shards and the markers only; None fetches
    the whole checkpoint (any world size can load it). A node's part is
    enough only when its ranks read no other node's files: DCP writes a
    replicated tensor (a DDP model, a step counter) once, into the
    coordinator's files, and every rank reads it from there."""
    try:
        import torch.distributed as dist
        distributed = dist.is_available() and dist.is_initialized()
    except ImportError:
        distributed = False
    if not distributed:
        return _restore_here(to, name, part, wait, config, run).get("path") or None
    rank = dist.get_rank(group)
    chosen: List[Optional[str]] = [None, None]  # name, error
    if rank == 0:
        try:
            chosen[0] = name or latest(config, run)
        except RestoreError as e:
            chosen[1] = str(e)
    dist.broadcast_object_list(chosen, src=0, group=group)
    if chosen[1]:
        raise RestoreError(chosen[1])
    if chosen[0] is None:
        return None  # a fresh start, on every rank
    local = int(os.environ.get("LOCAL_RANK", "0"))
    mine: List[Optional[str]] = [None, None]  # path, error
    if local == 0:
        try:
            mine[0] = _restore_here(to, chosen[0], part, wait, config, run).get("path")
        except RestoreError as e:
            mine[1] = str(e)
    every: List[List[Optional[str]]] = [[None, None] for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(every, mine, group=group)
    errors = [e for _, e in every if e]
    if errors:
        raise RestoreError(errors[0])
    # torchrun numbers a node's ranks contiguously: its LOCAL_RANK 0 is
    # rank - LOCAL_RANK.
    path: Optional[str] = every[int(rank) - local][0]
    return path

