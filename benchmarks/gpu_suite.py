"""A time-budgeted suite of training-step benchmarks for one GPU (H100/H200), one command.

    python benchmarks/gpu_suite.py [--budget_s=420] [--cases=chinchilla,gpt2] [--list]
    python benchmarks/gpu_suite.py --case_set=cpu --budget_s=120      # the same code path on CPU

Every case builds the stage's real jitted, donated train step on synthetic full-length batches,
exactly as benchmarks/train_throughput.py does (same jaxlm calls, same shardings), and records
compile s, step ms, tokens/s, achieved TFLOP/s, MFU and memory. Each case runs in its own child
process (`--worker`), so an OOM, a cuDNN failure or a hang costs that row only, and the peak
memory figure is the case's own. Cases run in priority order; a case is not started when the
estimate of its wall time (from the cases already run, or a default) would overrun `--budget_s`,
and a running case is killed at the budget (plus `--grace_s`) or at 3x its estimate. After a
cuDNN case fails with an error (not an OOM), the later cuDNN cases run with --cudnn_fallback
attention (chunked) instead.

Results: a markdown table on stdout and, appended row by row as each case ends,
$OUT/gpu_suite.md and $OUT/gpu_suite.jsonl (OUT defaults to /tmp/out). With budget left at the
end of the main cases (before the `extra` ones), one profile of the fastest chinchilla_1b case
(3 steps, a fresh compile) goes to $OUT/trace.tgz (skipped when larger than --trace_max_mib).

Extra XLA flags for every case: --xla_flags='...' or the environment variable EXTRA_XLA_FLAGS
(appended to XLA_FLAGS in the children).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row: a config file and the overrides applied to it."""

    config: str          # file under configs/, without .py
    batch: int
    attention: str       # model.attention
    remat: str           # model.remat; "best": the fastest remat of the matching `best_of` rows
    seq_len: int = 0     # 0: the config's data.seq_len
    best_of: str = ""    # glob over case names whose fastest ok row picks remat="best"
    default_s: float = 60.0  # wall-time estimate before any case of this config has run
    extra: bool = False  # after the profile (which runs before the first extra case)
    scan_layers: bool = True  # model.scan_layers; False unrolls the blocks

    @property
    def name(self) -> str:
        seq = f"x{self.seq_len}" if self.seq_len else ""
        unrolled = "" if self.scan_layers else "/unrolled"
        return f"{self.config}/{self.attention}/{self.remat}/b{self.batch}{seq}{unrolled}"


# Priority order. Estimates: ~15 s compile per 1B model on an H100, ~5-10 s process start and
# init, 12 steps of 0.6-1.5 s.
GPU_CASES = (
    # a. chinchilla_1b (23L x d1792, GELU, vocab 32000, seq 2048), cuDNN flash attention.
    Case("chinchilla_1b", 8, "cudnn", "save_dots", default_s=45),
    Case("chinchilla_1b", 8, "cudnn", "none", default_s=45),
    Case("chinchilla_1b", 16, "cudnn", "save_dots", default_s=60),
    Case("chinchilla_1b", 16, "cudnn", "none", default_s=60),
    # b. llama_1b (16L x d2048, GQA 32/8, vocab 128256) at the remat that won for chinchilla b8.
    Case("llama_1b", 8, "cudnn", "best", best_of="chinchilla_1b/*/*/b8", default_s=55),
    # c. gpt2_124m (12L x d768, seq 1024): batch 32 ran out of memory with XLA attention.
    Case("gpt2_124m", 32, "cudnn", "none", default_s=30),
    Case("gpt2_124m", 64, "cudnn", "none", default_s=35),
    # The profile of the fastest chinchilla_1b row runs here. Then extras while budget lasts:
    # the XLA-attention baseline of docs/benchmarks.md (18.5% MFU), llama_1b at batch 16, full
    # remat.
    Case("chinchilla_1b", 8, "xla", "save_dots", default_s=50, extra=True),
    Case("llama_1b", 16, "cudnn", "best", best_of="chinchilla_1b/*/*/b16", default_s=70,
         extra=True),
    Case("chinchilla_1b", 16, "cudnn", "full", default_s=60, extra=True),
    Case("gpt2_124m", 64, "cudnn", "save_dots", default_s=35, extra=True),
)

