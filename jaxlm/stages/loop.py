"""The step loop: what the trainer calls every step, the same interface for every stage.

`Program.make_loop(tokenizer, reference, frozen)` builds a stage's loop (`Stage.make_loop`) from
the Program's jitted pieces. The trainer hands it this process's host batches and never asks
what kind of stage it runs:

    loop.compile()                                      the train step, ahead of any data
    loop.train(state, host_batch) -> (state, metrics)   one trainer step
    loop.eval(params, host_batch) -> sums               one held-out batch (`Stage.eval_metrics`
                                                        turns the sums over batches into metrics)
    loop.samples() -> texts                             logged at each evaluation
    loop.host_state() / loop.load_host_state(dict)      what it carries between steps, saved
                                                        with every checkpoint

`JitStepLoop`, the default, runs the Program's train and eval steps on the process's rows
assembled into global batches; an RL stage's loop (`jaxlm.stages.rl.loop.RolloutLoop`) generates
with the Program's rollout, scores on the host, then runs the same jitted train step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from jaxlm.parallel import sharding

if TYPE_CHECKING:
    import numpy as np

    from jaxlm.run.program import Program

HostBatch = dict[str, "np.ndarray"]


class StepLoop(Protocol):
    """One stage's step as the trainer drives it (see the module doc)."""

    def compile(self) -> None:
        """Compiles the train step before the first batch (its time logged), so the first
        logged throughput is the step's own; `train` compiles it otherwise."""
        ...

    def train(self, state: Any, host_batch: HostBatch) -> tuple[Any, dict[str, Any]]:
        """One trainer step on this process's rows; metrics may still be on the device."""
        ...

    def eval(self, params: Any, host_batch: HostBatch) -> dict[str, Any]:
        """Summed eval values of one held-out batch (added up over the stage's eval_batches)."""
        ...

    def samples(self) -> list[str]:
        """Texts written to TensorBoard after each evaluation (none: [])."""
        ...

    def host_state(self) -> dict[str, Any]:
        """What the loop carries from step to step, JSON-serialisable: saved with every
        checkpoint (taken after the checkpointed step)."""
        ...

    def load_host_state(self, state: dict[str, Any]) -> None:
        """Continues from `host_state()` as a checkpoint saved it."""
        ...


class JitStepLoop:
    """The Program's jitted steps on global batches: the train step compiled ahead of its first
    batch (the compile time logged), the steps' extra arguments (reference, frozen params)
    bound. It carries nothing between steps."""

    def __init__(self, program: Program, step_args: tuple[Any, ...]):
        self.program, self.step_args = program, step_args
        self._train: Any = None

    def compile(self) -> None:
        if self._train is None:
            self._train = self.program.compile_train()

    def train(self, state: Any, host_batch: HostBatch) -> tuple[Any, dict[str, Any]]:
        self.compile()
        return self._train(state, sharding.global_batch(host_batch, self.program.mesh),
                           *self.step_args)

    def eval(self, params: Any, host_batch: HostBatch) -> dict[str, Any]:
        return self.program.eval_step(params, sharding.global_batch(host_batch,
                                                                    self.program.mesh),
                                      *self.step_args)

    def samples(self) -> list[str]:
        return []

    def host_state(self) -> dict[str, Any]:
        return {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        del state
