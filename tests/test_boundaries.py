"""House rules that keep the library light: no ray / optuna / mlflow on `import comic, comic.engine`."""

from __future__ import annotations

import subprocess
import sys

HEAVY = {"ray", "optuna", "mlflow"}


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(','.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.strip().split(","))


def test_core_import_leaves_orchestration_out():
    loaded = _loaded_after("import comic, comic.engine, comic.session, comic.tracking, comic.methods, comic.tune, "
                           "comic.sweep, comic.ablation, comic.ablation_cli")
    assert "torch" in loaded  # the check is live: the engine did import its own dependencies
    assert HEAVY.isdisjoint(loaded), HEAVY & loaded
