"""Build the native extensions of mqs.

Environment switches:
  MQS_DEBUG=1     -O0 -g and assertions on (MQS_DEBUG defined, NDEBUG off)
  MQS_SANITIZE=1  AddressSanitizer and UndefinedBehaviorSanitizer
  MQS_FAILPOINTS=1  named kill points for crash tests (csrc/mqs_failpoint.h)
"""

import os
import platform

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MQS_DEBUG") == "1"
SANITIZE = os.environ.get("MQS_SANITIZE") == "1"
FAILPOINTS = os.environ.get("MQS_FAILPOINTS") == "1"

compile_args = ["-std=c11", "-Wall", "-Wextra"]
link_args = []
if platform.machine() in ("x86_64", "AMD64"):
    # The shared ring moves a position and its count with one 16-byte CAS
    # (cmpxchg16b); every x86_64 CPU since 2006 has it.
    compile_args += ["-mcx16"]
if DEBUG:
    compile_args += ["-O0", "-g", "-UNDEBUG", "-DMQS_DEBUG=1"]
else:
    compile_args += ["-O3"]
if FAILPOINTS:
    compile_args += ["-DMQS_FAILPOINTS=1"]
if SANITIZE:
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    compile_args += sanitizers
    link_args += sanitizers


# C files that an earlier extension compiles already.
_compiled = set()


def _own_copy(name, source):
    """Return `source`, or, if another extension compiles it too, a file
    of this extension that includes it. With the parallel build each
    extension then writes its own object file: two compiles of one
    source write the same object, and one extension could link it half
    written (seen as an undefined symbol at import)."""
    if source not in _compiled:
        _compiled.add(source)
        return source
    directory = os.path.join("build", "mqs-shared-sources", name)
    os.makedirs(directory, exist_ok=True)
    # Not the included file's name, which would include the wrapper
    # itself (a quoted include looks in the including file's directory
    # first).
    wrapper = os.path.join(directory, f"copy_{os.path.basename(source)}")
    text = f'#include "{os.path.basename(source)}"\n'
    try:
        with open(wrapper, encoding="ascii") as file:
            unchanged = file.read() == text
    except FileNotFoundError:
        unchanged = False
    if not unchanged:
        with open(wrapper, "w", encoding="ascii") as file:
            file.write(text)
    return wrapper


def extension(name, sources):
    return Extension(
        f"mqs.{name}",
        sources=[f"src/mqs/{name}.pyx",
                 *(_own_copy(name, source) for source in sources)],
        include_dirs=["csrc"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=[os.path.join("csrc", f) for f in os.listdir("csrc")],
    )


extensions = [
    extension("_ring", ["csrc/mqs_ring.c"]),
    extension("_queue", ["csrc/mqs_ring.c"]),
    extension("_wheel", ["csrc/mqs_wheel.c"]),
    extension("_shared", ["csrc/mqs_bytering.c", "csrc/mqs_delay.c",
                         "csrc/mqs_wheel.c"]),
    extension("_seglog", ["csrc/mqs_seglog.c", "csrc/mqs_crc32c.c"]),
    extension("_journal", ["csrc/mqs_journal.c"]),
    extension("_topiccore", ["csrc/mqs_topiccore.c"]),
    extension("_slots", []),
]

setup(
    ext_modules=cythonize(
        extensions,
        nthreads=os.cpu_count() or 1,
        compiler_directives={
            "language_level": "3",
            # Start each method docstring with its signature in the
            # "name($self, ...)\n--\n\n" form, which CPython exposes as
            # __text_signature__ for inspect.signature and help(). The
            # default "c" form is plain text that inspect cannot read.
            # A cdef class gets no signature this way (Cython 3.x puts the
            # constructor's into __init__.__doc__), so each public class
            # writes its own in the first lines of its docstring.
            "embedsignature": True,
            "embedsignature.format": "clinic",
        },
    ),
    # Compile the extensions side by side: the build takes about a minute
    # on one core.
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
