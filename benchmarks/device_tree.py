"""The pyvl that benchmarks/device_check.sh runs: the checkout's Python files laid out as the wheel installs them
(pyproject.toml maps the top-level kernels/ to pyvl/kernels), plus a compiled extension pyvl._C from wherever one
was made. Every later step imports pyvl from this tree (PYTHONPATH), so the code measured is the checkout's.

    python device_tree.py assemble REPO TREE      TREE/pyvl = REPO/pyvl + REPO/kernels as pyvl/kernels, no _C
    python device_tree.py extension TREE SOURCE   TREE/pyvl/_C*.so from SOURCE: a built .so, or a wheel whose
                                                 _C*.so is taken alone (its Python files may be stale)
    python device_tree.py dependencies TREE DIR   every other wheel in DIR (pyvl's dependencies that the GPU
                                                 image lacks, e.g. blake3) unpacked into TREE, unless importable
    python device_tree.py check TREE [--want cuda|cpu|none] [--allow-shadowed]

assemble and extension use the standard library alone (no torch, no installed pyvl). check imports
pyvl and pyvl.kernels as the steps will (torch too) and loads the tree's _C by path; it fails when the wanted
_C is missing or lacks CUDA, or when pyvl is imported from elsewhere than the tree (an editable install's import
hook runs before PYTHONPATH: --allow-shadowed reports that instead, for a dry run on a developer's machine).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path

EXTENSION_GLOB = "_C*.so"
_NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", EXTENSION_GLOB)  # as the wheel, less any _C


def assemble(repo: Path, tree: Path) -> Path:
    """TREE/pyvl from the checkout, without any compiled extension; returns the package folder."""
    package = tree / "pyvl"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(repo / "pyvl", package, ignore=_NOT_SHIPPED)
    shutil.copytree(repo / "kernels", package / "kernels", ignore=_NOT_SHIPPED)
    return package


def add_extension(tree: Path, source: Path) -> Path:
    """Put pyvl._C into TREE/pyvl from a built .so or from a wheel (that member alone); returns its path."""
    package = tree / "pyvl"
    if not source.is_file():
        raise SystemExit(f"device_tree: no extension at {source}")
    for old in package.glob(EXTENSION_GLOB):
        old.unlink()
    if source.suffix != ".whl":
        return Path(shutil.copy2(source, package / source.name))
    with zipfile.ZipFile(source) as wheel:
        members = [
            m for m in wheel.namelist() if Path(m).parent == Path("pyvl") and Path(m).match(EXTENSION_GLOB)
        ]
        if not members:
            raise SystemExit(f"device_tree: {source.name} holds no pyvl/{EXTENSION_GLOB}")
        target = package / Path(members[0]).name
        target.write_bytes(wheel.read(members[0]))
    return target


def add_dependencies(tree: Path, wheels: Path) -> list[str]:
    """Unpack into TREE each wheel of WHEELS that is not pyvl's and whose top-level package cannot be imported
    (a wheel is a zip of what pip would install in site-packages); the names unpacked."""
    import importlib.util

    added = []
    for wheel in sorted(wheels.glob("*.whl")):
        name = wheel.name.split("-")[0]
        if name == "pyvl" or importlib.util.find_spec(name) is not None:
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tree)
        added.append(wheel.name)
    return added


def check(tree: Path, want: str, allow_shadowed: bool) -> None:
    """What the steps will import: pyvl and pyvl.kernels from the tree, and its _C as wanted."""
    import importlib.util

    found = sorted((tree / "pyvl").glob(EXTENSION_GLOB))
    if want != "none":
        if not found:
            raise SystemExit(f"no pyvl/{EXTENSION_GLOB} in {tree}")
        spec = importlib.util.spec_from_file_location("pyvl._C", found[0])
        extension = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(extension)
        print(f"{found[0].name} loads; has_cuda: {extension.has_cuda()}")
        if want == "cuda" and not extension.has_cuda():
            raise SystemExit(f"{found[0].name} was built without its CUDA kernels")
    import pyvl
    import pyvl.kernels.vit_attention as kernel

    origin, kernels = Path(pyvl.__file__).resolve().parent, Path(kernel.__file__).resolve().parent
    print(f"pyvl from {origin}, pyvl.kernels from {kernels}")
    if origin != tree / "pyvl" or kernels != tree / "pyvl" / "kernels":
        shadowed = f"pyvl is imported from {origin}, not from the tree {tree} (an editable install?)"
        if not allow_shadowed:
            raise SystemExit(shadowed)
        print(f"ALERT: {shadowed}: this run's steps use that pyvl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assemble")
    p.add_argument("repo", type=Path)
    p.add_argument("tree", type=Path)
    p = sub.add_parser("extension")
    p.add_argument("tree", type=Path)
    p.add_argument("source", type=Path)
    p = sub.add_parser("dependencies")
    p.add_argument("tree", type=Path)
    p.add_argument("wheels", type=Path)
    p = sub.add_parser("check")
    p.add_argument("tree", type=Path)
    p.add_argument("--want", choices=("cuda", "cpu", "none"), default="none")
    p.add_argument("--allow-shadowed", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "assemble":
        print(f"assembled {assemble(args.repo, args.tree)}")
    elif args.command == "dependencies":
        print(
            f"dependencies unpacked: {', '.join(add_dependencies(args.tree, args.wheels)) or 'none needed'}"
        )
    elif args.command == "extension":
        print(f"extension {add_extension(args.tree, args.source)} from {args.source.name}")
    else:
        check(args.tree.resolve(), args.want, args.allow_shadowed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
