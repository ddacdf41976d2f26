"""Every Python code block of the README runs as written, in order, in one fresh process (a
reader's session: later blocks use what earlier ones defined), in an empty directory. The
names the README leaves to the reader (`model`, `batches`, `loss_fn`, ...) are given first."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# What the README's examples assume the reader has: a CNN with `conv1` and `fc` (the names
# they exclude from pruning), data, a loss, an IMP rewind step and an epoch's length.
READERS_NAMES = '''
import torch
from torch import nn
import dynasparse

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.hidden, self.fc = nn.Linear(16 * 8 * 8, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.hidden(x.flatten(1))))


model = Net()
x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
batches, loss_fn = [(x, y)] * 3, nn.CrossEntropyLoss()
k, steps_per_epoch = 2, 50
'''


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_the_readme_has_its_examples():
    assert len(python_blocks()) >= 6


def test_every_readme_code_block_runs_as_written(tmp_path):
    blocks = python_blocks()
    code = READERS_NAMES + "".join(f"{block}\nprint('README block {i} done', flush=True)\n"
                                   for i, block in enumerate(blocks))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    done = [int(i) for i in re.findall(r"README block (\d+) done", result.stdout)]
    assert result.returncode == 0, (f"README code block {len(done) + 1} of {len(blocks)} failed:\n"
                                    f"{result.stderr[-3000:]}")
    assert done == list(range(len(blocks)))
