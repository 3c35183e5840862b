"""The structure of the package: no import cycle, every import points down a layer."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
assert _spec is not None and _spec.loader is not None
check_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layers)


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return check_layers.graph(tmp_path)  # type: ignore[no-any-return]


def test_the_package_has_no_cycle_and_no_upward_import() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_layers.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no import cycle" in result.stdout


def test_a_lazy_import_cycle_is_found(tmp_path: Path) -> None:
    edges = _tree(tmp_path, {
        "__init__.py": "",
        "connection.py": "def close():\n    from . import groups\n",
        "groups/__init__.py": "from ..connection import close\n",
    })
    assert edges["connection"] == {"groups"}
    assert check_layers.cycles(edges) == [["connection", "groups"]]
    assert any("import cycle" in p for p in check_layers.problems(edges))


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    edges = _tree(tmp_path, {
        "__init__.py": "",
        "websocket.py": "",
        "transports/__init__.py": "",
        "transports/wsgi/__init__.py": "",
        "transports/wsgi/loan.py": "from ...websocket import attach\n",
    })
    found = check_layers.problems(edges)
    assert found == [
        "transports.wsgi.loan (transports) imports websocket (user API), a higher layer"
    ]


def test_every_public_module_declares_its_names() -> None:
    missing = []
    for path in sorted((ROOT / "src" / "dwebsocket").rglob("*.py")):
        name = check_layers.module_name(path)
        if any(part.startswith("_") for part in name.split(".") if part) or "management" in name:
            continue
        if "__all__" not in path.read_text():
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []


def test_no_file_keeps_a_merge_conflict_marker() -> None:
    # Every file git tracks here, docs and changelog included: a marker left by a
    # merge is a defect wherever it is.
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    markers = ("<<<<<<< ", ">>>>>>> ")
    found = []
    for name in listed.splitlines():
        path = ROOT / name
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith(markers):
                found.append(f"{name}:{number}")
    assert not found, f"merge conflict markers left in: {', '.join(found)}"
