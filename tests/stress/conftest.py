"""Fixtures of the crash tests: a copy of mqs built with failpoints."""

import os
import platform
import shutil
import signal
import subprocess
import sysconfig
import tempfile
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


# The Cython output contains no failpoints, and compiling it at -O2 was
# most of the build time (about 45 s of CPU, measured with gcc 12 on
# a 2-core machine), so it is compiled at -O0. That includes the
# inline helpers of the csrc headers it includes. The csrc files, which
# contain the failpoints, keep -O2, so the steps around each failpoint
# run optimised code.
GLUE_FLAGS = ["-O0"]
CORE_FLAGS = ["-O2"]


def _compile_object(cc, flags, source, target, niceness=0):
    """Start compiling `source` into the object file `target`, `niceness`
    (os.nice) lower in priority than this process."""
    command = [
        *cc, "-c", "-fPIC", "-pthread", *flags, "-std=c11", "-Wall",
        "-Wextra", "-DMQS_FAILPOINTS=1", f"-I{ROOT / 'csrc'}",
        f"-I{sysconfig.get_paths()['include']}", str(source),
        "-o", str(target),
    ]
    if platform.machine() == "x86_64":
        command.insert(1, "-mcx16")  # the 16-byte CAS of mqs_atomic.h
    # A process group of its own, so that a stop also ends the compiler
    # proper (cc1) that the gcc driver started.
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        preexec_fn=(lambda: os.nice(niceness)) if niceness else None)


def _wait_all(compilers):
    """Wait for every compiler process and fail with the output of any
    that failed."""
    for name, compiler in compilers.items():
        output, _ = compiler.communicate(timeout=600)
        assert compiler.returncode == 0, f"{name}: {output}"


def _installed_package():
    import mqs

    return Path(mqs.__file__).parent


def _compiler():
    return (sysconfig.get_config_var("CC") or "cc").split()


def _start_build(installed, cc, out, niceness=0):
    """Copy the package into `out` and start compiling the modules of
    FAILPOINT_MODULES with failpoints into objects under `out`. Returns
    {source name: compiler process}."""
    package = out / "mqs"
    objects = out / "objects"
    objects.mkdir()
    skipped = [pattern for module in FAILPOINT_MODULES
               for pattern in (f"{module}.*.so", f"{module}.c")]
    shutil.copytree(installed, package, ignore=shutil.ignore_patterns(
        *skipped, "__pycache__"))

    # The Cython output, the longest compiles, starts first.
    compilers = {}
    for module in FAILPOINT_MODULES:
        c_source = _cython_source(installed, package, out, module)
        compilers[module] = _compile_object(
            cc, GLUE_FLAGS, c_source, objects / f"{module}.o", niceness)
    c_files = sorted({name for names in FAILPOINT_MODULES.values()
                      for name in names})
    for name in c_files:
        compilers[name] = _compile_object(
            cc, CORE_FLAGS, ROOT / "csrc" / name,
            objects / f"{Path(name).stem}.o", niceness)
    return compilers


# The build that pytest_collection_modifyitems started: "out" (its
# directory) and "compilers" (as _start_build returns them).
_early_build = {}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Start the failpoint build in the background, at low priority, once
    the tests to run are known and one of them needs it.

    The build takes about 10 s on 2 cores with gcc 12. Started here it
    runs beside the tests before the first failpoint test, at a lower
    priority so that they keep the CPU they need. Without a compiler, or
    when a Cython output must be made again, the failpoint_path fixture
    does the whole build itself.
    """
    if config.option.collectonly or not any(
            "failpoint_path" in getattr(item, "fixturenames", ())
            for item in items):
        return
    installed = _installed_package()
    cc = _compiler()
    if shutil.which(cc[0]) is None:
        return
    for module in FAILPOINT_MODULES:
        c_source = installed / f"{module}.c"
        pyx = installed / f"{module}.pyx"
        if not c_source.exists() \
                or c_source.stat().st_mtime < pyx.stat().st_mtime:
            return
    out = Path(tempfile.mkdtemp(prefix="mqs-failpoint-build-"))
    _early_build["out"] = out
    _early_build["compilers"] = _start_build(installed, cc, out, niceness=10)


def pytest_sessionfinish(session):
    """Stop an early build that no test waited for and remove its files."""
    for compiler in _early_build.get("compilers", {}).values():
        if compiler.poll() is None:
            # The driver's children keep its output pipe open, so
            # killing the driver alone leaves communicate() waiting for
            # them to finish compiling.
            try:
                os.killpg(compiler.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            compiler.communicate()
    if "out" in _early_build:
        shutil.rmtree(_early_build["out"], ignore_errors=True)


@pytest.fixture(scope="session")
def failpoint_path(tmp_path_factory):
    """Build a copy of mqs whose modules have failpoints compiled in.

    Returns a PYTHONPATH for child interpreters: the copy first, then this
    directory (for shared_workers). The modules of FAILPOINT_MODULES are
    compiled with -DMQS_FAILPOINTS=1 (each source file in its own process)
    from the Cython output that the normal build left next to the
    installed module. When that file is missing or stale, Cython (if
    installed) makes it again from the .pyx, and without Cython the
    failpoint tests are skipped. Usually the compilers were started at
    the end of collection (pytest_collection_modifyitems).
    """
    cc = _compiler()
    if "compilers" in _early_build:
        out = _early_build["out"]
        compilers = _early_build["compilers"]
    else:
        if shutil.which(cc[0]) is None:
            pytest.skip(f"no C compiler ({cc[0]}) to build the failpoint "
                        f"copy")
        out = tmp_path_factory.mktemp("failpoint-build")
        compilers = _start_build(_installed_package(), cc, out)
    _wait_all(compilers)

    package = out / "mqs"
    objects = out / "objects"
    linkers = {}
    for module, names in FAILPOINT_MODULES.items():
        target = package / f"{module}{sysconfig.get_config_var('EXT_SUFFIX')}"
        linkers[module] = subprocess.Popen(
            [*cc, "-shared", "-pthread", str(objects / f"{module}.o"),
             *(str(objects / f"{Path(name).stem}.o") for name in names),
             "-o", str(target)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_all(linkers)
    return f"{out}{os.pathsep}{STRESS_DIR}"
