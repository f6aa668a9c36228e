"""The one place that turns config into a device mesh and logical names into shardings."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism too


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor); one size may be -1: "all remaining devices"."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are "
            "available; set one of --config.mesh.data/fsdp/tensor to -1"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh; with mesh.dcn_data > 1 (several TPU slices) a hybrid one."""
    devices = jax.devices() if devices is None else devices
    # Auto axes: we shard with logical rules and constraints, not explicit-sharding types.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn_data = int(mesh_cfg.get("dcn_data", 1))
    if dcn_data > 1:
        return jax.sharding.Mesh(hybrid_devices(mesh_cfg, devices, dcn_data), MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(mesh_shape(mesh_cfg, len(devices)), MESH_AXES, axis_types=axis_types, devices=devices)


def hybrid_devices(mesh_cfg, devices, dcn_data: int) -> np.ndarray:
    """Devices laid out for `dcn_data` slices: data parallelism between slices, whose only
    traffic is one gradient reduction a step (the slow data-center network, DCN), and the
    configured data/fsdp/tensor sizes within each slice (the fast chip interconnect, ICI);
    mesh.data is the per-slice size. Without slices (GPU hosts, local.sh's CPU processes) the
    processes are the units."""
    if len(devices) % dcn_data:
        raise ConfigError(f"mesh.dcn_data={dcn_data} does not divide the {len(devices)} devices; set "
                          "--config.mesh.dcn_data to the number of slices")
    slices = {getattr(d, "slice_index", 0) for d in devices}
    processes = {d.process_index for d in devices}
    if dcn_data not in (len(slices), len(processes)):
        raise ConfigError(
            f"mesh.dcn_data={dcn_data} needs the devices in {dcn_data} slices (or, without slices, {dcn_data} "
            f"processes); these {len(devices)} are in {len(slices)} slice(s) and {len(processes)} process(es); "
            f"set --config.mesh.dcn_data={len(slices) if len(slices) > 1 else 1}"
        )
    per_slice = mesh_shape(mesh_cfg, len(devices) // dcn_data)
    return mesh_utils.create_hybrid_device_mesh(per_slice, (dcn_data, 1, 1), devices,
                                                process_is_granule=len(slices) != dcn_data)


def rules_from_config(mesh_cfg) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_cfg.rules)


def logical_to_sharding(boxed_tree, mesh, rules):
    """Map a tree of logically-annotated (boxed) values to NamedShardings on `mesh`."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
