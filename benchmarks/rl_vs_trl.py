"""GRPO in jaxlm beside TRL's GRPOTrainer: the same policy, task, reward and settings.

    python benchmarks/rl_vs_trl.py --work_dir=/tmp/rl_vs_trl --steps=300 --seeds=0,1,2

Needs `pip install -e .[trl]` (TRL; transformers and torch on CPU). What it does:

1. `prepare`: the SFT phase of configs/grpo_tiny.py (the starting policy of docs/rl.md's GRPO
   run), exported to Hugging Face format with `jaxlm.tools.convert_hf export` (config.json,
   safetensors, the sentencepiece tokenizer), and checked: the exported tokenizer must give
   jaxlm's prompt ids for every prompt, transformers' per-token log-probs of prompt + answer
   must equal jaxlm's (`sequence_logps`, the function of GRPO's loss) within 1e-4, and the
   greedy answers of both must agree on every held-out prompt.
2. `jaxlm`: one GRPO run per seed, `python -m jaxlm.main --config=configs/grpo_tiny.py:
   init=<sft>,steps=N` with the settings TRL can match (`trl_settings`), then the trained
   params exported to Hugging Face format.
3. `trl`: one TRL GRPOTrainer run per seed from the exported SFT policy (transformers' model on
   the CPU), with `trl_settings(config)` and the jaxlm rewards (`trl_rewards`).
4. One evaluator for both (`heldout_accuracy`): transformers' greedy `generate` of all 400
   held-out prompts (the prompt ids jaxlm's RL stages build, at most rl.max_new_tokens tokens,
   stopping at EOS or the chat turn end), scored by jaxlm's `correct`. jaxlm's own
   `eval_accuracy` of each jaxlm run at step N is printed beside it as a cross-check.
5. `check_step`: one update of TRL's against jaxlm's on the same sampled batch: the policy of
   jaxlm's first seed, the SFT policy as reference; advantages, loss and every parameter's
   gradient compared (`check_step`).
6. `speed`: wall time per step of both, alternated twice in one command (40-step runs).

Prints a markdown table (held-out accuracy per seed, mean, median wall time per step of the
seed runs) and writes the figures to <work_dir>/results.json, check_step.json and speed.json.
`--stages=...` runs a subset (each stage reuses what an earlier one wrote).
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxlm.stages.rl.rewards import correct, total_reward  # noqa: E402
from jaxlm.stages.rl.settings import parse_weights  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "grpo_tiny.py")
# What jaxlm's run changes from configs/grpo_tiny.py so that TRL can match it: TRL divides by
# the sample std (torch's `std`) and normalises its default loss ("dapo") by the batch's tokens.
JAXLM_OVERRIDES = {"rl.advantage_scale": "sample_std", "rl.loss_norm": "token"}

_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/rl_vs_trl", "Where every run is written.")
_STEPS = flags.DEFINE_integer("steps", 300, "GRPO steps of each run (one rollout batch each).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: one jaxlm and one TRL run each.")
_STAGES = flags.DEFINE_list("stages", ["prepare", "jaxlm", "trl", "check_step", "speed", "report"],
                            "What to run, in this order.")

LOSS_TYPES = {"sequence": "grpo", "token": "dapo", "constant": "dr_grpo"}
SCALE_REWARDS = {"sample_std": "group", "none": "none"}


def trl_settings(config: Any) -> dict[str, Any]:
    """TRL GRPOConfig arguments equal to a jaxlm GRPO config's: sampling, advantages, loss,
    optimizer and schedule (jaxlm's warm-up + cosine to learning_rate * min_lr_ratio is
    transformers' "cosine_with_min_lr"). Raises where TRL has no equal (population std)."""
    r, o = config.rl, config.optim
    if r.advantage_scale not in SCALE_REWARDS:
        raise ValueError(f"rl.advantage_scale={r.advantage_scale!r}: TRL divides by the sample "
                         "std (sample_std) or not at all (none)")
    if o.weight_decay:
        raise ValueError("optim.weight_decay: jaxlm never decays norms and embeddings, TRL's "
                         "AdamW decays every weight but biases and norms; compare with 0")
    return {
        # One generation batch per optimizer step: B prompts x G completions.
        "num_generations": r.group_size,
        "per_device_train_batch_size": config.train.global_batch_size * r.group_size,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,
        "num_iterations": r.num_epochs,
        # One jaxlm step is rl.num_epochs optimizer updates on one rollout batch.
        "max_steps": config.train.steps * r.num_epochs,
        "max_completion_length": r.max_new_tokens,
        "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
        "scale_rewards": SCALE_REWARDS[r.advantage_scale],
        "loss_type": LOSS_TYPES[r.loss_norm],
        "epsilon": r.clip_eps, "epsilon_high": r.clip_eps_high or r.clip_eps,
        "beta": r.kl_coef,
        # jaxlm's k3 term is not weighted by the ratio (TRL >= 1.x does so by default).
        "use_bias_correction_kl": False,
        "mask_truncated_completions": False,
        "reward_weights": [w for _, w in parse_weights(r.rewards)],
        "learning_rate": o.learning_rate, "warmup_steps": o.warmup_steps,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": o.min_lr_ratio},
        "adam_beta1": o.b1, "adam_beta2": o.b2, "adam_epsilon": o.eps,
        "weight_decay": o.weight_decay, "max_grad_norm": o.clip_norm,
        "seed": config.seed,
    }


def completion_text(tokenizer: Any, ids: Sequence[int], stop: Sequence[int]) -> str:
    """A completion's text as jaxlm's RL loop scores it: its stop token cut, then decoded."""
    ids = [int(t) for t in ids]
    if ids and ids[-1] in stop:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def trl_rewards(rewards: str, tokenizer: Any, stop: Sequence[int]) -> list[Callable[..., list]]:
    """One TRL reward function per jaxlm reward named in `rewards` (weights go to TRL's
    reward_weights), each scoring the completion ids decoded the way jaxlm's loop does."""
    funcs = []
    for name, _ in parse_weights(rewards):
        def reward(prompts, completions, completion_ids, answer, prompt_text, _name=name,
                   **kwargs):
            del completions, kwargs
            return [total_reward([(_name, 1.0)], p, completion_text(tokenizer, ids, stop),
                                 {"prompt": p, "answer": a})[0]
                    for p, ids, a in zip(prompt_text, completion_ids, answer)]
        reward.__name__ = name
        funcs.append(reward)
    return funcs


# -- jaxlm's side -------------------------------------------------------------------------------


def jaxlm_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(cmd: list[str], log: str) -> float:
    """Runs `cmd` with its output in `log`; its wall time in seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=jaxlm_env(),
                       cwd=ROOT)
    return time.perf_counter() - t0


def export(checkpoint_dir: str, out_dir: str, log: str) -> None:
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        run([sys.executable, "-m", "jaxlm.tools.convert_hf", "export",
             f"--checkpoint_dir={checkpoint_dir}", f"--out_dir={out_dir}"], log)


def grpo_config(work: str, steps: int, seed: int) -> Any:
    """configs/grpo_tiny.py's GRPO phase as this benchmark runs it."""
    sys.path.insert(0, os.path.dirname(CONFIG))
    import grpo_tiny

    c = grpo_tiny.get_config(f"init={work}/sft/checkpoints,steps={steps}")
    c.seed = seed
    c.data.seed = seed
    for key, value in JAXLM_OVERRIDES.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def jaxlm_run(work: str, steps: int, seed: int) -> dict[str, Any]:
    out = f"{work}/jaxlm/seed{seed}"
    done = f"{out}/run.json"
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(f"{work}/jaxlm", exist_ok=True)
    flags_ = [f"--config.{k}={v}" for k, v in JAXLM_OVERRIDES.items()]
    seconds = run([sys.executable, "-m", "jaxlm.main",
                   f"--config={CONFIG}:init={work}/sft/checkpoints,steps={steps}",
                   f"--workdir={out}", f"--config.seed={seed}", f"--config.data.seed={seed}",
                   f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}",
                   *flags_], f"{work}/jaxlm/seed{seed}.log")
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r][1:]  # first: compile
    evals = {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}
    export(f"{out}/checkpoints", f"{out}/hf", f"{out}/export.log")
    result = {"command_seconds": seconds, "step_seconds": statistics.median(1 / r for r in rates),
              "jaxlm_eval_accuracy": evals, "hf_dir": f"{out}/hf"}
    json.dump(result, open(done, "w"), indent=1)
    return result


