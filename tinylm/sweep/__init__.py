"""`tinylm sweep`: an Optuna study over config values, one normal run per trial.

space.py   axes from overrides (log/uniform/int ranges, choices, comma grids)
plan.py    the sweep's identity, per-trial budgets and overrides, run names, sweep.json
study.py   the Optuna study: claiming trials, adopting a killed sweep's trials, reporting
runner.py  trials as child `tinylm train` processes (K at once), pruning, divergence
report.py  the table sorted by best bits/byte, best.yaml, curves and Optuna's plots
cli.py     the `tinylm sweep` command
"""
