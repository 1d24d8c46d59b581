"""Compare runs: `python compare.py <sweep dir or run dirs...> [--out DIR]` writes a table and plots. See README.md."""
from mlxgpt.compare import main

if __name__ == "__main__":
    main()