# The same code path on a CPU (a development machine): tiny shapes, and one case that must fail
# (cuDNN off GPU) to exercise the error row.
CPU_CASES = (
    Case("tiny", 8, "xla", "save_dots", default_s=30),
    Case("tiny", 8, "xla", "none", default_s=30),
    Case("tiny", 8, "blocked", "best", best_of="tiny/xla/*/b8", default_s=30),
    Case("tiny", 8, "cudnn", "none", default_s=20),
    Case("tiny", 16, "chunked", "full", seq_len=64, default_s=30, extra=True),
    Case("tiny", 8, "cudnn", "save_dots", default_s=30, extra=True),  # -> cudnn_fallback
)

# Follow-up of the first profile (chinchilla_1b b8, remat none: GEMMs 53% of GPU time, cuDNN
# attention 20%, 1,545 small copies 5.5%, mostly the scanned layers' stacked residuals): the
# same shapes with the blocks unrolled, and a larger batch.
GPU_FOLLOWUP_CASES = (
    Case("chinchilla_1b", 16, "cudnn", "none", scan_layers=False, default_s=60),
    Case("chinchilla_1b", 32, "cudnn", "none", default_s=60),
    Case("chinchilla_1b", 8, "cudnn", "none", scan_layers=False, default_s=60),
    Case("llama_1b", 16, "cudnn", "none", scan_layers=False, default_s=70),
    Case("chinchilla_1b", 32, "cudnn", "none", scan_layers=False, default_s=70),
)

CASE_SETS = {"gpu": GPU_CASES, "gpu_followup": GPU_FOLLOWUP_CASES, "cpu": CPU_CASES}


# --------------------------------------------------------------------------------------------
# Worker: one case, in its own process.


def _load_config(case: Case, remat: str):
    from jaxlm.run import config as config_lib

    config = config_lib.load_config_file(os.path.join(REPO, "configs", f"{case.config}.py"))
    config.train.global_batch_size = case.batch
    config.model.attention = case.attention
    config.model.remat = remat
    config.model.scan_layers = case.scan_layers
    if case.seq_len:
        config.data.seq_len = case.seq_len
        if config.model.max_seq_len and config.model.max_seq_len < case.seq_len:
            config.model.max_seq_len = case.seq_len
    # One device, all of it: no data/fsdp split to resolve against other device counts.
    for axis in ("data", "fsdp", "tensor", "pipeline", "expert"):
        config.mesh[axis] = 1
    config_lib.validate(config)
    return config


def _memory_analysis(compiled) -> dict[str, float]:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if ma is None:
        return {}
    out = {}
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
        value = getattr(ma, key, None)
        if value is not None:
            out[key] = int(value)
    if {"argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes"} <= out.keys():
        out["compiled_total_bytes"] = (out["argument_size_in_bytes"]
                                       + out["output_size_in_bytes"]
                                       - out["alias_size_in_bytes"]
                                       + out["temp_size_in_bytes"])
    return out


def _memory_stats(device) -> dict[str, int]:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not implement it
        return {}
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_limit", "bytes_in_use")
            if k in stats}


