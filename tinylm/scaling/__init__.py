"""`tinylm scaling`: loss-vs-compute laws fitted to a sweep's runs.

fit.py   the laws (Chinchilla L(N, D) and L(C)), least-squares fits in numpy, compute-optimal size
cli.py   the `tinylm scaling` command: runs -> points, fit, prediction, plot
"""
