import subprocess
import sys

CORE = ["ragserve.metis.profile", "ragserve.metis.llm_profiler", "ragserve.metis.rules", "ragserve.metis.cost",
        "ragserve.metis.scheduler", "ragserve.metis.feedback"]


def test_core_imports_without_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE)
            + "bad = sorted(m for m in ('torch', 'transformers', 'ragserve.engines.local') "
              "if m in sys.modules)\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serving_path_imports_nothing_from_eval():
    """Evaluation and training code stays off the serving path (and out of its import graph)."""
    code = ("import sys\nimport ragserve.runtime\nimport ragserve.metis.planner\nimport ragserve.metis.learned\n"
            "bad = sorted(m for m in sys.modules if m.startswith('ragserve.eval'))\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
