"""Multi-process jobs: config checks, cluster detection, a real 2-process train step, launchers.

The unit tests fake the environment (nothing is initialised in this process). The 2-process
tests start real processes (tests/distributed_worker.py) that join over loopback with gloo CPU
collectives; every child has a deadline and is killed if the test fails.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxlm.parallel import distributed, sharding
from tests import distributed_worker
from tests.cli import xla_flags

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

ROOT = Path(__file__).resolve().parents[1]
SLURM_STEP = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16",
              "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


def _cfg(**overrides):
    cfg = distributed.default_distributed_config()
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------------------------------
# config checks


def test_default_config_is_valid_and_means_single_process():
    cfg = distributed.default_distributed_config()
    distributed.check_distributed_config(cfg)
    assert distributed.resolve_plan(cfg, environ={}, on_cloud_tpu_vm=False).mode == "single"


@pytest.mark.parametrize("key,value", [
    ("coordinator_address", "10.0.0.1"),
    ("coordinator_address", "10.0.0.1:http"),
    ("coordinator_address", ":1234"),
    ("coordinator_address", "host:70000"),
    ("num_processes", -1),
    ("process_id", -2),
    ("local_device_ids", "0,x"),
    ("local_device_ids", "1,1"),
    ("cpu_collectives", "nccl"),
    ("initialization_timeout", 0),
])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=rf"^config key distributed\.{key}: "):
        distributed.check_distributed_config(_cfg(**{key: value}))


def test_process_id_must_be_below_num_processes():
    with pytest.raises(ValueError, match=r"distributed\.process_id: 2 is not below "
                                         r"distributed\.num_processes=2"):
        distributed.check_distributed_config(_cfg(num_processes=2, process_id=2))


def test_unknown_key_is_named():
    cfg = distributed.default_distributed_config()
    cfg.coordinator = "x"
    with pytest.raises(ValueError, match=r"distributed\.coordinator: unknown key"):
        distributed.check_distributed_config(cfg)


def test_bad_environment_value_names_key_and_variable():
    with pytest.raises(ValueError, match=r"distributed\.num_processes: JAXLM_NUM_PROCESSES='two'"):
        distributed.resolve_plan(environ={"JAXLM_NUM_PROCESSES": "two"}, on_cloud_tpu_vm=False)
    env = {"JAXLM_COORDINATOR_ADDRESS": "h:1", "JAXLM_NUM_PROCESSES": "2",
           "JAXLM_PROCESS_ID": "5"}
    with pytest.raises(ValueError, match=r"process_id: 5 \(from JAXLM_PROCESS_ID\)"):
        distributed.resolve_plan(environ=env, on_cloud_tpu_vm=False)


# ---------------------------------------------------------------------------------------------
# deciding how to join, from (fake) environments


def _plan(environ, cfg=None, tpu_vm=False):
    return distributed.resolve_plan(cfg, environ=environ, on_cloud_tpu_vm=tpu_vm)


def test_plain_machine_is_single_process():
    assert _plan({"HOME": "/root", "PATH": "/bin"}).mode == "single"
    assert _plan({}, _cfg(num_processes=1)).mode == "single"


def test_slurm_job_step_is_left_to_jax_detection():
    plan = _plan(SLURM_STEP)
    assert plan.mode == "slurm"
    assert plan.initialize_kwargs()["coordinator_address"] is None  # jax reads SLURM_* itself
    assert plan.num_processes is None and plan.process_id is None


@pytest.mark.parametrize("environ", [
    dict(SLURM_STEP, SLURM_NTASKS="1"),  # one task: nothing to join
    {"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "8"},  # a shell in an allocation, not an srun step
])
def test_slurm_without_several_tasks_is_single(environ):
    assert _plan(environ).mode == "single"


@pytest.mark.parametrize("environ,tpu_vm,mode", [
    ({}, True, "tpu"),  # GCE TPU VM: the worker list comes from the metadata server
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}, True, "tpu"),  # GKE
    ({"TPU_WORKER_HOSTNAMES": "w-0", "TPU_WORKER_ID": "0"}, True, "single"),  # one host
    ({"MEGASCALE_COORDINATOR_ADDRESS": "w-0", "TPU_WORKER_HOSTNAMES": "w-0"}, True, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, False, "single"),  # no TPU here: jax would not join
    ({"TPU_SKIP_MDS_QUERY": "1"}, True, "single"),
])
def test_cloud_tpu_detection(environ, tpu_vm, mode):
    assert _plan(environ, tpu_vm=tpu_vm).mode == mode


def test_open_mpi_detection():
    env = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4"}
    assert _plan(env).mode == "ompi"
    assert _plan(dict(env, OMPI_COMM_WORLD_SIZE="1")).mode == "single"


def test_explicit_topology_from_environment_beats_config():
    env = {"JAXLM_COORDINATOR_ADDRESS": "127.0.0.1:5555", "JAXLM_NUM_PROCESSES": "2",
           "JAXLM_PROCESS_ID": "1", "JAXLM_LOCAL_DEVICE_IDS": "0,1"}
    cfg = _cfg(coordinator_address="10.0.0.1:1", num_processes=4, process_id=3)
    plan = _plan(env, cfg)
    assert plan.mode == "explicit"
    assert plan.initialize_kwargs() == dict(
        coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1,
        local_device_ids=[0, 1], initialization_timeout=300)


def test_explicit_topology_from_config():
    plan = _plan({}, _cfg(coordinator_address="10.0.0.1:8476", num_processes=4, process_id=0))
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == \
        ("explicit", "10.0.0.1:8476", 4, 0)


def test_explicit_coordinator_inside_slurm_leaves_the_rest_to_jax():
    plan = _plan(dict(SLURM_STEP, JAXLM_COORDINATOR_ADDRESS="gpu07:21234"))
    assert plan.mode == "explicit" and plan.coordinator_address == "gpu07:21234"
    assert plan.num_processes is None and plan.process_id is None


def test_incomplete_explicit_topology_names_the_missing_key():
    with pytest.raises(ValueError, match=r"distributed\.num_processes: must be set"):
        _plan({"JAXLM_COORDINATOR_ADDRESS": "127.0.0.1:1234"})
    with pytest.raises(ValueError, match=r"distributed\.process_id: must be set"):
        _plan({}, _cfg(coordinator_address="127.0.0.1:1234", num_processes=2))
    with pytest.raises(ValueError, match=r"distributed\.coordinator_address: is needed: "
                                         r"distributed\.num_processes=2 \(from JAXLM_NUM"):
        _plan({"JAXLM_NUM_PROCESSES": "2"})


def test_off_switch_wins_over_a_detected_cluster():
    assert _plan(dict(SLURM_STEP, JAXLM_DISTRIBUTED="off")).mode == "single"
    with pytest.raises(ValueError, match="JAXLM_DISTRIBUTED='maybe'"):
        _plan({"JAXLM_DISTRIBUTED": "maybe"})


# ---------------------------------------------------------------------------------------------
# initialize(), with jax.distributed.initialize replaced


def _plain_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("JAXLM_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_running_on_cloud_tpu_vm", lambda: False)


def _record_jax_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_initialize_is_a_no_op_on_a_plain_machine(monkeypatch):
    _plain_environment(monkeypatch)
    calls = _record_jax_initialize(monkeypatch)
    distributed.initialize(distributed.default_distributed_config())
    distributed.initialize(distributed.default_distributed_config())
    distributed.initialize()
    assert calls == []
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary()


def test_initialize_passes_the_explicit_topology_to_jax(monkeypatch):
    _plain_environment(monkeypatch)
    calls = _record_jax_initialize(monkeypatch)
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.setenv("JAXLM_COORDINATOR_ADDRESS", "127.0.0.1:4321")
    monkeypatch.setenv("JAXLM_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXLM_PROCESS_ID", "1")
    distributed.initialize(_cfg(initialization_timeout=30))
    assert calls == [dict(coordinator_address="127.0.0.1:4321", num_processes=2, process_id=1,
                          local_device_ids=None, initialization_timeout=30)]
    assert ("jax_cpu_collectives_implementation", "gloo") in updates


def test_initialize_twice_does_not_initialize_again(monkeypatch):
    _plain_environment(monkeypatch)
    calls = _record_jax_initialize(monkeypatch)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv("JAXLM_COORDINATOR_ADDRESS", "127.0.0.1:4321")
    monkeypatch.setenv("JAXLM_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXLM_PROCESS_ID", "0")
    distributed.initialize()
    assert calls == []


# ---------------------------------------------------------------------------------------------
# real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(**extra: str) -> dict[str, str]:
    """This environment without cluster variables, as 2 processes x 4 CPU devices."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAXLM_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4),
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@contextlib.contextmanager
def _processes(commands, envs, logs) -> Iterator[list[subprocess.Popen]]:
    """Starts the processes; whatever happens in the block, none outlives it."""
    procs = []
    try:
        for cmd, env, log in zip(commands, envs, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    """Exit codes once all have exited, or as soon as one fails, or at the deadline (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            return codes
        time.sleep(0.2)
    return [p.poll() for p in procs]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else "(no output)"


@pytest.fixture(scope="module")
def two_process_step(tmp_path_factory):
    """Each of 2 processes (4 CPU devices each) runs one train step on its half of the batch;
    meanwhile this process (8 devices) computes the same step on the whole batch."""
    tmp = tmp_path_factory.mktemp("two_process")
    port = _free_port()
    cmd = [sys.executable, "-m", "tests.distributed_worker", str(tmp / "result")]
    envs = [_child_env(JAXLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES="2",
                       JAXLM_PROCESS_ID=str(i)) for i in range(2)]
    logs = [tmp / f"log.{i}" for i in range(2)]
    with _processes([cmd, cmd], envs, logs) as procs:
        assert jax.process_count() == 1 and jax.device_count() == 8  # tests/conftest.py
        mesh = sharding.make_mesh(distributed_worker.MESH_SIZES)
        reference = distributed_worker.train_step_metrics(mesh,
                                                          distributed_worker.global_batch_np())
        codes = _wait_all(procs, timeout_s=240)
    assert codes == [0, 0], "\n".join(f"process {i} exit {c}:\n{_tail(logs[i])}"
                                      for i, c in enumerate(codes))
    results = [json.loads((tmp / f"result.{i}.json").read_text()) for i in range(2)]
    return results, reference


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_form_one_job_of_eight_devices(two_process_step):
    results, _ = two_process_step
    for i, result in enumerate(results):
        assert result["process_index"] == i and result["process_count"] == 2
        assert (result["local_devices"], result["devices"]) == (4, 8)
        assert result["is_primary"] == (i == 0)
    # each process fed only its own half of the global batch
    assert results[0]["rows"] == [0, 1, 2, 3]
    assert results[1]["rows"] == [4, 5, 6, 7]


@pytest.mark.multiprocess
def test_two_process_step_equals_one_process_with_eight_devices(two_process_step):
    results, reference = two_process_step
    for result in results:
        for key, value in reference.items():
            np.testing.assert_allclose(result["metrics"][key], value, rtol=2e-5, err_msg=key)


# ---------------------------------------------------------------------------------------------
# launch/local.sh


def _run_launcher(cmd, env, timeout_s: float) -> subprocess.CompletedProcess:
    """Runs a launcher script; at the deadline SIGTERM lets it stop its own children first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} timed out:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.multiprocess
