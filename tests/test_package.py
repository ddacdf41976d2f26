"""The public surface: what `import dynasparse` alone makes reachable (in a fresh process, so
that no other test's imports hide a missing one)."""

import subprocess
import sys


def test_import_dynasparse_exposes_every_layer():
    code = ("import dynasparse\n"
            "assert dynasparse.optim.SGD and dynasparse.optim.AdamW\n"
            "assert dynasparse.pruning.DPF\n"
            "assert dynasparse.nn.SparseLinear is dynasparse.SparseLinear\n"
            "assert dynasparse.nn.SparseTransposedLinear is dynasparse.SparseTransposedLinear\n"
            "for name in dynasparse.__all__: getattr(dynasparse, name)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