def _train_throughput():
    """benchmarks/train_throughput.py by file path (no `benchmarks` package is installed, and an
    installed package of that name must not shadow it)."""
    import importlib.util

    path = os.path.join(REPO, "benchmarks", "train_throughput.py")
    spec = importlib.util.spec_from_file_location("jaxlm_bench_train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(case: Case, remat: str, warmup: int, steps: int, repeats: int,
             profile_dir: str | None = None, row: dict | None = None) -> dict:
    """Compiles and times one case; the train step as benchmarks/train_throughput.py builds it.

    Fills `row` as it goes, so a failure (OOM at compile or run time) keeps what was known.
    """
    import jax

    from jaxlm.models.attention import resolve_attention
    from jaxlm.parallel import hardware, sharding
    from jaxlm.run import config as config_lib
    from jaxlm.run.program import build
    from jaxlm.scaling import flops as scaling

    synthetic_batch = _train_throughput().synthetic_batch
    row = {} if row is None else row
    t_start = time.perf_counter()
    config = _load_config(case, remat)
    mesh = sharding.make_mesh(config_lib.check_devices(config, jax.device_count()))
    program = build(config, mesh, vocab_size=config.data.vocab_size)
    model_cfg = program.model_cfg
    m = config.model
    kv = model_cfg.num_kv_heads
    row.update(
        params_m=scaling.count_params(model_cfg)["total"] / 1e6, vocab=model_cfg.vocab_size,
        seq_len=config.data.seq_len, dtype=m.compute_dtype,
        attention_impl=resolve_attention(m.attention),
        shape=(f"{m.num_layers}L x {m.num_heads}H{f'({kv} kv)' if kv != m.num_heads else ''}"
               f" x d{m.d_model}"))
    state = program.init_state(jax.random.key(0))
    batch = sharding.global_batch(synthetic_batch(program), mesh)
    jax.block_until_ready((state, batch))
    row["init_s"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    step = program.compile_train()
    row["compile_s"] = time.perf_counter() - t0
    row.update(_memory_analysis(step))
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    row["warmup_s"] = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) / steps)
    best = min(times)
    row["timed_s"] = sum(times) * steps
    loss = metrics.get("loss") if isinstance(metrics, dict) else None
    row["loss"] = float(loss) if loss is not None else None
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(3):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
    device = jax.devices()[0]
    flops = program.train_step_flops  # the train step alone is timed
    peak, note = hardware.peak_flops_per_device(device, m.compute_dtype)
    tokens = program.tokens_per_step
    row.update(
        step_s=best, step_s_all=times, tokens_per_sec=tokens / best,
        tokens_per_sec_per_device=tokens / best / jax.device_count(),
        achieved_flops=flops / best, flops_per_step=flops, peak_flops=peak, peak_note=note,
        mfu=hardware.mfu(flops, best, jax.device_count(), peak), **_memory_stats(device))
    return row


def worker_main(args) -> int:
    case = case_from_json(args.case_json)
    result: dict = {"case": case.name, "remat": args.remat}
    try:
        import jax

        result.update(jax_version=jax.__version__, device_kind=jax.devices()[0].device_kind,
                      platform=jax.devices()[0].platform, device_count=jax.device_count())
        run_case(case, args.remat, args.warmup, args.steps, args.repeats,
                 args.profile_dir or None, row=result)
        result["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        text = f"{type(e).__name__}: {e}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                      "OOM"))
        result["status"] = "OOM" if oom else "error"
        result["error"] = text[:2000]
        traceback.print_exc()
        try:
            result.update(_memory_stats(jax.devices()[0]))
        except Exception:  # noqa: BLE001
            pass
    with open(args.result_file, "w") as f:
        json.dump(result, f)
    return 0


def case_to_json(case: Case) -> str:
    return json.dumps(dataclasses.asdict(case))


def case_from_json(text: str) -> Case:
    return Case(**json.loads(text))


# --------------------------------------------------------------------------------------------
# Driver: budget, child processes, tables.


def select(cases, patterns: str) -> list[Case]:
    if not patterns:
        return list(cases)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cases
            if any(fnmatch.fnmatch(c.name, p) if any(ch in p for ch in "*?[") else p in c.name
                   for p in pats)]


def resolve_remat(case: Case, rows: list[dict]) -> str:
    if case.remat != "best":
        return case.remat
    done = [r for r in rows if r.get("status") == "ok" and fnmatch.fnmatch(r["case"], case.best_of)]
    if not done:
        return "save_dots"
    return min(done, key=lambda r: r["step_s"])["remat"]


