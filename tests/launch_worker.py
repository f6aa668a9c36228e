"""What launch/local.sh runs in place of mmjax.main in tests/test_launch.py (MMJAX_LOCAL_MODULE):
joins the process group through mmjax.distributed as main.py does, then checks it is real with
a psum over every process's devices. Prints one JSON line.

--fail=I --ready=FILE: the others print their pid, create FILE and wait forever; process I
exits with status 3 once FILE exists (so the pid is on the console before local.sh stops them)."""
import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("coordinator_address", "num_processes", "process_id", "fail", "ready"):
        parser.add_argument(f"--{name}", type=str if name in ("coordinator_address", "ready") else int)
    parser.add_argument("--distributed", action="store_true")
    args = parser.parse_args()
    if args.fail is not None:
        if args.process_id == args.fail:
            while not os.path.exists(args.ready):
                time.sleep(0.05)
            raise SystemExit(3)
        print(json.dumps({"waiting": os.getpid()}), flush=True)
        open(args.ready, "w").close()
        while True:  # until local.sh stops this process
            time.sleep(1)

    from mmjax import distributed

    described = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mmjax.parallel import sharding as mmjax_sharding

    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = NamedSharding(mesh, P("d"))
    # Device i holds i + 1: the global sum needs every process's share.
    ones = jax.make_array_from_callback((jax.device_count(),), sharding,
                                        lambda index: np.arange(jax.device_count())[index] + 1.0)
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones))
    # Two processes without slices: mesh.dcn_data=2 makes each process one unit along data.
    hybrid = mmjax_sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, dcn_data=2))
    print(json.dumps({"described": described, "processes": jax.process_count(), "index": jax.process_index(),
                      "local_devices": jax.local_device_count(), "devices": jax.device_count(), "sum": total,
                      "hybrid_processes": [d.process_index for d in hybrid.devices.flat]}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
