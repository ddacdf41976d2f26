"""`dynasparse bench`: kernels timed against the plain-PyTorch way, in the same run.

See `dynasparse.bench.harness` for the case registry, the timer and the command line.
"""
