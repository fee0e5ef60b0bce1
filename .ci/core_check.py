"""Is train.py's core path self-contained? The core is every line above the first optional block
(the first "# ===..." line that says "Optional"). Every global name a function there reads must be
defined there (or be a builtin), except the optional blocks' entry points below: the seams'
defaults. The run note and the live view are reached through extra(name), so they never appear.

    python .ci/core_check.py
"""

import builtins
import re
import symtable
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"table_data", "table_predict_inputs", "classification_objective",
                "regression_objective"}


def globals_read(table: symtable.SymbolTable) -> set[str]:
    names = {s.get_name() for s in table.get_symbols() if s.is_referenced() and s.is_global()}
    for child in table.get_children():
        names |= globals_read(child)
    return names


def main() -> None:
    source = (REPO / "train.py").read_text()
    first = re.search(r"^# =+ .*\n# Optional", source, re.M)
    if not first:
        sys.exit("train.py has no optional block: nothing marks where the core path ends")
    core = source[:first.start()]
    module = symtable.symtable(core, "core", "exec")
    defined = {s.get_name() for s in module.get_symbols() if s.is_assigned() or s.is_imported()}
    known = defined | set(dir(builtins)) | ENTRY_POINTS | {"__file__"}
    missing = globals_read(module) - known
    lines = core.count("\n")
    if missing:
        sys.exit(f"the core path ({lines} lines) calls what lives below it: "
                 f"{', '.join(sorted(missing))}")
    print(f"the core path is self-contained: {lines} lines, its only calls below it the entry "
          f"points {', '.join(sorted(ENTRY_POINTS))}")


if __name__ == "__main__":
    main()