# -- one evaluator -------------------------------------------------------------------------------


def heldout_accuracy(model: Any, prompt_ids: list[list[int]], examples: list[dict],
                     tokenizer: Any, stop: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of a transformers model to the held-out prompts (all the same length
    here: one batch, no padding), scored by jaxlm's `correct`."""
    import torch

    lengths = {len(p) for p in prompt_ids}
    if len(lengths) != 1:
        raise ValueError(f"held-out prompts of {sorted(lengths)} tokens: pad them first")
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt_ids), attention_mask=torch.ones(
            len(prompt_ids), lengths.pop(), dtype=torch.long), do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=list(stop), pad_token_id=stop[0])
    answers = []
    for row in out[:, len(prompt_ids[0]):].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        answers.append(completion_text(tokenizer, row[:cut], stop))
    hits = [correct(e["prompt"], a, e) for a, e in zip(answers, examples)]
    return {"accuracy": float(np.mean(hits)), "answers": answers}


class Task:
    """The held-out and training prompts of configs/grpo_tiny.py with jaxlm's tokenizer."""

    def __init__(self, work: str):
        from jaxlm.data.tasks import split_examples
        from jaxlm.stages.rl.loop import stop_ids
        from jaxlm.stages.rl.prompts import prompt_ids, prompt_template
        from jaxlm.weights.restore import read_checkpoint, saved_tokenizer

        self.config = grpo_config(work, 1, 0)
        self.tokenizer = saved_tokenizer(read_checkpoint(f"{work}/sft/checkpoints"))
        template = prompt_template(self.config)
        self.stop = stop_ids(self.tokenizer, self.config.rl.stop, template)
        self.eval = split_examples(self.config, "eval")
        self.train = split_examples(self.config, "train")
        self.eval_ids = [prompt_ids(self.tokenizer, e["prompt"], template) for e in self.eval]
        self.train_ids = [prompt_ids(self.tokenizer, e["prompt"], template) for e in self.train]

    def accuracy(self, hf_dir: str) -> dict[str, Any]:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        return heldout_accuracy(model, self.eval_ids, self.eval, self.tokenizer, self.stop,
                                self.config.rl.max_new_tokens)


