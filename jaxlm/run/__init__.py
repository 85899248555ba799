"""A run: its config, the program builder, the train state, the loop, checkpoints and logs.

  config        the run config: every section's defaults and checks, assembled
  program       `build(config, mesh) -> Program`: model, optimizer, shardings, jitted steps
  train_state   `TrainState`, its shardings, `gradient_step`
  optim         the AdamW chain and warmup-cosine schedule
  trainer       the one loop every stage runs through
  checkpoint    atomic orbax checkpoints of a run it writes
  workdir_lock, step_health, counters, metrics, console, errors: the loop's guards and outputs
"""
