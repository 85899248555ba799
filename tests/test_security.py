"""Inputs that try to escape: a directory name that would end the generated config's docstring,
a safetensors index that points outside the model directory, and file modes of what
jaxlm/tools/prepare_data.py writes."""

import importlib.util
import json
import os
import stat

import pytest

from jaxlm.data import cache
from jaxlm.run.errors import DataError
from jaxlm.weights.hf import convert as hf_interop
from jaxlm.weights.hf import safetensors_io


def test_generated_config_escapes_the_directory_name(tmp_path):
    hostile = str(tmp_path / 'm"""; import os; os.environ["JAXLM_PWNED"] = "1"; """\\x')
    path = tmp_path / "imported.py"
    c = hf_interop.config_lib.base_config()
    c.model.vocab_size = 300
    hf_interop._write_config_file(str(path), c, {"vocab_size": 300}, hostile)
    spec = importlib.util.spec_from_file_location("imported", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # parses, and runs nothing from the name
    assert "JAXLM_PWNED" not in os.environ
    assert module.get_config().model.vocab_size == 300
    assert repr(hostile) in module.__doc__


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd",
                                  "sub/../../outside.safetensors"])
def test_safetensors_index_may_not_leave_the_model_directory(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (model / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(DataError, match="outside"):
        safetensors_io.weight_files(str(model))


def test_atomic_writes_get_the_mode_of_ordinary_files(tmp_path):
    ordinary = tmp_path / "shard"
    ordinary.write_bytes(b"x")
    cache.write_json_atomic(str(tmp_path / "manifest.json"), {"a": 1})
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
    assert mode(tmp_path / "manifest.json") == mode(ordinary)