# -- the starting policy and its checks -------------------------------------------------------


def prepare(work: str) -> dict[str, Any]:
    done = f"{work}/sft.json"
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(work, exist_ok=True)
    if not glob.glob(f"{work}/sft/checkpoints/*"):
        run([sys.executable, "-m", "jaxlm.main", f"--config={CONFIG}:phase=sft",
             f"--workdir={work}/sft"], f"{work}/sft.log")
    export(f"{work}/sft/checkpoints", f"{work}/sft_hf", f"{work}/sft_export.log")
    result = check_export(work)
    json.dump(result, open(done, "w"), indent=1)
    return result


def check_export(work: str) -> dict[str, Any]:
    """The exported model + tokenizer against jaxlm: prompt ids, per-token log-probs of the
    held-out prompts with their answers, and greedy answers."""
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxlm.models import Transformer
    from jaxlm.stages.rl.rollout import sequence_logps
    from jaxlm.weights.restore import restore

    task = Task(work)
    hf_tok = transformers.AutoTokenizer.from_pretrained(f"{work}/sft_hf")
    for ids in task.eval_ids + task.train_ids:  # the text TRL is given, re-tokenized by HF
        text = hf_tok.decode(ids)
        if hf_tok(text)["input_ids"] != ids:
            raise AssertionError(f"exported tokenizer: {text!r} -> {hf_tok(text)['input_ids']}, "
                                 f"jaxlm {ids}")
    answers = [list(task.tokenizer.encode(e["answer"])) + [task.stop[-1]] for e in task.eval]
    width = max(len(a) for a in answers)
    rows = [p + a + [0] * (width - len(a)) for p, a in zip(task.eval_ids, answers)]
    valid = [[1] * (len(p) + len(a)) + [0] * (width - len(a))
             for p, a in zip(task.eval_ids, answers)]
    mask = np.array([[1] * len(a) + [0] * (width - len(a)) for a in answers], bool)

    loaded = restore(f"{work}/sft/checkpoints")
    jx = np.asarray(sequence_logps(loaded.params, jnp.array(rows), jnp.array(valid), width,
                                   model=Transformer(loaded.model_cfg)))
    model = transformers.AutoModelForCausalLM.from_pretrained(f"{work}/sft_hf").eval()
    with torch.no_grad():
        logits = model(torch.tensor(rows), attention_mask=torch.tensor(valid)).logits
    logp = torch.log_softmax(logits[:, -width - 1:-1].double(), -1)
    hf = logp.gather(-1, torch.tensor(rows)[:, -width:, None])[..., 0].numpy()
    diff = float(np.abs(jx - hf)[mask].max())

    hf_greedy = task.accuracy(f"{work}/sft_hf")
    jx_greedy = jaxlm_greedy(loaded, task)
    same = sum(a == b for a, b in zip(hf_greedy["answers"], jx_greedy))
    print(f"export check: {len(task.eval_ids) + len(task.train_ids)} prompts tokenized alike; "
          f"max |log p jaxlm - log p HF| {diff:.2e} over {int(mask.sum())} answer tokens; greedy "
          f"answers equal on {same}/{len(jx_greedy)} held-out prompts; HF accuracy "
          f"{hf_greedy['accuracy']:.4f}")
    if diff > 1e-4 or same != len(jx_greedy):
        raise AssertionError("the exported model does not reproduce jaxlm's")
    return {"max_logp_diff": diff, "greedy_equal": same, "accuracy": hf_greedy["accuracy"]}


