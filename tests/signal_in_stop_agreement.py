"""`python signal_in_stop_agreement.py N train.py <overrides>` under mlx.launch: train.py where rank 0 alone gets a
SIGTERM while it waits in the N-th collective in which the ranks agree on stopping (as from `kill` or a scheduler); rank 0
then writes the stopped run's records slowly (1 s, as on a slow disk)."""
import os
import runpy
import signal
import sys
import time
import types

import mlx.core as mx

from mlxgpt import interrupt, task

if __name__ == "__main__":
    at, script = int(sys.argv[1]), sys.argv[2]
    calls = []

    def all_sum_then_sigterm(x, group):
        calls.append(x)
        if len(calls) == at and group.rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before this rank's answer is read
        return mx.distributed.all_sum(x, group=group)

    write_failure = task._write_failure

    def slow_write_failure(run_dir, result):
        time.sleep(1.0 if mx.distributed.init().rank() == 0 else 0.0)
        write_failure(run_dir, result)

    task._write_failure = slow_write_failure
    distributed = types.SimpleNamespace(all_sum=all_sum_then_sigterm, init=mx.distributed.init)
    interrupt.mx = types.SimpleNamespace(array=mx.array, eval=mx.eval, distributed=distributed)  # interrupt.py's only
    sys.argv = sys.argv[2:]  # the script sees its own command line (and names itself in resume commands)
    runpy.run_path(script, run_name="__main__")
