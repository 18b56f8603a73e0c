"""`python evaluate_blimp.py MODEL [MORE_MODELS...] --data DIR ...`: the same as `afgpt eval-blimp` (see its --help)."""
import sys

from afgpt.cli import main

if __name__ == "__main__":
    main(["eval-blimp", *sys.argv[1:]])
