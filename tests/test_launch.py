"""Multi-process launch: where --distributed takes its process group from, the launchers'
command lines (dry runs), the hybrid ICI/DCN mesh, and launch/local.sh run for real."""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from mmjax import distributed
from mmjax.errors import UserError
from mmjax.parallel import sharding

SPACED = "--workdir=/runs/my run"  # an argument that must arrive whole


# --- mmjax.distributed.resolve ----------------------------------------------------------------


def test_flags_then_environment_then_detection():
    env = {"JAX_COORDINATOR_ADDRESS": "head:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve("h:1", 2, 1, environ=env) == distributed.ProcessGroup("h:1", 2, 1)
    assert distributed.resolve(environ=env) == distributed.ProcessGroup("head:9", 4, 3)
    assert distributed.resolve(process_id=0, environ=env) == distributed.ProcessGroup("head:9", 4, 0)
    assert distributed.resolve(environ={}) == distributed.ProcessGroup()  # jax detects SLURM, TPU, MPI
    # A coordinator alone overrides the one jax detects, as jax's own variable does.
    assert distributed.resolve("h:1", environ={}) == distributed.ProcessGroup("h:1")


@pytest.mark.parametrize("kwargs, env, named", [
    (dict(num_processes=2), {}, ["--coordinator_address", "--process_id"]),
    (dict(coordinator_address="h:1", process_id=0), {}, ["--num_processes (or JAX_NUM_PROCESSES)"]),
    (dict(), {"JAX_PROCESS_ID": "1"}, ["JAX_PROCESS_ID given", "--coordinator_address", "--num_processes"]),
    (dict(), {"JAX_NUM_PROCESSES": "two"}, ["JAX_NUM_PROCESSES='two' is not an integer"]),
    (dict(coordinator_address="head", num_processes=2, process_id=0), {}, ["'head' is not HOST:PORT"]),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, ["--process_id=2 is not in 0..1"]),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), {}, ["--num_processes=0 must be at least 1"]),
])
def test_bad_process_groups_are_one_line_naming_the_fix(kwargs, env, named):
    with pytest.raises(UserError) as e:
        distributed.resolve(**kwargs, environ=env)
    assert "\n" not in str(e.value) and all(part in str(e.value) for part in named), str(e.value)


def test_main_refuses_a_partial_group_before_jax_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mmjax.main", "--config=configs/clip.py", f"--workdir={tmp_path}",
                             "--num_processes=2"], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--process_id" in lines[0], result.stderr
    assert not os.listdir(tmp_path)


# --- the launchers' dry runs ------------------------------------------------------------------


def dry_run(script, *args, env=None):
    result = subprocess.run(["bash", f"launch/{script}", "--dry_run", *args], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.strip().splitlines()]


def main_args(command: str) -> list[str]:
    """The arguments mmjax.main gets from a remote shell command line."""
    words = shlex.split(command)
    return words[words.index("mmjax.main") + 1:]


def test_tpu_pod_copies_installs_and_runs_on_every_worker():
    copy, scp, install, train = dry_run("tpu_pod.sh", "--project", "p", "my-tpu", "us-east5-a",
                                        "--config=configs/coca.py", SPACED)
    assert "ls-files" in copy and "tar" in copy
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "my-tpu:~/mmjax.tar.gz" in scp
    for ssh in (install, train):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        assert {"--worker=all", "us-east5-a", "p"} <= set(ssh)
    assert "pip install -q -e '.[gcs]' 'jax[tpu]'" in install[-1]
    assert main_args(train[-1]) == ["--distributed", "--config=configs/coca.py", SPACED]


def test_tpu_pod_from_a_repository():
    clone, train = dry_run("tpu_pod.sh", "--repo", "https://example.com/mmjax.git", "--ref", "v1", "t", "z", "--x")
    assert "git clone --depth 1 --branch v1 https://example.com/mmjax.git ~/mmjax" in clone[-1]
    assert main_args(train[-1]) == ["--distributed", "--x"]
    [only_train] = dry_run("tpu_pod.sh", "--skip_install", "t", "z", "--x")
    assert main_args(only_train[-1]) == ["--distributed", "--x"]


def test_xpk_spans_the_slices_along_data():
    [cmd] = dry_run("xpk.sh", "--cluster", "c", "--tpu-type=v5p-256", "--num-slices", "2", "--zone", "z",
                    "--config=configs/coca.py", SPACED)
    assert cmd[:3] == ["xpk", "workload", "create"]
    options = dict(zip(cmd[3:-2:2], cmd[4:-2:2]))
    assert options["--cluster"] == "c" and options["--tpu-type"] == "v5p-256" and options["--num-slices"] == "2"
    assert options["--zone"] == "z" and options["--base-docker-image"] and os.path.isdir(options["--script-dir"])
    assert cmd[-2] == "--command" and "pip install -q -e '.[gcs]'" in cmd[-1]
    assert main_args(cmd[-1]) == ["--distributed", "--config.mesh.dcn_data=2", "--config=configs/coca.py", SPACED]


