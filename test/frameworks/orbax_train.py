"""JAX + Orbax on the CPU: an MLP trained with plain SGD, an
orbax.checkpoint.CheckpointManager saving every SAVE_EVERY steps
asynchronously (the save goes on while training does; Orbax writes
<step>.orbax-checkpoint-tmp-*/ and renames it to <step>/ once complete)
keeping the 2 newest (max_to_keep). preemptd.Preemption (no torch: this
process alone) says when to stop; the final save is forced and waited
for. Check mode restores with Orbax itself."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CHECK, CKPT_DIR, RESUME, SAVE_EVERY, STEP_SLEEP, WIDTH, checksum, say  # noqa: E402

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import preemptd  # noqa: E402


def init():
    k = jax.random.PRNGKey(0)
    return {"w%d" % i: jax.random.normal(jax.random.fold_in(k, i), (WIDTH, WIDTH)) * 0.01 for i in range(4)}


def weights(params):
    return checksum(np.asarray(v, dtype=np.float64).sum() for v in jax.tree_util.tree_leaves(params))


def manager(path, **kw):
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(**kw))


def restore(path):
    """The params of the checkpoint folder path (<dir>/<step>), by Orbax."""
    mngr = manager(os.path.dirname(path), read_only=True)
    step = int(os.path.basename(path))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, init())
    return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))


if CHECK:
    say("checksum", weights(restore(CHECK)[1]))
    sys.exit(0)


@jax.jit
def train_step(params, x):
    def loss(p):
        h = x
        for i in range(4):
            h = jnp.tanh(h @ p["w%d" % i])
        return jnp.mean(h ** 2)

    g = jax.grad(loss)(params)
    return jax.tree_util.tree_map(lambda p, d: p - 1e-2 * d, params, g)


stop = preemptd.Preemption()
step, params = restore(RESUME) if RESUME else (0, init())
mngr = manager(CKPT_DIR, max_to_keep=2, save_interval_steps=SAVE_EVERY, enable_async_checkpointing=True)
pending = None
key = jax.random.PRNGKey(1)
while True:
    key, sub = jax.random.split(key)
    params = train_step(params, jax.random.normal(sub, (16, WIDTH)))
    step += 1
    time.sleep(STEP_SLEEP)
    if pending is not None and not mngr.is_saving_in_progress():
        say("saved", pending)
        pending = None
    if stop.should_stop():
        mngr.wait_until_finished()
        if pending is not None:
            say("saved", pending)
        mngr.save(step, args=ocp.args.StandardSave(params), force=True)
        mngr.wait_until_finished()
        say("final", str(step), "checksum", weights(params))
        break
    if step % SAVE_EVERY == 0:
        if pending is not None:  # Orbax waits for the save in flight before it starts one
            mngr.wait_until_finished()
            say("saved", pending)
        pending = str(step)
        say("saving", pending)
        mngr.save(step, args=ocp.args.StandardSave(params))
mngr.close()
