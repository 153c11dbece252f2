"""Serving the Recognizer: `dmf-serve` (server.py), the model Triton runs (triton_model.py), the client
(remote.py).

The names below are what `dmf_deploy.runtime.serve` offered when it was one module (its console-script
target `dmf_deploy.runtime.serve:main` among them), kept for compatibility.
"""

from dmf_deploy.runtime.serve.server import (
    DEFAULT_MODEL,
    INSTALL_HINT,
    SITE_DIRS_VARIABLE,
    STOP_TIMEOUT_S,
    Served,
    ServeError,
    TritonInstall,
    backend_directory,
    find_triton,
    free_port,
    main,
    server_command,
    server_environment,
    serving,
    start_serving,
    stop,
    wait_ready,
)

__all__ = [
    "DEFAULT_MODEL",
    "INSTALL_HINT",
    "SITE_DIRS_VARIABLE",
    "STOP_TIMEOUT_S",
    "ServeError",
    "Served",
    "TritonInstall",
    "backend_directory",
    "find_triton",
    "free_port",
    "main",
    "server_command",
    "server_environment",
    "serving",
    "start_serving",
    "stop",
    "wait_ready",
]
