"""Start a Triton server on a repository, on 127.0.0.1, and wait until it is ready.

Which binary: `tritonserver` on PATH (the official container puts it there), else the one bundled in the
PyTriton wheel of the serving virtual environment (`scripts/triton_env.sh` makes `.venv-triton`; set
FSDEPLOY_TRITON_VENV to use another). The PyTriton binary needs two things found by experiment on these
machines: LD_LIBRARY_PATH with the interpreter's LIBDIR (the Python backend stub links libpython; a
pyenv Python failed with an `_recursion_count` error against the system one) and with the wheel's
`nvidia_pytriton.libs`; and a backend folder whose `python/` holds the stub for this Python version.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fsdeploy.errors import InvalidInput, MissingDependency
from fsdeploy.serving.roles import read_manifest

VENV_ENV = "FSDEPLOY_TRITON_VENV"
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")
UTILS = "triton_python_backend_utils.py"
# The stub imports this module (and numpy through it) before any model.py runs, with the interpreter's own
# site-packages on sys.path and PYTHONPATH ignored. PyTriton's stub needs numpy<2 (with numpy 2 the BYTES
# tensors it hands over arrive garbled), so the shim puts the serving venv's packages first, then runs the real module.
_UTILS_SHIM = '''# written by fsdeploy.serving.server: the serving venv first on sys.path, then PyTriton's module
import sys
if {site!r} not in sys.path:
    sys.path.insert(0, {site!r})
exec(compile(open({real!r}).read(), {real!r}, "exec"))
'''


def venv_path() -> Path:
    """The serving virtual environment: $FSDEPLOY_TRITON_VENV, else `.venv-triton` in the source tree."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV])
    return Path(__file__).resolve().parents[2] / ".venv-triton"


def venv_site_packages(venv: Path | None = None) -> Path:
    venv = venv or venv_path()
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / ver / "site-packages"


@dataclass(frozen=True)
class ServerBinary:
    """A tritonserver executable, its backends folder and the library path it needs."""

    binary: Path
    backends: Path | None  # None: the binary's default (/opt/tritonserver/backends)
    ld_paths: tuple[str, ...] = ()
    stub: Path | None = None  # PyTriton: the Python backend stub for this interpreter


def find_server() -> ServerBinary:
    """Locate tritonserver.

    Raises:
        MissingDependency: neither a tritonserver on PATH nor the PyTriton wheel in the serving venv.
    """
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), None)
    sp = venv_site_packages()
    root = sp / "pytriton" / "tritonserver"
    binary = root / "bin" / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not binary.is_file():
        raise MissingDependency(
            f"no tritonserver on PATH and no PyTriton in {venv_path()}; run `bash scripts/triton_env.sh` "
            f"(or set {VENV_ENV} to a venv with nvidia-pytriton)"
        )
    if not stub.is_file():
        raise MissingDependency(f"PyTriton in {venv_path()} has no Python backend stub for Python {ver}; use Python 3.8-3.13")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    return ServerBinary(binary, root / "backends", (libdir, str(sp / "nvidia_pytriton.libs")), stub)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TritonServer:
    """A tritonserver process serving `repo` over HTTP on 127.0.0.1 (gRPC and metrics off).

    Args:
        repo: repository from `fsdeploy triton export`.
        http_port: default a free port.
        log: file for the server's output (default: a file in a private temp folder, removed by `stop`).
        verbose: Triton's --log-verbose=1.
    """

    def __init__(self, repo: str | Path, *, http_port: int | None = None, log: str | Path | None = None,
                 verbose: bool = False) -> None:
        self.repo = Path(repo).resolve()
        if not SAFE_PATH.match(str(self.repo)):
            # measured: a '<' in the path made every stub fail to start and the server hang unready
            raise InvalidInput(
                f"repository path {self.repo} has characters Triton's Python backend cannot pass to its stub (it starts "
                "it through a shell); move the repository to a path of letters, digits and . _ - + /"
            )
        info = read_manifest(self.repo)
        if info.get("pending"):
            raise InvalidInput(
                f"{repo} still needs {', '.join(info['pending'])}; run models/features/build_plan.sh on the GPU server first"
            )
        if info.get("backend") != "python" and not shutil.which("tritonserver"):
            raise MissingDependency(
                f"{repo} uses the {info.get('backend')} backend, which the PyTriton server lacks; serve it with the "
                "official Triton container (see README), or export with --backend python"
            )
        self.server = find_server()
        self.port = http_port or free_port()
        self.url = f"127.0.0.1:{self.port}"
        self._tmp = Path(tempfile.mkdtemp(prefix="fsdeploy-triton-"))
        self.log_path = Path(log) if log else self._tmp / "server.log"
        self.verbose = verbose
        self.proc: subprocess.Popen[bytes] | None = None

    def _backend_dir(self) -> Path | None:
        if self.server.stub is None:
            return self.server.backends
        # a private backends folder: PyTriton's python backend plus the stub matching this interpreter
        be = self._tmp / "backends" / "python"
        be.mkdir(parents=True, exist_ok=True)
        assert self.server.backends is not None
        real_utils = self.server.backends / "python" / UTILS
        for f in (self.server.backends / "python").iterdir():
            if f.is_file() and f.name != UTILS:
                (be / f.name).symlink_to(f)
        (be / "triton_python_backend_stub").symlink_to(self.server.stub)
        (be / UTILS).write_text(_UTILS_SHIM.format(site=str(venv_site_packages()), real=str(real_utils)))
        return be.parent

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        """Launch and wait for /v2/health/ready.

        Raises:
            InvalidInput: the server exited or was not ready in time (the log's last lines are in the message).
        """
        cmd = [str(self.server.binary), f"--model-repository={self.repo / 'models'}", "--http-address=127.0.0.1",
               f"--http-port={self.port}", "--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=true",
               "--strict-readiness=true", f"--log-verbose={1 if self.verbose else 0}"]
        be = self._backend_dir()
        if be is not None:
            cmd.append(f"--backend-directory={be}")
        env = dict(os.environ)
        if self.server.ld_paths:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.server.ld_paths, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise InvalidInput(f"tritonserver exited with code {self.proc.returncode} on {self.repo}:\n{tail}")
            if self.ready():
                return self
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise InvalidInput(f"tritonserver was not ready after {timeout_s:.0f} s on {self.repo}:\n{tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def models(self) -> list[dict[str, str]]:
        req = urllib.request.Request(f"http://{self.url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        """SIGKILL the server and its stubs (the fault tests' crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL after `timeout_s`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        # the private backends folder (and the default log) go with the server
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        if self.proc is None:
            try:
                self.start()
            except BaseException:  # Ctrl-C while waiting: stop what was started
                self.stop()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
