"""Joining a multi-process (multi-host) job: `initialize` before any JAX call touches devices.

One jaxlm process runs per host (per GPU on GPU clusters); together they form one JAX job
whose `jax.devices()` spans every host. `initialize(config.distributed)` decides how this
process joins, in this order of precedence for each key of `config.distributed`:

1. the environment variable `JAXLM_<KEY>` (e.g. `JAXLM_COORDINATOR_ADDRESS`, `JAXLM_PROCESS_ID`),
   which is how the launch scripts in `launch/` pass the topology without editing a config;
2. the config value (`--config.distributed.process_id=1`), unless it is the "auto" default;
3. the cluster environment, read by `jax.distributed.initialize` itself (a SLURM job step, a
   Cloud TPU pod slice on GCE or GKE, an Open MPI job).

The mode follows: "explicit" when a coordinator address is known, otherwise the detected
cluster ("slurm", "tpu", "ompi"), otherwise "single": a plain machine, where nothing is
initialised. `JAXLM_DISTRIBUTED=off` forces "single" (e.g. a one-process tool run inside a
multi-task SLURM allocation). Only `resolve_plan` reads the environment; it is pure, so tests
can pass a fake environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from jaxlm.run import errors
from jaxlm.run.errors import ConfigError
from jaxlm.run.section import Section

ENV_PREFIX = "JAXLM_"
# "off" never initialises (one process); "auto" (or unset) decides as described above.
MODE_ENV = "JAXLM_DISTRIBUTED"
CPU_COLLECTIVES = ("gloo", "mpi", "")


def default_distributed_config() -> ml_collections.ConfigDict:
    """The `config.distributed` section: how this process joins a multi-process job."""
    d = ml_collections.ConfigDict()
    # host:port of process 0's coordinator service; "" = detect it (SLURM, Cloud TPU) or,
    # outside a cluster, run as a single process.
    d.coordinator_address = ""
    # Processes in the job; 0 = detect it (1 outside a cluster).
    d.num_processes = 0
    # This process's index in [0, num_processes); -1 = detect it.
    d.process_id = -1
    # Comma-separated local device ids this process drives ("0" or "0,1"); "" = JAX's default:
    # every local device, or one GPU per process (its local rank) under SLURM and Open MPI.
    d.local_device_ids = ""
    # Cross-process collectives of the CPU backend: "gloo", "mpi", or "" (JAX's default).
    # Only CPU computations use it; TPU and GPU have their own interconnect.
    d.cpu_collectives = "gloo"
    # Seconds to wait for every process to reach the coordinator before failing.
    d.initialization_timeout = 300
    return d


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins: the mode and the arguments of `jax.distributed.initialize`.

    An argument left None is detected by JAX from the cluster environment.
    """

    mode: str  # "single", "explicit", "slurm", "tpu" or "ompi"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_collectives: str = "gloo"
    initialization_timeout: int = 300

    def initialize_kwargs(self) -> dict[str, Any]:
        return dict(coordinator_address=self.coordinator_address,
                    num_processes=self.num_processes, process_id=self.process_id,
                    local_device_ids=(list(self.local_device_ids)
                                      if self.local_device_ids is not None else None),
                    initialization_timeout=self.initialization_timeout)


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(f"distributed.{key}", msg)


def _source(key: str, origin: Mapping[str, str]) -> str:
    return f" (from {origin[key]})" if key in origin else ""


def _parse_device_ids(text: str) -> tuple[int, ...]:
    ids = tuple(int(part) for part in text.split(","))
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(text)
    return ids


