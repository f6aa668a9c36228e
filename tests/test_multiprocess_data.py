"""Two real processes under jax.distributed: disjoint shares that make one epoch, every
process's iterator state gathered into one checkpoint entry, and each resuming its own."""
import json
import socket
import subprocess
import sys

from mmjax.configs import load_config
from mmjax.data import pipeline
from tests import data_builders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_share_an_epoch_and_resume_their_own_state(tmp_path):
    spec = "csv:" + data_builders.write_table(tmp_path / "table", 40)
    cfg = load_config("configs/clip.py").data
    cfg.update(dict(train=spec, vocab_size=60))
    tokenizer = str(tmp_path / "spm.model")
    pipeline.make_tokenizer(cfg, tokenizer)  # one tokenizer file both processes load
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "tests/multiprocess_data_worker.py", str(i), "2", str(port), spec, tokenizer],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    first, second = (set(r["captions"]) for r in reports)
    assert len(first) == len(second) == 20 and not first & second
    assert first | second == {caption for _, _, caption, _ in data_builders.examples(40)}
    assert all(r["states"] == 2 and r["resumed_exactly"] for r in reports)

