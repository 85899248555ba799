"""A tiny IsoFLOP sweep on CPU: for each compute budget C, models of ~0.02-0.23M parameters
trained on D = C / (6 N) tokens (Chinchilla's Approach 2 grid), on the embedded stdlib corpus.

    python -m jaxlm.tools.sweep --config=configs/sweeps/isoflop_tiny.py --workdir=/tmp/isoflop_tiny
    python -m jaxlm.tools.fit_scaling_law --results=/tmp/isoflop_tiny/results.csv \
        --out_dir=/tmp/isoflop_tiny/fit --grid=small --bootstrap=20 --target_flops=1e12,1e13

The default grid (3 budgets 3e11/1e12/3e12 x 5 shapes, batch 8 x 64 tokens, 1024-piece
tokenizer, eval on 204,800 tokens of a 10% held-out split) runs in ~20 minutes on 2 cores and
brackets the optimum at every budget (docs/scaling.md has the measured run and its fit).
Arguments (`configs/sweeps/isoflop_tiny.py:budgets=1e12/3e12,shapes=64x2/96x3`): `budgets` are
training FLOPs (6 N D) separated by '/'; `shapes` are `<d_model>x<layers>` separated by '/';
`batch` (rows of 64 tokens), `eval_tokens`, `vocab`; `smoke=True` shrinks data, vocabulary and
batch for a seconds-long test. N counts every parameter as built (`train.param_convention=
"total"`: embeddings included; the tied embedding is also the output head, so 6N per token counts
it right): these RoPE models have no relative-position weights, which the Chinchilla convention
would count, and the fit in docs/scaling.md was measured with this N.
Run a single point with `python -m jaxlm.main --config=configs/sweeps/isoflop_tiny.py
--workdir=...` plus its overrides (see `--print_commands`).
"""

from jaxlm.run import config as config_lib
from jaxlm.scaling import flops as scaling


def get_config(arg: str | None = None):
    args = _args(arg)
    c = config_lib.base_config()
    _set_shape(c, *_shapes(args.shapes)[0])
    c.model.tie_embeddings = True

    c.data.source = "stdlib"
    c.data.seq_len = 16 if args.smoke else 64
    c.data.vocab_size = 400 if args.smoke else args.vocab
    if args.smoke:
        c.data.max_documents = 60
    else:  # a larger held-out set (~10% of the stdlib files): differences between points are
        c.data.eval_fraction = 0.1  # a few hundredths of a nat, a few files are not enough

    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 2 if args.smoke else 20
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1

    c.train.global_batch_size = 8 if args.smoke else args.batch
    c.train.steps = 0
    c.train.tokens_per_param = 0.0  # 20 tokens per parameter unless a point sets train.tokens
    c.train.param_convention = "total"  # N as built (see the docstring)
    c.eval.every_steps = 0  # only at the end
    c.eval.tokens = 2 * 8 * 16 if args.smoke else args.eval_tokens

    c.checkpoint.every_steps = 0  # at the end (and on SIGTERM)
    c.checkpoint.keep_last = 1
    c.log.every_steps = 1 if args.smoke else 10
    c.log.sample_every = 0
    c.log.tensorboard = False
    if args.smoke:
        c.log.peak_flops = 1e11  # MFU against a nominal peak: skips the CPU matmul measurement
    config_lib.validate(c)
    return c


def get_sweep(arg: str | None = None):
    """IsoFLOP grid: every shape at every budget, D = C / (6 N) tokens."""
    args = _args(arg)
    base = get_config(arg)
    for budget in (float(b) for b in args.budgets.split("/")):
        for d_model, layers in _shapes(args.shapes):
            c = base.copy_and_resolve_references()
            _set_shape(c, d_model, layers)
            n = scaling.param_count(config_lib.model_config(c, c.data.vocab_size),
                                    c.train.param_convention)
            tokens = int(budget / (6 * n))
            steps = -(-tokens // config_lib.tokens_per_step(c))
            yield {"name": f"C{budget:.0e}_d{d_model}_l{layers}".replace("+", ""), "budget": budget,
                   "model.d_model": d_model, "model.num_layers": layers,
                   "model.num_heads": c.model.num_heads, "model.d_ff": c.model.d_ff,
                   "train.tokens": tokens,
                   # Short runs warm up over their first 20% (at most the base's steps).
                   "optim.warmup_steps": min(base.optim.warmup_steps, max(1, steps // 5))}


def _args(arg):
    return config_lib.parse_arg(arg, budgets="3e11/1e12/3e12",
                                shapes="16x2/24x2/32x2/48x2/64x3", batch=8, eval_tokens=204_800,
                                vocab=1024, smoke=False)


def _shapes(spec: str) -> list[tuple[int, int]]:
    try:
        return [(int(d), int(layers)) for d, layers in (s.split("x") for s in spec.split("/"))]
    except ValueError as e:
        raise ValueError(f"config argument shapes: {spec!r} is not <d_model>x<layers>/...") from e


def _set_shape(c, d_model: int, layers: int) -> None:
    c.model.d_model, c.model.num_layers = d_model, layers
    c.model.num_heads = max(1, d_model // 32)  # heads of 32 (48 -> 1 head of 48)
    c.model.d_ff = 3 * d_model  # SwiGLU: 9 d^2 per layer