def test_xpk_with_a_ready_image_and_its_required_options():
    [cmd] = dry_run("xpk.sh", "--cluster", "c", "--tpu-type", "v5e-8", "--docker-image", "gcr.io/p/mmjax", "--",
                    "--config=configs/clip.py")
    assert "--docker-image" in cmd and "--script-dir" not in cmd and "pip" not in cmd[-1]
    assert main_args(cmd[-1]) == ["--distributed", "--config.mesh.dcn_data=1", "--config=configs/clip.py"]
    missing = subprocess.run(["bash", "launch/xpk.sh", "--dry_run", "--tpu-type", "v5e-8"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "--cluster and --tpu-type are required" in missing.stderr


def test_slurm_one_process_per_node_sees_every_gpu():
    [cmd] = dry_run("slurm_gpu.sh", "--config=configs/coca.py", SPACED,
                    env={"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4", "JAX_LOCAL_DEVICE_IDS": ""})
    assert cmd[0] == "srun" and "env" in cmd and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in cmd
    assert cmd[cmd.index("mmjax.main") + 1:] == ["--distributed", "--config=configs/coca.py", SPACED]
    [per_gpu] = dry_run("slurm_gpu.sh", "--x", env={"SLURM_NTASKS_PER_NODE": "8(x2)"})
    assert per_gpu[0] == "srun" and not any(w.startswith("JAX_LOCAL_DEVICE_IDS") for w in per_gpu)


def test_local_dry_run_gives_each_process_its_id_and_devices():
    lines = dry_run("local.sh", "3", "--devices_per_process", "2", "--config=configs/clip.py", SPACED,
                    env={"XLA_FLAGS": ""})
    assert len(lines) == 3
    ports = set()
    for i, cmd in enumerate(lines):
        assert "JAX_PLATFORMS=cpu" in cmd and "XLA_FLAGS=--xla_force_host_platform_device_count=2" in cmd
        args = cmd[cmd.index("mmjax.main") + 1:]
        assert args[:2] == ["--config=configs/clip.py", SPACED] and args[2] == "--distributed"
        assert args[4:] == ["--num_processes=3", f"--process_id={i}"]
        ports.add(re.fullmatch(r"--coordinator_address=localhost:(\d+)", args[3]).group(1))
    assert len(ports) == 1


# --- the hybrid ICI/DCN mesh ------------------------------------------------------------------


def fake_devices(slices: int, per_slice: int, processes_per_slice: int = 1):
    """CPU-like devices listed with the slices interleaved, as a pod's device list may be."""
    per_process = per_slice // processes_per_slice
    devices = [SimpleNamespace(id=s * per_slice + k, slice_index=s, process_index=s * processes_per_slice + k // per_process,
                               platform="cpu", device_kind="fake")
               for s in range(slices) for k in range(per_slice)]
    return sorted(devices, key=lambda d: (d.id % per_slice, d.slice_index))


def test_hybrid_mesh_puts_the_slices_along_data():
    devices = fake_devices(slices=2, per_slice=4, processes_per_slice=2)
    grid = sharding.hybrid_devices(dict(data=-1, fsdp=2, tensor=1, dcn_data=2), devices, 2)
    assert grid.shape == (4, 2, 1)  # data = 2 per slice x 2 slices
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()  # fsdp and tensor stay inside a slice


def test_hybrid_mesh_takes_processes_where_there_are_no_slices():
    devices = [SimpleNamespace(id=i, process_index=i // 2, platform="cpu", device_kind="fake") for i in (3, 0, 2, 1)]
    grid = sharding.hybrid_devices(dict(data=-1, fsdp=1, tensor=1), devices, 2)
    assert [d.process_index for d in grid.flat] == [0, 0, 1, 1]


@pytest.mark.parametrize("dcn_data, message", [
    (3, "mesh.dcn_data=3 does not divide the 8 devices"),
    (4, "needs the devices in 4 slices (or, without slices, 4 processes); these 8 are in 2 slice(s) and 2 process(es)"),
])
def test_hybrid_mesh_errors_name_the_fix(dcn_data, message):
    with pytest.raises(UserError, match=re.escape(message)):
        sharding.hybrid_devices(dict(data=-1, fsdp=1, tensor=1), fake_devices(2, 4), dcn_data)


def test_dcn_data_one_is_the_plain_mesh():
    from mmjax.configs import load_config

    mesh_cfg = load_config("configs/siglip.py").mesh
    assert mesh_cfg.dcn_data == 1 and dict(sharding.make_mesh(mesh_cfg).shape) == dict(data=8, fsdp=1, tensor=1)


# --- launch/local.sh for real -----------------------------------------------------------------


def local_sh(*args):
    env = {**os.environ, "MMJAX_LOCAL_MODULE": "tests.launch_worker", "PYTHON": sys.executable}
    return subprocess.run(["bash", "launch/local.sh", *args], capture_output=True, text=True, timeout=240, env=env)


def reports(stdout: str) -> dict[int, dict]:
    return {int(m.group(1)): json.loads(m.group(2)) for m in re.finditer(r"^\[p(\d+)\] (\{.*\})$", stdout, re.M)}


def test_local_processes_join_one_group():
    result = local_sh("2", "--devices_per_process", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    by_process = reports(result.stdout)
    assert sorted(by_process) == [0, 1]
    for i, report in by_process.items():
        assert report["index"] == i and report["described"].startswith(f"process {i} of 2 (coordinator localhost:")
        assert report["processes"] == 2 and report["local_devices"] == 2 and report["devices"] == 4
        assert report["sum"] == 1 + 2 + 3 + 4  # every process's devices took part
        assert report["hybrid_processes"] == [0, 0, 1, 1]


def test_local_stops_the_others_when_one_fails(tmp_path):
    start = time.monotonic()
    result = local_sh("2", "--devices_per_process", "1", "--fail=1", f"--ready={tmp_path / 'ready'}")
    assert result.returncode == 3 and "stopping the others" in result.stderr, result.stderr
    assert time.monotonic() - start < 60
    [waiting] = [r["waiting"] for r in reports(result.stdout).values()]
    with pytest.raises(ProcessLookupError):
        os.kill(waiting, 0)
