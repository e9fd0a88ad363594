"""The runtime needs no compiler: an artifact loads and runs in a process where every compiler module of
qcompile (and the compiler's own dependencies: onnx-ir, onnxscript, scipy) cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCKED = (
    "qcompile.api",
    "qcompile.cli",
    "qcompile.flow",
    "qcompile.frontend",
    "qcompile.passes",
    "qcompile.search",
    "qcompile.hwmodels",
    "qcompile.backends",
    "qcompile.calibration",
    "qcompile.execution",
    "qcompile.graph",
    "onnx_ir",
    "onnxscript",
    "scipy",
)

SCRIPT = """
import importlib.abc, json, sys
import numpy as np

BLOCKED = {blocked!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == blocked or name.startswith(blocked + ".") for blocked in BLOCKED):
            raise ImportError(f"{{name}} is blocked: the runtime must not need it")
        return None

sys.meta_path.insert(0, Blocker())
import qcompile.runtime

folder = {folder!r}
results = {{}}
for executor in ("onnxruntime", "onnxruntime-fp32", "tvm"):
    session = qcompile.runtime.load(folder, executor)
    outputs = session.run(session.random_feeds())
    results[executor] = {{name: list(value.shape) for name, value in outputs.items()}}
loaded = sorted(name for name in sys.modules if name.startswith("qcompile"))
print(json.dumps({{"results": results, "loaded": loaded}}))
"""


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)


def test_artifact_runs_with_the_compiler_blocked(artifact: Path) -> None:
    """The digits artifact (onnxruntime, fp32 and its TVM library) runs with only the runtime importable."""
    completed = _run(SCRIPT.format(blocked=BLOCKED, folder=str(artifact)))
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(report["results"]) == {"onnxruntime", "onnxruntime-fp32", "tvm"}
    assert all(shapes == {"logits": [1, 10]} for shapes in report["results"].values()), report["results"]
    loaded = report["loaded"]
    assert all(name.startswith(("qcompile.runtime", "qcompile.errors")) or name == "qcompile" for name in loaded)


def test_the_blocker_blocks(artifact: Path) -> None:
    """The same script fails when it imports a blocked module, so the test above can fail."""
    script = SCRIPT.format(blocked=BLOCKED, folder=str(artifact)).replace(
        "import qcompile.runtime\n", "import qcompile.runtime\nimport qcompile.flow.compile\n"
    )
    completed = _run(script)
    assert completed.returncode != 0 and "qcompile.flow is blocked" in completed.stderr