def check_distributed_config(cfg: ml_collections.ConfigDict,
                             origin: Mapping[str, str] | None = None) -> None:
    """Raises ValueError naming `distributed.<key>` for a malformed or inconsistent value.

    `origin` maps a key to where its value came from (an environment variable), for the message.
    """
    origin = origin or {}
    schema = default_distributed_config()
    for key in cfg.keys():
        if key not in schema:
            _fail(key, f"unknown key; expected one of {', '.join(schema.keys())}")
    src = lambda key: _source(key, origin)

    address = cfg.coordinator_address
    if not isinstance(address, str):
        _fail("coordinator_address", f"must be a string, got {address!r}")
    if address:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail("coordinator_address", f"{address!r}{src('coordinator_address')} is not "
                  "host:port (e.g. 10.0.0.1:8476 or 127.0.0.1:1234)")
    for key, low in (("num_processes", 0), ("process_id", -1), ("initialization_timeout", 1)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(key, f"must be an integer >= {low}, got {value!r}{src(key)}")
    if 0 < cfg.num_processes <= cfg.process_id:
        _fail("process_id", f"{cfg.process_id}{src('process_id')} is not below "
              f"distributed.num_processes={cfg.num_processes}{src('num_processes')}")
    ids = cfg.local_device_ids
    if not isinstance(ids, str):
        _fail("local_device_ids", f"must be a string like '0,1', got {ids!r}")
    if ids:
        try:
            _parse_device_ids(ids)
        except ValueError:
            _fail("local_device_ids", f"{ids!r}{src('local_device_ids')} is not a "
                  "comma-separated list of distinct device ids >= 0")
    if cfg.cpu_collectives not in CPU_COLLECTIVES:
        _fail("cpu_collectives", f"{cfg.cpu_collectives!r}{src('cpu_collectives')} is not one "
              f"of {CPU_COLLECTIVES}")


def with_env_overrides(cfg: ml_collections.ConfigDict, environ: Mapping[str, str]
                       ) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
    """A copy of `cfg` with every non-empty `JAXLM_<KEY>` applied; also returns key -> variable."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    origin: dict[str, str] = {}
    for key in default_distributed_config().keys():
        name = ENV_PREFIX + key.upper()
        text = environ.get(name, "").strip()
        if not text:
            continue
        if isinstance(out[key], int):
            try:
                out[key] = int(text)
            except ValueError:
                _fail(key, f"{name}={text!r} is not an integer")
        else:
            out[key] = text
        origin[key] = name
    return out, origin


def _running_on_cloud_tpu_vm() -> bool:
    """Whether `import jax` found TPU chips and libtpu here (JAX decides this at import)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _int_env(environ: Mapping[str, str], name: str, default: int = 1) -> int:
    try:
        return int(environ.get(name, default))
    except ValueError:
        return default


def detect_cluster(environ: Mapping[str, str], on_cloud_tpu_vm: bool) -> str | None:
    """The multi-process cluster this process runs in, as JAX's auto-detection will see it.

    None on a plain machine, and in a cluster of one process (then nothing need be initialised).
    """
    if "OMPI_MCA_orte_hnp_uri" in environ and _int_env(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    # What JAX's SLURM detection reads; srun sets all of them for every task of a job step.
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                  "SLURM_LOCALID")
    if all(v in environ for v in slurm_vars) and _int_env(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if on_cloud_tpu_vm:
        if environ.get("MEGASCALE_COORDINATOR_ADDRESS") or \
                _int_env(environ, "MEGASCALE_NUM_SLICES") > 1:
            return "tpu"  # multislice
        hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
        if hosts is not None:
            return "tpu" if len(hosts.split(",")) > 1 else None  # GKE
        if not environ.get("TPU_SKIP_MDS_QUERY"):
            return "tpu"  # GCE TPU VM: JAX reads the worker list from the metadata server
    return None


def resolve_plan(cfg: ml_collections.ConfigDict | None = None,
                 environ: Mapping[str, str] | None = None,
                 on_cloud_tpu_vm: bool | None = None) -> Plan:
    """Decides how to join (see the module docstring) without touching JAX. Raises ValueError
    naming the `distributed.*` key when the settings cannot work."""
    environ = os.environ if environ is None else environ
    cfg = default_distributed_config() if cfg is None else cfg
    if on_cloud_tpu_vm is None:
        on_cloud_tpu_vm = _running_on_cloud_tpu_vm()
    switch = environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if switch not in ("auto", "off"):
        raise ConfigError(f"config key distributed: {MODE_ENV}={switch!r} is not 'auto' or 'off'")
    cfg, origin = with_env_overrides(cfg, environ)
    check_distributed_config(cfg, origin)
    common = dict(cpu_collectives=cfg.cpu_collectives,
                  initialization_timeout=cfg.initialization_timeout)
    if switch == "off":
        return Plan("single", **common)
    cluster = detect_cluster(environ, on_cloud_tpu_vm)
    explicit = dict(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes or None,
        process_id=cfg.process_id if cfg.process_id >= 0 else None,
        local_device_ids=(_parse_device_ids(cfg.local_device_ids)
                          if cfg.local_device_ids else None))
    if cfg.coordinator_address:
        if cluster is None:  # nothing for JAX to detect the rest from
            if not cfg.num_processes:
                _fail("num_processes", "must be set (>= 1) when distributed.coordinator_address "
                      f"is {cfg.coordinator_address!r} outside a SLURM job or Cloud TPU slice")
            if cfg.process_id < 0:
                _fail("process_id", "must be set (0 for the coordinator's host) when "
                      f"distributed.coordinator_address is {cfg.coordinator_address!r} outside "
                      "a SLURM job or Cloud TPU slice")
        return Plan("explicit", **explicit, **common)
    if cluster is not None:
        return Plan(cluster, **explicit, **common)
    if cfg.num_processes > 1 or cfg.process_id > 0:
        key = "num_processes" if cfg.num_processes > 1 else "process_id"
        _fail("coordinator_address", f"is needed: distributed.{key}={cfg[key]}"
              f"{_source(key, origin)} asks for several processes, but no SLURM job or Cloud "
              "TPU slice was detected to take the coordinator from")
    return Plan("single", **common)


def _may_run_on_cpu() -> bool:
    platforms = jax.config.jax_platforms
    return not platforms or "cpu" in platforms.split(",")


def initialize(cfg: ml_collections.ConfigDict | None = None) -> None:
    """Joins the multi-process job described by `cfg` (config.distributed) and the environment.

    Call it first, before any JAX call that touches devices (jax.devices, jit, device_put):
    the backend's device list is fixed at that point. A second call does nothing. On a plain
    single machine nothing is initialised. Logs the process index and device counts.
    """
    if jax.distributed.is_initialized():
        logging.info("jax.distributed is already initialised (process %d of %d)",
                     jax.process_index(), jax.process_count())
        return
    plan = resolve_plan(cfg)
    if plan.mode != "single":
        if plan.cpu_collectives and _may_run_on_cpu():
            # Read when the CPU backend is created, so set before anything touches devices.
            jax.config.update("jax_cpu_collectives_implementation", plan.cpu_collectives)
        logging.info("jax.distributed.initialize (%s): coordinator=%s processes=%s process_id=%s "
                     "local_device_ids=%s (None = detected by JAX)", plan.mode,
                     plan.coordinator_address, plan.num_processes, plan.process_id,
                     plan.local_device_ids)
        jax.distributed.initialize(**plan.initialize_kwargs())
    logging.info("process %d of %d (%s) | %d local / %d global %s devices",
                 jax.process_index(), jax.process_count(), plan.mode, jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, metrics and samples."""
    return jax.process_index() == 0


__all__ = ["default_distributed_config", "check_distributed_config", "with_env_overrides",
           "detect_cluster", "resolve_plan", "initialize", "is_primary", "Plan"]


def check_distributed(config: ml_collections.ConfigDict) -> None:
    check_distributed_config(config.distributed)


# How this process joins a multi-host job (docs/multihost.md); auto-detected on Cloud TPU and
# SLURM, a no-op on one machine.
DISTRIBUTED = Section("distributed", default_distributed_config, check_distributed)
