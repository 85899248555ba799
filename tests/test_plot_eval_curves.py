"""jaxlm.tools.plot_eval_curves: a panel leaves out a run that lacks its metric (a GRPO run
beside PPO's reward-model score) and fails only when no run has it."""

import json

from tests.cli import run_cli


def _run(tmp_path, name, rows):
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def test_a_run_without_a_panels_metric_is_left_out_of_that_panel(tmp_path):
    ppo = _run(tmp_path, "ppo", [{"step": 0, "eval_accuracy": 0.39, "eval_score_mean": 3.2},
                                 {"step": 200, "eval_accuracy": 0.5, "eval_score_mean": 5.2}])
    grpo = _run(tmp_path, "grpo", [{"step": 0, "eval_accuracy": 0.39},
                                   {"step": 200, "eval_accuracy": 0.6}])
    out = tmp_path / "curves.png"
    result = run_cli("jaxlm.tools.plot_eval_curves", f"--out={out}", f"--run=ppo={ppo}",
                     f"--run=grpo={grpo}", "--metrics=eval_accuracy,eval_score_mean")
    assert result.returncode == 0, result.stderr
    assert "grpo: eval_accuracy 0.39 at step 0 -> 0.6 at step 200" in result.stdout
    assert "grpo: no eval_score_mean rows" in result.stdout
    assert "ppo: eval_score_mean 3.2 at step 0 -> 5.2 at step 200" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = run_cli("jaxlm.tools.plot_eval_curves", f"--out={tmp_path / 'no.png'}",
                      f"--run=grpo={grpo}", "--metrics=kl", check=False)
    assert missing.returncode != 0
    assert "no run's metrics.jsonl has 'kl' rows" in missing.stderr
    assert not (tmp_path / "no.png").exists()
