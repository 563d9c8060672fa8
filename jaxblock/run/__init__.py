"""Runs: wiring from a config to a model, data, an algorithm and an exchange; entry points for
`scripts/` (`experiment.train`, `serve`, `client`, `evaluate_run`, `export_hf`); checkpoints,
timelines, evaluation, the bundled task, plans and the paper's tables. The only layer that reads
config files and writes workdirs.
"""
