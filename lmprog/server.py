"""A resident lmprog process: ``lmprog serve`` keeps Python, JAX, the loaded models and the compiled kernels
alive, and later ``lmprog run``, ``batch``, ``generate`` and ``demo`` commands hand their work to it instead of
paying the imports, the model load and the executables' loading again (docs/running.md, "A resident server").

The client (:func:`forward`) is light: it imports no JAX. It finds the server by a key over everything that could
make the server's answer differ from the one the command would compute itself (lmprog's sources, the Python
installation, the process-level environment: ``JAX_*``, ``XLA_*``, ``LMPROG_*``, ...), so a server started from
another checkout, virtualenv or environment is never used. The server runs one command at a time, in its main
thread, with the client's arguments, working folder, environment, and standard output and error streamed back;
a client that finds it busy (or finds none) runs the command itself. The exit status is the command's. Ctrl-C in
the client interrupts the command in the server as it would in-process (exit 130); the server goes on serving.

Wire format: each message is a 4-byte big-endian length and a UTF-8 JSON object, over a Unix socket in
``cache_dir()/server/`` (a folder only the user can enter; the socket itself mode 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Callable

PROTOCOL = 1
FORWARDED = ("run", "batch", "generate", "demo")
# environment variables read when a process starts (JAX's and XLA's flags, caches, devices, threads): a server
# started with other values would not compute what the client would, so they are part of the key
PROCESS_ENV_PREFIXES = ("JAX_", "XLA_", "LMPROG_", "CUDA_", "TPU_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "TF_")
CLIENT_ONLY_ENV = ("LMPROG_NO_SERVER",)
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
MAX_MESSAGE = 1 << 26
MAP_COUNT_LIMIT = 30_000  # XLA:CPU maps ~3 regions per executable; Linux allows 65,530 per process


class ServeError(Exception):
    """``lmprog serve`` cannot start or reach a server (exit 2)."""


# --------------------------------------------------------------------------------------------- the key


def _package_files() -> list[Path]:
    root = Path(__file__).resolve().parent
    return sorted(p for p in root.rglob("*") if p.suffix in (".py", ".lark") and "__pycache__" not in p.parts)


def server_key(environ=None) -> str:
    """The hex key a client and a server must share: lmprog's sources (path, size, modification time), the
    Python executable and version, the installed packages (the modification times of the ``site-packages``
    folders, which change when a package is installed or removed), the cache folder and the process-level
    environment (:data:`PROCESS_ENV_PREFIXES`, ``PYTHONPATH``)."""
    environ = os.environ if environ is None else environ
    h = hashlib.sha256(f"lmprog-server {PROTOCOL}".encode())
    for path in _package_files():
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(f"{sys.executable}\0{sys.version}\0{sys.prefix}\n".encode())
    for entry in sys.path:
        if entry.endswith(("site-packages", "dist-packages")) and os.path.isdir(entry):
            h.update(f"{entry}\0{os.stat(entry).st_mtime_ns}\n".encode())
    h.update(f"{_cache_dir(environ).resolve()}\n".encode())
    for name in sorted(environ):
        if (name.startswith(PROCESS_ENV_PREFIXES) or name == "PYTHONPATH") and name not in CLIENT_ONLY_ENV:
            h.update(f"{name}={environ[name]}\n".encode())
    return h.hexdigest()


def _cache_dir(environ) -> Path:
    """:func:`lmprog.paths.cache_dir` for the environment ``environ``."""
    return Path(environ.get("LMPROG_CACHE_DIR") or Path.home() / ".cache" / "lmprog")


def socket_path(environ=None) -> Path:
    """Where the server for the environment ``environ`` (default: this process's) listens."""
    environ = os.environ if environ is None else environ
    return _cache_dir(environ) / "server" / f"{server_key(environ)[:24]}.sock"


# ------------------------------------------------------------------------------------------ wire format


def send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket) -> dict | None:
    """The next message, or ``None`` when the other side has closed the connection."""
    head = _read_exactly(sock, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_MESSAGE:
        raise ConnectionError(f"message of {n} bytes")
    body = _read_exactly(sock, n)
    return None if body is None else json.loads(body)


@contextlib.contextmanager
def _address(path: Path):
    """The address to bind or connect ``path`` by: the path itself, or, when it is longer than a socket
    address may be, the same file through a descriptor of its folder (``/proc/self/fd/N/name``, Linux)."""
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        yield str(path)
        return
    if not os.path.isdir("/proc/self/fd"):
        raise OSError(f"the path is longer than a Unix socket address may be ({SOCKET_PATH_MAX} bytes); "
                      "set LMPROG_CACHE_DIR to a shorter folder")
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _connect(path: Path, timeout: float | None = None) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _address(path) as address:
            sock.connect(address)
    except OSError:
        sock.close()
        return None
    return sock


def _closed(sock: socket.socket) -> bool:
    """Whether the other side has closed ``sock`` (without reading what it may have sent)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _listening(path: Path) -> bool:
    """Whether a process accepts connections on ``path`` (a socket nobody listens on refuses them)."""
    sock = _connect(path, timeout=5.0)
    if sock is None:
        return False
    sock.close()
    return True


def request(path: Path, message: dict, timeout: float = 10.0) -> dict | None:
    """One question to the server at ``path`` (``ping``, ``stop``) and its answer; ``None`` if none answers."""
    sock = _connect(path, timeout)
    if sock is None:
        return None
    with sock:
        try:
            send(sock, message)
            return receive(sock)
        except (OSError, ValueError):
            return None


# --------------------------------------------------------------------------------------------- client


def _forwardable(argv: list[str], environ) -> bool:
    if environ.get("LMPROG_NO_SERVER") or not argv or argv[0] not in FORWARDED:
        return False
    # standard input is the client's, and a jax.distributed batch needs a process of its own
    if any(a == "-" or a.startswith(("/dev/stdin", "/dev/fd/", "/proc/self/fd")) for a in argv[1:]):
        return False
    if any(a.startswith(("--coordinator", "--num-processes", "--process-id")) for a in argv):
        return False
    return True


def forward(argv: list[str], environ=None) -> int | None:
    """Run ``lmprog argv`` in a server if one with this process's key is listening and free: its exit status,
    with its output written to this process's standard output and error. ``None`` when the command should run
    here (no server, a busy one, or a command that is never forwarded)."""
    environ = os.environ if environ is None else environ
    if not _forwardable(argv, environ):
        return None
    path = socket_path(environ)
    if not path.exists():
        return None
    sock = _connect(path, timeout=5.0)
    if sock is None:
        return None
    env = dict(environ)
    if sys.stdout.isatty():  # the server's terminal is not the client's: pass the client's size on
        import shutil

        size = shutil.get_terminal_size()
        env.setdefault("COLUMNS", str(size.columns))
        env.setdefault("LINES", str(size.lines))
    try:
        send(sock, {"op": "run", "argv": argv, "cwd": os.getcwd(), "env": env,
                    "tty": [sys.stdout.isatty(), sys.stderr.isatty()]})
        answer = receive(sock)
    except (OSError, ValueError):
        answer = None
    if not answer or not answer.get("accepted"):
        sock.close()
        return None
    sock.settimeout(None)
    return _relay(sock)


def _relay(sock: socket.socket) -> int:
    """Write the server's output here until its exit status arrives. The first Ctrl-C asks the server to
    interrupt the command (which then reports what it had done, as in-process); a second one leaves at once."""
    import signal

    interrupts = []

    def on_interrupt(signum, frame):
        if interrupts:
            raise KeyboardInterrupt
        interrupts.append(time.monotonic())
        with contextlib.suppress(OSError):
            send(sock, {"op": "interrupt"})

    previous = signal.signal(signal.SIGINT, on_interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        with sock:
            while True:
                try:
                    message = receive(sock)
                except (OSError, ValueError):
                    message = None
                if message is None:
                    print("lmprog: the lmprog server stopped during the command (its log may say why); "
                          "run the command again, or with LMPROG_NO_SERVER=1 to run it here", file=sys.stderr)
                    return 1
                if "out" in message or "err" in message:
                    stream = sys.stdout if "out" in message else sys.stderr
                    try:
                        stream.write(message.get("out", message.get("err")))
                        stream.flush()
                    except BrokenPipeError:  # `lmprog run ... | head`: the reader has gone; so does the command
                        with contextlib.suppress(OSError):
                            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
                        return 1
                elif "exit" in message:
                    return int(message["exit"])
    except KeyboardInterrupt:
        print("lmprog: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------- server


class RemoteStream(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` of a served command: text sent to the client as ``{kind: text}``
    messages (buffered to a line or 8 KiB). ``isatty`` answers for the client's stream, so rich renders as
    it would there."""

    def __init__(self, sock: socket.socket, lock: threading.Lock, kind: str, tty: bool):
        super().__init__()
        self._sock, self._lock, self._kind, self._tty = sock, lock, kind, tty
        self._parts: list[str] = []
        self._size = 0

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "strict"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._tty

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            self._parts.append(text)
            self._size += len(text)
            if "\n" in text or self._size >= 8192:
                self.flush()
        return len(text)

    def flush(self) -> None:
        if not self._parts:
            return
        text, self._parts, self._size = "".join(self._parts), [], 0
        with self._lock, contextlib.suppress(OSError):  # a client that has gone loses its output, nothing else
            send(self._sock, {self._kind: text})


class Server:
    """Serves commands on ``path`` with ``command(argv) -> exit status`` until stopped, or idle for
    ``idle_timeout`` seconds (0: never)."""

    def __init__(self, path: Path, command: Callable[[list[str]], int], idle_timeout: float = 3600.0, log=None):
        self.command = command  # the CLI's in-process entry point, ``lmprog.cli.main``
        self.path = path
        self.idle_timeout = idle_timeout
        self.log = log if log is not None else sys.stderr
        self.started = time.time()
        self.served = 0
        self._pending: list = []  # at most one (connection, request) waiting for the main thread
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._running = False  # a command is running: an interrupt may be delivered to the main thread
        self._client_interrupt = False
        self._last = time.monotonic()
        self._listener: socket.socket | None = None

    # -- set-up

    def bind(self) -> None:
        folder = self.path.parent
        try:
            self._bind(folder)
        except OSError as exc:
            raise ServeError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None

    def _bind(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if self.path.exists() or self.path.is_symlink():
            if _listening(self.path):
                info = request(self.path, {"op": "ping"}, timeout=5.0) or {}
                raise ServeError(f"an lmprog server is already running for this installation "
                                 f"(pid {info.get('pid', '?')}); stop it with 'lmprog serve --stop'")
            self.path.unlink()  # left by a server that was killed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            with _address(self.path) as address:
                listener.bind(address)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old)
        listener.listen(16)
        self._listener = listener

    def info(self) -> dict:
        from lmprog import __version__

        get_model = getattr(sys.modules.get("lmprog.runner"), "get_model", None)  # None while being imported
        models = get_model.cache_info().currsize if hasattr(get_model, "cache_info") else 0
        rss = None
        with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="utf-8") as f:
            rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), None)
        return {"pid": os.getpid(), "version": __version__, "uptime_s": round(time.time() - self.started, 1),
                "served": self.served, "busy": self._busy, "models": models, "rss_bytes": rss,
                "socket": str(self.path), "idle_timeout_s": self.idle_timeout}

    # -- threads: accepting connections; the main thread runs the commands

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stopping
            threading.Thread(target=self._greet, args=(conn,), daemon=True).start()

    def _greet(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10.0)
            message = receive(conn)
            conn.settimeout(None)
        except (OSError, ValueError):
            message = None
        if not message:
            conn.close()
            return
        op = message.get("op")
        try:
            if op == "ping":
                send(conn, self.info())
            elif op == "stop":
                send(conn, {"stopping": True, "pid": os.getpid(), "busy": self._busy})
                with self._cv:
                    self._stop = True
                    self._cv.notify_all()
            elif op == "run":
                with self._cv:
                    if self._busy or self._stop:
                        send(conn, {"busy": True})
                    else:  # answered here, at once: the client waits for "accepted" only a few seconds
                        send(conn, {"accepted": True, "pid": os.getpid()})
                        self._busy = True
                        self._pending.append((conn, message))
                        self._cv.notify_all()
                        return  # the main thread owns the connection now
            else:
                send(conn, {"error": f"unknown request {op!r}"})
        except Exception as exc:  # noqa: BLE001 - never leave a client waiting for an answer
            with contextlib.suppress(OSError):
                send(conn, {"error": f"{type(exc).__name__}: {exc}"})
        conn.close()

    def serve_forever(self) -> None:
        import signal

        if self._listener is None:
            self.bind()
        signal.signal(signal.SIGTERM, lambda signum, frame: self._request_stop())
        threading.Thread(target=self._accept_loop, daemon=True).start()
        self._say(f"lmprog server {os.getpid()} listening on {self.path}"
                  + (f" (stops after {self.idle_timeout:g} s idle)" if self.idle_timeout else ""))
        try:
            _warm_up()  # commands that arrive meanwhile wait for it
            while True:
                with self._cv:
                    while not self._pending and not self._stop:
                        left = None
                        if self.idle_timeout:
                            left = self.idle_timeout - (time.monotonic() - self._last)
                            if left <= 0:
                                self._stop = True
                                self._say("idle: stopping")
                                break
                        self._cv.wait(timeout=left if left is None else min(left, 60.0))
                    if not self._pending:  # stopping; a command accepted before the stop still runs
                        break
                    conn, message = self._pending.pop()
                user_stop = self._execute(conn, message)
                with self._cv:
                    self._busy = False
                    self._last = time.monotonic()
                if user_stop:
                    self._say("interrupted: stopping")
                    break
        except KeyboardInterrupt:
            self._say("interrupted: stopping")
        finally:
            self.close()

    def _request_stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.log, flush=True)

    # -- one command

    def _watch(self, conn: socket.socket) -> None:
        """The client's messages during a command: ``interrupt`` (its Ctrl-C), or a closed connection (the
        client has gone), both delivered to the command as the SIGINT a terminal would send."""
        import signal

        while True:
            try:
                message = receive(conn)
            except (OSError, ValueError):
                message = None
            if message is not None and message.get("op") != "interrupt":
                continue
            with self._cv:
                if self._running and not self._client_interrupt:
                    self._client_interrupt = True
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if message is None:
                return

    def _execute(self, conn: socket.socket, message: dict) -> bool:
        """Run one command with :attr:`command` in this (the main) thread; True if the server's own terminal sent
        the interrupt (then the server stops after the command)."""
        argv = [str(a) for a in message.get("argv", [])]
        t0 = time.perf_counter()
        lock = threading.Lock()
        tty_out, tty_err = (list(message.get("tty") or []) + [False, False])[:2]
        out = RemoteStream(conn, lock, "out", bool(tty_out))
        err = RemoteStream(conn, lock, "err", bool(tty_err))
        saved = (os.getcwd(), dict(os.environ), sys.stdout, sys.stderr, sys.stdin, sys.argv)
        code, user_stop = 1, False
        if _closed(conn):  # the client gave up before its command started (it runs it itself)
            conn.close()
            return False
        watcher = threading.Thread(target=self._watch, args=(conn,), daemon=True)
        try:
            try:
                os.chdir(message["cwd"])
                os.environ.clear()
                os.environ.update({str(k): str(v) for k, v in (message.get("env") or {}).items()})
                sys.stdout, sys.stderr, sys.stdin, sys.argv = out, err, io.StringIO(""), ["lmprog", *argv]
                with self._cv:
                    self._running, self._client_interrupt = True, False
                watcher.start()
                try:
                    code = self.command(argv)
                except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
                finally:
                    with self._cv:
                        self._running = False
            except KeyboardInterrupt:  # delivered after the command had returned, or outside it
                code = 130
            except Exception as exc:  # noqa: BLE001 - the server must survive whatever a command does
                code = 1
                with contextlib.suppress(Exception):
                    err.write(f"lmprog: internal error in the lmprog server: {type(exc).__name__}: {exc}\n")
            user_stop = code == 130 and not self._client_interrupt
        finally:
            with contextlib.suppress(Exception):
                out.flush()
                err.flush()
            cwd, env, sys.stdout, sys.stderr, sys.stdin, sys.argv = saved
            os.environ.clear()
            os.environ.update(env)
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        with lock, contextlib.suppress(OSError):
            send(conn, {"exit": int(code)})
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        watcher.join(timeout=5.0)
        self.served += 1
        self._say(f"{' '.join(argv[:2])}{' ...' if len(argv) > 2 else ''}: exit {code} in "
                  f"{time.perf_counter() - t0:.2f} s")
        _release_if_crowded()
        return user_stop


