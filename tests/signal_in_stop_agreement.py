"""`python signal_in_stop_agreement.py N train.py <overrides>` under mlx.launch: train.py where rank 0 alone gets a
SIGTERM while it waits in the N-th collective in which the ranks agree on stopping (as from `kill` or a scheduler)."""
import os
import runpy
import signal
import sys
import types

import mlx.core as mx

from mlxgpt import interrupt

if __name__ == "__main__":
    at, script = int(sys.argv[1]), sys.argv[2]
    calls = []

    def all_sum_then_sigterm(x, group):
        calls.append(x)
        if len(calls) == at and group.rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before this rank's answer is read
        return mx.distributed.all_sum(x, group=group)

    distributed = types.SimpleNamespace(all_sum=all_sum_then_sigterm)
    interrupt.mx = types.SimpleNamespace(array=mx.array, distributed=distributed)  # only the stop agreement's
    sys.argv = sys.argv[2:]  # the script sees its own command line (and names itself in resume commands)
    runpy.run_path(script, run_name="__main__")
