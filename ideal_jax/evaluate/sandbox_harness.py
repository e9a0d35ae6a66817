"""The programs that run *inside* the code sandbox (ideal_jax/evaluate/sandbox.py starts them).

Each is passed to `python -I -c`; neither imports anything of ideal_jax. docs/sandbox.md has the
threat model.
"""

# The inprocess backend: runs as `python -I -c INPROCESS_HARNESS mem cpu fsize nproc nofile nonce`
# with cwd = a temporary directory.
INPROCESS_HARNESS = r"""
import sys, os, resource, builtins, io, _io
def _setup():
    mem, cpu, fsize, nproc, nofile = map(int, sys.argv[1:6])
    nonce = sys.argv[6]
    sys.argv = ["prog.py"]  # the nonce must not be visible to the program
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass
    root = os.path.realpath(os.getcwd())
    src = open("prog.py", encoding="utf-8").read()
    result = open("result.txt", "w")
    def denied(*a, **k):
        raise PermissionError("disabled in the evaluation sandbox")
    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        p = os.path.realpath(os.fsdecode(path))
        return p == root or p.startswith(root + os.sep)
    import socket, _socket
    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
            if hasattr(mod, name):
                setattr(mod, name, denied)
    import subprocess, _posixsubprocess
    subprocess.Popen = denied
    _posixsubprocess.fork_exec = denied
    for name in dir(os):
        if name.startswith(("exec", "spawn", "posix_spawn", "fork")) or name in (
                "system", "popen", "kill", "killpg", "setsid", "setpgid"):
            setattr(os, name, denied)
    for name in ("ctypes", "_ctypes", "multiprocessing"):
        sys.modules[name] = None
    real_open, real_os_open = _io.open, os.open
    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"write outside the sandbox: {file!r}")
        return real_open(file, mode, *a, **k)
    def relative_to_fd(k):  # paths relative to a directory fd cannot be checked: refuse them
        return any(k.get(n) is not None for n in ("dir_fd", "src_dir_fd", "dst_dir_fd"))
    def guarded_os_open(path, flags, *a, **k):
        wr = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        if flags & wr and (not inside(path) or relative_to_fd(k)):
            raise PermissionError(f"write outside the sandbox: {path!r}")
        return real_os_open(path, flags, *a, **k)
    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and not inside(file):
                raise PermissionError(f"write outside the sandbox: {file!r}")
            super().__init__(file, mode, *a, **k)
    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = guarded_os_open
    def path_guard(fn, nargs):
        def wrapper(*a, **k):
            if not all(inside(p) for p in a[:nargs]) or relative_to_fd(k):
                raise PermissionError(f"{fn.__name__} outside the sandbox")
            return fn(*a, **k)
        return wrapper
    for name, nargs in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("chmod", 1),
                        ("chown", 1), ("truncate", 1), ("utime", 1), ("mkfifo", 1),
                        ("rename", 2), ("replace", 2), ("link", 2), ("symlink", 2)):
        if hasattr(os, name):
            setattr(os, name, path_guard(getattr(os, name), nargs))
    return src, result, nonce
def _run():  # locals, not module globals, so sys.modules["__main__"] does not expose the nonce
    src, result, nonce = _setup()
    exec(compile(src, "prog.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    result.write(nonce)
    result.flush()
_run()
"""


# Runs inside bubblewrap as `python -I -c BWRAP_HARNESS mem cpu fsize nproc nofile uid src res`
# (as the namespace's root with only CAP_SETUID/SETGID until it drops to `uid`, or as the caller's
# uid when uid is 0). It holds no secret: the verdict is that this code reached the write on res_fd.
BWRAP_HARNESS = r"""
import os, sys, resource
def _setup():
    mem, cpu, fsize, nproc, nofile, uid, src_fd, res_fd = map(int, sys.argv[1:9])
    sys.argv = ["prog.py"]
    with open(src_fd, "rb", closefd=True) as f:
        src = f.read()
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (val, val))
    if uid:  # an unused uid: no capabilities left, no other process to signal, NPROC enforced
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid):
            os._exit(97)
    return compile(src, "prog.py", "exec"), res_fd
def _main():
    code, res_fd = _setup()
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(res_fd, b"PASS\n")
    os._exit(0)
_main()
"""
VERDICT = b"PASS\n"
