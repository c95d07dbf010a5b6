# The create-or-attach steps of a /dev/shm file that processes share,
# included by _journal.pyx and _topiccore.pyx. The including module
# cimports mmap, munmap, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE,
# int64_t and uint64_t, and imports os and secrets.


cdef class _MappedFile:
    """A file under /dev/shm, mapped whole, read-write and shared.

    `_open` creates the file, or maps and checks the one that exists. A
    subclass points its typed header at the mapping in `_mapped`, writes
    the header of a new file in `_format` and checks an existing one in
    `_validate`. Before `_open` it sets `_min_file_bytes`, `_kind` (the
    article and name used in errors, such as "a topic core") and
    `_layout_error` (the exception for a file of another layout).
    """

    cdef void *_base
    cdef uint64_t _file_bytes
    cdef int _fd
    cdef int64_t _min_file_bytes
    cdef str _kind
    cdef object _layout_error
    cdef readonly str path
    cdef readonly bint created

    def __cinit__(self, *args, **kwargs):
        self._base = NULL
        self._fd = -1

    cdef int _mapped(self, void *base) except -1:
        return 0

    cdef int _format(self, const void *params) except -1:
        return 0

    cdef int _validate(self, str path) except -1:
        return 0

    cdef int _open(self, str path, uint64_t file_bytes,
                   const void *params) except -1:
        """Create `path` with `file_bytes` bytes formatted from `params`,
        or attach to the file that another process created first."""
        self.path = path
        self.created = False
        temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            # Built under a private name, then linked into place, so no
            # process maps a half-formatted file.
            os.ftruncate(fd, file_bytes)
            self._map(fd)
            self._format(params)
            try:
                os.link(temp, path)
                self.created = True
            except FileExistsError:
                self._unmap()
                os.close(fd)
                fd = -1
                self._attach(path)
        except BaseException:
            if fd >= 0:
                self._unmap()
                os.close(fd)
            raise
        finally:
            os.unlink(temp)
        if fd >= 0:
            self._fd = fd
        return 0

    cdef int _map(self, int fd) except -1:
        cdef void *base
        self._file_bytes = os.fstat(fd).st_size
        base = mmap(NULL, <size_t>self._file_bytes, PROT_READ | PROT_WRITE,
                    MAP_SHARED, fd, 0)
        if base == MAP_FAILED:
            raise OSError(f"cannot map {self._file_bytes} bytes of "
                          f"{self.path}; /dev/shm or the address space is "
                          f"exhausted")
        self._base = base
        self._mapped(base)
        return 0

    cdef int _unmap(self) except -1:
        if self._base != NULL:
            munmap(self._base, <size_t>self._file_bytes)
            self._base = NULL
            self._mapped(NULL)
        return 0

    cdef int _attach(self, str path) except -1:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < self._min_file_bytes:
                raise self._layout_error(
                    f"{path} is {size} bytes, too small for {self._kind}; "
                    f"it is not one, so remove it or use another name")
            self._map(fd)
            self._validate(path)
        except BaseException:
            self._unmap()
            os.close(fd)
            raise
        self._fd = fd
        return 0

    cdef int _close_file(self) except -1:
        """Unmap the file and close its descriptor; idempotent."""
        self._unmap()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        return 0

    def __dealloc__(self):
        if self._base != NULL:
            munmap(self._base, <size_t>self._file_bytes)
        if self._fd >= 0:
            os.close(self._fd)
