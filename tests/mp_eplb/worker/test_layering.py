"""The layering rule visible from the tree: ``mp_eplb/worker/`` never imports ``mp_eplb/engine/``,
and the subprocess entry ``mp_eplb.worker.boot`` loads without torch (checked in a fresh
interpreter each, since this one has imported everything)."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import mp_eplb.worker

ROOT = Path(__file__).resolve().parents[3]
WORKER_MODULES = sorted(f"mp_eplb.worker.{m.name}" for m in pkgutil.iter_modules(mp_eplb.worker.__path__))


def _loaded_after(imports: list[str]) -> list[str]:
    """Modules loaded by a fresh interpreter after importing ``imports``."""
    code = ("import importlib, json, sys\n"
            f"for name in {imports!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env, timeout=120)
    return json.loads(out.stdout)


def test_worker_modules_are_all_checked() -> None:
    assert {"mp_eplb.worker.boot", "mp_eplb.worker.logic", "mp_eplb.worker.loop",
            "mp_eplb.worker.main", "mp_eplb.worker.failpoints"} <= set(WORKER_MODULES)


def test_worker_never_imports_engine() -> None:
    loaded = _loaded_after(WORKER_MODULES)
    assert "mp_eplb.worker.logic" in loaded
    assert [m for m in loaded if m == "mp_eplb.engine" or m.startswith("mp_eplb.engine.")] == []


def test_boot_loads_without_torch() -> None:
    loaded = _loaded_after(["mp_eplb.worker.boot"])
    assert "mp_eplb.worker.boot" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "numpy", "zmq", "msgpack")]
    assert heavy == []
