"""Run untrusted, model-written Python in a child process with limits, for HumanEval pass@k.

Threat model. The code comes from a language model under evaluation: usually harmless, sometimes
broken in ways that hurt (infinite loops, memory bombs, ``os.remove`` or ``shutil.rmtree`` on the wrong
path, a ``pip install`` or an HTTP request it saw in training data). It is not written by an attacker
who targets this sandbox. The layers below stop those accidents and make deliberate escapes harder;
they are defence in depth, not a jail. Do not run code from an adversary with it: use a VM or a
container without secrets for that.

Each program runs in ``python -I`` (no PYTHON* variables, no user site) in a fresh temporary working
directory that is deleted afterwards, with a minimal environment (no inherited variables, so no tokens
or keys), stdin from /dev/null, stdout and stderr to a file, in its own session so that the wall-clock
timeout kills the whole process group. Inside the child, before the program's first line runs:

1. **Resource limits** (``setrlimit``): address space (``memory_mb``), CPU seconds (a backstop to the
   wall-clock timeout), file size (output bombs), no core files. They are set by the child itself
   rather than in ``preexec_fn``, which is unsafe in a multi-threaded parent such as one running
   PyTorch. ``RLIMIT_NPROC`` is not used: it counts all of the user's processes (so a value low
   enough to matter also breaks threads and depends on what else the user runs) and root ignores it.
2. **Network namespace** (Linux, where allowed): the child moves into a new network namespace that has
   no interfaces, so no TCP/UDP traffic and no abstract Unix sockets reach the host.
3. **Landlock** (Linux >= 5.13, unprivileged): the kernel refuses to create, write, truncate, rename or
   delete files outside the temporary directory (``/dev/null`` excepted) and to ``execve`` anything;
   from ABI 4 also TCP bind/connect, from ABI 6 signals to processes outside the sandbox.
4. **Audit hook** (``sys.addaudithook``, cannot be removed once installed): refuses opening files for
   writing and removing/renaming/creating files or directories outside the temporary directory,
   every ``socket`` operation, ``subprocess``/``os.system``/``os.exec*``/``os.fork``/``os.posix_spawn``
   (``_posixsubprocess.fork_exec``, which raises no audit event, is replaced as well), ``ctypes``, signals
   to other processes, raising resource limits, ``sqlite3`` files outside the directory and
   ``syslog``. A refused operation raises ``PermissionError`` in the program and makes the result
   ``"blocked"`` even when the program catches it.

What remains possible: reading any file the user can read (imports need it; the output only comes back
to the evaluation records), creating FIFOs/device nodes or using ``dir_fd`` tricks where Landlock is
missing (3.11 raises no audit event for ``mkfifo``/``mknod``, and the ``open`` event has no ``dir_fd``;
the hook refuses ``os.open`` on directories outside for that reason), and anything done through memory
corruption or by tampering with the hook's state via ``gc``/frame introspection where the kernel layers
are missing. Which layers were active is reported in each result (``layers``).

Run as a script (``python -I sandbox.py FD``) this file is the child's bootstrap; it imports only the
standard library so that the child stays small.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

STATUSES = ("passed", "failed", "timeout", "error", "blocked")
_STARTUP_LIMIT_S = 30.0  # Python start-up in the child, not counted against the program's timeout
_DETAIL_CHARS = 2000
_OUTPUT_TAIL = 2000


@dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed run ended.

    ``status``: "passed" (ran to its last line), "failed" (raised, or exited before its last line),
    "timeout" (wall-clock or CPU limit), "error" (killed by a signal or a limit other than time, or the
    sandbox could not start), "blocked" (attempted an operation the sandbox refuses).
    """

    passed: bool
    status: str
    detail: str
    layers: tuple[str, ...] = field(default=())


def _minimal_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _read_tail(fileobj, n: int) -> str:
    fileobj.seek(0, os.SEEK_END)
    size = fileobj.tell()
    fileobj.seek(max(0, size - n))
    return fileobj.read().decode("utf-8", errors="replace")


