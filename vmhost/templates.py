"""Sandbox templates: what a sandbox's userland contains, described in ``infra/templates``.

A template file is TOML::

    name = "base"                 # must match the file name (<name>.toml)
    description = "..."
    vcpus = 1                     # defaults for sandboxes of this template
    memory_mb = 512
    [apt]  packages = [...]       # Debian packages of the microVM rootfs
    [pip]  packages = [...]       # pinned pip packages (a virtualenv; baked into the rootfs)

``digest`` is a content hash of the file, used to key built artifacts (bwrap environments,
microVM images) so a rebuild happens only when the description changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmhost.errors import ConfigError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "infra" / "templates"
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
FIELDS = {"name", "description", "vcpus", "memory_mb", "apt", "pip"}


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    vcpus: int
    memory_mb: int
    apt_packages: tuple[str, ...]
    pip_packages: tuple[str, ...]
    digest: str  # sha256 of the template file

    @property
    def has_pip_env(self) -> bool:
        return bool(self.pip_packages)


def templates_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    return Path(env.get("BULKHEAD_TEMPLATES_DIR") or TEMPLATES_DIR)


def _packages(doc: dict[str, Any], table: str, path: Path) -> tuple[str, ...]:
    section = doc.get(table, {})
    if not isinstance(section, dict) or set(section) - {"packages"}:
        raise ConfigError(f"{path}: [{table}] may only contain 'packages'")
    packages = section.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise ConfigError(f"{path}: [{table}].packages must be a list of strings")
    return tuple(packages)


def load_template(name: str, directory: Path | None = None) -> Template:
    """Parse and validate ``<directory>/<name>.toml``; ConfigError says what is wrong."""
    if not NAME.match(name):
        raise ConfigError(f"invalid template name {name!r}")
    path = (directory or templates_dir()) / f"{name}.toml"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        known = ", ".join(list_templates(directory)) or "none"
        raise ConfigError(f"unknown template {name!r} (known: {known})") from None
    try:
        doc = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(doc) - FIELDS
    if unknown:
        raise ConfigError(f"{path}: unknown fields {sorted(unknown)}")
    if doc.get("name") != name:
        raise ConfigError(f"{path}: name must be {name!r}")
    vcpus, memory_mb = doc.get("vcpus", 1), doc.get("memory_mb", 512)
    if not isinstance(vcpus, int) or not 1 <= vcpus <= 64:
        raise ConfigError(f"{path}: vcpus must be an integer from 1 to 64")
    if not isinstance(memory_mb, int) or not 64 <= memory_mb <= 65536:
        raise ConfigError(f"{path}: memory_mb must be an integer from 64 to 65536")
    return Template(
        name=name,
        description=str(doc.get("description", "")),
        vcpus=vcpus,
        memory_mb=memory_mb,
        apt_packages=_packages(doc, "apt", path),
        pip_packages=_packages(doc, "pip", path),
        digest=hashlib.sha256(raw).hexdigest(),
    )


def list_templates(directory: Path | None = None) -> list[str]:
    directory = directory or templates_dir()
    return sorted(p.stem for p in directory.glob("*.toml") if NAME.match(p.stem))
