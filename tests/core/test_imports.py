import subprocess
import sys

CORE = ["ragserve.profiler", "ragserve.planner", "ragserve.cost", "ragserve.scheduler",
        "ragserve.feedback"]


def test_core_imports_without_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE)
            + "bad = sorted(m for m in ('torch', 'transformers', 'ragserve.engines.local') "
              "if m in sys.modules)\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
