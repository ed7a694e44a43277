"""`tinylm sweep`: a grid or random search over config values, one normal run per point.

plan.py    the sweep's points, budgets, run names and its manifest (sweep.json)
runner.py  runs them one after another or K at once, resumably, abandoning diverging runs
report.py  the final table (sorted by best validation loss) and the comparison plot
cli.py     the `tinylm sweep` command
"""
