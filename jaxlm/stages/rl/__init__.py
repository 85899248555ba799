"""Reinforcement learning pieces shared by the grpo, ppo and rejection stages: tasks and their
rewards, prompt batches, rollouts, advantages and policy objectives (docs/rl.md)."""
