"""Many processes: 2 JAX processes x 4 CPU devices train as one process with 8 does.

tests/multiprocess_worker.py runs as two processes coordinated by
``jax.distributed`` on 127.0.0.1 (tests/distributed.py starts them, with
bounded timeouts, and kills them by pid when the run ends). They train three
steps data x model parallel and save a checkpoint; this process runs the same
training on its own eight devices first (its checkpoint is loaded by the two),
compares the losses, and loads theirs.
"""

import os
import re
import textwrap
from pathlib import Path

import distributed
import jax
import multiprocess_worker as worker
import numpy as np
import pytest

import toylib as tl

WORKER = Path(worker.__file__)


def test_two_processes_train_as_one_and_their_checkpoint_loads_in_one(tmp_path):
    model, optimizer, losses = worker.train(worker.mesh((2, 4)))  # one process, 8 devices
    assert len(losses) == worker.STEPS and losses[-1] < losses[0]
    tl.save(tmp_path / "one", (model, optimizer))  # for the two processes to load

    path = tmp_path / "ckpt"
    args = (str(path), str(tmp_path / "one"))
    outputs = distributed.launch(WORKER, *args, processes=2, devices=4, timeout=150)
    seen = [distributed.records(out) for out in outputs]
    for i, record in enumerate(seen):
        assert (record["process"], record["devices"], record["local"]) == (i, 8, 4)
        assert record["rows"] == [i * worker.ROWS // 2]  # each fed its own half of the batch
        np.testing.assert_allclose(record["losses"], losses, rtol=1e-5, atol=1e-5)
        # Both processes loaded the checkpoint back, onto the saving mesh and onto (4, 2),
        # and loaded the one this process saved.
        assert record["same_mesh"] and record["other_mesh"] and record["from_one"]
        assert record["init_equals_shard"]  # tl.sharding.init under jax.distributed
        assert record["spec"] == "P(None, 'model')" and record["shard_shapes"] == [[8, 16]]
        # A blob of one process cannot hold the other's shards; one loads onto the mesh.
        assert (
            record["blob"][0] == "ValueError"
            and "`model.l1.kernel` is sharded" in record["blob"][1]
        )
        assert record["blob_loaded"]
    # Saves that failed on the primary: it raised its own error, the other one quoting it...
    refused, failed = (
        (seen[0]["refused"], seen[1]["refused"]),
        (seen[0]["failed"], seen[1]["failed"]),
    )
    assert refused[0][0] == "FileExistsError" and "is not a checkpoint" in refused[0][1]
    assert refused[1][0] == "RuntimeError" and "failed to check the path" in refused[1][2]
    assert f"    FileExistsError: {refused[0][1]}" in refused[1]
    for i, record in enumerate(seen):  # each process its own path: all refuse, nothing written
        assert record["paths_differ"][:2] == [
            "ValueError",
            f"tl.save: the processes were given different paths (this one: {path}_{i}); every",
        ]
    assert failed[0] == ["OSError", "disk full (injected)"]
    assert failed[1][0] == "RuntimeError" and "    OSError: disk full (injected)" in failed[1]
    # ...and the checkpoint they would have replaced is the trained one, nothing left beside it.
    assert seen[0]["kept"] and seen[1]["kept"]
    assert sorted(os.listdir(tmp_path)) == ["a_file", "ckpt", "one"]

    # Their checkpoint, loaded in this one process: into the 8-device model...
    like = (model, optimizer)
    loaded = tl.load(path, like)
    assert int(loaded[1].step.value) == worker.STEPS
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(like), strict=True):
        assert got.sharding == want.sharding
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # ...and into a model on one device, as a fresh one is.
    plain = tl.load(path, worker.make(None))
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(like), strict=True):
        assert len(got.devices()) == 1 and not got.committed
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# A stand-in for a worker: process 1 fails (or, with "sleep", both hang) while
# process 0 waits as if in a collective.
STUCK = textwrap.dedent(
    """
    import os, sys, time
    if sys.argv[1] == "fail" and os.environ["TOYLIB_TEST_PROCESS_ID"] == "1":
        sys.exit(3)
    time.sleep(600)
    """
)


@pytest.mark.parametrize(
    ("how", "error"), [("fail", "process 1 exited with 3"), ("sleep", "timed out after 1 s")]
)
def test_the_launcher_stops_every_process(tmp_path, how, error):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    with pytest.raises(AssertionError, match=error) as info:
        distributed.launch(script, how, processes=2, timeout=1)
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+), exit", str(info.value))]
    assert len(pids) == 2
    for pid in pids:  # killed and reaped: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
