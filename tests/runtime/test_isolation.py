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
from qcompile.runtime import tvm_runtime
alone, torch = tvm_runtime.runtime_only(), "torch" in sys.modules
print(json.dumps({{"results": results, "loaded": loaded, "runtime_only": alone, "torch": torch}}))
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
    # TVM's runtime library alone (not its 260 MB compiler), and not torch, which TVM's FFI imports when it can
    assert report["runtime_only"] and not report["torch"]


def test_compiling_after_the_runtime_loaded_tvm_alone_is_a_clear_error(artifact: Path) -> None:
    """TVM cannot load its compiler once its runtime was loaded alone: the compiler side says so and how to avoid
    it, instead of failing deep inside TVM; torch still imports afterwards."""
    script = (
        "import qcompile.runtime, sys\n"
        f"qcompile.runtime.load({str(artifact)!r}, 'tvm')\n"
        "import torch\n"
        "from qcompile.errors import QCompileError\n"
        "try:\n"
        "    import qcompile.backends.tvm\n"
        "except QCompileError as error:\n"
        "    print('refused:', error)\n"
    )
    completed = _run(script)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "refused: this process loaded TVM's runtime alone" in completed.stdout
    assert "import qcompile.api before loading any artifact" in completed.stdout


def test_the_blocker_blocks(artifact: Path) -> None:
    """The same script fails when it imports a blocked module, so the test above can fail."""
    script = SCRIPT.format(blocked=BLOCKED, folder=str(artifact)).replace(
        "import qcompile.runtime\n", "import qcompile.runtime\nimport qcompile.flow.compile\n"
    )
    completed = _run(script)
    assert completed.returncode != 0 and "qcompile.flow is blocked" in completed.stderr
