"""The command line: one clear line per bad input, preemption, a short real run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = [
    "--config.batch_size=16",
    "--config.data.num_eval=32",
    "--config.eval.batch_size=16",
    "--config.model.vision.depth=1",
    "--config.model.text.unimodal_depth=1",
    "--config.model.text.multimodal_depth=1",
]


def mmjax_main(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "mmjax.main", *args], capture_output=True, text=True, timeout=600, **kwargs
    )


def single_error_line(result):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unknown_config_key_names_valid_keys(tmp_path):
    line = single_error_line(mmjax_main("--config=configs/coca.py", f"--workdir={tmp_path}", "--config.total_stepz=3"))
    assert "total_stepz" in line and "total_steps" in line


def test_unknown_nested_config_key(tmp_path):
    line = single_error_line(mmjax_main("--config=configs/coca.py", f"--workdir={tmp_path}", "--config.model.widht=3"))
    assert "model.widht" in line and "vision" in line


def test_unknown_variant_names_valid_variants(tmp_path):
    line = single_error_line(mmjax_main("--config=configs/coca.py:huge", f"--workdir={tmp_path}"))
    assert "huge" in line and "valid" in line


def test_missing_config_file(tmp_path):
    line = single_error_line(mmjax_main("--config=configs/nope.py", f"--workdir={tmp_path}"))
    assert "configs/nope.py" in line and "configs/coca.py" in line


def test_bad_override_value(tmp_path):
    line = single_error_line(mmjax_main("--config=configs/coca.py", f"--workdir={tmp_path}", "--config.total_steps=abc"))
    assert "total_steps" in line


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = single_error_line(mmjax_main("--config=configs/coca.py", f"--workdir={blocker}/run", *TINY))
    assert "not writable" in line and "--workdir" in line


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """Preemption: SIGTERM mid-run -> checkpoint at the current step, exit 0."""
    args = ["--config=configs/coca.py", f"--workdir={tmp_path}", *TINY, "--config.total_steps=1000",
            "--config.log_every=1", "--config.eval_every=1000", "--config.checkpoint_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.main", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "Preempted" in out
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 1000  # (exact resume after it: the Ctrl-C test below)


def start_and_wait_for_training(args):
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and open(metrics).read().strip()) and time.time() < deadline:
        time.sleep(0.2)
    return proc


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_ctrl_c_saves_exits_0_and_resumes_exactly(tmp_path):
    """Ctrl-C is handled like SIGTERM; the resumed run's losses equal an uninterrupted run's."""
    common = ["--config=configs/coca.py", *TINY, "--config.log_every=1", "--config.eval_every=1000",
              "--config.checkpoint_every=1000"]
    interrupted = str(tmp_path / "interrupted")
    proc = start_and_wait_for_training([*common, f"--workdir={interrupted}", "--config.total_steps=1000"])
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    saved = [int(s) for s in os.listdir(os.path.join(interrupted, "checkpoints")) if s.isdigit()]
    assert len(saved) == 1 and f"Interrupted (Ctrl-C): saved step {saved[0]}; re-run the same command" in out
    assert "Traceback" not in out
    total = f"--config.total_steps={saved[0] + 2}"
    resumed = mmjax_main(*common, f"--workdir={interrupted}", total)
    assert f"Resumed from step {saved[0]}" in resumed.stdout, resumed.stdout + resumed.stderr
    straight = str(tmp_path / "straight")
    result = mmjax_main(*common, f"--workdir={straight}", total)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final held-out results" in result.stdout and os.path.exists(os.path.join(straight, "curves.png"))
    assert losses(interrupted) == pytest.approx(losses(straight), rel=1e-6)


def test_second_ctrl_c_aborts_at_once(tmp_path):
    proc = start_and_wait_for_training(["--config=configs/coca.py", f"--workdir={tmp_path}", *TINY,
                                        "--config.total_steps=1000", "--config.log_every=1"])
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # the first Ctrl-C is acknowledged at once...
        if "press Ctrl-C again to abort without saving" in line:
            break
    proc.send_signal(signal.SIGINT)  # ...and the second kills the process before it saves
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT
    assert not [s for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]


def test_an_unexpected_error_ends_with_its_root_cause(tmp_path):
    """Async checkpoint threads are shut down before the traceback, so nothing buries it."""
    script = (
        "import sys; from absl import app; from mmjax import main\n"
        "from mmjax import evals\n"
        "def fail(*args, **kwargs): raise RuntimeError('boom: the root cause')\n"
        "evals.run = fail\n"
        "app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "--config=configs/coca.py", f"--workdir={tmp_path}", *TINY,
         "--config.total_steps=4", "--config.checkpoint_every=1", "--config.eval_every=2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "RuntimeError: boom: the root cause", result.stderr[-3000:]
    assert "Event loop is closed" not in result.stderr and "During handling" not in result.stderr
