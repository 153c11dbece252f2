"""`dmf-serve`: run the Triton Inference Server of the `serve` extra on a `dmf-export --triton` repository.

The `nvidia-pytriton` wheel carries `tritonserver` (2.51) with its Python backend; this arranges what
that binary needs to serve `dmf_recognizer` from a plain repository:

- a backend folder holding the wheel's Python backend and the stub built for this Python version;
- LD_LIBRARY_PATH: this interpreter's libpython (the stub embeds it) and the wheel's libraries;
- DMF_SERVE_SITE_DIRS: this environment's site-packages, which the model puts first on its path
  (the stub's interpreter is isolated and ignores PYTHONPATH).

It binds to 127.0.0.1 unless told otherwise, loads only the models asked for (dmf_recognizer by default),
waits until they are ready, prints one `dmf-serve: ready ...` line, and on SIGTERM or SIGINT stops the
server and exits.

Access (see dmf_deploy/runtime/serve/key.py for the key): Triton's health checks are open; inference,
metadata, model configs and statistics need the header `dmf-serve-key`; the model-repository API (which
loads models, and so runs code), shared memory, logging and trace settings are closed to every client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click

from dmf_deploy.cli_support import DmfCommand, version_option
from dmf_deploy.runtime.serve.key import (
    ENVIRONMENT_VARIABLE,
    HEADER,
    ServeKeyError,
    check_key,
    is_loopback,
    key_file,
    load_or_create_key_file,
    read_key_file,
)
from dmf_deploy.runtime.serve.leftovers import backends_prefix, remove_leftovers, shm_prefix

INSTALL_HINT = 'pip install "dmf-deploy[serve]" && pip install --no-deps nvidia-pytriton'
DEFAULT_MODEL = "dmf_recognizer"
SITE_DIRS_VARIABLE = "DMF_SERVE_SITE_DIRS"  # read by dmf_deploy/runtime/serve/triton_model.py
STOP_TIMEOUT_S = 30.0  # tritonserver's own exit timeout is 30 s; then it is killed
MMAP_THRESHOLD_BYTES = 1 << 20
# Triton's names of the APIs behind the key, and of those closed to everyone.
KEYED_APIS = "metadata,inference,model-config,statistics"
CLOSED_APIS = "model-repository,shared-memory,trace,logging"
# A header no request can carry (a header name cannot hold ':'): what Triton asks for the closed APIs.
UNSENDABLE_HEADER = "dmf:closed"


class ServeError(RuntimeError):
    """The server cannot be run here (extra missing, no stub for this Python), or did not come up."""


@dataclass(frozen=True)
class TritonInstall:
    server: Path  # the tritonserver binary
    libraries: Path  # the wheel's bundled shared libraries
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version


def find_triton() -> TritonInstall:
    """The tritonserver of the installed nvidia-pytriton wheel; ServeError saying what to install."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError(f"tritonserver is not installed; {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        server=root / "bin" / "tritonserver",
        libraries=package.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for path in (install.server, install.python_backend / "libtriton_python.so"):
        if not path.is_file():
            raise ServeError(f"the nvidia-pytriton install lacks {path}; reinstall it: {INSTALL_HINT}")
    if not install.stub.is_file():
        raise ServeError(f"nvidia-pytriton has no Python backend stub for Python {version} ({install.stub})")
    return install


def backend_directory(install: TritonInstall, folder: Path) -> Path:
    """folder/python: the wheel's Python backend plus the stub, as links (the stub finds its libraries
    relative to its real location)."""
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (*install.python_backend.iterdir(), install.stub):
        if source.is_file():
            link = python / source.name
            if not link.exists():
                link.symlink_to(source)
    return folder


def server_environment(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    # Buffers of 1 MB and more are mapped apart and unmapped when freed: the memory of a large request
    # goes back to the system after it, instead of staying in the heap (glibc otherwise raises this
    # threshold as large buffers come and go). The model's stub inherits it.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
    libraries = [str(install.libraries)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libraries.insert(0, str(sysconfig.get_config_var("LIBDIR")))  # this interpreter's libpython
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env[SITE_DIRS_VARIABLE] = os.pathsep.join(site.getsitepackages())
    return env


def server_command(
    install: TritonInstall,
    repo: Path,
    backends: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    models: tuple[str, ...],
    key: str,
) -> list[str]:
    command = [
        str(install.server),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=false",  # no third port
        "--model-control-mode=explicit",  # load what is asked for, not every model in the folder
        # Shared-memory regions named after this dmf-serve, so that a later start can tell they are its
        # leftovers if it is killed (runtime/serve/leftovers.py).
        f"--backend-config=python,shm-region-prefix-name={shm_prefix()}",
        f"--exit-timeout-secs={int(STOP_TIMEOUT_S)}",
        # gRPC clients send the header as `triton-grpc-protocol-dmf-serve-key` (Triton's prefix).
        f"--http-restricted-api={KEYED_APIS}:{HEADER}={key}",
        f"--grpc-restricted-protocol={KEYED_APIS}:{HEADER}={key}",
        f"--http-restricted-api={CLOSED_APIS}:{UNSENDABLE_HEADER}=never",
        f"--grpc-restricted-protocol={CLOSED_APIS}:{UNSENDABLE_HEADER}=never",
    ]
    return command + [f"--load-model={m}" for m in models]


def server_key(host: str, key: str | None) -> tuple[str, str]:
    """The key to serve with, and where it came from: the one given (--key or DMF_SERVE_KEY); on a
    loopback address without one, the key file's (made at the first start). ServeError on any other
    address without a key."""
    if key:
        given = f"--key or {ENVIRONMENT_VARIABLE}"
        return check_key(key, given), given
    if not is_loopback(host):
        raise ServeError(
            f"--host {host} lets other machines connect: give the key they must send "
            f"(set {ENVIRONMENT_VARIABLE}, or --key)"
        )
    return load_or_create_key_file(), f"the key file {key_file()}"


def wait_ready(
    process: subprocess.Popen,
    url: str,
    models: tuple[str, ...],
    timeout_s: float,
    stopping: list[int] | None = None,
    poll_s: float = 0.25,
) -> None:
    """Poll until every model answers ready; ServeError if the server exits or time runs out.
    Returns early when `stopping` gets an entry (a signal arrived)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stopping:
        if process.poll() is not None:
            raise ServeError(f"tritonserver exited with status {process.returncode} before it was ready")
        if all(_ready(f"{url}/v2/models/{m}/ready") for m in models):
            return
        time.sleep(poll_s)
    if stopping:
        return
    raise ServeError(f"the models {', '.join(models)} were not ready within {timeout_s:.0f} s")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM the server's process group (server and model stubs), SIGKILL it after timeout_s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout_s)
    return process.returncode


@click.command("dmf-serve", cls=DmfCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("dmf-serve")
@click.option(
    "--repo",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Model repository written by `dmf-export --triton`.",
)
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every one).")
@click.option(
    "--model",
    "models",
    multiple=True,
    default=(DEFAULT_MODEL,),
    show_default=True,
    help="Model to load (repeatable).",
)
@click.option("--ready-timeout", default=120.0, show_default=True, type=float, help="Seconds to wait.")
@click.option(
    "--key",
    envvar=ENVIRONMENT_VARIABLE,
    show_envvar=True,
    help=f"The key every client must send (16-256 characters). Needed with a --host other than loopback; "
    f"on loopback the default is the key file ({key_file()}), made at the first start.",
)
def main(
    repo: Path,
    http_port: int,
    grpc_port: int,
    host: str,
    models: tuple[str, ...],
    ready_timeout: float,
    key: str | None,
) -> None:
    """Serve a dmf model repository with Triton Inference Server until SIGTERM or Ctrl-C."""
    try:
        install = find_triton()
        key, key_source = server_key(host, key)
    except (ServeError, ServeKeyError) as exc:
        click.echo(f"dmf-serve: error: {exc}", err=True)
        sys.exit(2)
    stopping = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for path in remove_leftovers():
        click.echo(f"dmf-serve: removed {path}, left by a dmf-serve that was killed", err=True)
    with tempfile.TemporaryDirectory(prefix=backends_prefix()) as folder:
        backends = backend_directory(install, Path(folder))
        command = server_command(install, repo.resolve(), backends, host, http_port, grpc_port, models, key)
        # Its own process group, so that stopping it reaches the model stubs too.
        process = subprocess.Popen(command, env=server_environment(install), start_new_session=True)
        try:
            wait_ready(process, f"http://{_url_host(host)}:{http_port}", models, ready_timeout, stopping)
            click.echo(
                f"dmf-serve: ready on http://{_url_host(host)}:{http_port} ({', '.join(models)}); "
                f"clients send the key from {key_source}"
            )
            while not stopping and process.poll() is None:
                time.sleep(0.2)
        except ServeError as exc:
            click.echo(f"dmf-serve: error: {exc}", err=True)
            stop(process)
            sys.exit(1)
        finally:
            code = stop(process)
    if not stopping:
        click.echo(f"dmf-serve: tritonserver exited with status {code}", err=True)
        sys.exit(1)
    click.echo("dmf-serve: stopped")


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


# ----- running dmf-serve from Python (tests, benchmarks/triton_load.py) ------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    """A `dmf-serve` child process and the tritonserver it started."""

    process: subprocess.Popen
    url: str  # host:port of the HTTP endpoint, as RemoteRecognizer takes it
    log: Path
    key: str  # what clients send in the dmf-serve-key header
    grpc_url: str  # host:port of the gRPC endpoint

    def server_pid(self) -> int | None:
        """tritonserver's pid (the leader of its own process group, with the model stubs)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            pids = children.read_text().split()
            return int(pids[0]) if pids else None  # none before it starts the server, or after
        return None

    def kill(self) -> None:
        """kill -9 the server, its model stubs and dmf-serve: no chance to finish anything."""
        pid = self.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM dmf-serve (which stops the server); kill -9 everything left after the timeout."""
        pid = self.server_pid()
        code = stop(self.process, STOP_TIMEOUT_S + 10)
        if pid is not None and code != 0:  # dmf-serve did not stop it cleanly
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return code


@contextlib.contextmanager
def serving(
    repo: Path,
    log: Path,
    timeout_s: float = 120.0,
    models: tuple[str, ...] = (DEFAULT_MODEL,),
    key: str | None = None,
):
    """Run `dmf-serve` on free loopback ports until the block ends; yields a Served. Always stopped."""
    served = start_serving(repo, log, timeout_s, models, key)
    try:
        yield served
    finally:
        served.stop()


def start_serving(
    repo: Path,
    log: Path,
    timeout_s: float = 120.0,
    models: tuple[str, ...] = (DEFAULT_MODEL,),
    key: str | None = None,
) -> Served:
    """Start `dmf-serve` on free loopback ports and wait for its ready line (ServeError on failure).

    With no `key`, the server uses DMF_SERVE_KEY or else the key file, as `dmf-serve` does.
    """
    env = {**os.environ, ENVIRONMENT_VARIABLE: key} if key else None  # as a user would give it
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "dmf_deploy.runtime.serve", "--repo", str(repo)]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--ready-timeout", str(timeout_s)]
    command += [arg for m in models for arg in ("--model", m)]
    with open(log, "ab") as sink:
        start = sink.tell()  # a log that already holds an earlier run's ready line: read only what follows
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    key = key or os.environ.get(ENVIRONMENT_VARIABLE) or ""
    served = Served(process, f"127.0.0.1:{http_port}", log, key, f"127.0.0.1:{grpc_port}")
    deadline = time.monotonic() + timeout_s + 10
    while time.monotonic() < deadline:
        if b"dmf-serve: ready" in log.read_bytes()[start:]:
            served.key = served.key or read_key_file(key_file()) or ""  # the one dmf-serve made
            return served
        if process.poll() is not None:
            break
        time.sleep(0.2)
    served.stop()
    tail = log.read_bytes()[-3000:].decode("utf-8", "replace")
    raise ServeError(f"dmf-serve did not become ready (status {process.returncode}); log tail:\n{tail}")


if __name__ == "__main__":
    main()
