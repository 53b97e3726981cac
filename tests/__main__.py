"""The test command:  python3 -m tests [extra pytest arguments]

Run from the repository root with any Python 3.10+.  Prepares .venv with run.py's installer (the "app"
and "test" groups of packages.jsonc; nothing is installed again while packages.jsonc is unchanged), then
runs pytest on tests/ inside .venv and exits with pytest's code.  "No tests collected" counts as a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600          # per test (pytest-timeout); a test may ask for more with @pytest.mark.timeout(...)
# Test files run in parallel worker processes (pytest-xdist), one per core up to this many: each test uses one
# torch thread (tests/conftest.py), and a file stays in one worker so that its module fixtures are built once.
MAX_WORKERS = 4


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import run

    try:
        py = run.ensure_environment(groups=("app", "test"))
    except run.InstallError as e:
        print(f"\nERROR: {e}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nInstallation interrupted.  Run `python3 -m tests` again to continue.", flush=True)
        return 130
    # Test paths given on the command line replace the default (the whole tests/ folder).
    names_paths = any(not a.startswith("-") and (ROOT / a.split("::")[0]).exists() for a in argv)
    workers = min(MAX_WORKERS, os.cpu_count() or 1)
    parallel = [] if workers < 2 or any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in argv) \
        else ["-n", str(workers), "--dist", "loadfile"]
    cmd = [str(py), "-m", "pytest", "-q", f"--timeout={TIMEOUT_S}", "--rootdir", str(ROOT), *parallel,
           *([] if names_paths else [str(ROOT / "tests")]), *argv]
    print("Running: " + " ".join(cmd), flush=True)
    try:
        rc = subprocess.call(cmd, cwd=str(ROOT))
    except KeyboardInterrupt:
        return 130
    if rc == 5:
        print("ERROR: pytest collected no tests.", flush=True)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