def _read_available(fd: int, limit: int = 1 << 20) -> bytes:
    """Whatever the (non-blocking) report pipe holds, up to `limit` bytes."""
    chunks, total = [], 0
    while total < limit:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_sandboxed(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
                  max_file_mb: int = 16, kernel_layers: bool = True) -> SandboxResult:
    """Run `program` as ``__main__`` in a sandboxed child process (see the module docstring).

    `timeout_s` is wall-clock time from the program's first line (the child's Python start-up is not
    counted); `memory_mb` caps the address space; `max_file_mb` caps every file the child writes,
    its captured output included. ``kernel_layers=False`` leaves out the network namespace and
    Landlock, to check the layers that work everywhere (limits, audit hook) on their own.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64 (Python itself needs it), got {memory_mb}")
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="fedbiot-sandbox-", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as output:
        workdir = os.path.realpath(workdir)
        job = {
            "nonce": nonce,
            "program": program,
            "workdir": workdir,
            "memory_bytes": int(memory_mb) << 20,
            "cpu_s": int(math.ceil(timeout_s)) + 1,
            "fsize_bytes": int(max_file_mb) << 20,
            "kernel_layers": bool(kernel_layers),
        }
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(write_fd)],
                stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, cwd=workdir,
                env=_minimal_env(workdir), pass_fds=(write_fd,), start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            return SandboxResult(False, "error", f"could not start the sandbox: {exc}")
        os.close(write_fd)
        try:
            return _supervise(proc, read_fd, output, job, timeout_s)
        finally:
            _kill_group(proc.pid)
            if proc.poll() is None:
                proc.wait()
            os.close(read_fd)


def _supervise(proc: subprocess.Popen, read_fd: int, output, job: dict, timeout_s: float) -> SandboxResult:
    """Feed the job, wait for the child to start and then for it to finish, and read its report."""
    try:
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
    except OSError:  # the child died before reading its job; its exit status tells why
        pass
    # The child writes one byte just before the program's first line; the timeout starts there.
    poller = select.poll()  # not select.select: that fails for descriptors above 1023
    poller.register(read_fd, select.POLLIN | select.POLLHUP)
    ready = poller.poll(_STARTUP_LIMIT_S * 1000)
    started = os.read(read_fd, 1) == b"S" if ready else False
    if not started:
        _kill_group(proc.pid)
        proc.wait()
        detail = _tail(_read_tail(output, _OUTPUT_TAIL), _DETAIL_CHARS)
        return SandboxResult(False, "error", f"sandbox did not start (exit {proc.returncode}): {detail}")
    t0 = time.monotonic()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(proc.pid)  # nothing the program started may outlive it
    proc.wait()
    os.set_blocking(read_fd, False)
    layers, report = _parse_report(_read_available(read_fd), job["nonce"])
    if timed_out:
        return SandboxResult(False, "timeout", f"killed after {time.monotonic() - t0:.1f} s wall-clock "
                                               f"(limit {timeout_s:g} s)", layers)
    if report is not None:
        status = report["status"] if report["status"] in STATUSES else "error"
        return SandboxResult(status == "passed", status, _tail(str(report.get("detail", "")), _DETAIL_CHARS),
                             layers)
    code = proc.returncode
    out = _tail(_read_tail(output, _OUTPUT_TAIL), _DETAIL_CHARS)
    if code < 0:
        if -code == signal.SIGXCPU:
            return SandboxResult(False, "timeout", f"CPU time limit ({job['cpu_s']} s) exceeded", layers)
        if -code == signal.SIGXFSZ:
            return SandboxResult(False, "error", f"file size limit exceeded; {out}", layers)
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return SandboxResult(False, "error", f"killed by {name}; {out}", layers)
    return SandboxResult(False, "failed", f"exited with status {code} before the program's last line; {out}",
                         layers)


def _parse_report(raw: bytes, nonce: str) -> tuple[tuple[str, ...], dict | None]:
    """The sandbox layers the child announced at start, and its final report if it got that far.

    Only lines carrying this run's nonce count, so a program that exits early, or writes something
    report-like to the pipe, cannot forge a result.
    """
    layers: tuple[str, ...] = ()
    final = None
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict) or message.get("nonce") != nonce:
            continue
        if "layers" in message and not layers:
            layers = tuple(str(x) for x in message["layers"])
        if "status" in message:
            final = message
    return layers, final


# --------------------------------------------------------------------------------------------------
# Child side: everything below runs in the sandboxed process, before and around the program.
# --------------------------------------------------------------------------------------------------

class SandboxViolation(PermissionError):
    """Raised inside the child for an operation the sandbox refuses."""


_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # all arches
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


def _set_limits(job: dict) -> None:
    import resource

    def cap(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    cap(resource.RLIMIT_AS, job["memory_bytes"])
    cap(resource.RLIMIT_CPU, job["cpu_s"])
    cap(resource.RLIMIT_FSIZE, job["fsize_bytes"])
    cap(resource.RLIMIT_CORE, 0)


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _enter_network_namespace(libc) -> bool:
    """A new network namespace: directly where privileged, else inside a new user namespace (which
    needs a uid/gid map; a forked probe checks the map can be written before the real switch)."""
    if libc.unshare(_CLONE_NEWNET) == 0:
        return True
    uid, gid = os.geteuid(), os.getegid()

    def enter_user_ns() -> bool:
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            return False
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            return False
        return True

    pid = os.fork()
    if pid == 0:
        os._exit(0 if enter_user_ns() else 1)
    _, status = os.waitpid(pid, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        return False
    return enter_user_ns()


def _landlock(libc, workdir: str) -> list[str]:
    """Kernel-enforced write/exec restrictions (and TCP, signals on newer ABIs); [] where unavailable."""
    import ctypes
    import struct

    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return []
    execute, write_file, truncate, refer = 1 << 0, 1 << 1, 1 << 14, 1 << 13
    # remove dir/file, make char/dir/reg/sock/fifo/block/sym
    mutate = sum(1 << b for b in (4, 5, 6, 7, 8, 9, 10, 11, 12))
    writes = write_file | mutate | (refer if abi >= 2 else 0) | (truncate if abi >= 3 else 0)
    net = 0b11 if abi >= 4 else 0  # bind TCP, connect TCP: no rule allows either
    scoped = 0b11 if abi >= 6 else 0  # abstract Unix sockets, signals
    if abi >= 6:
        attr = struct.pack("=QQQ", execute | writes, net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", execute | writes, net)
    else:
        attr = struct.pack("=Q", execute | writes)
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return []
    try:
        for path, access in ((workdir, writes), ("/dev/null", write_file | (truncate if abi >= 3 else 0))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr (packed)
                if libc.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, rule, ctypes.c_uint32(0)) != 0:
                    return []
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return []
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            return []
    finally:
        os.close(ruleset)
    layers = ["landlock-fs"]
    if net:
        layers.append("landlock-net")
    if scoped:
        layers.append("landlock-scope")
    return layers


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ALWAYS_BLOCKED = frozenset({
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.link", "os.symlink", "os.killpg", "resource.setrlimit", "resource.prlimit", "webbrowser.open",
    "sqlite3.enable_load_extension", "sqlite3.load_extension", "os.startfile", "ensurepip.bootstrap",
})
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "syslog.", "winreg.", "_winapi.")
# event -> [(index of a path argument, index of its dir_fd argument or None, follow the last symlink)]
_PATH_EVENTS: dict[str, list[tuple[int, int | None, bool]]] = {
    "os.remove": [(0, 1, False)],
    "os.rmdir": [(0, 1, False)],
    "os.mkdir": [(0, 2, False)],
    "os.rename": [(0, 2, False), (1, 3, False)],
    "os.chmod": [(0, 2, True)],
    "os.chown": [(0, 3, True)],
    "os.utime": [(0, 3, True)],
    "os.truncate": [(0, None, True)],
    "os.setxattr": [(0, None, True)],
    "os.removexattr": [(0, None, True)],
    "shutil.rmtree": [(0, 1, False)],
}


def _make_audit_hook(workdir: str, violations: list[str]):
    """The audit hook: refuses the operations listed in the module docstring, records each refusal."""
    root = os.path.realpath(workdir)
    allowed_files = frozenset({"/dev/null"})
    my_pid = os.getpid()
    realpath, isabs, join, split, readlink, getcwd, fspath, fsdecode, isdir = (
        os.path.realpath, os.path.isabs, os.path.join, os.path.split, os.readlink, os.getcwd, os.fspath,
        os.fsdecode, os.path.isdir)

    def resolve(path, dir_fd=None, follow=True) -> str:
        if isinstance(path, int):
            return readlink(f"/proc/self/fd/{path}")
        p = fsdecode(fspath(path))
        if not isabs(p):
            use_fd = isinstance(dir_fd, int) and dir_fd >= 0  # events report "no dir_fd" as -1 or None
            base = readlink(f"/proc/self/fd/{dir_fd}") if use_fd else getcwd()
            p = join(base, p)
        if follow:
            return realpath(p)
        head, tail = split(p)
        if tail in ("", ".", ".."):
            return realpath(p)
        return join(realpath(head), tail)

    def inside(resolved: str) -> bool:
        return resolved == root or resolved.startswith(root + os.sep) or resolved in allowed_files

    def refuse(event: str, args: tuple) -> None:
        message = f"sandbox: {event}{_short(args)} is not allowed"
        if len(violations) < 20:
            violations.append(message)
        raise SandboxViolation(message)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            if flags & _WRITE_FLAGS:
                if not inside(resolve(path)):
                    refuse(event, args)
            elif mode is None:  # os.open: a directory fd outside could serve as dir_fd for a write
                target = resolve(path)
                if not inside(target) and isdir(target):
                    refuse(event, args)
            return
        if event in _PATH_EVENTS:
            for path_i, dir_fd_i, follow in _PATH_EVENTS[event]:
                path = args[path_i]
                if path is None:
                    continue
                dir_fd = args[dir_fd_i] if dir_fd_i is not None and dir_fd_i < len(args) else None
                if not inside(resolve(path, dir_fd, follow)):
                    refuse(event, args)
            return
        if event in _ALWAYS_BLOCKED or event.startswith(_BLOCKED_PREFIXES):
            refuse(event, args)
        if event == "os.kill" and args[0] != my_pid:
            refuse(event, args)
        if event == "sqlite3.connect":
            database = args[0]
            if database not in (":memory:", "", b":memory:", b"") and not inside(resolve(database)):
                refuse(event, args)
        if event == "import" and args[0] == "_posixsubprocess":
            refuse(event, args)

    return hook


def _short(args: tuple) -> str:
    text = repr(args)
    return text if len(text) <= 200 else text[:200] + "...)"


def _blocked_fork_exec(*args, **kwargs):
    raise SandboxViolation("sandbox: starting a process is not allowed")


def _child_main(report_fd: int) -> None:
    """Bootstrap of the sandboxed process: read the job, lock down, run the program, report."""
    import builtins
    import linecache
    import traceback
    import types

    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    workdir = job["workdir"]
    os.chdir(workdir)

    _set_limits(job)
    layers = ["rlimits"]
    if job["kernel_layers"]:
        libc = _libc()
        try:
            if _enter_network_namespace(libc):
                layers.append("netns")
        except OSError:
            pass
        try:
            layers += _landlock(libc, workdir)
        except OSError:
            pass
    import _posixsubprocess
    import ctypes  # noqa: F401 - imported before the hook: its import-time dlopen is not the program's

    _posixsubprocess.fork_exec = _blocked_fork_exec
    violations: list[str] = []
    sys.addaudithook(_make_audit_hook(workdir, violations))
    layers.append("audit-hook")

    source = job["program"]
    filename = "<program>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    sys.argv = [filename]
    status, detail = "passed", ""
    os.write(report_fd, b"S" + json.dumps({"nonce": job["nonce"], "layers": layers}).encode() + b"\n")
    try:
        code = compile(source, filename, "exec")
        exec(code, main.__dict__)
    except SystemExit as exc:
        status, detail = "failed", f"SystemExit({exc.code!r}) before the program's last line"
    except BaseException as exc:  # the program's failure is the result
        status = "failed"
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        detail = "".join(traceback.format_exception(type(exc), exc, tb))
    if violations:
        status, detail = "blocked", "; ".join(violations)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced them
            pass
    report = {"nonce": job["nonce"], "status": status, "detail": detail[-_DETAIL_CHARS:]}
    try:
        os.write(report_fd, b"\n" + json.dumps(report).encode() + b"\n")
    finally:
        os._exit(0)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
