"""The wheel carries what an installed metrix-s2s needs at run time beside its Python modules:
the Lua scripts, the fake Metrix the demo runs, the type marker."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from metrix_s2s import redis_scripts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Given a copy of the project's own files (the build leaves nothing in the checkout)
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "metrix_s2s", src / "metrix_s2s", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    # When its wheel is built
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("metrix_s2s-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_every_lua_script(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for script in redis_scripts.FILES:
        assert f"metrix_s2s/lua/{script}.lua" in names
    assert not {n for n in names if n.endswith(".lua")} - {
        f"metrix_s2s/lua/{s}.lua" for s in redis_scripts.FILES
    }


def test_the_wheel_holds_the_fake_metrix_and_the_type_marker(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "metrix_s2s/testing/fake_metrix.py" in names
    assert "metrix_s2s/py.typed" in names
    assert "metrix_s2s/fakeserver.py" not in names


def test_the_wheel_holds_the_django_app_with_its_migration_and_command(
    wheel: zipfile.ZipFile,
) -> None:
    names = set(wheel.namelist())
    app = "metrix_s2s/contrib/django"
    for path in ("apps.py", "models.py", "migrations/__init__.py", "migrations/0001_initial.py",
                 "management/commands/metrix_s2s_relay.py", "tasks.py"):  # fmt: skip
        assert f"{app}/{path}" in names, path
    assert "metrix_s2s/contrib/sqlalchemy.py" in names
