"""A real multi-host run: launch/local.sh starts 2 processes × 4 simulated CPU devices joined by
jax.distributed. One process is killed (SIGKILL): local.sh stops the other, and the same command
resumes from the last periodic checkpoint. Then SIGTERM reaches only one of them: both save the
same step and exit 0; the same command resumes again. Every loss equals that of one process with
8 devices. Both accumulate each step's gradient from 2 micro-batches with GradCache."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ARGS = [
    "--config=configs/clip.py",
    "--config.total_steps=12",
    "--config.batch_size=16",
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.eval_every=100",
    "--config.data.num_eval=64",
    "--config.accumulate.steps=2",  # GradCache across processes (tests/test_accumulate.py: it equals the full batch)
]
ENV = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


class LocalRun:
    """launch/local.sh in the background, its [p<i>]-prefixed output collected line by line."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.lines = []
        self.proc = subprocess.Popen(["bash", "launch/local.sh", "2", "--devices_per_process", "4", *ARGS,
                                      f"--workdir={workdir}"], env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, text, timeout=240):
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None and time.time() < deadline, "".join(self.lines[-30:])
            time.sleep(0.1)

    def finish(self, timeout=300):
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc, "".join(self.lines)

    def pid_of_process(self, i):
        """The python of process i (local.sh's own child, found by its command line)."""
        found = subprocess.run(["pgrep", "-f", f"workdir={self.workdir} .*--process_id={i}$"],
                               capture_output=True, text=True).stdout.split()
        pythons = [p for p in found if "python" in open(f"/proc/{p}/cmdline").read().split("\0")[0]]
        assert len(pythons) == 1, found
        return int(pythons[0])


def test_two_processes_killed_then_preempted_resume_and_equal_one_process_of_eight_devices(tmp_path):
    reference = str(tmp_path / "one_process")
    subprocess.run([sys.executable, "-m", "mmjax.main", *ARGS, f"--workdir={reference}"], env=ENV, check=True,
                   capture_output=True, timeout=300)
    workdir = str(tmp_path / "two_processes")
    checkpoints = lambda: sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())

    run = LocalRun(workdir)
    run.wait_for("[p0] step      5/12")
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "4")) and time.time() < deadline:
        time.sleep(0.1)  # the step-4 save is asynchronous: let it land first
    os.kill(run.pid_of_process(1), signal.SIGKILL)  # a host dies: no save, the other is stopped
    rc, out = run.finish()
    assert rc != 0 and "local.sh: a process exited with status 137; stopping the others" in out, out[-3000:]
    assert checkpoints() == [4]

    run = LocalRun(workdir)
    run.wait_for("[p0] step      7/12")
    os.kill(run.pid_of_process(1), signal.SIGTERM)  # a preemption notice that reaches one host only
    rc, out = run.finish()
    assert rc == 0, out[-3000:]  # local.sh exits 0 only when both processes did
    assert f"[p0] Resumed from step 4 in {workdir}" in out
    saved = [line for line in out.splitlines() if "Preempted: saved step" in line]
    assert len(saved) == 1 and saved[0].startswith("[p0] "), out[-3000:]  # the console is process 0's
    step = int(saved[0].split("saved step ")[1].split(";")[0])
    assert 7 <= step < 12 and checkpoints()[-1] == step  # one save that every process took part in
    assert not any(line.startswith("[p1] step ") for line in out.splitlines())

    rc, out = LocalRun(workdir).finish()
    assert rc == 0, out[-3000:]
    assert f"[p0] Resumed from step {step} in {workdir}" in out
    two, one = losses(workdir), losses(reference)
    assert sorted(two) == sorted(one) == list(range(1, 13))
    assert two == pytest.approx(one, rel=1e-5)
