"""`python slow_rank0_records.py [N] train.py <overrides>` under mlx.launch: train.py where rank 0 writes a stopped or
failed run's records slowly (1 s, as on a slow disk); with N, rank 0 alone also gets a SIGTERM while it waits in the
N-th collective in which the ranks agree on stopping (as from `kill` or a scheduler)."""
import os
import runpy
import signal
import sys
import time
import types

import mlx.core as mx

from mlxgpt import interrupt, task

if __name__ == "__main__":
    at = int(sys.argv.pop(1)) if sys.argv[1].isdigit() else None
    write_failure, calls = task._write_failure, []

    def slow_write_failure(run_dir, result):
        time.sleep(1.0 if mx.distributed.init().rank() == 0 else 0.0)
        write_failure(run_dir, result)

    def all_sum_then_sigterm(x, group):
        calls.append(x)
        if len(calls) == at and group.rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before this rank's answer is read
        return mx.distributed.all_sum(x, group=group)

    task._write_failure = slow_write_failure
    distributed = types.SimpleNamespace(all_sum=all_sum_then_sigterm, init=mx.distributed.init)
    interrupt.mx = types.SimpleNamespace(array=mx.array, eval=mx.eval, distributed=distributed)  # interrupt.py's only
    sys.argv = sys.argv[1:]  # the script sees its own command line (and names itself in resume commands)
    runpy.run_path(sys.argv[0], run_name="__main__")
