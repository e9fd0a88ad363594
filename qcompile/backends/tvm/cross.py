"""Cross-compilation for edge CPUs: GNU toolchains, the device runtime, ELF checks and runs under qemu.

An aarch64 artifact carries what a board needs to run its TVM library without Python: ``libtvm_runtime.so``
and ``libtvm_ffi.so`` taken from the official aarch64 wheels of the same TVM version as the compiler (so
the library and the runtime agree on the ABI), and ``qcompile-runner``, a small C++ program of ours
(``runner.cc``) built with the cross compiler against the tvm-ffi headers. ``qcompile toolchains
--install`` installs the Debian cross compilers and qemu and fetches those wheels from PyPI once; compiling
never downloads anything.

Exactness under emulation: TVM 0.27's default CPU build leaves loops in order and lets LLVM contract
``a * b + c`` into fused multiply-adds wherever the ISA has them. AArch64 always has FMA, so the host
reference is built for an x86-64 CPU with FMA (``HOST_REFERENCE``): the two then round identically and the
emulated outputs equal the host's bit for bit (measured on EfficientNet-Lite0 fp32 and W8A8). Without
FMA on the host side they differ by 1e-6 relative in fp32 and by 1.8 % relative in W8A8, where a value
on a rounding boundary lands one quantization step away.

armv7 and riscv64: no TVM runtime is published for them, so their libraries are cross-compiled and linked
and their ELF headers checked (machine, class, float ABI), but nothing here can run them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import BackendError

logger = logging.getLogger(__name__)

DEVICE_FOLDER = "device"
RUNNER = "qcompile-runner"
RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")
# x86-64 with FMA (and AVX2): contracts multiply-adds as AArch64 code does; see the module docstring.
HOST_REFERENCE: dict[str, Any] = {"kind": "llvm", "mcpu": "haswell"}


class IllegalInstructionError(BackendError):
    """The emulated CPU met an instruction it does not have (SIGILL)."""


@dataclass(frozen=True)
class Toolchain:
    """A Debian GNU cross toolchain and what the ELF files it builds must say."""

    arch: str
    prefix: str  # GNU triple of the Debian cross compiler, also the sysroot under /usr
    triples: tuple[str, ...]  # LLVM mtriple prefixes that this toolchain links
    elf_machine: int
    elf_bits: int
    packages: tuple[str, ...]
    qemu: str | None = None  # user-mode emulator; only where a TVM runtime for the arch exists
    wheel_platform: str | None = None  # pip platform tag of the official TVM wheels for the arch
    float_abi: str | None = None  # what the ELF flags must say: 'hard' (ARM EABI) or 'double' (RISC-V)

    @property
    def compiler(self) -> str:
        return f"{self.prefix}-g++"

    @property
    def sysroot(self) -> Path:
        return Path("/usr") / self.prefix

    @property
    def runnable(self) -> bool:
        return self.qemu is not None and self.wheel_platform is not None


# e_machine values: EM_AARCH64 = 183, EM_ARM = 40, EM_RISCV = 243 (System V ABI, ELF header).
TOOLCHAINS = {
    "aarch64": Toolchain(
        "aarch64",
        "aarch64-linux-gnu",
        ("aarch64",),
        183,
        64,
        ("g++-aarch64-linux-gnu", "qemu-user", "llvm"),  # llvm: llvm-mca, for the board estimates
        qemu="qemu-aarch64",
        wheel_platform="manylinux_2_28_aarch64",
    ),
    "armv7": Toolchain(
        "armv7", "arm-linux-gnueabihf", ("armv7", "arm-"), 40, 32, ("g++-arm-linux-gnueabihf",), float_abi="hard"
    ),
    "riscv64": Toolchain(
        "riscv64", "riscv64-linux-gnu", ("riscv64",), 243, 64, ("g++-riscv64-linux-gnu",), float_abi="double"
    ),
}

# Architecture features of the CPU models qemu 7.2 emulates (Arm technical reference manuals; qemu's
# target/arm/cpu64.c sets the same ID registers). A feature named in a target's mattr that the emulated
# CPU lacks is what a SIGILL under qemu points at.
_ARMV8_0 = frozenset({"neon", "fp-armv8", "crc", "crypto", "aes", "sha2"})
_ARMV8_2 = _ARMV8_0 | {"v8.2a", "lse", "rdm", "rcpc", "dotprod", "fullfp16", "fp16fml"}
QEMU_CPU_FEATURES: dict[str, frozenset[str]] = {
    "cortex-a53": _ARMV8_0,
    "cortex-a57": _ARMV8_0,
    "cortex-a72": _ARMV8_0,
    "cortex-a76": _ARMV8_2 - {"fp16fml"},
    "neoverse-n1": _ARMV8_2 - {"fp16fml"},
    "a64fx": _ARMV8_0 | {"v8.2a", "lse", "rdm", "fullfp16", "sve"},
}


def toolchain_for(tvm_target: dict[str, Any]) -> Toolchain | None:
    """The cross toolchain of a target's (host) code, or None when it is built for this machine."""
    host = tvm_target.get("host") if tvm_target.get("kind") != "llvm" else tvm_target
    triple = str((host or {}).get("mtriple", ""))
    if not triple or triple.startswith(os.uname().machine):
        return None
    for toolchain in TOOLCHAINS.values():
        if triple.startswith(toolchain.triples):
            return toolchain
    raise BackendError(f"no cross toolchain known for mtriple '{triple}' (known: {sorted(TOOLCHAINS)})")


