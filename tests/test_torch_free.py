"""`import dmf_deploy.runtime` (and the torch-free core modules) must work where torch is absent.

The subprocess sees a fake `torch` package first on PYTHONPATH whose import raises ImportError, so any
import of torch (direct, or through torchvision/torchdiffeq) fails as on a machine without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TORCH_FREE = [
    "dmf_deploy",
    "dmf_deploy.config",
    "dmf_deploy.atomic",
    "dmf_deploy.names",
    "dmf_deploy.manifest",
    "dmf_deploy.preprocess",
    "dmf_deploy.packaged",
    "dmf_deploy.tensorrt_support",
    "dmf_deploy.runtime",
    "dmf_deploy.runtime.backends",
    "dmf_deploy.runtime.explain",
    "dmf_deploy.runtime.app.loop",
    "dmf_deploy.runtime.app.cli",  # dmf-run
    "dmf_deploy.runtime.app.web.console",  # dmf-run --web
    "dmf_deploy.runtime.app.web.webhook",  # dmf-run --webhook
    "dmf_deploy.runtime.tools.demo",  # dmf-demo
    "dmf_deploy.runtime.tools.bench",  # dmf-bench
    "dmf_deploy.runtime.tools.explain_cli",  # dmf-explain
    "dmf_deploy.runtime.serve.remote",
    "dmf_deploy.runtime.serve.server",  # dmf-serve
    "dmf_deploy.runtime.serve.key",
    # the module paths from before app/, serve/ and tools/, kept for compatibility
    "dmf_deploy.runtime.app",
    "dmf_deploy.runtime.serve",
    "dmf_deploy.runtime.remote",
    "dmf_deploy.runtime.bench",
    "dmf_deploy.runtime.demo",
    "dmf_deploy.runtime.explain_cli",
]

PROBE = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    report = {"errors": {}}
    try:
        import torch  # noqa: F401
        report["torch_blocked"] = False
    except ImportError:
        report["torch_blocked"] = True
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except BaseException:
            report["errors"][name] = traceback.format_exc()
    try:  # the lazy torch-backed API must fail only when asked for, and then clearly
        import dmf_deploy
        dmf_deploy.load_checkpoint
        report["lazy"] = "loaded"
    except ImportError as exc:
        report["lazy"] = "ImportError: " + str(exc)
    report["leaked"] = sorted(m for m in ("torch", "torchvision", "torchdiffeq") if m in sys.modules)
    print(json.dumps(report))
    """
)


@pytest.fixture
def no_torch_env(tmp_path):
    fake = tmp_path / "blocker" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("torch is not installed (blocked by the test)")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake.parent), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONSTARTUP", None)
    return env


def test_runtime_imports_without_torch(tmp_path, no_torch_env):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *TORCH_FREE],
        cwd=tmp_path,  # not the repository root, which would shadow the editable package mapping
        env=no_torch_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch_blocked"], "the fake torch package did not shadow the real one"
    assert not report["errors"], "\n".join(f"{k}:\n{v}" for k, v in report["errors"].items())
    assert report["leaked"] == [], f"modules left in sys.modules: {report['leaked']}"
    # dmf_deploy.load_checkpoint needs torch: without it, a plain ImportError at first use.
    assert report["lazy"].startswith("ImportError"), report["lazy"]
