"""Fixtures of the crash tests: a copy of mqs built with failpoints."""

import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STRESS_DIR = Path(__file__).resolve().parent
# Extension modules that contain failpoints, with the C files they link.
FAILPOINT_MODULES = {
    "_shared": ["mqs_bytering.c", "mqs_delay.c", "mqs_wheel.c"],
    "_seglog": ["mqs_seglog.c", "mqs_crc32c.c"],
    "_journal": ["mqs_journal.c"],
    "_topiccore": ["mqs_topiccore.c"],
}


def _cython_source(installed, package, out, module):
    """Return the Cython output of `module`, made again if missing or stale."""
    c_source = installed / f"{module}.c"
    pyx = installed / f"{module}.pyx"
    if c_source.exists() and c_source.stat().st_mtime >= pyx.stat().st_mtime:
        return c_source
    cython = shutil.which("cython") or shutil.which("cython3")
    if cython is None:
        pytest.skip(f"src/mqs/{module}.c is missing or older than "
                    f"{module}.pyx, and Cython is not installed to make it")
    c_source = out / f"{module}.c"
    subprocess.run([cython, "-3", "--directive", "embedsignature=True",
                    "-I", str(out), str(package / f"{module}.pyx"),
                    "-o", str(c_source)], check=True, timeout=300)
    return c_source


@pytest.fixture(scope="session")
def failpoint_path(tmp_path_factory):
    """Build a copy of mqs whose modules have failpoints compiled in.

    Returns a PYTHONPATH for child interpreters: the copy first, then this
    directory (for shared_workers). The modules of FAILPOINT_MODULES are
    compiled with -DMQS_FAILPOINTS=1 (in parallel) from the Cython output
    that the normal build left next to the installed module. When that
    file is missing or stale, Cython (if installed) makes it again from
    the .pyx, and without Cython the failpoint tests are skipped.
    """
    import mqs

    installed = Path(mqs.__file__).parent
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[0]}) to build the failpoint copy")
    out = tmp_path_factory.mktemp("failpoint-build")
    package = out / "mqs"
    skipped = [pattern for module in FAILPOINT_MODULES
               for pattern in (f"{module}.*.so", f"{module}.c")]
    shutil.copytree(installed, package, ignore=shutil.ignore_patterns(
        *skipped, "__pycache__"))

    compilers = {}
    for module, c_files in FAILPOINT_MODULES.items():
        c_source = _cython_source(installed, package, out, module)
        target = package / f"{module}{sysconfig.get_config_var('EXT_SUFFIX')}"
        command = [
            *cc, "-shared", "-fPIC", "-pthread", "-O2", "-std=c11", "-Wall",
            "-Wextra", "-DMQS_FAILPOINTS=1", f"-I{ROOT / 'csrc'}",
            f"-I{sysconfig.get_paths()['include']}", str(c_source),
            *(str(ROOT / "csrc" / name) for name in c_files),
            "-o", str(target),
        ]
        if platform.machine() == "x86_64":
            command.insert(1, "-mcx16")  # the 16-byte CAS of mqs_atomic.h
        compilers[module] = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
    for module, compiler in compilers.items():
        output, _ = compiler.communicate(timeout=600)
        assert compiler.returncode == 0, f"{module}: {output}"
    return f"{out}{os.pathsep}{STRESS_DIR}"