def home() -> Path:
    return Path(os.environ.get("QCOMPILE_HOME") or Path.home() / ".cache" / "qcompile")


def _versions() -> tuple[str, str]:
    return metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi")


def runtime_dir(toolchain: Toolchain) -> Path:
    tvm_version, ffi_version = _versions()
    return home() / "runtimes" / f"{toolchain.arch}-tvm{tvm_version}-ffi{ffi_version}"


def _which(program: str) -> str | None:
    return shutil.which(program)


def status(toolchain: Toolchain) -> dict[str, Any]:
    """What is present for ``toolchain``: compiler, emulator, device runtime."""
    runtime = runtime_dir(toolchain)
    return {
        "compiler": _which(toolchain.compiler),
        "qemu": _which(toolchain.qemu) if toolchain.qemu else None,
        "runtime": str(runtime) if toolchain.runnable and _runtime_complete(runtime) else None,
        "runnable": toolchain.runnable,
    }


def _runtime_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in RUNTIME_LIBRARIES) and (folder / "include").is_dir()


def require_compiler(toolchain: Toolchain) -> str:
    compiler = _which(toolchain.compiler)
    if compiler is None:
        raise BackendError(
            f"the {toolchain.arch} cross compiler {toolchain.compiler} is not installed; run "
            f"`qcompile toolchains --install` (Debian packages: {', '.join(toolchain.packages)})"
        )
    return compiler


def require_runtime(toolchain: Toolchain) -> Path:
    folder = runtime_dir(toolchain)
    if not _runtime_complete(folder):
        raise BackendError(
            f"the {toolchain.arch} TVM runtime is not in {folder}; run `qcompile toolchains --install` once "
            "(it takes libtvm_runtime.so and libtvm_ffi.so from the official wheels on PyPI)"
        )
    return folder


def install(toolchain: Toolchain, apt: bool = True) -> list[str]:
    """Install the Debian packages of ``toolchain`` (when missing) and fetch its device runtime; returns
    what was done, one line each."""
    done = []
    missing = [package for package in toolchain.packages if not _package_present(package)]
    if missing and apt:
        sudo = ["sudo"] if os.geteuid() != 0 else []
        command = [*sudo, "apt-get", "install", "-y", "-q", *missing]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:  # a fresh machine may not have the package lists yet
            subprocess.run([*sudo, "apt-get", "update", "-q"], capture_output=True, check=False)
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BackendError(f"`{' '.join(command)}` failed: {result.stderr.strip().splitlines()[-1:]}")
        done.append(f"installed {', '.join(missing)}")
    if toolchain.runnable and not _runtime_complete(runtime_dir(toolchain)):
        fetch_runtime(toolchain)
        done.append(f"fetched the {toolchain.arch} TVM runtime into {runtime_dir(toolchain)}")
    return done


