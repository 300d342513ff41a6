"""Run tests/valgrind_entry_points.py under valgrind and judge bnpy alone.

    python tests/valgrind_check.py

CPython and the dynamic loader have valgrind reports of their own (the
loader's strncmp, the interpreter's small-int cache, NumPy's start-up
allocations); this keeps only what involves bnpy: any error with a frame in
bnpy's extension (invalid reads or writes, uses of uninitialised values) and
any block definitely lost that bnpy allocated. Exit status 1 when there is one.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HERE = Path(__file__).parent
BNPY_OBJECT = "bnpy/_core"  # the extension module's file, installed or built in place


def frames(error):
    for frame in error.iter("frame"):
        yield (frame.findtext("obj") or "", frame.findtext("fn") or "")


def involves_bnpy(error):
    return any(BNPY_OBJECT in obj for obj, _ in frames(error))


def describe(error):
    lines = [
        error.findtext("kind")
        + ": "
        + (error.findtext("what") or error.findtext("xwhat/text") or "")
    ]
    lines += [f"    {fn or '?'}  ({obj})" for obj, fn in frames(error)][:12]
    return "\n".join(lines)


def main():
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "valgrind.xml"
        env = {**os.environ, "PYTHONMALLOC": "malloc", "BNPY_NUM_THREADS": "1"}
        run = subprocess.run(
            [
                "valgrind",
                "--xml=yes",
                f"--xml-file={xml}",
                "--leak-check=full",
                "--show-leak-kinds=definite",
                sys.executable,
                str(HERE / "valgrind_entry_points.py"),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        print(run.stdout, end="")
        if run.returncode != 0 or "done" not in run.stdout:
            print(run.stderr[-3000:], file=sys.stderr)
            print(
                f"the entry-point script failed under valgrind ({run.returncode})", file=sys.stderr
            )
            return 1
        errors = ElementTree.parse(xml).getroot().findall("error")
    ours = [e for e in errors if involves_bnpy(e)]
    others = len(errors) - len(ours)
    for error in ours:
        print(describe(error), file=sys.stderr)
    print(
        f"valgrind: {len(ours)} report(s) involving bnpy "
        f"({others} elsewhere: CPython, NumPy, the loader)"
    )
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
