"""The tools never destroy what they read, refuse files from outside a model directory, and
answer a mistake with one line: every case runs the real entry point (`python -m jaxlm.tools.*`)
and checks the exit status, the `error:` line, and that nothing of any run changed.

One tiny trained run, one LoRA checkpoint and Hugging Face directories (written from jaxlm's own
tensor map, no torch) are made once for the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlm.models import Transformer
from jaxlm.run import config as config_lib
from jaxlm.run import trainer
from jaxlm.run.errors import ConfigError
from jaxlm.weights import restore
from jaxlm.weights.hf import config as hf_config
from jaxlm.weights.hf import convert as hf
from jaxlm.weights.hf import safetensors_io
from jaxlm.weights.hf import tensors as hf_weights
from jaxlm.weights.write import output_directory, write_params_checkpoint
from tests.cli import ROOT, cli_command, cli_env, run_cli
from tests.hf_tokenizer_fixtures import write_hf_tokenizer
from tests.run_fixtures import tiny_run_config

# -- helpers ---------------------------------------------------------------------------------

pytestmark = pytest.mark.slow  # each test runs a command-line tool, most of them several

# absl's log line prefix: "I1205 17:18:39.463463 140131587308416 checkpoint.py:441] ..."
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ (\S+?):\d+\] ")
_OWN_FILES = {p.name for p in (ROOT / "jaxlm").rglob("*.py")}


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under `roots` (symlinks not followed out)."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fails_in_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The `error:` line of a run that exited 1 with it and at most two log lines beside."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) <= 3, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def is_quiet(proc: subprocess.CompletedProcess, max_lines: int = 2) -> None:
    """Succeeded, and logged at most `max_lines` INFO lines of jaxlm's own (as jaxlm.main):
    no library lines, no warnings."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) <= max_lines, proc.stderr
    for line in lines:
        match = _LOG_LINE.match(line)
        assert match and match.group(1) == "I" and match.group(2) in _OWN_FILES, line


def no_partial_beside(target: Path) -> None:
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]


def llama_json(**overrides) -> dict:
    return {"model_type": "llama", "vocab_size": 512, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": False, **overrides}


def write_hf_model(directory: Path, hf_json: dict | None = None, *, shards: int = 1,
                   tokenizer: bool = True, int_tensor: str = "") -> Path:
    """A HF Llama directory: config.json, random safetensors (`shards` files with an index
    when > 1; `int_tensor` stored as int32), and a byte-level BPE tokenizer with its side
    files."""
    hf_json = hf_json or llama_json()
    directory.mkdir(parents=True)
    cfg = config_lib.model_config(hf.run_config(hf_config.model_fields(hf_json), "float32"))
    rng = np.random.default_rng(0)
    tensors = {m.name: rng.normal(0.0, 0.02, m.shape).astype(np.float32)
               for m in hf_weights.tensor_maps(cfg)}
    if int_tensor:
        tensors[int_tensor] = tensors[int_tensor].astype(np.int32)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / safetensors_io.SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: tensors[n] for n in part}, str(directory / file),
                      metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (directory / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_json))
    if tokenizer:
        write_hf_tokenizer(str(directory), "llama3", vocab_size=400)
        (directory / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8}))
        (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "x"}))
    return directory


