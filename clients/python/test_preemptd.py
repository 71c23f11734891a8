"""Tests of preemptd.py; run with `python3 -m unittest` in this folder (the
Go test beside it runs them in `make test`)."""

import http.server
import json
import os
import signal
import socket
import subprocess
import socketserver
import sys
import tempfile
import threading
import time
import unittest

import preemptd


def write_notice(d, doc):
    tmp = os.path.join(d, ".notice.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, os.path.join(d, "notice.json"))


FATAL = {"provider": "job", "kind": "job", "id": "node2--aws-i-1", "class": "fatal",
         "noticed_at": "2026-11-30T07:00:00.123456789Z", "deadline": "2026-11-30T07:02:00.5Z", "seconds_left": 120}


class NoticeFileTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def test_none_bad_and_good(self):
        self.assertIsNone(preemptd.read_notice(self.dir))
        with open(os.path.join(self.dir, "notice.json"), "w") as f:
            f.write("{not json")
        self.assertIsNone(preemptd.read_notice(self.dir))
        write_notice(self.dir, FATAL)
        self.assertEqual(preemptd.read_notice(self.dir)["id"], "node2--aws-i-1")

    def test_seconds_left(self):
        deadline = preemptd._parse_time(FATAL["deadline"])
        self.assertAlmostEqual(preemptd.seconds_left(FATAL, now=deadline - 30.25), 30.25, places=3)
        self.assertEqual(preemptd.seconds_left(FATAL, now=deadline + 5), 0.0)
        self.assertIsNone(preemptd.seconds_left({"class": "advisory", "deadline": None}))
        # Go writes nanoseconds; they are cut to microseconds, not misread.
        self.assertAlmostEqual(preemptd._parse_time("2026-11-30T07:00:00.123456789Z") % 1, 0.123456, places=5)

    def test_requested_by_fatal_notice_only(self):
        p = preemptd.Preemption(self.dir, install=False)
        self.assertFalse(p.requested())
        write_notice(self.dir, dict(FATAL, **{"class": "advisory", "kind": "rebalance", "deadline": None}))
        self.assertFalse(p.requested(), "an advisory notice is not a stop")
        time.sleep(0.01)
        write_notice(self.dir, FATAL)
        self.assertTrue(p.requested())
        self.assertTrue(p.should_stop(), "without a process group, this process decides alone")
        os.remove(os.path.join(self.dir, "notice.json"))
        self.assertFalse(p.requested(), "a notice gone (a drill over) is no stop")


def write_advice(d, doc):
    tmp = os.path.join(d, ".advice.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, os.path.join(d, "advice.json"))


ADVICE = {"version": 1, "checkpoint_every_s": 1342, "checkpoint_now": False, "request": 0, "reason": "next due"}


class AdviceTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def test_once_per_request(self):
        p = preemptd.Preemption(self.dir, install=False)
        self.assertFalse(p.should_checkpoint(), "no advice, no fallback: never")
        self.assertIsNone(p.checkpoint_every())
        write_advice(self.dir, ADVICE)
        self.assertFalse(p.should_checkpoint())
        self.assertEqual(p.checkpoint_every(), 1342)
        time.sleep(0.01)
        write_advice(self.dir, dict(ADVICE, checkpoint_now=True, request=1))
        self.assertTrue(p.should_checkpoint())
        self.assertFalse(p.should_checkpoint(), "request 1 acted on: not again before preemptd sees the save")
        time.sleep(0.01)
        write_advice(self.dir, dict(ADVICE, checkpoint_now=True, request=2, reason="checkpoint now: rebalance"))
        self.assertTrue(p.should_checkpoint())
        self.assertFalse(p.should_checkpoint())

    def test_fallback_without_advice(self):
        p = preemptd.Preemption(self.dir, install=False, fallback_every=0)
        self.assertTrue(p.should_checkpoint())
        p = preemptd.Preemption(self.dir, install=False, fallback_every=3600)
        self.assertFalse(p.should_checkpoint())

    def test_checkpoint_signal(self):
        old = signal.getsignal(signal.SIGUSR2)
        try:
            p = preemptd.Preemption(self.dir, signals=(), checkpoint_signals=(signal.SIGUSR2,))
            write_advice(self.dir, ADVICE)
            self.assertFalse(p.should_checkpoint())
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(100):
                if p.checkpoint_requested():
                    break
                time.sleep(0.01)
            self.assertTrue(p.should_checkpoint())
            self.assertFalse(p.should_checkpoint(), "one signal, one checkpoint")
            self.assertFalse(p.requested(), "a checkpoint signal is no stop")
        finally:
            signal.signal(signal.SIGUSR2, old)


class SignalTest(unittest.TestCase):
    def test_signal_sets_the_flag_and_does_not_kill(self):
        old = signal.getsignal(signal.SIGUSR1)
        try:
            p = preemptd.Preemption(tempfile.mkdtemp(), signals=(signal.SIGUSR1,))
            self.assertFalse(p.requested())
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):
                if p.requested():
                    break
                time.sleep(0.01)
            self.assertTrue(p.requested())
            self.assertEqual(p.signal_received, signal.SIGUSR1)
        finally:
            signal.signal(signal.SIGUSR1, old)


_STORM_CHILD = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import preemptd
p = preemptd.Preemption(sys.argv[2], signals=(signal.SIGTERM,), checkpoint_signals=(signal.SIGUSR1,))
print("ready", flush=True)
asked = 0
deadline = time.monotonic() + 20
while not p.requested():
    if p.should_checkpoint():
        asked += 1
    if time.monotonic() > deadline:
        print("never told to stop", flush=True)
        sys.exit(3)
print("stopped by %d after %d checkpoint requests" % (p.signal_received, asked), flush=True)
"""


class SignalStormTest(unittest.TestCase):
    """The handlers only set a flag: a storm of the checkpoint signal (every
    2 ms) and two stop signals microseconds apart (preemptd and torchrun, or
    systemd) neither hang the main thread nor overflow its stack."""

    def test_storm(self):
        here = os.path.dirname(os.path.dirname(os.path.abspath(preemptd.__file__)))  # the folder holding the package
        # Every 2 ms, then flat out: the handler that took a lock (Event.set)
        # hung in the first flat-out trial.
        for trial, gap in enumerate((0.002, 0.002, 0, 0)):
            child = subprocess.Popen([sys.executable, "-c", _STORM_CHILD, here, tempfile.mkdtemp()],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.assertEqual(child.stdout.readline().strip(), "ready")
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                os.kill(child.pid, signal.SIGUSR1)
                if gap:
                    time.sleep(gap)
            os.kill(child.pid, signal.SIGTERM)
            os.kill(child.pid, signal.SIGTERM)
            try:
                out, err = child.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                out, err = child.communicate()
                self.fail("trial %d: the main thread hung in the storm\n%s" % (trial, err[-2000:]))
            self.assertEqual(child.returncode, 0, "trial %d: %s%s" % (trial, out, err[-2000:]))
            self.assertIn("stopped by %d" % signal.SIGTERM, out)


class _Handler(http.server.BaseHTTPRequestHandler):
    answers = []

    def do_GET(self):
        status, body = self.answers.pop(0)
        self.server.paths.append(self.path)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("local", 0)


class SocketTest(unittest.TestCase):
    def test_long_poll(self):
        d = tempfile.mkdtemp()
        srv = _UnixServer(os.path.join(d, "preemptd.sock"), _Handler)
        srv.paths = []
        _Handler.answers = [(204, b""), (200, json.dumps(FATAL).encode())]
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            self.assertIsNone(preemptd.wait_notice(1, d))
            self.assertEqual(preemptd.wait_notice(30, d)["kind"], "job")
            self.assertEqual(srv.paths, ["/v1/notice?wait=1s", "/v1/notice?wait=30s"])
        finally:
            srv.shutdown()
            srv.server_close()

    def test_no_daemon(self):
        with self.assertRaises(OSError):
            preemptd.wait_notice(1, tempfile.mkdtemp())
        with self.assertRaises(OSError):
            preemptd.wait_advice(1, tempfile.mkdtemp())

    def test_advice_long_poll(self):
        d = tempfile.mkdtemp()
        srv = _UnixServer(os.path.join(d, "preemptd.sock"), _Handler)
        srv.paths = []
        _Handler.answers = [(200, json.dumps(dict(ADVICE, checkpoint_now=True, request=3)).encode()),
                            (404, b'{"error":"checkpoint advice is off"}')]
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            self.assertEqual(preemptd.wait_advice(20, d)["request"], 3)
            with self.assertRaises(OSError):
                preemptd.wait_advice(1, d)
            self.assertEqual(srv.paths, ["/v1/advice?wait=20s", "/v1/advice?wait=1s"])
        finally:
            srv.shutdown()
            srv.server_close()


def _rank(rank, port, told, results, checkpoint=False, lagged=False):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=2)
    d = tempfile.mkdtemp()
    p = preemptd.Preemption(d, install=False)
    if lagged:  # as on a GPU: the answer of the call before, read without a wait
        p._agreement = preemptd._Agreement(lagged=True)
    out = []
    for step in range(6):
        if step == 2 and rank in told:
            if checkpoint is True:  # this rank's daemon asks for a checkpoint
                write_advice(d, dict(ADVICE, checkpoint_now=True, request=1))
            else:
                p._signalled = True  # as the signal handler does
        if checkpoint == "both":  # both methods every step, as the docstring's loop does
            out.append((p.should_stop(), p.should_checkpoint()))
        else:
            out.append(p.should_checkpoint() if checkpoint else p.should_stop())
    results.put((rank, out))
    dist.destroy_process_group()


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class AgreementTest(unittest.TestCase):
    """Two ranks (gloo): one told at step 2, both stop at step 2."""

    def setUp(self):
        try:
            import torch  # noqa: F401
        except ImportError:
            if os.environ.get("PREEMPTD_REQUIRE_TORCH") == "1":
                raise
            self.skipTest("torch not installed")

    def run_ranks(self, told, checkpoint=False, lagged=False):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, port, told, q, checkpoint, lagged)) for r in range(2)]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
            self.assertEqual(p.exitcode, 0)
        return got

    def test_one_rank_told_all_stop_at_the_same_step(self):
        got = self.run_ranks(told={1})
        self.assertEqual(got[0], [False, False, True, True, True, True])
        self.assertEqual(got[1], got[0])

    def test_checkpoint_asked_on_one_node_all_save_once(self):
        got = self.run_ranks(told={1}, checkpoint=True)
        self.assertEqual(got[0], [False, False, True, False, False, False])
        self.assertEqual(got[1], got[0])

    def test_nobody_told_nobody_stops(self):
        got = self.run_ranks(told=set())
        self.assertEqual(got[0], [False] * 6)
        self.assertEqual(got[1], [False] * 6)

    def test_lagged_all_stop_one_step_later(self):
        got = self.run_ranks(told={1}, lagged=True)
        self.assertEqual(got[0], [False, False, False, True, True, True])
        self.assertEqual(got[1], got[0])

    def test_lagged_checkpoint_once(self):
        # The answer after the checkpoint still carries its request: it is
        # not taken for a second one.
        got = self.run_ranks(told={0}, checkpoint=True, lagged=True)
        self.assertEqual(got[0], [False, False, False, True, False, False])
        self.assertEqual(got[1], got[0])

    def test_lagged_both_methods_each_step(self):
        # On a GPU each call answers with the call before, here the other
        # method's: the stop still reaches every rank at the same step.
        got = self.run_ranks(told={1}, checkpoint="both", lagged=True)
        stops = [s for s, _ in got[0]]
        self.assertEqual(stops, [False, False, False, True, True, True])
        self.assertEqual(got[1], got[0])

    def test_agreement_device(self):
        import torch

        self.assertEqual(preemptd._Agreement(device="cpu").device(), torch.device("cpu"))
        # the rank's own device, as given (Lightning's pl_module.device)
        self.assertEqual(preemptd._Agreement(device=torch.device("cuda", 3)).device(), torch.device("cuda", 3))


def _have(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@unittest.skipUnless(_have("lightning"), "Lightning not installed")
class LightningCallbackTest(unittest.TestCase):
    """preemptd.lightning.Preemptd in a real Lightning Trainer (CPU)."""

    def fit(self, at_step, doc, advice=False, max_steps=8):
        import lightning as L
        import torch

        from preemptd.lightning import Preemptd

        run, ckpt = tempfile.mkdtemp(), tempfile.mkdtemp()

        class Model(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(4, 1)

            def training_step(self, batch, _):
                return self.net(batch[0]).pow(2).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        class Tell(L.Callback):  # preemptd publishes at step at_step
            def on_train_batch_start(self, trainer, *_):
                if trainer.global_step == at_step:
                    (write_advice if advice else write_notice)(run, doc)

        cb = Preemptd(dirpath=ckpt, path=run, signals=())
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[Tell(), cb])
        data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=4))
        return trainer, cb, sorted(os.listdir(ckpt))

    def test_notice_saves_and_stops(self):
        trainer, cb, files = self.fit(3, FATAL)
        self.assertEqual(trainer.global_step, 4, "stops after the batch the notice came in")
        self.assertEqual(files, ["preempted-step=4.ckpt"])
        self.assertEqual(cb.preemption.device.type, "cpu", "the agreement on the module's own device")
        # Lightning itself loads what it wrote.
        import torch

        self.assertEqual(torch.load(cb.last_path, weights_only=False)["global_step"], 4)

    def test_advice_saves_once_and_trains_on(self):
        trainer, _, files = self.fit(3, dict(ADVICE, checkpoint_now=True, request=7), advice=True)
        self.assertEqual(trainer.global_step, 8, "a checkpoint asked for is no stop")
        self.assertEqual(files, ["preempted-step=4.ckpt"], "once per request")

    def test_advisory_notice_is_no_stop(self):
        trainer, _, files = self.fit(3, dict(FATAL, **{"class": "advisory"}))
        self.assertEqual((trainer.global_step, files), (8, []))


@unittest.skipUnless(_have("transformers"), "Transformers not installed")
class HFCallbackTest(unittest.TestCase):
    """preemptd.hf.PreemptdCallback in a real Hugging Face Trainer (CPU)."""

    def train(self, at_step, doc, advice=False):
        import torch
        from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

        from preemptd.hf import PreemptdCallback

        run, out = tempfile.mkdtemp(), tempfile.mkdtemp()

        class Tell(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == at_step:
                    (write_advice if advice else write_notice)(run, doc)

        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, i):
                return {"input_ids": torch.tensor([i % 7 + 1] * 8), "labels": torch.tensor(i % 2)}

        model = BertForSequenceClassification(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                                         num_attention_heads=1, intermediate_size=8, num_labels=2))
        args = TrainingArguments(output_dir=out, max_steps=8, save_strategy="no", per_device_train_batch_size=4,
                                 report_to=[], logging_strategy="no", disable_tqdm=True, use_cpu=True)
        cb = PreemptdCallback(path=run, signals=())
        trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Tell(), cb])
        trainer.train()
        return trainer, cb, sorted(os.listdir(out))

    def test_notice_saves_and_stops(self):
        trainer, cb, dirs = self.train(3, FATAL)
        self.assertEqual((trainer.state.global_step, cb.stopped_at), (4, 4))
        self.assertEqual(dirs, ["checkpoint-4"])
        self.assertTrue(os.path.exists(os.path.join(trainer.args.output_dir, "checkpoint-4", "trainer_state.json")))

    def test_advice_saves_once_and_trains_on(self):
        trainer, _, dirs = self.train(3, dict(ADVICE, checkpoint_now=True, request=7), advice=True)
        self.assertEqual(trainer.state.global_step, 8)
        self.assertEqual(dirs, ["checkpoint-4"])


def _make_store(root):
    """A run with step-3 committed (preemptd upload) in a folder store;
    returns the config's path."""
    ck = os.path.join(root, "ckpt", "step-3")
    os.makedirs(ck)
    with open(os.path.join(ck, "__0_0.distcp"), "wb") as f:
        f.write(os.urandom(300 << 10))
    with open(os.path.join(ck, ".metadata"), "wb") as f:
        f.write(b"meta")
    cfg = os.path.join(root, "preemptd.yaml")
    with open(cfg, "w") as f:
        f.write("run_id: py\ncheckpoint: {layout: dcp}\nrun_dir: %s\nstate_dir: %s\n"
                % (os.path.join(root, "run"), os.path.join(root, "state")))
    os.makedirs(os.path.join(root, "state"))
    subprocess.run([os.environ["PREEMPTD_BIN"], "upload", "--config", cfg, ck], check=True,
                   stdout=subprocess.DEVNULL)
    return cfg


def _restore_rank(rank, port, cfg, to, local, results):
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(local)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=2)
    try:
        results.put((rank, preemptd.restore(to=to, config=cfg), None))
    except Exception as e:  # noqa: BLE001 — reported to the test
        results.put((rank, None, repr(e)))
    dist.destroy_process_group()


