"""The image builder's pure parts: cpio, vmlinux extraction, module order, keys, CLI."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmhost.errors import ImageError
from vmhost.images import build_image, find_image, image_key
from vmhost.images.cli import build, show
from vmhost.images.initramfs import CpioWriter
from vmhost.images.kernel import extract_vmlinux, module_order
from vmhost.images.rootfs import _platforms
from vmhost.images.tools import is_static_elf, require_tool
from vmhost.templates import load_template

FAKE_ELF = b"\x7fELF" + bytes(range(256)) * 64


def test_cpio_archive_lists_and_extracts(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    cpio = CpioWriter()
    cpio.directory("bin")
    cpio.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    cpio.symlink("bin/alias", "tool")
    cpio.file("etc/odd-size", b"x" * 5)
    archive = tmp_path / "initrd.img"
    archive.write_bytes(cpio.to_bytes())
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [busybox, "cpio", "-id"], stdin=archive.open("rb"), cwd=out, check=True,
        capture_output=True,
    )  # fmt: skip
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (out / "bin/alias").readlink() == Path("tool")
    assert (out / "etc/odd-size").read_bytes() == b"xxxxx"


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_extract_vmlinux_finds_the_payload(compress: object) -> None:
    assert callable(compress)
    bzimage = b"MZ setup code \x1f\x8b junk " + compress(FAKE_ELF) + b"trailing"
    assert extract_vmlinux(bzimage) == FAKE_ELF


def test_extract_vmlinux_without_a_payload_is_an_error() -> None:
    with pytest.raises(ImageError, match="no ELF vmlinux"):
        extract_vmlinux(b"MZ nothing compressed here")


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    def ko(name: str, depends: str) -> None:
        (tmp_path / "kernel").mkdir(exist_ok=True)
        data = (
            b"\x00junk\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=" + name.encode()
        )
        (tmp_path / "kernel" / f"{name}.ko").write_bytes(data + b"\x00")

    ko("virtio_ring", "")
    ko("virtio", "virtio_ring")
    ko("virtio_blk", "virtio,virtio_ring")
    ko("virtio_mmio", "virtio,virtio_ring")
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    order = [p.stem for p in module_order(tmp_path, ("virtio_mmio", "virtio_blk", "ext4"))]
    assert order == ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
    with pytest.raises(ImageError, match="no module 'nope'"):
        module_order(tmp_path, ("nope",))


def test_manylinux_tags_cover_older_glibc() -> None:
    tags = _platforms("2.36")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_28_x86_64" in tags and "manylinux2014_x86_64" in tags


def test_tools_name_their_package() -> None:
    with pytest.raises(ImageError, match="apt-get install some-package"):
        require_tool("no-such-tool-anywhere", "some-package")
    static = subprocess.run(["dpkg", "-s", "busybox-static"], capture_output=True, check=False)
    if static.returncode == 0:
        assert is_static_elf(Path("/bin/busybox"))
    assert not is_static_elf(Path("/bin/sh"))  # dash is dynamically linked


def test_image_key_is_stable_and_find_image_misses_in_an_empty_dir(tmp_path: Path) -> None:
    base = load_template("base")
    assert image_key(base) == image_key(base)
    assert image_key(base) != image_key(load_template("code-interpreter"))
    assert find_image(base, tmp_path) is None


def test_cli_list_and_unknown_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert show(tmp_path) == 0
    assert "none (build one" in capsys.readouterr().out
    assert build(["no-such-template"], False, "qemu", tmp_path) == 1
    assert "unknown template" in capsys.readouterr().err


def test_build_is_a_no_op_when_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    from vmhost.settings import default_image_dir

    base = load_template("base")
    if find_image(base, default_image_dir()) is None:
        reason = "no base image built here (bulkhead image build --template base)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # setup builds it in CI
        pytest.skip(reason)
    info = build_image(base, default_image_dir(), print)
    assert "up to date (nothing to do)" in capsys.readouterr().out
    assert info.interpreters["python"] == "/usr/bin/python3"
