"""Where training metrics go: <workdir>/metrics.jsonl, TensorBoard events, the console line.

metrics.jsonl has one JSON object per logged step; field names are stable because tools and
tests read them: step, loss, lr, grad_norm, tokens_per_sec, mfu (+ eval_* when evaluation ran).
Metrics written for the step of the last row (an evaluation after the step's training metrics)
are merged into that row, which is rewritten in place. Only process 0 writes. The workdir may
be a local path or an object-store URL such as gs://bucket/run (through etils.epath; install
the `gcs` extra): objects cannot be appended to, so there the whole file is rewritten at each
write (it stays small: one line per logged step).
"""

from __future__ import annotations

import json
import math
from typing import Any

from etils import epath


def is_remote(path: str) -> bool:
    """True for URLs like gs://..., s3://... (no appends, no local cache)."""
    return "://" in path


class MetricsWriter:
    """Appends metrics to metrics.jsonl and (optionally) TensorBoard; a no-op off process 0."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
                 append: bool | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        root = epath.Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        self._path = root / "metrics.jsonl"
        self._append = not is_remote(workdir) if append is None else append
        # The last row written by this writer and where its line starts (to merge into it).
        self._last: dict[str, Any] | None = None
        self._last_start = 0
        if self._append:
            self._jsonl = self._path.open("a")
        else:  # object store: keep the text and rewrite the object
            self._text = self._path.read_text() if self._path.exists() else ""
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(root / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        # Strict JSON: a NaN/Inf value is written as null (with its kind in "<key>_nonfinite").
        for key, value in list(row.items()):
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
                row[f"{key}_nonfinite"] = str(value)
        merge = self._last is not None and self._last["step"] == row["step"]
        whole = {**self._last, **row} if merge else row
        line = json.dumps(whole, allow_nan=False) + "\n"
        if self._append:
            if merge:
                self._jsonl.truncate(self._last_start)
            else:
                self._last_start = self._jsonl.tell()
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            if merge:
                self._text = self._text[:self._last_start]
            else:
                self._last_start = len(self._text)
            self._text += line
            self._path.write_text(self._text)
        self._last = whole
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> int:
        """Drops the rows of steps after `step` (a resumed run rewrites them), so every step
        appears once; returns how many rows were dropped."""
        if not self.enabled or not self._path.exists():
            return 0
        lines = (self._text if not self._append else self._path.read_text()).splitlines()
        kept = [line for line in lines if not line.strip() or _row_step(line) <= step]
        dropped = len(lines) - len(kept)
        if not dropped:
            return 0
        text = "".join(line + "\n" for line in kept)
        self._last = None  # rows before the resumed step are never merged into
        if self._append:
            self._jsonl.close()
            self._path.write_text(text)
            self._jsonl = self._path.open("a")
        else:
            self._text = text
            self._path.write_text(text)
        return dropped

    def set_aside(self, name: str) -> int:
        """Moves the rows written so far to `name` beside metrics.jsonl and starts the file
        afresh (a run that starts over keeps the old run's rows); returns how many rows were
        moved (0: none, nothing moved)."""
        if not self.enabled or not self._path.exists():
            return 0
        text = self._path.read_text() if self._append else self._text
        rows = sum(1 for line in text.splitlines() if line.strip())
        if not rows:
            return 0
        target = self._path.parent / name
        if self._append:
            self._jsonl.close()
            self._path.rename(target)
            self._jsonl = self._path.open("a")
        else:
            target.write_text(text)
            self._text = ""
            self._path.write_text("")
        return rows

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line (a line that does not parse counts as after any step:
    a write cut short by a crash)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _scalar(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total_steps: int, metrics: dict[str, float], eta_s: float) -> str:
    return (f"step {step}/{total_steps} | loss {metrics['loss']:.4f} | "
            f"grad_norm {metrics['grad_norm']:.3f} | lr {metrics['lr']:.2e} | "
            f"{metrics['steps_per_sec']:.2f} steps/s | {metrics['tokens_per_sec']:,.0f} tok/s | "
            f"mfu {mfu_text(metrics['mfu'])} | eta {format_duration(eta_s)}")


def mfu_text(mfu: float) -> str:
    """MFU as a percentage; above 100% it cannot be right, and says the peak is suspect."""
    text = f"{100 * mfu:.1f}%"
    if mfu > 1.0:
        text += " (over 100%: the peak FLOP/s is suspect; set log.peak_flops)"
    return text

