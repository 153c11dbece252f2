"""runtime/'s folders: the core imports none of app/, serve/ and tools/, and the module paths from before
those folders existed (console-script targets, `dmf_deploy.runtime.remote`) still give the same objects."""

from __future__ import annotations

import ast
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import dmf_deploy.runtime

RUNTIME = Path(dmf_deploy.runtime.__file__).parent
SUBPACKAGES = ("app", "serve", "tools")

# pyproject.toml's [project.scripts] before the regrouping: installed scripts and `pip install -e`
# metadata made then still name these.
OLD_SCRIPT_TARGETS = {
    "dmf-run": ("dmf_deploy.runtime.app:main", "dmf_deploy.runtime.app.cli:main"),
    "dmf-bench": ("dmf_deploy.runtime.bench:main", "dmf_deploy.runtime.tools.bench:main"),
    "dmf-demo": ("dmf_deploy.runtime.demo:main", "dmf_deploy.runtime.tools.demo:main"),
    "dmf-explain": ("dmf_deploy.runtime.explain_cli:main", "dmf_deploy.runtime.tools.explain_cli:main"),
    "dmf-serve": ("dmf_deploy.runtime.serve:main", "dmf_deploy.runtime.serve.server:main"),
}


def runtime_imports(path: Path) -> set[str]:
    """The dmf_deploy.runtime subpackages (app, serve, tools) a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["dmf_deploy", "runtime"] and len(parts) > 2 and parts[2] in SUBPACKAGES:
                found.add(parts[2])
    return found


def test_the_core_imports_no_subpackage_and_app_and_serve_stay_apart() -> None:
    shims = {"remote.py", "bench.py", "demo.py", "explain_cli.py"}  # the old paths, re-exporting
    core = [p for p in RUNTIME.glob("*.py") if p.name not in shims]
    assert {p.name for p in core} >= {"recognizer.py", "gallery.py", "backends.py", "__init__.py"}
    assert {p.name: runtime_imports(p) for p in core} == {p.name: set() for p in core}
    for path in (RUNTIME / "app").glob("*.py"):
        assert "serve" not in runtime_imports(path), path
    for path in (RUNTIME / "serve").glob("*.py"):
        assert "app" not in runtime_imports(path), path


@pytest.mark.parametrize("script", sorted(OLD_SCRIPT_TARGETS))
def test_old_console_script_targets_resolve_to_the_new_commands(script: str) -> None:
    old, new = OLD_SCRIPT_TARGETS[script]
    load = EntryPoint(name=script, value=old, group="console_scripts").load
    assert load() is EntryPoint(name=script, value=new, group="console_scripts").load()


def test_old_module_paths_re_export_the_same_objects() -> None:
    from dmf_deploy.runtime import app, remote, serve
    from dmf_deploy.runtime.app import cli
    from dmf_deploy.runtime.serve import remote as new_remote
    from dmf_deploy.runtime.serve import server

    assert remote.RemoteRecognizer is new_remote.RemoteRecognizer  # README's client, before the move
    assert remote.RemoteError is new_remote.RemoteError
    for name in app.__all__:
        assert getattr(app, name) is getattr(cli, name), name
    for name in serve.__all__:
        assert getattr(serve, name) is getattr(server, name), name
