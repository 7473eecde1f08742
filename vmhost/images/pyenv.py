"""The bwrap driver's prepared environment for a template with pip packages.

bwrap sandboxes see the host's ``/usr``, so a template's Debian packages are whatever the
host has; its pip packages live in a virtualenv built here with the host's python3 and
mounted read-only into the sandbox at the same path. The directory name carries the
template's digest, so a changed template builds a new environment and an unchanged one is
not rebuilt. Matplotlib's font cache is built once here and copied into each sandbox.

    <image_dir>/pyenv/<template>-<digest[:16]>/
        bin/python3 ...      the virtualenv
        mplconfig/           a prebuilt matplotlib font cache (when matplotlib is installed)
        .complete            written last: the environment is usable
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vmhost.errors import ConfigError
from vmhost.images.tools import run
from vmhost.templates import Template

PYTHON = "/usr/bin/python3"


def pyenv_path(template: Template, image_dir: Path) -> Path:
    return image_dir / "pyenv" / f"{template.name}-{template.digest[:16]}"


def find_pyenv(template: Template, image_dir: Path) -> Path | None:
    """The built environment of ``template``, or None (also None without pip packages)."""
    path = pyenv_path(template, image_dir)
    return path if template.has_pip_env and (path / ".complete").exists() else None


def build_pyenv(
    template: Template, image_dir: Path, progress: Callable[[str], None]
) -> Path | None:
    """Build (or find) the template's virtualenv; None when it has no pip packages."""
    if not template.has_pip_env:
        progress(f"{template.name}: no pip packages, no bwrap environment needed")
        return None
    found = find_pyenv(template, image_dir)
    if found is not None:
        progress(f"{template.name}: bwrap environment up to date at {found}")
        return found
    if not os.access(PYTHON, os.X_OK):
        raise ConfigError(f"{PYTHON} is missing: apt-get install python3 python3-venv")
    target = pyenv_path(template, image_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(target.parent, 0o755)
    # build next to the target, then rename: a crash never leaves a half environment behind
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.rmtree(staging)
        progress(f"{template.name}: creating a virtualenv with {PYTHON}")
        run([PYTHON, "-m", "venv", str(staging)])  # Debian: needs python3-venv
        packages = list(template.pip_packages)
        progress(f"{template.name}: pip install {' '.join(packages)}")
        pip = [str(staging / "bin" / "python3"), "-m", "pip"]
        run([*pip, "install", "--disable-pip-version-check", "-q", *packages])
        os.chmod(staging, 0o755)
        staging.rename(target)  # the venv's scripts name the staging path; python3 does not
        _fix_scripts(staging, target)
        if any(p.split("=")[0].strip().lower() == "matplotlib" for p in packages):
            progress(f"{template.name}: building matplotlib's font cache")
            env = {**os.environ, "MPLCONFIGDIR": str(target / "mplconfig"), "MPLBACKEND": "Agg"}
            code = "import matplotlib.pyplot as plt; plt.figure()"
            run([str(target / "bin" / "python3"), "-c", code], env=env)
        (target / ".complete").write_text(template.digest + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        raise
    progress(f"{template.name}: bwrap environment built at {target}")
    return target


def _fix_scripts(old: Path, new: Path) -> None:
    """Point the venv's config and entry-point shebangs at its final path."""
    for path in [new / "pyvenv.cfg", *(new / "bin").iterdir()]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if str(old).encode() in data[:4096] or path.name == "pyvenv.cfg":
            path.write_bytes(data.replace(str(old).encode(), str(new).encode()))


def pyenv_env(pyenv: Path, user_env: dict[str, str]) -> dict[str, str]:
    """Environment for processes in a sandbox using the environment at ``pyenv``."""
    path = user_env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    return {
        "PATH": f"{pyenv}/bin:{path}",
        "VIRTUAL_ENV": str(pyenv),
        "MPLCONFIGDIR": "/home/user/.config/matplotlib",
        "MPLBACKEND": "Agg",
    }


def pyenv_files(pyenv: Path) -> list[tuple[str, bytes]]:
    """Files (home-relative path, content) to seed a sandbox home with: matplotlib's
    prebuilt font cache, as a writable copy."""
    return [
        (f".config/matplotlib/{cache.name}", cache.read_bytes())
        for cache in sorted((pyenv / "mplconfig").glob("*.json"))
    ]