def test_local_sh_runs_n_processes_with_prefixed_output(tmp_path):
    # a device count inherited from the caller (tests/conftest.py: 8) is replaced by local.sh's
    env = _child_env(MODULE="tests.distributed_worker", PYTHON=sys.executable,
                     XLA_FLAGS=xla_flags(8))
    run = _run_launcher(["bash", "launch/local.sh", "2", str(tmp_path / "r"), "--task=gather"],
                        env, timeout_s=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for i in range(2):
        result = json.loads((tmp_path / f"r.{i}.json").read_text())
        assert result["gathered"] == [0, 1] and result["devices"] == 8  # 2 x 4 by default
        assert f"[{i}] process {i} wrote" in run.stdout


@pytest.mark.multiprocess
def test_local_sh_stops_everyone_when_one_process_fails(tmp_path):
    env = _child_env(MODULE="tests.distributed_worker", PYTHON=sys.executable)
    start = time.monotonic()
    # Processes 0 and 2 wait for process 1 at the coordinator until local.sh stops them.
    run = _run_launcher(["bash", "launch/local.sh", "3", str(tmp_path / "r"),
                         "--fail-process=1"], env, timeout_s=60)
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[1] failing on purpose" in run.stdout
    assert "stopping the others" in run.stderr
    assert time.monotonic() - start < 30  # not the 60 s initialization timeout
    assert not list(tmp_path.glob("r.*.json"))


def test_local_sh_usage_error():
    run = _run_launcher(["bash", "launch/local.sh"], _child_env(), timeout_s=30)
    assert run.returncode == 2 and "usage" in run.stderr


# ---------------------------------------------------------------------------------------------
# cluster launchers, without a cluster


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
    env = _child_env(TPU_NAME="my-tpu", ZONE="us-west4-a")
    run = _run_launcher(["bash", "launch/tpu_vm.sh", "--dry-run", "--accelerator-type=v5litepod-16",
                         "--project=proj", "--config=configs/llama_1b.py",
                         "--workdir=gs://bucket/run", "--", "--config.train.steps=7"],
                        env, timeout_s=30)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    common = "my-tpu --zone=us-west4-a --project=proj"
    assert any(line.startswith(f"gcloud compute tpus tpu-vm create {common}") and
               "--accelerator-type=v5litepod-16" in line for line in lines)
    assert any(line.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in line
               for line in lines)
    ssh = [line for line in lines if line.startswith(f"gcloud compute tpus tpu-vm ssh {common}")]
    assert len(ssh) == 2 and all("--worker=all" in line for line in ssh)
    assert "pip install" in ssh[0] and "[tpu]" in ssh[0]
    assert "-m jaxlm.main --config=configs/llama_1b.py --workdir=gs://bucket/run " \
           "--config.train.steps=7" in ssh[1]


def test_tpu_vm_requires_a_workdir():
    run = _run_launcher(["bash", "launch/tpu_vm.sh", "--dry-run"], _child_env(), timeout_s=30)
    assert run.returncode == 2 and "--workdir" in run.stderr


def test_slurm_sbatch_derives_the_topology_from_slurm(tmp_path):
    """Runs the sbatch script with stand-ins for scontrol, srun (one task) and python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'printf "gpu07\\ngpu08\\n"',
        # srun: skip its options, run the task as rank 9 of 16 (local rank 1)
        "srun": 'while [[ $1 == -* ]]; do shift; done\n'
                'SLURM_NTASKS=16 SLURM_PROCID=9 SLURM_LOCALID=1 exec "$@"',
        "fake-python": f'exec {sys.executable} -c "import json, os, sys; print(json.dumps('
                       '{\\"argv\\": sys.argv[1:], \\"env\\": {k: v for k, v in '
                       'os.environ.items() if k.startswith(\\"JAXLM_\\")}}))" "$@"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = _child_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON="fake-python",
                     SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu[07-08]",
                     SLURM_SUBMIT_DIR=str(ROOT), WORKDIR="/shared/run", CONFIG="configs/x.py")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = _run_launcher(["bash", "launch/slurm.sbatch", "--config.train.steps=3"], env,
                        timeout_s=30)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["env"] == {"JAXLM_COORDINATOR_ADDRESS": "gpu07:21234",
                           "JAXLM_NUM_PROCESSES": "16", "JAXLM_PROCESS_ID": "9",
                           "JAXLM_LOCAL_DEVICE_IDS": "1"}
    assert seen["argv"] == ["-u", "-m", "jaxlm.main", "--config=configs/x.py",
                            "--workdir=/shared/run", "--config.train.steps=3"]


def test_gke_jobset_coordinator_is_pod_zero_of_the_headless_service():
    manifest = yaml.safe_load((ROOT / "launch/gke_jobset.yaml").read_text())
    assert manifest["kind"] == "JobSet" and manifest["spec"]["network"]["enableDNSHostnames"]
    (rjob,) = manifest["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JAXLM_COORDINATOR_ADDRESS"]["value"].startswith(
        "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):")
    assert int(env["JAXLM_NUM_PROCESSES"]["value"]) == job["parallelism"] == job["completions"]
    assert "job-completion-index" in env["JAXLM_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["command"][container["command"].index("-m") + 1] == "jaxlm.main"
