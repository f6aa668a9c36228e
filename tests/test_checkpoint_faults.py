"""Checkpoints that fail loudly and lose nothing: an unreadable step is moved aside and the
previous one restored, a failed save stops the run in one line, and an exception on its way
out is not buried under the checkpoint threads' own errors."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mmjax.checkpoint import Checkpointer
from mmjax.errors import RunStopped, UserError

# A failed read leaves orbax's abandoned async work to surface later as unraisable exceptions.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def tiny_state(seed: int, rows: int = 64, layers: int = 0) -> dict:
    """Sharded arrays; `layers` more small ones make more reads in flight when one fails."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.NamedSharding(mesh, jax.P("data"))
    values = np.random.default_rng(seed).normal(size=(rows, 32)).astype(np.float32)
    return {
        "w": jax.device_put(values, sharded),
        "b": jax.device_put(np.arange(8.0) + seed, sharded),
        **{f"layer{i}": jax.device_put(values[:8] + i, sharded) for i in range(layers)},
    }


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def save_steps(directory, steps, layers: int = 0):
    ckpt = Checkpointer(str(directory), keep=5)
    for step in steps:
        ckpt.save(step, tiny_state(step, layers=layers), {"position": step})
    ckpt.close()


def largest_data_file(step_dir) -> str:
    # ocdbt's data files; once the per-process databases are merged, restore reads state/d/.
    files = glob.glob(f"{step_dir}/state/d/*") or glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    path = largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    """A fresh interpreter (8 simulated devices, as here), so that everything it prints,
    late tracebacks from background threads included, can be checked."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_truncated_latest_step_is_moved_aside_and_the_previous_one_restored(tmp_path, capfd):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    truncate(directory / "2")
    capfd.readouterr()

    ckpt = Checkpointer(str(directory), keep=5)
    step, state, data_state = ckpt.restore_latest(abstract(tiny_state(0)))

    assert step == 1 and data_state == {"position": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(tiny_state(1)["w"]))
    np.testing.assert_array_equal(np.asarray(state["b"]), np.asarray(tiny_state(1)["b"]))
    assert state["w"].sharding == tiny_state(0)["w"].sharding
    out, err = capfd.readouterr()
    moved = tmp_path / "checkpoints_unreadable" / "2"
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"warning: checkpoint step 2 in {directory} cannot be read (")
    assert err.rstrip().endswith(f"; moved it to {moved} and trying step 1"), err
    assert os.path.getsize(largest_data_file(moved)) > 0  # kept for a post-mortem, not deleted
    # The run goes on: step 2 is written again, and a re-launch finds it.
    ckpt.save(2, tiny_state(22), {"position": 2})
    ckpt.close()
    assert Checkpointer(str(directory), keep=5).restore_latest(abstract(tiny_state(0)))[0] == 2


def test_deleted_file_falls_back_and_prints_one_line_only(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2], layers=100)
    os.remove(largest_data_file(directory / "2"))
    result = run_python(
        f"""
        import time
        from mmjax.checkpoint import Checkpointer
        from tests.test_checkpoint_faults import abstract, tiny_state
        ckpt = Checkpointer({str(directory)!r}, keep=5)
        print("restored step", ckpt.restore_latest(abstract(tiny_state(0, layers=100)))[0])
        ckpt.close()
        time.sleep(1)  # the abandoned reads of step 2 complete after the restore returned
        """,
        tmp_path,
    )
    assert result.stdout == "restored step 1\n", result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "warning: checkpoint step 2" in result.stderr and "trying step 1" in result.stderr
    assert (tmp_path / "checkpoints_unreadable" / "2").is_dir()


def test_no_readable_step_stops_the_run_naming_each(tmp_path, capfd):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    truncate(directory / "1")
    truncate(directory / "2")
    capfd.readouterr()
    ckpt = Checkpointer(str(directory), keep=5)
    with pytest.raises(RunStopped) as stopped:
        ckpt.restore_latest(abstract(tiny_state(0)))
    message = str(stopped.value)
    assert message.startswith(f"no checkpoint in {directory} can be read: step 2 (")
    assert ", step 1 (" in message and f"moving {directory} aside starts the run fresh" in message
    assert len(message.splitlines()) == 1
    # The newer step went aside on the way; the last one stays for the user to decide.
    assert (tmp_path / "checkpoints_unreadable" / "2").is_dir() and (directory / "1").is_dir()
    assert len(capfd.readouterr().err.splitlines()) == 1  # step 2's warning
    ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5)
    assert ckpt.restore_latest(abstract(tiny_state(0))) is None
    ckpt.close()


def test_state_of_another_shape_is_refused_and_the_checkpoint_kept(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1])
    ckpt = Checkpointer(str(directory), keep=5)
    with pytest.raises(UserError, match="does not fit this run's model or optimizer") as refused:
        ckpt.restore_latest(abstract(tiny_state(0, rows=128)))
    assert not isinstance(refused.value, RunStopped)
    assert (directory / "1").is_dir() and not (tmp_path / "checkpoints_unreadable").exists()
    ckpt.close()


def test_failed_save_stops_the_run_in_one_line(tmp_path):
    """Writes past 64 KiB fail with EFBIG (RLIMIT_FSIZE), as they would with ENOSPC on a full disk."""
    result = run_python(
        f"""
        import json, os, resource, signal, time
        from mmjax.checkpoint import Checkpointer
        from mmjax.errors import RunStopped
        from tests.test_checkpoint_faults import tiny_state

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write returns EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        report = {{}}

        ckpt = Checkpointer({str(tmp_path / "a")!r}, keep=5)
        ckpt.save(1, tiny_state(1), {{"position": 1}})
        # 8 shards of 128 KiB of incompressible floats: each over the limit on its own, since
        # OCDBT may write the shards to separate files (it did under load: 16 KiB shards passed)
        ckpt.save(2, tiny_state(2, rows=8192), {{"position": 2}})
        try:
            for _ in range(600):  # the trainer's per-step check, until the async write fails
                ckpt.check_for_errors()
                time.sleep(0.05)
        except RunStopped as e:
            report["check"] = str(e)
        for name, call in [("save", lambda: ckpt.save(3, tiny_state(3), {{}})), ("close", ckpt.close)]:
            try:
                call()
            except RunStopped as e:
                report[name] = str(e)
        report["left"] = sorted(os.listdir({str(tmp_path / "a")!r}))

        ckpt = Checkpointer({str(tmp_path / "b")!r}, keep=5)
        ckpt.save(5, tiny_state(5, rows=8192), {{}})
        ckpt.close(abandon=True)  # an exception on its way out: the failing save stays quiet
        report["left_abandoned"] = sorted(os.listdir({str(tmp_path / "b")!r}))
        print(json.dumps(report))
        """,
        tmp_path,
    )
    assert result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    message = report["check"]
    assert message.startswith(f"could not write checkpoint step 2 to {tmp_path / 'a'}: File too large (EFBIG); ")
    assert "that filesystem has " in message and " free" in message and "--workdir" in message
    assert message.endswith("the last good checkpoint, step 1, which is intact")
    assert len(message.splitlines()) == 1
    assert report["save"] == report["close"] == message  # it stays stopped
    assert report["left"] == ["1"]  # no half-written tmp directory
    assert report["left_abandoned"] == []


def test_abandoning_a_save_in_flight_prints_nothing_and_keeps_it(tmp_path, capfd):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(str(directory), keep=5)
    capfd.readouterr()
    ckpt.save(7, tiny_state(7, rows=4096), {"position": 7})
    ckpt.check_for_errors()  # does not wait for the save in flight
    ckpt.close(abandon=True)
    assert capfd.readouterr() == ("", "")
    assert Checkpointer(str(directory), keep=5).latest_step() == 7
