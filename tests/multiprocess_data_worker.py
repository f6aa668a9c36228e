"""One of N real processes (jax.distributed on CPU) reading a CSV through the pipeline; run
by tests/test_multiprocess_data.py. Prints a JSON report on its last line."""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
from absl import flags  # noqa: E402


def main(process_id: int, processes: int, port: int, spec: str, tokenizer_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=processes, process_id=process_id)
    from mmjax.configs import load_config
    from mmjax.data import pipeline

    cfg = load_config("configs/clip.py").data
    cfg.update(dict(train=spec, image_size=32, text_len=16, tokenizer=tokenizer_path))
    tok = pipeline.make_tokenizer(cfg, "")
    fingerprint = pipeline.fingerprint(cfg, 8, seed=0)
    it = pipeline.train_iterator(cfg, tok, 8, seed=0)
    first_epoch = [t for _ in range(40 // 8) for t in tok.decode(next(it)["tokens"])]
    saved = json.loads(json.dumps(pipeline.data_state(it, fingerprint)))  # collective, as in a checkpoint
    expected = [next(it)["image"].tobytes() for _ in range(2)]
    it.close()
    resumed = pipeline.train_iterator(cfg, tok, 8, seed=0)
    pipeline.restore_data_state(resumed, saved, fingerprint)
    exact = [next(resumed)["image"].tobytes() for _ in range(2)] == expected
    resumed.close()
    print(json.dumps({"captions": first_epoch, "states": len(saved["processes"]), "resumed_exactly": exact}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])  # grain reads absl flags
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
