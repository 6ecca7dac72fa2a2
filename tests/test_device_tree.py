"""benchmarks/device_tree.py: the pyvl tree that the device check's steps import, the checkout's Python laid out as
the wheel installs it, with a _C from a build or taken alone from a prebuilt wheel.

Each import check runs in ``python -S`` with the site-packages folders on PYTHONPATH: no .pth file is read, so a
developer's editable install (whose import hook runs before PYTHONPATH) cannot stand in for the tree."""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
TOOL = REPO / "benchmarks" / "device_tree.py"


def tree_python(tree: Path, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(tree), *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-S", *args], env=env, cwd=tree, capture_output=True, text=True, timeout=300
    )


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-S", str(TOOL), *args], capture_output=True, text=True, timeout=120
    )


def built_extension() -> Path:
    """The _C of the pyvl these tests run with (the test extra builds it)."""
    spec = importlib.util.find_spec("pyvl._C")
    if spec is None or spec.origin is None:
        pytest.fail("pyvl._C is not built: install pyvl (pip install -e '.[test]') before running the tests")
    return Path(spec.origin)


def test_the_assembled_tree_imports_our_kernels_without_any_extension(tmp_path):
    assert tool("assemble", str(REPO), str(tmp_path)).returncode == 0
    assert not list((tmp_path / "pyvl").glob("_C*.so")) and not list(tmp_path.rglob("__pycache__"))
    got = tree_python(
        tmp_path, "-c", "import pyvl, pyvl.kernels.vit_attention as k; print(pyvl.__file__, k.__file__)"
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == [
        str(tmp_path / "pyvl" / "__init__.py"),
        str(tmp_path / "pyvl" / "kernels" / "vit_attention.py"),
    ]
    check = tree_python(tmp_path, str(TOOL), "check", str(tmp_path), "--want", "none")
    assert check.returncode == 0 and "ALERT" not in check.stdout, check.stdout + check.stderr
    missing = tree_python(tmp_path, str(TOOL), "check", str(tmp_path), "--want", "cpu")
    assert missing.returncode != 0 and "no pyvl/_C*.so" in missing.stderr


def test_a_wheel_gives_its_extension_alone(tmp_path):
    so = built_extension()
    wheel = tmp_path / "pyvl-0.1.0-cp3-cp3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(so, f"pyvl/{so.name}")
        z.writestr("pyvl/__init__.py", "raise ImportError('a stale wheel file')\n")
    tree = tmp_path / "tree"
    assert tool("assemble", str(REPO), str(tree)).returncode == 0
    got = tool("extension", str(tree), str(wheel))
    assert got.returncode == 0, got.stderr
    assert (tree / "pyvl" / so.name).read_bytes() == so.read_bytes()
    assert (tree / "pyvl" / "__init__.py").read_text() == (REPO / "pyvl" / "__init__.py").read_text()
    check = tree_python(tree, str(TOOL), "check", str(tree), "--want", "cpu")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{so.name} loads" in check.stdout


def test_check_refuses_a_pyvl_imported_from_elsewhere(tmp_path):
    tree, other = tmp_path / "tree", tmp_path / "other"
    for folder in (tree, other):
        assert tool("assemble", str(REPO), str(folder)).returncode == 0
    env_path = os.pathsep.join([str(other), str(tree)])  # the other tree comes first, as a shadowing install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([env_path, *site.getsitepackages()])}
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, "-S", str(TOOL), "check", str(tree), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    refused = run()
    assert refused.returncode != 0 and "not from the tree" in refused.stderr
    allowed = run("--allow-shadowed")
    assert allowed.returncode == 0 and allowed.stdout.splitlines()[-1].startswith(
        "ALERT: pyvl is imported from"
    )


def test_missing_dependencies_travel_as_wheels_and_are_unpacked_into_the_tree(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "pyvldeptest-1.0-cp312-cp312-manylinux_2_17_x86_64.whl", "w") as z:
        z.writestr("pyvldeptest/__init__.py", "VALUE = 42\n")
        z.writestr("pyvldeptest-1.0.dist-info/METADATA", "Name: pyvldeptest\n")
    with zipfile.ZipFile(wheels / "json-1.0-py3-none-any.whl", "w") as z:  # importable already: left alone
        z.writestr("json/__init__.py", "raise ImportError('shadowing the standard library')\n")
    (wheels / "pyvl-0.1.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"")  # pyvl's own: the build step's
    tree = tmp_path / "tree"
    tree.mkdir()
    got = tool("dependencies", str(tree), str(wheels))
    assert got.returncode == 0, got.stderr
    assert "pyvldeptest-1.0" in got.stdout and "json-1.0" not in got.stdout
    assert (tree / "pyvldeptest" / "__init__.py").is_file() and not (tree / "json").exists()
    imported = tree_python(tree, "-c", "import pyvldeptest; print(pyvldeptest.VALUE)")
    assert imported.stdout.strip() == "42", imported.stderr
