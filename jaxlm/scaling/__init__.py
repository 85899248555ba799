"""Scaling-law tooling: parameter and FLOP counts (`flops`), the Chinchilla model family
(`chinchilla`) and Chinchilla-style fits (`fit`). Sweeps run through `jaxlm.tools.sweep`."""
