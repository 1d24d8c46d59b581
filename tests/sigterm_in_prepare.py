"""`python sigterm_in_prepare.py train.py <overrides>`: train.py with a SIGTERM arriving while it tokenizes its text
(as a scheduler's time limit or `kill` would)."""
import importlib
import os
import runpy
import signal
import sys

prepare = importlib.import_module("mlxgpt.data.prepare")  # the module (mlxgpt.data.prepare is also a function's name)

if __name__ == "__main__":
    tokenize = prepare._tokenize_text

    def sigterm_then_tokenize(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return tokenize(*args)

    prepare._tokenize_text = sigterm_then_tokenize
    sys.argv = sys.argv[1:]  # the script sees its own command line (and names itself in resume commands)
    runpy.run_path(sys.argv[0], run_name="__main__")
