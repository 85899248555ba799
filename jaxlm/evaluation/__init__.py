"""Evaluation of jaxlm models: the scoring engine, built-in offline tasks, the lm-evaluation-harness
backend, reward-model win rates and result files.
`python -m jaxlm.tools.eval` is the command line."""
