"""`python ctrl_c_in_evaluation.py N train.py <overrides>`: train.py with a Ctrl-C arriving in the middle of the
evaluation at iteration N (after its first validation batch)."""
import os
import runpy
import signal
import sys

from mlxgpt.trainer import Trainer

if __name__ == "__main__":
    at, script = int(sys.argv[1]), sys.argv[2]
    batch, sent = Trainer.batch, []

    def batch_then_ctrl_c(trainer, split, key):
        if split == "val" and trainer.iter == at and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return batch(trainer, split, key)

    Trainer.batch = batch_then_ctrl_c
    sys.argv = sys.argv[2:]  # the script sees its own command line (and names itself in resume commands)
    runpy.run_path(script, run_name="__main__")
