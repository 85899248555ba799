"""The tiny model with a mixture of experts in every other block: 8 experts, top-2, on CPU.

    python -m jaxlm.main --config=configs/tiny_moe.py --workdir=/tmp/jaxlm_tiny_moe

Same data, width and schedule as configs/tiny.py; every second block (2, 4, 6) has 8 experts of
tiny.py's MLP width. Arguments:
`steps=N`, `experts=E`, `top_k=1|2`, `expert_parallel=P` (mesh.expert; P must divide E and
the batch of 16), `dropless=True`. See docs/moe.md.
"""

from pathlib import Path

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, steps=200, experts=8, top_k=2, expert_parallel=1,
                                dropless=False)
    c = config_lib.load_config_file(Path(__file__).with_name("tiny.py"), f"steps={args.steps}")

    c.model.moe.num_experts = args.experts
    c.model.moe.top_k = args.top_k
    c.model.moe.capacity_factor = 1.25
    c.model.moe.dropless = args.dropless
    c.model.moe.every = 2
    c.model.moe.aux_loss_weight = 0.01
    c.model.moe.router_z_loss_weight = 0.001
    c.mesh.expert = args.expert_parallel
    config_lib.validate(c)
    return c
