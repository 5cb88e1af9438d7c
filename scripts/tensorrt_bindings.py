"""The real TensorRT Python bindings of every release hwaware supports, read without loading them.

TensorRT's libraries do not install from the package index, but its bindings wheels do (about 1 MB
each), and their extension module's string table holds every class, method and enum member name,
and the docstrings with each method's `:arg name:` lines. This script fetches the pinned wheels
into a cache without installing them (`fetch CACHE`), checks a cache (`check CACHE`), and is
imported by tests/test_tensorrt_conformance.py, which checks every TensorRT name hwaware uses
against each release.

Exit status: 0 done; 2 a corrupt or foreign wheel in the cache (one line, nothing written);
3 the download failed (offline), so the conformance test will skip. Standard library only.
"""

from __future__ import annotations

import ast
import hashlib
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Pin:
    release: str  # the TensorRT version
    requirement: str  # what pip downloads
    file: str
    sha256: str

    @property
    def major(self) -> int:
        return int(self.release.split(".")[0])


# cp311 manylinux x86-64 wheels for every interpreter: the bindings' names do not depend on the Python tag.
PINS = (
    Pin("8.6.1", "tensorrt-bindings==8.6.1", "tensorrt_bindings-8.6.1-cp311-none-manylinux_2_17_x86_64.whl",
        "705cfab5c60f0bed7d939559d880165a761bd9ac0f4203004948a760eef99838"),
    Pin("10.4.0", "tensorrt-cu12-bindings==10.4.0",
        "tensorrt_cu12_bindings-10.4.0-cp311-none-manylinux_2_17_x86_64.whl",
        "451492cebb48b2d088db20a3fd524df64e87bb911428fd1eb5979698d854b6f1"),
    Pin("10.13.0.35", "tensorrt-cu12-bindings==10.13.0.35",
        "tensorrt_cu12_bindings-10.13.0.35-cp311-none-manylinux_2_28_x86_64.whl",
        "338c9d7b8f7bf9685869bc0b5da9ecf79d1f2a8a962a6e1a833798010f19f544"),
    Pin("11.4.0.106", "tensorrt-cu12-bindings==11.4.0.106",
        "tensorrt_cu12_bindings-11.4.0.106-cp311-none-manylinux_2_28_x86_64.whl",
        "e2ab48f316bbff6a7a44a30e94a9ceb0d2cf6645ff39feadecfa68d7cb7a94bf"),
)
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "tensorrt-bindings"


