"""Kept for compatibility: the client's path before the regrouping; it lives in runtime/serve/remote.py."""

from dmf_deploy.runtime.serve.remote import (
    DEFAULT_URL,
    MODEL,
    OUTPUTS,
    KeyRefused,
    RemoteError,
    RemoteRecognizer,
)

__all__ = ["DEFAULT_URL", "MODEL", "OUTPUTS", "KeyRefused", "RemoteError", "RemoteRecognizer"]