def estimate_s(case: Case, history: list[tuple[Case, float, dict]]) -> float:
    """Wall time of a case from the last finished case of the same config, scaled for batch."""
    same = [(c, wall, r) for c, wall, r in history if c.config == case.config]
    if not same:
        return case.default_s
    ok = [h for h in same if h[2].get("status") == "ok"]
    if not ok:
        return max(same[-1][1], case.default_s)
    c, wall, r = ok[-1]
    fixed = r.get("compile_s", 0.0) + r.get("init_s", 0.0)
    run_s = r.get("warmup_s", 0.0) + r.get("timed_s", 0.0)
    overhead = max(wall - fixed - run_s, 0.0)  # process start, imports, peak lookup
    ratio = (case.batch * (case.seq_len or r.get("seq_len", 1))
             / (c.batch * (c.seq_len or r.get("seq_len", 1))))
    return overhead + fixed * (1.2 if ratio > 1 else 1.0) + run_s * ratio


def _stream(pipe, sink: collections.deque, prefix: str) -> None:
    for line in iter(pipe.readline, ""):
        sink.append(line.rstrip("\n"))
        print(f"{prefix}{line}", end="", flush=True)


def run_child(case: Case, remat: str, args, timeout_s: float, env: dict,
              profile_dir: str = "") -> tuple[dict, float]:
    fd, result_file = tempfile.mkstemp(prefix="gpu_suite_", suffix=".json")
    os.close(fd)
    os.unlink(result_file)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--case_json",
           case_to_json(case), "--remat", remat, "--result_file", result_file,
           f"--warmup={args.warmup}", f"--steps={args.steps}", f"--repeats={args.repeats}"]
    if profile_dir:
        cmd.append(f"--profile_dir={profile_dir}")
    tail: collections.deque = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    reader = threading.Thread(target=_stream, args=(proc.stdout, tail, "    | "), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(timeout_s, 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)
        proc.wait()
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    row = {"case": case.name, "remat": remat}
    if os.path.exists(result_file):
        with open(result_file) as f:
            row = json.load(f)
        os.unlink(result_file)
    elif timed_out:
        row.update(status="timeout", error=f"killed after {wall:.0f} s (budget)")
    else:
        text = "\n".join(tail)
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        row.update(status="OOM" if oom else "crash",
                   error=f"exit code {proc.returncode}: " + " / ".join(list(tail)[-5:])[-1500:])
    row["wall_s"] = wall
    return row, wall


HEADER = ("| case | shape | params | attn | remat | batch x seq | status | compile s | step ms | "
          "tokens/s | TFLOP/s | MFU | peak mem GiB | XLA est GiB | wall s |")
RULE = "|" + " --- |" * HEADER.count(" | ") + " --- |"


def fmt_row(r: dict) -> str:
    def num(key, scale=1.0, spec=".1f"):
        v = r.get(key)
        return "" if v is None else format(v * scale, spec)

    ok = r.get("status") == "ok"
    status = r.get("status", "?")
    if not ok and r.get("error"):
        status += ": " + r["error"].splitlines()[0][:90].replace("|", "/")
    return (f"| {r['case']} | {r.get('shape', '')} | "
            f"{num('params_m', 1, '.0f')}{'M' if r.get('params_m') else ''} | "
            f"{r.get('attention_impl', '')} | {r.get('remat', '')} | "
            f"{r.get('batch', '')} x {r.get('seq_len', '')} | {status} | {num('compile_s')} | "
            f"{num('step_s', 1e3) if ok else ''} | "
            f"{num('tokens_per_sec', 1, ',.0f') if ok else ''} | "
            f"{num('achieved_flops', 1e-12) if ok else ''} | "
            f"{num('mfu', 100) + '%' if ok else ''} | "
            f"{num('peak_bytes_in_use', 1 / GIB, '.2f')} | "
            f"{num('compiled_total_bytes', 1 / GIB, '.2f')} | {num('wall_s', 1, '.0f')} |")


def _device_info(env: dict) -> dict:
    """Device kind and versions, from a short child (the driver itself never touches the GPU)."""
    code = ("import json, jax, jaxlib, flax, optax; d = jax.devices()[0]; print('INFO ' + "
            "json.dumps({'device_kind': d.device_kind, 'platform': d.platform, "
            "'device_count': jax.device_count(), 'jax': jax.__version__, "
            "'jaxlib': jaxlib.__version__, 'flax': flax.__version__, "
            "'optax': optax.__version__}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env={**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                             cwd=REPO)
        for line in out.stdout.splitlines():
            if line.startswith("INFO "):
                return json.loads(line[5:])
        return {"error": (out.stderr or out.stdout)[-500:]}
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def make_trace_tgz(trace_dir: str, out_path: str, max_mib: float) -> str:
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(trace_dir) for f in fs)
    with tarfile.open(out_path, "w:gz") as tar:
        tar.add(trace_dir, arcname="trace")
    packed = os.path.getsize(out_path)
    if packed > max_mib * 1024**2:
        os.unlink(out_path)
        return f"trace skipped: {packed / 1024**2:.1f} MiB packed ({size / 1024**2:.1f} raw)"
    return f"trace: {out_path} ({packed / 1024**2:.1f} MiB packed, {size / 1024**2:.1f} raw)"


def profile_best(args, rows, history, env, out_dir, t_begin) -> str:
    """Profiles the fastest ok --profile_config case into $OUT/trace.tgz; returns a note."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("config") == args.profile_config]
    remaining = args.budget_s - (time.perf_counter() - t_begin)
    if not ok:
        return f"profile skipped: no ok {args.profile_config} row"
    best = min(ok, key=lambda r: r["step_s"])
    case = next(c for c, _, _ in history if c.name == best["case"])
    est = next((w for c, w, _ in history if c.name == case.name), case.default_s) + 10
    if est > remaining:
        return f"profile skipped: {est:.0f} s needed, {remaining:.0f} s left"
    trace_dir = tempfile.mkdtemp(prefix="gpu_suite_trace_")
    print(f"== profile {case.name} (remat {best['remat']}) -> {trace_dir}", flush=True)
    pargs = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1, "repeats": 1})
    prow, _ = run_child(case, best["remat"], pargs, remaining + args.grace_s, env,
                        profile_dir=trace_dir)
    try:
        if prow.get("status") != "ok":
            return f"profile failed: {prow.get('status')}: {prow.get('error', '')[:300]}"
        return (f"profile of {case.name} (remat {best['remat']}, 3 steps): "
                + make_trace_tgz(trace_dir, os.path.join(out_dir, "trace.tgz"),
                                 args.trace_max_mib))
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)


def driver_main(args) -> int:
    t_begin = time.perf_counter()
    out_dir = os.environ.get("OUT") or "/tmp/out"
    os.makedirs(out_dir, exist_ok=True)
    md_path, jsonl_path = (os.path.join(out_dir, "gpu_suite.md"),
                           os.path.join(out_dir, "gpu_suite.jsonl"))
    cases = select(CASE_SETS[args.case_set], args.cases)
    if args.list:
        for c in cases:
            print(c.name)
        return 0

    env = dict(os.environ)
    extra = " ".join(s for s in (os.environ.get("EXTRA_XLA_FLAGS", ""), args.xla_flags) if s)
    env["XLA_FLAGS"] = " ".join(s for s in (os.environ.get("XLA_FLAGS", ""), extra) if s).strip()
    if args.mem_fraction:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"

    info = _device_info(env)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"## gpu_suite {date}: {info.get('device_kind', '?')} x "
              f"{info.get('device_count', '?')} ({info.get('platform', '?')}, "
              f"{platform.node()}), jax {info.get('jax', '?')} / jaxlib {info.get('jaxlib', '?')}"
              f", flax {info.get('flax', '?')}, optax {info.get('optax', '?')}\n\n"
              f"XLA_FLAGS={env['XLA_FLAGS']!r}; XLA_PYTHON_CLIENT_MEM_FRACTION="
              f"{env.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '(default)')}; steps: {args.warmup} "
              f"warm-up + best of {args.repeats} x {args.steps}; budget {args.budget_s:.0f} s."
              " peak mem = memory_stats peak_bytes_in_use of the case's own process; XLA est ="
              " compiled memory_analysis arguments + outputs - aliased + temp.\n")
    if "error" in info:
        header += f"\ndevice check failed: {info['error']}\n"
    print(header, flush=True)
    with open(md_path, "a") as f:
        f.write(header + "\n" + HEADER + "\n" + RULE + "\n")
    with open(jsonl_path, "a") as f:
        f.write(json.dumps({"suite": date, "info": info, "xla_flags": env["XLA_FLAGS"],
                            "mem_fraction": env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                            "budget_s": args.budget_s, "cases": [c.name for c in cases]}) + "\n")

    rows: list[dict] = []
    history: list[tuple[Case, float, dict]] = []
    note = None
    cudnn_broken = False
    for case in cases:
        if case.extra and note is None and args.profile:
            note = profile_best(args, rows, history, env, out_dir, t_begin)
            print(f"== {note}", flush=True)
        if cudnn_broken and case.attention == "cudnn" and args.cudnn_fallback:
            print(f"== cuDNN attention failed earlier: {case.name} runs with "
                  f"attention={args.cudnn_fallback}", flush=True)
            case = dataclasses.replace(case, attention=args.cudnn_fallback)
        elapsed = time.perf_counter() - t_begin
        remaining = args.budget_s - elapsed
        est = estimate_s(case, history)
        remat = resolve_remat(case, rows)
        if est > remaining:
            row = {"case": case.name, "remat": remat, "status": "skipped",
                   "error": f"budget: estimate {est:.0f} s > {remaining:.0f} s left"}
            print(f"== {case.name}: skipped (estimate {est:.0f} s, {remaining:.0f} s left)",
                  flush=True)
        else:
            print(f"== {case.name} (remat {remat}): estimate {est:.0f} s, {remaining:.0f} s left",
                  flush=True)
            timeout = min(remaining + args.grace_s, max(3 * est, est + 90))
            row, wall = run_child(case, remat, args, timeout, env)
            history.append((case, wall, row))
            if case.attention == "cudnn" and row.get("status") in ("error", "crash"):
                cudnn_broken = True
        row.setdefault("batch", case.batch)
        row.update(config=case.config, xla_flags=env["XLA_FLAGS"])
        rows.append(row)
        line = fmt_row(row)
        print(HEADER + "\n" + RULE + "\n" + line, flush=True)
        with open(md_path, "a") as f:
            f.write(line + "\n")
        with open(jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    if note is None:
        note = (profile_best(args, rows, history, env, out_dir, t_begin) if args.profile
                else "")
    total = time.perf_counter() - t_begin
    summary = f"\nsuite wall time {total:.0f} s (budget {args.budget_s:.0f} s). {note}\n"
    print("\n" + header + "\n" + HEADER + "\n" + RULE)
    for r in rows:
        print(fmt_row(r))
    print(summary, flush=True)
    with open(md_path, "a") as f:
        f.write(summary)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget_s", type=float, default=420.0,
                   help="Wall-time budget of the whole suite, the device check and profile too.")
    p.add_argument("--grace_s", type=float, default=20.0,
                   help="A running case is killed this long after the budget.")
    p.add_argument("--cases", default="", help="Comma-separated substrings or globs of case "
                   "names (see --list); empty: all of --case_set.")
    p.add_argument("--case_set", default="gpu", choices=sorted(CASE_SETS))
    p.add_argument("--list", action="store_true", help="Print the selected case names, exit.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--xla_flags", default="", help="Appended to XLA_FLAGS (after "
                   "$EXTRA_XLA_FLAGS) in every case.")
    p.add_argument("--mem_fraction", default="0.92", help="XLA_PYTHON_CLIENT_MEM_FRACTION for "
                   "the cases unless already set; empty: JAX's default (0.75).")
    p.add_argument("--cudnn_fallback", default="chunked", help="Attention of the cuDNN cases "
                   "after a cuDNN case failed with an error (not OOM); empty: keep cudnn.")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="Profile the fastest --profile_config case into $OUT/trace.tgz.")
    p.add_argument("--profile_config", default="chinchilla_1b")
    p.add_argument("--trace_max_mib", type=float, default=15.0)
    # Worker mode (internal).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case_json", default="", help=argparse.SUPPRESS)
    p.add_argument("--remat", default="", help=argparse.SUPPRESS)
    p.add_argument("--result_file", default="", help=argparse.SUPPRESS)
    p.add_argument("--profile_dir", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
