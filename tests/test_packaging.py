"""Packaging: the wheel ships the package, its data, and the top-level configs/ and assets/ (as visae/configs, visae/assets)."""

import fnmatch
import shutil
import subprocess
import sys
import zipfile

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

from conftest import REPO  # noqa: E402
from visae import resources  # noqa: E402
from visae.toyclip import TOYCLIP_WEIGHTS  # noqa: E402

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dir(pkg: str):
    mapped = PYPROJECT.get("package-dir", {})
    return REPO / (mapped[pkg] if pkg in mapped else pkg.replace(".", "/"))


def test_every_subpackage_is_listed():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "visae").rglob("__init__.py")}
    missing = found - set(PYPROJECT["packages"])
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}: the wheel would not ship them"


def test_every_data_file_is_package_data():
    """Each non-Python file under a package's directory matches a package-data glob of a package above it."""
    data = PYPROJECT["package-data"]
    roots = {pkg: _package_dir(pkg) for pkg in PYPROJECT["packages"]}
    missing = []
    for root in roots.values():
        for f in root.rglob("*"):
            if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
                continue
            if not any(r in f.parents and any(fnmatch.fnmatch(str(f.relative_to(r)), g) for g in data.get(pkg, []))
                       for pkg, r in roots.items()):
                missing.append(str(f.relative_to(REPO)))
    assert not missing, f"files the wheel would leave out (add them to package-data): {sorted(set(missing))}"


def test_checkout_resolves_to_the_repository():
    assert resources.shipped_dir("configs") == REPO / "configs"
    assert resources.config_yaml("train_sae.yaml").is_file()
    assert TOYCLIP_WEIGHTS == REPO / "assets" / "toyclip" / "visae-toyclip.safetensors"
    with pytest.raises(ValueError, match="unknown directory"):
        resources.shipped_dir("runs")


@pytest.mark.slow
def test_wheel_ships_configs_and_assets(tmp_path):
    # Build from a copy (setuptools writes build/ next to the sources), with the installed setuptools.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("visae", "configs", "assets"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp_path / "whl").glob("visae-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    expected = {f"visae/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    expected |= {f"visae/assets/{p.relative_to(REPO / 'assets')}" for p in (REPO / "assets").rglob("*") if p.is_file()}
    expected |= {"visae/toyclip.py", "visae/resources.py", "visae/sae/base.py", "visae/browse/static/index.js",
                 "visae/data/imagenet_wnids.txt", "visae/model_configs/visae-toyclip.json"}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert not any(n.startswith(("configs/", "assets/", "tests/")) for n in names), "top-level data leaked into the wheel"
