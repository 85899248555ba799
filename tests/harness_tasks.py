"""lm-eval task files over local jsonl data, written by the harness tests (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as one JSON object a line."""
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_task(path: Path, name: str, data: Path, output_type: str, metrics: list[str],
               extra: str = "", **docs: str) -> Path:
    """A task YAML `name` of `output_type` reading `data` as its test split: `docs` are its
    doc_to_* templates (doc_to_text="{{question}}"), `extra` more YAML lines verbatim
    (generation_kwargs), `metrics` its metric_list."""
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {data}", "test_split: test", f"output_type: {output_type}"]
    lines += [f"doc_to_{key}: {json.dumps(template)}" for key, template in docs.items()]
    lines += [extra.rstrip("\n")] if extra else []
    lines += ["metric_list:", *[f"  - metric: {m}" for m in metrics]]
    path.write_text("\n".join(lines) + "\n")
    return path