def as_hf_cache(model: Path, cache: Path) -> Path:
    """`model` laid out as the Hugging Face cache does: files in blobs/, the snapshot's entries
    symlinks to ../../blobs/<hash>; returns the snapshot directory."""
    repo = cache / "models--jaxlm--tiny"
    snapshot_dir = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for path in model.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / digest)
        (snapshot_dir / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot_dir


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained run (checkpoints 1 and 2), a second run to be the victim of misdirected
    outputs, a LoRA checkpoint on the run's tokenizer, a HF model and a secret file."""
    tmp = tmp_path_factory.mktemp("tools")
    config = tiny_run_config(tmp, num_layers=1, seq_len=16, steps=2)
    config.checkpoint.every_steps = 1
    trainer.run(config, str(tmp / "run"))
    shutil.copytree(tmp / "run", tmp / "other_run")

    saved = restore.read_checkpoint(str(tmp / "run"))
    lora_config = saved.run_config()
    lora_config.model.lora.update(rank=2, alpha=4.0)
    tokenizer = restore.saved_tokenizer(saved)
    cfg = config_lib.model_config(lora_config, tokenizer.vocab_size)
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    write_params_checkpoint(str(tmp / "lora"), 3, jax.device_get(nn.meta.unbox(
        variables["params"])), lora_config, saved.extra)

    secret = tmp / "secret" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- not for sharing\n")
    return {"tmp": tmp, "run": tmp / "run", "other": tmp / "other_run", "lora": tmp / "lora",
            "hf": write_hf_model(tmp / "hf", shards=3), "secret": secret,
            "tokenizer": Path(saved.extra["tokenizer_path"])}


@pytest.fixture(scope="module")
def imported(world):
    """The HF model imported through the CLI (checked quiet by a test below)."""
    out = world["tmp"] / "imported"
    proc = run_cli("jaxlm.tools.convert_hf", "import", f"--hf_dir={world['hf']}",
                   f"--out_dir={out}", check=False)
    return out, proc


@pytest.fixture(scope="module")
def quantized(world):
    """int8 params of the run, through the CLI (checked quiet by a test below)."""
    out = world["tmp"] / "int8"
    proc = run_cli("jaxlm.tools.quantize", f"--workdir={world['run']}", "--quantize=int8",
                   f"--out={out}", check=False)
    return out, proc


# -- writing tools never overwrite what they should not --------------------------------------


def _misdirected(case: str, w: dict, quantized_dir: Path) -> tuple[list[str], list[str], Path]:
    """(module and args, needles of the error, the directory the output would have hit)."""
    run, other = w["run"], w["other"]
    cases = {
        # Into another run's checkpoints: the writer would have replaced or mixed its steps.
        "quantize_into_another_run": (
            ["jaxlm.tools.quantize", f"--workdir={run}", f"--out={other}/checkpoints"],
            ["not empty", "--overwrite"], other),
        # int4 into a directory holding int8 params: refused, the int8 params stay.
        "quantize_into_a_quantized_dir": (
            ["jaxlm.tools.quantize", f"--workdir={run}", "--quantize=int4",
             f"--out={quantized_dir}"], ["not empty"], quantized_dir),
        "quantize_over_its_own_run": (
            ["jaxlm.tools.quantize", f"--workdir={run}", f"--out={run}", "--overwrite"],
            ["overlaps the input"], run),
        "merge_lora_into_its_own_checkpoints": (
            ["jaxlm.tools.merge_lora", f"--checkpoints={w['lora']}", f"--output={w['lora']}"],
            ["overlaps the input"], w["lora"]),
        "import_over_its_own_input": (
            ["jaxlm.tools.convert_hf", "import", f"--hf_dir={w['hf']}",
             f"--out_dir={w['hf']}", "--overwrite"], ["overlaps the input"], w["hf"]),
        "export_inside_its_run": (
            ["jaxlm.tools.convert_hf", "export", f"--checkpoint_dir={run}",
             f"--out_dir={run}/checkpoints/hf"], ["overlaps the input"], run),
        "prepare_data_into_a_run": (
            ["jaxlm.tools.prepare_data", f"--input={w['hf']}/config.json",
             f"--output_dir={other}", f"--tokenizer={w['tokenizer']}",
             "--num_workers=0"], ["not empty"], other),
    }
    return cases[case]


@pytest.mark.parametrize("case", [
    "quantize_into_another_run", "quantize_into_a_quantized_dir", "quantize_over_its_own_run",
    "merge_lora_into_its_own_checkpoints", "import_over_its_own_input", "export_inside_its_run",
    "prepare_data_into_a_run"])
def test_a_writing_tool_refuses_a_non_empty_or_overlapping_output(case, world, quantized):
    args, needles, target = _misdirected(case, world, quantized[0])
    before = snapshot(world["run"], world["other"], world["lora"], world["hf"], quantized[0])
    fails_in_one_line(run_cli(*args, check=False), *needles)
    assert snapshot(world["run"], world["other"], world["lora"], world["hf"],
                    quantized[0]) == before
    no_partial_beside(target)


def test_output_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(ConfigError, match="not empty"):
        with output_directory(str(target)):
            pass
    with pytest.raises(OSError, match="disk full"):  # a failure leaves the old output
        with output_directory(str(target), overwrite=True) as directory:
            Path(directory, "new").write_text("half")
            raise OSError("disk full")
    assert os.listdir(target) == ["old"]
    no_partial_beside(target)
    with output_directory(str(target), overwrite=True) as directory:
        assert not (target / "new").exists()  # nothing shows before the block ends
        Path(directory, "new").write_text("new")
    assert os.listdir(target) == ["new"]
    no_partial_beside(target)


def test_quantize_and_merge_lora_write_a_complete_output_quietly(world, quantized, tmp_path):
    out, proc = quantized
    is_quiet(proc)
    assert proc.stdout.strip() == f"int8 params of step 2 -> {out}"
    assert restore.read_checkpoint(str(out)).config.quant.weight == "int8"
    no_partial_beside(out)

    merged = tmp_path / "merged" / "checkpoints"
    proc = run_cli("jaxlm.tools.merge_lora", f"--checkpoints={world['lora']}",
                   f"--output={merged}", check=False)
    is_quiet(proc)
    saved = restore.read_checkpoint(str(merged))
    assert saved.step == 3 and not saved.has_lora
    # --overwrite replaces a non-empty output that is not an input.
    proc = run_cli("jaxlm.tools.quantize", f"--workdir={world['run']}", "--quantize=int4",
                   f"--out={merged}", "--overwrite", check=False)
    is_quiet(proc)
    assert restore.read_checkpoint(str(merged)).config.quant.weight == "int4"
    no_partial_beside(merged)


def test_merge_lora_of_a_run_without_adapters_is_one_line(world, tmp_path):
    fails_in_one_line(run_cli("jaxlm.tools.merge_lora", f"--checkpoints={world['run']}",
                              f"--output={tmp_path / 'm'}", check=False), "no LoRA adapters")
    assert not (tmp_path / "m").exists()


# -- Hugging Face import and export ----------------------------------------------------------


def test_import_and_export_are_quiet_and_complete(world, imported, tmp_path):
    out, proc = imported
    is_quiet(proc)
    assert sorted(os.listdir(out)) == ["checkpoints", "config.py", "generation_config.json",
                                       "special_tokens_map.json", "tokenizer.json",
                                       "tokenizer_config.json"]
    no_partial_beside(out)
    proc = run_cli("jaxlm.tools.convert_hf", "export", f"--checkpoint_dir={out}",
                   f"--out_dir={tmp_path / 'hf'}", check=False)
    is_quiet(proc)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == \
        (world["hf"] / "tokenizer.json").read_bytes()


def test_a_sharded_model_in_the_hf_cache_layout_imports(world, tmp_path):
    snapshot_dir = as_hf_cache(world["hf"], tmp_path / "hub")
    assert os.path.islink(snapshot_dir / safetensors_io.INDEX_FILE)
    proc = run_cli("jaxlm.tools.convert_hf", "import", f"--hf_dir={snapshot_dir}",
                   f"--out_dir={tmp_path / 'jx'}", check=False)
    is_quiet(proc)
    assert restore.read_checkpoint(str(tmp_path / "jx")).step == hf.IMPORT_STEP


@pytest.mark.parametrize("name", ["generation_config.json", "special_tokens_map.json",
                                  "tokenizer_config.json", "config.json", "model.safetensors"])
def test_import_refuses_a_file_that_links_out_of_the_model_directory(world, tmp_path, name):
    model = write_hf_model(tmp_path / "m")
    (model / name).unlink()
    (model / name).symlink_to(world["secret"])
    fails_in_one_line(run_cli("jaxlm.tools.convert_hf", "import", f"--hf_dir={model}",
                              f"--out_dir={tmp_path / 'jx'}", check=False),
                      name, "outside the model directory")
    assert not (tmp_path / "jx").exists()


def _record_tokenizer(checkpoint_dir: Path, path: Path, sha256: str | None = None) -> None:
    """Rewrites the tokenizer path (and hash, unless None) that the import's checkpoint
    records."""
    extra_file = checkpoint_dir / "checkpoints" / "0" / "extra" / "metadata"
    extra = json.loads(extra_file.read_text())
    extra["tokenizer_path"] = str(path)
    extra["tokenizer_sha256"] = extra["tokenizer_sha256"] if sha256 is None else sha256
    extra_file.write_text(json.dumps(extra))


@pytest.mark.parametrize("case", ["side_file_links_out", "secret_with_the_recorded_hash",
                                  "secret_with_its_own_hash", "another_tokenizer"])
def test_export_refuses_side_files_from_outside_and_a_tokenizer_that_is_not_the_recorded_one(
        world, imported, tmp_path, case):
    """A side file linking out of the tokenizer's directory, or a recorded tokenizer path
    naming another file: one that is no tokenizer (whatever hash is recorded), or a tokenizer
    of another hash. Nothing is exported, the secret nowhere."""
    secret = world["secret"].read_bytes()
    crafted = tmp_path / "crafted"
    shutil.copytree(imported[0], crafted)
    path, sha, needles = {
        "side_file_links_out": (crafted / "tokenizer.json", None,
                                ("generation_config.json", "outside")),
        "secret_with_the_recorded_hash": (world["secret"], None,
                                          (str(world["secret"]), "not a sentencepiece model")),
        "secret_with_its_own_hash": (world["secret"], hashlib.sha256(secret).hexdigest(),
                                     (str(world["secret"]), "not a sentencepiece model")),
        "another_tokenizer": (world["tokenizer"], None,
                              (str(world["tokenizer"]), "changed since")),
    }[case]
    _record_tokenizer(crafted, path, sha)
    if case == "side_file_links_out":
        (crafted / "generation_config.json").unlink()
        (crafted / "generation_config.json").symlink_to(world["secret"])
    fails_in_one_line(run_cli("jaxlm.tools.convert_hf", "export", f"--checkpoint_dir={crafted}",
                              f"--out_dir={tmp_path / 'out'}", check=False), *needles)
    assert not (tmp_path / "out").exists()
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or path.is_symlink() or path.read_bytes() != secret


def _config_mistakes() -> dict[str, tuple[dict, str]]:
    return {
        "unsupported_model_type": (llama_json(model_type="falcon"), "model_type"),
        "shape_mismatch": (llama_json(hidden_size=48), "shape"),
        "zero_heads": (llama_json(num_attention_heads=0), "num_attention_heads"),
        "string_size": (llama_json(hidden_size="32"), "hidden_size"),
        "null_size": (llama_json(intermediate_size=None), "intermediate_size"),
        # Refused from the headers at once: nothing is built for 10^8 layers.
        "layers_beyond_the_weights": (llama_json(num_hidden_layers=100_000_000),
                                      "num_hidden_layers"),
        "not_json": ("{not json", "not valid JSON"),
    }


@pytest.mark.parametrize("case", list(_config_mistakes()))
def test_an_import_config_json_mistake_is_one_line(world, tmp_path, case):
    hf_json, needle = _config_mistakes()[case]
    model = tmp_path / "m"
    shutil.copytree(world["hf"], model)
    (model / "config.json").write_text(hf_json if isinstance(hf_json, str)
                                       else json.dumps(hf_json))
    fails_in_one_line(run_cli("jaxlm.tools.convert_hf", "import", f"--hf_dir={model}",
                              f"--out_dir={tmp_path / 'jx'}", check=False, timeout=120),
                      needle)
    assert not (tmp_path / "jx").exists()


def test_an_integer_tensor_where_a_float_weight_belongs_is_refused(tmp_path):
    model = write_hf_model(tmp_path / "m", tokenizer=False, int_tensor="model.norm.weight")
    fails_in_one_line(run_cli("jaxlm.tools.convert_hf", "import", f"--hf_dir={model}",
                              f"--out_dir={tmp_path / 'jx'}", check=False),
                      "model.norm.weight", "I32", "float")


# -- prepare_data ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["empty_input", "binary_input", "binary_tokenizer"])
def test_a_prepare_data_mistake_is_one_line(world, tmp_path, case):
    tokenizer = world["tokenizer"]
    data = tmp_path / "docs.txt"
    data.write_bytes(np.random.default_rng(0).bytes(4000) if case == "binary_input" else b"")
    if case == "binary_tokenizer":
        data.write_text("one small document of text\n")
        tokenizer = tmp_path / "tok.model"
        tokenizer.write_bytes(np.random.default_rng(1).bytes(3000))
    needle = {"empty_input": "no document with text", "binary_input": "not UTF-8",
              "binary_tokenizer": "not a sentencepiece model"}[case]
    fails_in_one_line(run_cli("jaxlm.tools.prepare_data", f"--input={data}",
                              f"--tokenizer={tokenizer}", f"--output_dir={tmp_path / 'out'}",
                              "--num_workers=0", check=False), needle)
    assert not (tmp_path / "out").exists()
    no_partial_beside(tmp_path / "out")


# -- generate --------------------------------------------------------------------------------


_GENERATE_MISTAKES = {  # case: (flags, with {tmp} for the test's directory; error text)
    "negative_max_new_tokens": (["--prompt=a", "--max_new_tokens=-5"], "--max_new_tokens"),
    # A cache of 10^11 positions is refused against the free memory before it is allocated.
    "max_new_tokens_beyond_memory": (["--prompt=a", "--max_new_tokens=100000000000"],
                                     "GiB free"),
    "unknown_quantize": (["--prompt=a", "--quantize=int3"], "--quantize='int3'"),
    "unknown_kv_cache": (["--prompt=a", "--kv_cache=int4"], "--kv_cache='int4'"),
    "score_with_prompt": (["--prompt=a", "--score", "--input={tmp}/empty.txt"],
                          "exactly one of"),
    "score_empty_file": (["--score", "--input={tmp}/empty.txt"], "holds no text"),
    "score_binary_file": (["--score", "--input={tmp}/binary.txt"], "not UTF-8"),
}


@pytest.mark.parametrize("case", list(_GENERATE_MISTAKES))
def test_a_generate_mistake_is_one_line(world, tmp_path, case):
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\xff" * 100)
    (tmp_path / "empty.txt").write_text("\n\n")
    args, needle = _GENERATE_MISTAKES[case]
    before = snapshot(world["run"])
    fails_in_one_line(run_cli("jaxlm.tools.generate", f"--workdir={world['run']}",
                              *(a.format(tmp=tmp_path) for a in args), check=False), needle)
    assert snapshot(world["run"]) == before


def test_generate_on_a_truncated_checkpoint_is_one_line(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    # A copy cut short: every array data file of step 2 holds half its bytes.
    data_files = [p for p in (run / "checkpoints" / "2" / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    fails_in_one_line(run_cli("jaxlm.tools.generate", f"--workdir={run}", "--prompt=a",
                              check=False), "checkpoint 2", "cannot be read")


def test_late_read_reports_of_a_failed_restore_are_dropped_and_nothing_else():
    """Reads still in flight when a restore fails report on stderr from several threads at
    once, in fragments; the filter drops those tracebacks and passes every other line (and a
    traceback of anything else) through."""
    import io
    import threading

    from jaxlm.weights.restore import _WithoutLateReadReports

    late = ["Traceback (most recent call last):\n",
            '  File "base_events.py", line 806, in call_soon_threadsafe\n', "    ",
            "self._check_closed()", "\n", "RuntimeError", ": ", "Event loop is closed", "\n"]
    other = ["Traceback (most recent call last):\n", '  File "x.py", line 1, in f\n',
             "ValueError: a real one\n"]
    writers = {0: late, 1: list(late), 2: ["error: checkpoint 2 cannot be read\n", "\rbar ["],
               3: list(other)}
    out = io.StringIO()
    stream = _WithoutLateReadReports(out)
    turns = [i for step in range(max(map(len, writers.values())))
             for i in writers if step < len(writers[i])]  # round robin: fragments interleave
    events = [threading.Event() for _ in range(len(turns) + 1)]
    events[0].set()

    def write(i):
        for k, turn in enumerate(turns):
            if turn == i:
                events[k].wait()
                stream.write(writers[i].pop(0))
                events[k + 1].set()

    threads = [threading.Thread(target=write, args=(i,)) for i in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out.getvalue() == ("error: checkpoint 2 cannot be read\n\rbar [" + "".join(other))


def test_a_chat_template_the_sandbox_blocks_is_one_line(world, imported, tmp_path):
    model = tmp_path / "blocked"
    shutil.copytree(imported[0], model)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    config_file.write_text(json.dumps(config))
    _record_tokenizer(model, model / "tokenizer.json", "")  # no hash: changed on purpose
    proc = subprocess.run(cli_command("jaxlm.tools.generate", f"--workdir={model}", "--chat",
                                      "--max_new_tokens=2"),
                          cwd=ROOT, input="hello\n", capture_output=True, text=True,
                          timeout=300, env=cli_env(1))
    fails_in_one_line(proc, "chat template", "SecurityError")


# -- eval ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown_task", "missing_include_path", "malformed_yaml"])
def test_an_eval_task_mistake_is_one_line_before_the_checkpoint_loads(world, tmp_path, case):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\ndataset_path: [unclosed\n  foo: :\n")
    args, needle = {
        "unknown_task": (["--tasks=no_such_task_anywhere"], "no_such_task_anywhere"),
        "missing_include_path": (["--tasks=mine", f"--include_path={tmp_path / 'nope'}"],
                                 "--include_path"),
        "malformed_yaml": (["--tasks=mine", f"--include_path={tasks}"], "mine.yaml"),
    }[case]
    proc = run_cli("jaxlm.tools.eval", f"--workdir={world['run']}", *args,
                   f"--output={tmp_path / 'r.json'}", check=False)
    fails_in_one_line(proc, needle)
    assert "params restored" not in proc.stderr  # refused before the checkpoint was read


def test_eval_is_quiet(world, tmp_path):
    proc = run_cli("jaxlm.tools.eval", f"--workdir={world['run']}", "--tasks=corpus_bpb",
                   "--limit=2", "--noprogress", f"--output={tmp_path / 'r.json'}", check=False)
    # The restore, and the deduplicated held-out split it scores.
    is_quiet(proc, max_lines=2)
    assert json.loads((tmp_path / "r.json").read_text())["results"]["corpus_bpb"]