@unittest.skipUnless(os.environ.get("PREEMPTD_BIN"), "PREEMPTD_BIN (the preemptd binary) not set")
class RestoreTest(unittest.TestCase):
    """restore()/latest() through the real preemptd command and a folder store."""

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.cfg = _make_store(self.root)

    def test_one_process(self):
        self.assertEqual(preemptd.latest(config=self.cfg), "step-3")
        to = os.path.join(self.root, "new")
        path = preemptd.restore(to=to, config=self.cfg)
        self.assertEqual(path, os.path.join(to, "step-3"))
        with open(os.path.join(self.root, "ckpt", "step-3", "__0_0.distcp"), "rb") as a, \
                open(os.path.join(path, "__0_0.distcp"), "rb") as b:
            self.assertEqual(a.read(), b.read())
        self.assertEqual(preemptd.restore(to=to, config=self.cfg), path)  # kept: nothing fetched

    def test_fresh_start_is_none(self):
        self.assertIsNone(preemptd.latest(config=self.cfg, run="nothing-yet"))
        self.assertIsNone(preemptd.restore(to=os.path.join(self.root, "x"), config=self.cfg, run="nothing-yet"))

    def test_no_store_yet_is_none(self):
        """A first machine whose local store was never written: latest() and
        restore() say fresh start (preemptd exits 4), and create nothing."""
        fresh = os.path.join(self.root, "fresh")
        os.makedirs(fresh)
        cfg = os.path.join(fresh, "preemptd.yaml")
        with open(cfg, "w") as f:
            f.write("run_id: py\nrun_dir: %s\nstate_dir: %s\n" % (os.path.join(fresh, "run"), os.path.join(fresh, "state")))
        self.assertIsNone(preemptd.latest(config=cfg))
        self.assertIsNone(preemptd.restore(to=os.path.join(fresh, "x"), config=cfg))
        self.assertFalse(os.path.exists(os.path.join(fresh, "state")))

    def test_failure_raises(self):
        with self.assertRaises(preemptd.RestoreError):
            preemptd.restore(to=os.path.join(self.root, "x"), name="step-9", config=self.cfg)

    def run_ranks(self, locals_, tos):
        try:
            import torch  # noqa: F401
        except ImportError:
            if os.environ.get("PREEMPTD_REQUIRE_TORCH") == "1":
                raise
            self.skipTest("torch not installed")
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_restore_rank, args=(r, port, self.cfg, tos[r], locals_[r], q)) for r in range(2)]
        for p in procs:
            p.start()
        got = {r: (path, err) for r, path, err in (q.get(timeout=120) for _ in procs)}
        for p in procs:
            p.join(30)
        return got

    def test_ranks_of_one_node_agree(self):
        to = os.path.join(self.root, "node")
        got = self.run_ranks([0, 1], [to, to])
        want = os.path.join(to, "step-3")
        self.assertEqual(got, {0: (want, None), 1: (want, None)})

    def test_two_nodes_each_fetch(self):
        tos = [os.path.join(self.root, "n0"), os.path.join(self.root, "n1")]
        got = self.run_ranks([0, 0], tos)
        self.assertEqual(got, {0: (os.path.join(tos[0], "step-3"), None), 1: (os.path.join(tos[1], "step-3"), None)})
        self.assertTrue(os.path.exists(os.path.join(tos[1], "step-3", ".metadata")))


if __name__ == "__main__":
    unittest.main()
