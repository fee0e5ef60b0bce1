"""The deep suite: `python -m pytest -q tests/`. It tests this repository's train.py with inputs
it builds itself, through the command line and in this process."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # train.py, bench.py


# The same guard as the user's test.py, from there: one definition of "tests never touch the
# network". (Loaded by path: "test" as a module name is the standard library's test package.)
_spec = importlib.util.spec_from_file_location("user_smoke_checks", ROOT / "test.py")
_user_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_user_checks)
no_network = _user_checks.no_network