def _package_present(package: str) -> bool:
    if package == "llvm":  # Debian names it llvm-mca or llvm-mca-<version>
        return any(_which(name) for name in ("llvm-mca", *(f"llvm-mca-{v}" for v in range(13, 21))))
    tool = {"qemu-user": "qemu-aarch64"}.get(package, package.removeprefix("g++-") + "-g++")
    return _which(tool) is not None


def fetch_runtime(toolchain: Toolchain) -> Path:
    """Take the runtime libraries and tvm-ffi headers for ``toolchain`` from the official wheels of the
    installed TVM version (PyPI, through pip), into :func:`runtime_dir`."""
    assert toolchain.wheel_platform is not None
    tvm_version, ffi_version = _versions()
    folder = runtime_dir(toolchain)
    with tempfile.TemporaryDirectory(prefix="qcompile-wheels-") as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--platform", toolchain.wheel_platform, "--python-version", "3.11", "-d", scratch,
            f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BackendError(f"pip could not download the {toolchain.arch} TVM wheels: {result.stderr.strip()}")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_parent(folder)))
        for wheel in Path(scratch).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if name.endswith(RUNTIME_LIBRARIES):
                        (staging / Path(name).name).write_bytes(archive.read(name))
                    elif name.startswith("tvm_ffi/include/") and not name.endswith("/"):
                        target = staging / "include" / name.removeprefix("tvm_ffi/include/")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(archive.read(name))
        if not _runtime_complete(staging):
            shutil.rmtree(staging)
            raise BackendError(f"the {toolchain.arch} wheels lack {RUNTIME_LIBRARIES} or the tvm-ffi headers")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    return folder