def jaxlm_greedy(loaded: Any, task: Task) -> list[str]:
    """jaxlm's own greedy answers (its KV-cache sampler) to the held-out prompts."""
    from jaxlm.inference.sampler import Request, Sampler

    sampler = Sampler(loaded.model_cfg, loaded.params, mesh=loaded.mesh,
                      pad_id=task.tokenizer.pad_id, bucket=1)
    n = task.config.rl.max_new_tokens
    out = sampler.generate([Request(ids, n, tuple(task.stop)) for ids in task.eval_ids])
    return [completion_text(task.tokenizer, c.tokens, task.stop) for c in out]


# -- TRL's side ---------------------------------------------------------------------------------


def trl_trainer(work: str, steps: int, seed: int, out: str, policy: str = ""
                ) -> tuple[Any, Task]:
    """TRL's GRPOTrainer on the exported SFT policy (or the HF directory `policy`) with
    `trl_settings` of the jaxlm run."""
    import datasets
    import torch
    import transformers
    import trl

    task = Task(work)
    config = grpo_config(work, steps, seed)
    settings = trl_settings(config)
    hf_tok = transformers.AutoTokenizer.from_pretrained(f"{work}/sft_hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(policy or f"{work}/sft_hf",
                                                              dtype=torch.float32)
    # Stop where jaxlm's rollout stops: EOS or the chat turn end.
    model.generation_config.eos_token_id = list(task.stop)
    data = datasets.Dataset.from_list([
        {"prompt": hf_tok.decode(ids), "prompt_text": e["prompt"], "answer": e["answer"]}
        for ids, e in zip(task.train_ids, task.train)])
    args = trl.GRPOConfig(output_dir=out, logging_steps=10, save_strategy="no", report_to=[],
                          use_cpu=True, bf16=False, dataloader_num_workers=0,
                          remove_unused_columns=False,
                          # jaxlm's model.remat is "none"; TRL recomputes activations by default.
                          gradient_checkpointing=False, **settings)
    trainer = trl.GRPOTrainer(model=model, args=args, processing_class=hf_tok, train_dataset=data,
                              reward_funcs=trl_rewards(config.rl.rewards, task.tokenizer,
                                                       task.stop))
    if sorted(trainer.eos_token_ids) != sorted(task.stop):
        raise AssertionError(f"TRL stops at {trainer.eos_token_ids}, jaxlm at {task.stop}")
    return trainer, task