def _warm_up() -> None:
    """Import what every command needs (the front end, the runner, JAX and its backend) before the first one."""
    import importlib

    for name in ("lmprog.program", "lmprog.runner", "lmprog.backends.jax_setup"):
        importlib.import_module(name)
    sys.modules["jax"].devices()


def _map_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _release_if_crowded() -> None:
    """Drop the compiled executables when the process nears Linux's limit on memory maps (XLA:CPU maps about
    three regions per executable); the kernel cache on disk serves them again."""
    if _map_count() < MAP_COUNT_LIMIT:
        return
    jax = sys.modules.get("jax")
    aot = sys.modules.get("lmprog.inference.aot")
    if jax is not None:
        jax.clear_caches()
    if aot is not None:
        aot.clear()


# ---------------------------------------------------------------------------------------- lmprog serve


def start_detached(idle_timeout: float, wait_s: float = 120.0) -> dict:
    """Start a server in the background (its own session, output to ``server/<key>.log``) and wait until it
    answers; its ``ping`` answer."""
    import subprocess

    path = socket_path()
    if path.exists() and _listening(path):
        running = request(path, {"op": "ping"}, timeout=5.0) or {}
        raise ServeError(f"an lmprog server is already running for this installation (pid {running.get('pid', '?')})")
    log_path = path.with_suffix(".log")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        log = open(log_path, "ab")  # noqa: SIM115 - closed below, once the child has it
    except OSError as exc:
        raise ServeError(f"cannot write the server's log {log_path}: {exc.strerror or exc}") from None
    with log:
        proc = subprocess.Popen([sys.executable, "-m", "lmprog.cli", "serve", "--idle-timeout", f"{idle_timeout:g}"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if k not in CLIENT_ONLY_ENV})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        info = request(path, {"op": "ping"}, timeout=2.0)
        if info is not None and info.get("pid") == proc.pid:
            info["log"] = str(log_path)
            return info
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise ServeError("the server did not start: " + (" / ".join(tail) or f"exit {proc.returncode}"))
        time.sleep(0.1)
    proc.terminate()
    raise ServeError(f"the server did not answer within {wait_s:g} s (log: {log_path})")
