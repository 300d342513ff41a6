"""Coverage-guided fuzzing of bnpy's calls with atheris (where it installs):
the programs of test_fuzz_calls, with atheris choosing the bytes hypothesis
turns into a program, so that inputs reaching new branches of bnpy's Python
code are kept and mutated. Every check of test_fuzz_calls holds after every
call; a failed check, an undocumented exception or a crash stops the run.

    python tests/fuzz/atheris_calls.py -max_total_time=60 -rss_limit_mb=4096
"""

import os
import sys
import warnings

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# instrumented: the branches of bnpy's Python code and of the program
# generator guide the fuzzer
with atheris.instrument_imports(include=["bnpy", "test_fuzz_calls"]):
    import test_fuzz_calls

    import bnpy  # noqa: F401

warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)


def main():
    atheris.Setup(sys.argv, test_fuzz_calls._random_batch.hypothesis.fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