def step_times(trainer: Any) -> list[float]:
    """The wall time of each of the trainer's steps (generation, scoring and update), filled
    in as it trains."""
    import transformers

    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    return times


def speed(work: str, steps: int, repeats: int) -> dict[str, Any]:
    """Wall time per step of both, alternated in one command (the machine is shared): short
    runs from the SFT policy, every step timed, the first 5 of each run left out."""
    import shutil

    out = f"{work}/speed"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    result: dict[str, Any] = {"cpu_pressure": [], "jaxlm": [], "trl": []}
    for rep in range(repeats):
        result["cpu_pressure"].append(open("/proc/pressure/cpu").readline().strip())
        flags_ = [f"--config.{k}={v}" for k, v in JAXLM_OVERRIDES.items()]
        run([sys.executable, "-m", "jaxlm.main",
             f"--config={CONFIG}:init={work}/sft/checkpoints,steps={steps}",
             f"--workdir={out}/jaxlm{rep}", "--config.log.every_steps=1",
             f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}",
             *flags_], f"{out}/jaxlm{rep}.log")
        rows = [json.loads(line) for line in open(f"{out}/jaxlm{rep}/metrics.jsonl")]
        rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r][5:]
        result["jaxlm"].append(statistics.median(1 / r for r in rates))
        trainer, _ = trl_trainer(work, steps, 0, f"{out}/trl{rep}")
        times = step_times(trainer)
        trainer.train()
        result["trl"].append(statistics.median(times[5:]))
    result["cpu_pressure"].append(open("/proc/pressure/cpu").readline().strip())
    print(f"median seconds per step over {steps - 5} steps, {repeats} alternations: "
          f"jaxlm {result['jaxlm']}, TRL {result['trl']}; /proc/pressure/cpu "
          f"{result['cpu_pressure']}")
    return result


