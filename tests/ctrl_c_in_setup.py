"""`python ctrl_c_in_setup.py N train.py <overrides>`: train.py with a Ctrl-C arriving while its job number N (from 0)
reads its data, before the training loop and its signal handler."""
import itertools
import os
import runpy
import signal
import sys

import mlxgpt.task as task

if __name__ == "__main__":
    at, script = int(sys.argv[1]), sys.argv[2]
    load, jobs = task.load_data, itertools.count()
    task.load_data = lambda cfg: (next(jobs) == at and os.kill(os.getpid(), signal.SIGINT), load(cfg))[1]
    sys.argv = sys.argv[2:]  # the script sees its own command line (and names itself in resume commands)
    runpy.run_path(script, run_name="__main__")