class BindingsCacheError(Exception):
    """A cache file that is not the pinned wheel it should be."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_wheels(cache: Path) -> dict[str, Path]:
    """{release: wheel} for the pinned wheels in `cache`, each checked against its SHA-256; any other file
    ending in .whl there, or a pinned one with other bytes, is a BindingsCacheError."""
    pins = {pin.file: pin for pin in PINS}
    found = {}
    for path in sorted(cache.glob("*.whl")) if cache.is_dir() else []:
        pin = pins.get(path.name)
        if pin is None:
            raise BindingsCacheError(f"{path}: a foreign wheel in the TensorRT bindings cache (not one of the pinned "
                                     f"releases); delete it")
        if _sha256(path) != pin.sha256:
            raise BindingsCacheError(f"{path}: corrupt (its SHA-256 is not the pinned one); delete it and rerun "
                                     f"scripts/setup.sh")
        found[pin.release] = path
    return found


def fetch(cache: Path) -> list[str]:
    """Download the missing pinned wheels into `cache` (hash-checked by pip, moved in only when complete);
    returns what could not be downloaded."""
    have = cached_wheels(cache)
    missing = [pin for pin in PINS if pin.release not in have]
    if not missing:
        return []
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as staging:
        for pin in missing:
            requirements = Path(staging) / f"{pin.release}.txt"
            requirements.write_text(f"{pin.requirement} --hash=sha256:{pin.sha256}\n")
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                 "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "--platform",
                 "manylinux_2_28_x86_64", "--require-hashes", "--timeout", "15", "--retries", "1",
                 "-r", str(requirements), "-d", staging],
                capture_output=True, text=True)
            wheel = Path(staging) / pin.file
            if done.returncode != 0 or not wheel.is_file() or _sha256(wheel) != pin.sha256:
                # offline, most likely: do not wait out the same timeout for each of the others
                return [p.requirement for p in missing[missing.index(pin):]]
            wheel.replace(cache / pin.file)
    return []


@dataclass
class Bindings:
    """What one release's bindings offer: every name in its extension module or its Python wrapper, and the
    documented argument names of the methods whose docstrings survive as symbols (`Class.method`)."""

    release: str
    names: frozenset[str]
    strings: bytes = field(repr=False)
    arguments: dict[tuple[str, str], list[str]]

    @property
    def major(self) -> int:
        return int(self.release.split(".")[0])

    def has(self, name: str) -> bool:
        # the linker merges a string that ends another one into its tail, so a name is found as a suffix too
        return name in self.names or (name.encode() + b"\0") in self.strings


def read_bindings(wheel: Path, release: str) -> Bindings:
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        library = next((n for n in members if n.endswith(".so") and "/tensorrt" in n), None)
        wrapper = next((n for n in members if n.endswith("/__init__.py") and n.count("/") == 1), None)
        if library is None or wrapper is None:
            raise BindingsCacheError(f"{wheel}: not a TensorRT bindings wheel (no extension module)")
        data, python = archive.read(library), archive.read(wrapper).decode()
    names = {p.decode() for p in data.split(b"\0") if re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", p)}
    names |= _python_names(python)
    return Bindings(release, frozenset(names), data, _documented_arguments(data))


def _python_names(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _documented_arguments(data: bytes) -> dict[tuple[str, str], list[str]]:
    """{(class, method): [arg names]} from the docstring pointers `tensorrt::<Class>Doc::<method>` (ELF64
    symbols whose 8-byte value a relative relocation points at the docstring in .rodata)."""
    if data[:5] != b"\x7fELF\x02":
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    names_at = sections[names_index][4]

    def section_name(s) -> str:
        return data[names_at + s[0]:data.index(b"\0", names_at + s[0])].decode()

    by_name = {section_name(s): s for s in sections}
    if ".symtab" not in by_name or ".rela.dyn" not in by_name:
        return {}
    symtab = by_name[".symtab"]
    strtab = sections[symtab[6]]
    targets = {}
    rela = by_name[".rela.dyn"]
    for at in range(rela[4], rela[4] + rela[5], 24):
        offset, info, addend = struct.unpack_from("<QQq", data, at)
        if info & 0xFFFFFFFF == 8:  # R_X86_64_RELATIVE
            targets[offset] = addend

    def file_offset(address: int) -> int | None:
        for s in sections:
            if s[1] != 8 and s[3] and s[3] <= address < s[3] + s[5]:  # not NOBITS
                return s[4] + address - s[3]
        return None

    symbol = re.compile(rb"_ZN8tensorrt(\d+)")
    found = {}
    for at in range(symtab[4], symtab[4] + symtab[5], 24):
        name_at, _, _, _, value, size = struct.unpack_from("<IBBHQQ", data, at)
        start = strtab[4] + name_at
        name = data[start:data.index(b"\0", start)]
        match = symbol.match(name)
        if size != 8 or not match or b"DocL" not in name:
            continue
        head = match.end()
        owner = name[head:head + int(match.group(1))]
        rest = re.match(rb"L(\d+)", name[head + len(owner):])
        if not owner.endswith(b"Doc") or not rest:
            continue
        member = name[head + len(owner) + rest.end():][:int(rest.group(1))]
        text_at = file_offset(targets.get(value, 0))
        if text_at is None:
            continue
        text = data[text_at:data.index(b"\0", text_at)].decode(errors="replace")
        found[(owner[:-3].decode(), member.decode())] = re.findall(r":arg (\w+):", text)
    return found


def load_all(cache: Path = DEFAULT_CACHE) -> dict[str, Bindings]:
    return {release: read_bindings(path, release) for release, path in cached_wheels(cache).items()}


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] not in ("fetch", "check"):
        print("usage: tensorrt_bindings.py fetch|check [CACHE]", file=sys.stderr)
        return 2
    cache = Path(argv[1]) if len(argv) == 2 else DEFAULT_CACHE
    try:
        if argv[0] == "fetch":
            failed = fetch(cache)
            if failed:
                print(f"tensorrt bindings: could not download {', '.join(failed)} (offline?); the TensorRT "
                      "conformance test skips until they are here", file=sys.stderr)
                return 3
        wheels = cached_wheels(cache)
        for release, path in wheels.items():
            read_bindings(path, release)
    except BindingsCacheError as exc:
        print(f"tensorrt bindings: {exc}", file=sys.stderr)
        return 2
    print(f"tensorrt bindings: {', '.join(wheels) or 'none'} in {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