def trl_run(work: str, steps: int, seed: int) -> dict[str, Any]:
    out = f"{work}/trl/seed{seed}"
    done = f"{out}/run.json"
    if os.path.exists(done):
        return json.load(open(done))
    trainer, task = trl_trainer(work, steps, seed, out)
    times = step_times(trainer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_model(f"{out}/hf")
    logs = trainer.state.log_history
    result = {"command_seconds": seconds, "step_seconds": statistics.median(times[1:]),
              "hf_dir": f"{out}/hf", "log_history": logs}
    json.dump(result, open(done, "w"), indent=1)
    return result


def check_step(work: str, seed: int) -> dict[str, Any]:
    """One update's loss and gradient, TRL's against jaxlm's `grpo.loss_fn` on the same
    completions: the policy is jaxlm's GRPO run of `seed` (so the KL term is not zero), the
    reference the SFT policy; TRL samples and scores a batch, jaxlm computes the advantages
    from the same rewards and the loss with rl.loss_norm's token weights."""
    import jax
    import jax.numpy as jnp
    import transformers

    from jaxlm.losses.policy import token_weights
    from jaxlm.models import Transformer
    from jaxlm.stages.grpo import loss_fn
    from jaxlm.stages.rl.advantages import group_advantages
    from jaxlm.stages.rl.rollout import sequence_logps
    from jaxlm.weights.hf.tensors import param_slot, tensor_maps
    from jaxlm.weights.restore import restore

    run_dir = f"{work}/jaxlm/seed{seed}"
    trainer, task = trl_trainer(work, 1, seed, f"{work}/check_step", policy=f"{run_dir}/hf")
    sft = transformers.AutoModelForCausalLM.from_pretrained(f"{work}/sft_hf")
    trainer.ref_model.load_state_dict(sft.state_dict())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train for each step
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()

    c = task.config
    g, t = c.rl.group_size, c.rl.max_new_tokens
    comp = inputs["completion_ids"].numpy()
    cmask = inputs["completion_mask"].numpy()
    ids = [row[m.astype(bool)].tolist() for row, m in zip(comp, cmask)]
    prompts = [task.eval[0]["prompt"]] * len(ids)  # the rewards read only the answers
    answers = [task.train[next(i for i, p in enumerate(task.train_ids)
                               if p == row.tolist())]["answer"]
               for row in inputs["prompt_ids"].numpy()]
    funcs = trl_rewards(c.rl.rewards, task.tokenizer, task.stop)
    rewards = sum(w * np.asarray(f(prompts=None, completions=None, completion_ids=ids,
                                   answer=answers, prompt_text=prompts))
                  for f, (_, w) in zip(funcs, parse_weights(c.rl.rewards)))
    adv = np.asarray(group_advantages(jnp.asarray(rewards.reshape(-1, g), jnp.float32),
                                      c.rl.advantage_scale)).reshape(-1)
    pad = t - comp.shape[1]
    completion = np.pad(comp * cmask, ((0, 0), (0, pad)))
    tokens = np.concatenate([inputs["prompt_ids"].numpy(), completion], 1).astype(np.int32)
    mask = np.pad(cmask, ((0, 0), (0, pad))).astype(np.float32)
    valid = np.concatenate([inputs["prompt_mask"].numpy(), mask], 1).astype(np.int32)

    policy, ref = restore(f"{run_dir}/checkpoints"), restore(f"{work}/sft/checkpoints")
    model = Transformer(policy.model_cfg)
    batch = {"tokens": jnp.asarray(tokens), "valid": jnp.asarray(valid), "mask": jnp.asarray(mask),
             "advantages": jnp.asarray(adv),
             "weights": token_weights(jnp.asarray(mask), c.rl.loss_norm)}
    batch["old_logps"] = sequence_logps(policy.params, batch["tokens"], batch["valid"], t,
                                        model=model)
    batch["ref_logps"] = sequence_logps(ref.params, batch["tokens"], batch["valid"], t,
                                        model=model)
    (jx_loss, sums), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, model=model, clip_low=c.rl.clip_eps,
                          clip_high=c.rl.clip_eps_high or c.rl.clip_eps, kl_coef=c.rl.kl_coef,
                          total_rows=len(ids)), has_aux=True)(policy.params)
    hf_grads = dict(trainer.model.named_parameters())
    worst, scale = 0.0, 0.0
    for m in tensor_maps(policy.model_cfg):
        arrays = []
        for path in m.params:
            where, layer = param_slot(policy.model_cfg, path, m.layer)
            leaf = grads
            for key in where:
                leaf = leaf[key]
            arrays.append(np.asarray(leaf if layer is None else leaf[layer]))
        ours = m.to_hf(*arrays)
        theirs = hf_grads[m.name].grad.numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
        scale = max(scale, float(np.abs(theirs).max()))
    result = {"advantage_max_diff": float(np.abs(adv - inputs["advantages"].numpy()).max()),
              "loss_trl": float(loss), "loss_jaxlm": float(jx_loss),
              "kl_jaxlm": float(sums["kl_sum"] / sums["mask_sum"]),
              "grad_max_abs_diff": worst, "grad_max_abs": scale,
              "completion_tokens": int(mask.sum())}
    print(f"one update, TRL vs jaxlm: {result}")
    return result


# -- the report ---------------------------------------------------------------------------------


