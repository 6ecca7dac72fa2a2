"""The build and the wheel: pyvl._C links no libtorch, carries CUDA when CI has nvcc, and a wheel installs and imports.

PYVL_EXPECT_CUDA=1 (set by .ci/run when nvcc is on PATH) makes a CPU-only _C a failure; 0 makes a CUDA _C one.
The wheel test builds from this checkout into a temporary directory (nothing is written to the source tree).
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import pyvl.ops.native  # noqa: F401  (first: its ImportError explains a missing or shadowed build)
from pyvl import _C

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"^lib(torch|c10|cudart)")  # cudart is linked statically, torch not at all


def _dependency_dirs() -> list[str]:
    """The sys.path folders this environment imports pyvl's dependencies from (a venv, conda or bare Python)."""
    dirs = [
        Path(importlib.import_module(m).__file__).resolve().parents[1]
        for m in ("torch", "numpy", "PIL", "safetensors", "sentencepiece")
    ]
    return [str(d) for d in dict.fromkeys(dirs)]


def needed_libraries(so: str) -> list[str]:
    """Shared libraries `so` names as dependencies (readelf NEEDED entries, else ldd)."""
    if shutil.which("readelf"):
        text = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", text)
    if shutil.which("ldd"):
        text = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
        return [line.split()[0] for line in text.splitlines() if line.strip()]
    pytest.skip("neither readelf nor ldd is available")


def test_extension_links_no_libtorch():
    libs = needed_libraries(_C.__file__)
    assert libs, f"no dependencies parsed for {_C.__file__}"
    assert not [lib for lib in libs if FORBIDDEN.match(lib)], f"{_C.__file__} links {libs}"


def test_cuda_compiled_when_expected():
    expect = os.environ.get("PYVL_EXPECT_CUDA")
    if expect is None:
        pytest.skip("PYVL_EXPECT_CUDA is not set (.ci/run sets it from whether nvcc is on PATH)")
    assert _C.has_cuda() == (expect == "1"), f"PYVL_EXPECT_CUDA={expect} but _C.has_cuda() is {_C.has_cuda()}"


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip(f"no source checkout at {ROOT}")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(wheels)],
        cwd=tmp_path,
        check=True,
    )
    (wheel,) = wheels.glob("pyvl-0.1.0-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Every source file ships, data included (the demo tokenizer.model ...): pyvl/ as is, kernels/ as pyvl/kernels/.
    for src, dest in [("pyvl", "pyvl"), ("kernels", "pyvl/kernels")]:
        for file in (ROOT / src).rglob("*"):
            if file.is_file() and "__pycache__" not in file.parts and file.suffix not in (".pyc", ".so"):
                name = f"{dest}/{file.relative_to(ROOT / src).as_posix()}"
                assert name in names, f"{name} missing from {wheel.name}"
    assert any(re.fullmatch(r"pyvl/_C\..*\.so", n) for n in names), f"no pyvl/_C*.so in {names}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pyvl = pyvl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # The dependencies come from the environment running the tests instead of a download: a .pth file lists
    # the folders they are imported from. (--system-site-packages would not do: inside a virtualenv it points at the base
    # interpreter, where torch may not be.) The venv's own site-packages precede the .pth entries, so the
    # fresh wheel, not an installed pyvl, is what gets imported; .pth files of those entries (an editable
    # install's import hook) are not processed.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    venv_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(venv_site, "parent_env.pth").write_text("".join(f"{p}\n" for p in _dependency_dirs()))
    install = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    subprocess.run(install, cwd=tmp_path, check=True)
    code = "import pyvl._C, pyvl.ops.native; print(pyvl._C.__file__)"
    so = subprocess.run(
        [python, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(so).resolve().is_relative_to(env_dir.resolve()), f"imported {so}, not the wheel in {env_dir}"
