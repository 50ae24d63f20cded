"""Run the Triton kernels on CPU under the Triton interpreter, whatever else shares this pytest process.

TRITON_INTERPRET=1 only takes effect if it is set before `triton` is first imported (triton's own
`tl.*` helpers are jit functions made at its import). So:

1. Importing this conftest sets it when CUDA is absent and triton is not imported yet — the usual
   case, since importing `spindle_kernels` never imports triton. The interpreter tests then run here.
2. If triton was already imported in compiled mode (another test imported it first, or we are on a
   CUDA machine and the compiled kernels are wanted for the `gpu` tests), every test marked
   `triton_interpreter` is run once more in ONE child pytest with the variable set; each of them
   passes or fails here with its twin's outcome (and the child's failure text).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

_CHILD_REPORT_ENV = "SPINDLE_KERNEL_TESTS_REPORT"  # set in the child: where to write its outcomes

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


def interpreter_active() -> bool:
    """Whether Triton kernels launched in this process run in the interpreter."""
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET") == "1"
    import triton.language.standard as standard

    return type(standard.zeros).__name__ == "InterpretedFunction"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "triton_interpreter: runs Triton kernels on CPU tensors (interpreter)")


# ---- child side: record outcomes ------------------------------------------------------------------

_child_outcomes: dict[str, dict[str, str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get(_CHILD_REPORT_ENV) is None:
        return
    if report.failed or (report.when == "call" and report.nodeid not in _child_outcomes):
        _child_outcomes[report.nodeid] = {"outcome": report.outcome, "text": report.longreprtext}
    elif report.skipped:
        _child_outcomes[report.nodeid] = {"outcome": "skipped", "text": report.longreprtext}


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(_CHILD_REPORT_ENV)
    if path is not None:
        Path(path).write_text(json.dumps(_child_outcomes))


# ---- parent side: delegate interpreter tests to the child when this process cannot interpret ------


class _Delegated:
    """Runs the interpreter tests of this session in one child process, the first time one is needed."""

    def __init__(self, config: pytest.Config, nodeids: list[str]) -> None:
        self.config = config
        self.nodeids = nodeids
        self.outcomes: dict[str, dict[str, str]] | None = None
        self.output = ""

    def outcome(self, nodeid: str) -> dict[str, str]:
        if self.outcomes is None:
            self._run()
        assert self.outcomes is not None
        return self.outcomes.get(nodeid, {"outcome": "missing", "text": self.output[-4000:]})

    def _run(self) -> None:
        if os.environ.get(_CHILD_REPORT_ENV) is not None:
            raise RuntimeError("the interpreter child could not enable TRITON_INTERPRET; is triton preloaded?")
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "outcomes.json"
            env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **{_CHILD_REPORT_ENV: str(report)})
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *self.nodeids],
                cwd=self.config.rootpath,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            self.output = proc.stdout + proc.stderr
            self.outcomes = json.loads(report.read_text()) if report.exists() else {}


_delegated: _Delegated | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _delegated
    if interpreter_active():
        return
    nodeids = [item.nodeid for item in items if item.get_closest_marker("triton_interpreter")]
    if nodeids:
        _delegated = _Delegated(config, nodeids)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if _delegated is None or pyfuncitem.get_closest_marker("triton_interpreter") is None:
        return None
    result = _delegated.outcome(pyfuncitem.nodeid)
    if result["outcome"] == "skipped":
        pytest.skip(f"skipped in the interpreter child: {result['text'][-500:]}")
    if result["outcome"] != "passed":
        pytest.fail(f"failed in the TRITON_INTERPRET=1 child process:\n{result['text']}", pytrace=False)
    return True  # ran (and passed) in the child