# Training metrics logged by both, every 10 steps: jaxlm's metrics.jsonl name, TRL's log name.
CURVES = {"reward": ("reward_mean", "reward"), "kl": ("kl", "kl"),
          "entropy": ("entropy", "entropy"), "length": ("response_length",
                                                       "completions/mean_length")}


def curves(work: str, name: str, seed: int) -> dict[str, dict[int, float]]:
    """Each CURVES metric of one run by logged step."""
    if name == "jaxlm":
        rows = [json.loads(line) for line in open(f"{work}/jaxlm/seed{seed}/metrics.jsonl")]
    else:
        rows = json.load(open(f"{work}/trl/seed{seed}/run.json"))["log_history"]
    i = 0 if name == "jaxlm" else 1
    return {k: {r["step"]: r[names[i]] for r in rows if names[i] in r}
            for k, names in CURVES.items()}


def window_mean(curve: dict[int, float], first: int, last: int) -> float:
    return float(np.mean([v for step, v in curve.items() if first <= step <= last]))


def report(work: str, steps: int, seeds: list[int]) -> None:
    task = Task(work)
    start = prepare(work)
    rows, results = [], {"steps": steps, "start_accuracy": start["accuracy"], "runs": {}}
    for name in ("jaxlm", "trl"):
        accs, step_s = [], []
        for seed in seeds:
            path = f"{work}/{name}/seed{seed}/run.json"
            if not os.path.exists(path):
                continue
            r = json.load(open(path))
            acc = task.accuracy(r["hf_dir"])["accuracy"]
            accs.append(acc)
            step_s.append(r["step_seconds"])
            c = curves(work, name, seed)
            early = {k: window_mean(v, 1, 50) for k, v in c.items()}
            late = {k: window_mean(v, steps - 49, steps) for k, v in c.items()}
            results["runs"][f"{name}/seed{seed}"] = {
                "accuracy": acc, "step_seconds": r["step_seconds"],
                "command_seconds": r["command_seconds"], "first_50_steps": early,
                "last_50_steps": late, "jaxlm_eval_accuracy": r.get("jaxlm_eval_accuracy")}
            own = r.get("jaxlm_eval_accuracy", {}).get(str(steps))
            print(f"{name} seed {seed}: held-out {acc:.4f}"
                  + (f" (jaxlm's own eval: {own:.4f})" if own is not None else "")
                  + f", {r['step_seconds']:.3f} s/step, {r['command_seconds']:.0f} s; steps "
                  "1-50 -> last 50: " + ", ".join(f"{k} {early[k]:.3f} -> {late[k]:.3f}"
                                                   for k in CURVES))
        if accs:
            rows.append(f"| {name} | {', '.join(f'{a:.4f}' for a in accs)} | "
                        f"{np.mean(accs):.4f} +- {np.std(accs, ddof=1) if len(accs) > 1 else 0:.4f}"
                        f" | {statistics.median(step_s):.3f} |")
    json.dump(results, open(f"{work}/results.json", "w"), indent=1)
    print(f"\nheld-out accuracy after {steps} GRPO steps (start {start['accuracy']:.4f}):\n")
    print("| trainer | per seed | mean +- sample std | median s / step |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))


def main(argv: list[str]) -> None:
    del argv
    work, steps = os.path.abspath(_WORK_DIR.value), _STEPS.value
    seeds = [int(s) for s in _SEEDS.value]
    if "prepare" in _STAGES.value:
        print(prepare(work))
    for seed in seeds:
        if "jaxlm" in _STAGES.value:
            jaxlm_run(work, steps, seed)
        if "trl" in _STAGES.value:
            trl_run(work, steps, seed)
    if "check_step" in _STAGES.value:
        json.dump(check_step(work, seeds[0]), open(f"{work}/check_step.json", "w"), indent=1)
    if "speed" in _STAGES.value:
        json.dump(speed(work, 40, 2), open(f"{work}/speed.json", "w"), indent=1)
    if "report" in _STAGES.value:
        report(work, steps, seeds)


if __name__ == "__main__":
    app.run(main)