def _parent(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent


def build_runner(toolchain: Toolchain) -> Path:
    """``qcompile-runner`` for ``toolchain``, built once per version of ``runner.cc`` and kept with the runtime."""
    runtime = require_runtime(toolchain)
    compiler = require_compiler(toolchain)
    source = resources.files("qcompile.backends.tvm").joinpath("runner.cc").read_bytes()
    binary = runtime / f"{RUNNER}-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory(prefix="qcompile-runner-") as scratch:
        (Path(scratch) / "runner.cc").write_bytes(source)
        output = Path(scratch) / RUNNER
        command = [
            compiler, "-std=c++17", "-O2", f"-I{runtime / 'include'}", str(Path(scratch) / "runner.cc"),
            "-o", str(output), f"-L{runtime}", "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime",
            "-Wl,-rpath,$ORIGIN",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BackendError(f"building {RUNNER} for {toolchain.arch} failed:\n{result.stderr.strip()}")
        shutil.copy2(output, binary)
    return binary


def bundle(toolchain: Toolchain, folder: Path) -> list[str]:
    """Copy the device runtime and the runner into ``folder / DEVICE_FOLDER``; returns the relative paths."""
    runner = build_runner(toolchain)
    runtime = require_runtime(toolchain)
    device = folder / DEVICE_FOLDER
    device.mkdir(exist_ok=True)
    shutil.copy2(runner, device / RUNNER)
    for name in RUNTIME_LIBRARIES:
        shutil.copy2(runtime / name, device / name)
    return [f"{DEVICE_FOLDER}/{name}" for name in (RUNNER, *RUNTIME_LIBRARIES)]


@dataclass(frozen=True)
class ElfInfo:
    machine: int
    bits: int
    float_abi: str | None


def elf_info(path: Path) -> ElfInfo:
    """Machine, class and float ABI from an ELF header (ELF64/ELF32, little-endian)."""
    header = path.read_bytes()[:64]
    if header[:4] != b"\x7fELF":
        raise BackendError(f"{path} is not an ELF file")
    bits = 64 if header[4] == 2 else 32
    machine = int.from_bytes(header[18:20], "little")
    flags = int.from_bytes(header[48:52] if bits == 64 else header[36:40], "little")
    float_abi = None
    if machine == 40:  # ARM EABI: EF_ARM_ABI_FLOAT_HARD / _SOFT
        float_abi = "hard" if flags & 0x400 else "soft" if flags & 0x200 else None
    elif machine == 243:  # RISC-V: EF_RISCV_FLOAT_ABI field
        float_abi = {0: "soft", 2: "single", 4: "double", 6: "quad"}[flags & 0x6]
    return ElfInfo(machine, bits, float_abi)


def check_elf(path: Path, toolchain: Toolchain) -> ElfInfo:
    """Raise unless ``path`` is an ELF file for ``toolchain``'s machine, class and float ABI."""
    info = elf_info(path)
    expected = ElfInfo(toolchain.elf_machine, toolchain.elf_bits, toolchain.float_abi or info.float_abi)
    if info != expected:
        raise BackendError(f"{path.name} is built for {info}, not for {toolchain.arch} ({expected})")
    return info


def lacking_features(mattr: list[str], cpu: str) -> list[str]:
    """Features a target's ``mattr`` enables that the qemu CPU model ``cpu`` does not have."""
    known = QEMU_CPU_FEATURES.get(cpu)
    if known is None:
        return []
    return [feature.lstrip("+") for feature in mattr if feature.startswith("+") and feature[1:] not in known]


def emulate(
    toolchain: Toolchain,
    folder: Path,
    library: str,
    inputs: list[np.ndarray],
    cpu: str,
    mattr: list[str],
    repeat: int = 0,
    function: str | None = None,
    runner: Path | None = None,
) -> tuple[list[np.ndarray], float | None]:
    """Run ``folder/library`` with the artifact's runner under qemu as ``cpu``; returns the outputs (and the
    median latency under emulation when ``repeat`` > 0, which says nothing about the board's speed).

    ``function`` calls that function of the library instead of the Relax ``main`` (the outputs are then
    every argument after the call); ``runner`` replaces the artifact's bundled runner."""
    if toolchain.qemu is None or _which(toolchain.qemu) is None:
        raise BackendError(f"no emulator for {toolchain.arch}; run `qcompile toolchains --install`")
    with tempfile.TemporaryDirectory(prefix="qcompile-emulate-") as scratch:
        paths = []
        for index, array in enumerate(inputs):
            paths.append(str(Path(scratch) / f"input_{index}.npy"))
            np.save(paths[-1], np.require(array, requirements="C"))
        command = [
            toolchain.qemu, "-cpu", cpu, "-L", str(toolchain.sysroot),
            str(runner or folder / DEVICE_FOLDER / RUNNER), str(folder / library), scratch, *paths,
        ]  # fmt: skip
        if repeat:
            command += ["--repeat", str(repeat)]
        if function:
            command += ["--function", function]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode in (-signal.SIGILL, 128 + signal.SIGILL):
            lacking = lacking_features(mattr, cpu)
            claim = (
                f"the target enables {', '.join('+' + f for f in lacking)}, which {cpu} lacks"
                if lacking
                else f"no feature of the target's mattr {mattr} is known to be missing on {cpu}"
            )
            raise IllegalInstructionError(
                f"{library} executed an instruction that the emulated {cpu} does not have (SIGILL): {claim}; "
                "remove those features from the target file's mattr, or emulate a CPU that has them"
            )
        if result.returncode != 0:
            raise BackendError(
                f"{RUNNER} under {toolchain.qemu} -cpu {cpu} failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}"
            )
        outputs = []
        index = 0
        while (Path(scratch) / f"output_{index}.npy").is_file():
            outputs.append(np.load(Path(scratch) / f"output_{index}.npy"))
            index += 1
        latency = None
        for line in result.stdout.splitlines():
            if line.startswith(f"{RUNNER}:") and "median_ms=" in line:
                latency = float(line.rsplit("median_ms=", 1)[1])
        return outputs, latency
