"""dmf-run's web options, and the one function that starts the console from the command line.

Kept apart from the console itself so that dmf-run imports no web stack unless --web is given (the
`[web]` extra: starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dmf_deploy.preprocess import Roi
from dmf_deploy.runtime.app.web.settings import (
    TOKEN_ENV,
    ConsoleSettings,
    WebSettingsError,
    check_webhook_url,
    resolve_settings,
)

if TYPE_CHECKING:
    from dmf_deploy.runtime.app.loop import Output
    from dmf_deploy.runtime.recognizer import Recognizer


def web_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options --web, --web-token, --web-cert, --web-key and --webhook."""
    options = [
        click.option(
            "--web",
            metavar="[HOST:]PORT",
            help="Serve the web console on this address (HOST defaults to 127.0.0.1; 0.0.0.0 is every "
            "interface and needs a token). Needs the [web] extra.",
        ),
        click.option(
            "--web-token",
            help=f"The console's token (default: ${TOKEN_ENV}; for a non-loopback HOST without one, a token "
            "is generated and printed).",
        ),
        click.option(
            "--web-cert", type=click.Path(path_type=Path, dir_okay=False), help="TLS certificate (PEM)."
        ),
        click.option(
            "--web-key", type=click.Path(path_type=Path, dir_okay=False), help="TLS private key (PEM)."
        ),
        click.option(
            "--webhook",
            metavar="URL",
            help="POST a JSON object to URL when the recognised label appears, changes or goes.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def web_settings(
    web: str | None, token: str | None, cert: Path | None, key: Path | None, webhook: str | None
) -> tuple[ConsoleSettings | None, str | None]:
    """The options checked, before anything is opened; click.UsageError says what is wrong."""
    try:
        if webhook is not None:
            check_webhook_url(webhook)
        if web is None:
            if token is not None or cert is not None or key is not None:
                raise WebSettingsError("--web-token, --web-cert and --web-key need --web [HOST:]PORT")
            return None, webhook
        return resolve_settings(web, token, cert, key), webhook
    except WebSettingsError as exc:
        raise click.UsageError(str(exc)) from None


class WebParts:
    """What --web and --webhook started: the outputs to add to the loop's, and how to stop them."""

    def __init__(self) -> None:
        self.console = None
        self.outputs: list[Output] = []

    def wrap(self, output: Output | None, frame_rate: float | None = None, roi: Roi | None = None) -> Output:
        """The loop's output with the console's and the webhook's beside it. `frame_rate`: a video
        file's own rate, at which the console plays it when no window does (None: as fast as it goes).
        `roi`: the guide box (--roi), drawn on the live view as in the window."""
        from dmf_deploy.runtime.app.web.output import Tee

        if self.console is not None:
            self.console.output.frame_rate = frame_rate
            self.console.output.guide_box = roi
        outputs = ([output] if output is not None else []) + self.outputs
        assert outputs, "no output: the command line asks for a window, --headless or --web"
        return outputs[0] if len(outputs) == 1 else Tee(*outputs)

    def stop(self) -> None:
        if self.console is not None:
            self.console.stop()


def start_web(
    settings: ConsoleSettings | None,
    webhook: str | None,
    rec: Recognizer,
    gallery_path: Path,
    source: str,
    shots: int,
) -> WebParts:
    """Start the console (and the webhook); print where the console is, with its token, on stderr."""
    parts = WebParts()
    if webhook is not None:
        from dmf_deploy.runtime.app.web.webhook import Webhook

        parts.outputs.append(Webhook(webhook))
    if settings is None:
        return parts
    try:
        from dmf_deploy.runtime.app.web.console import WebConsole, WebConsoleError
    except ImportError as exc:
        raise click.ClickException(
            f"--web needs the web extra ({exc.name} is missing): pip install 'dmf-deploy[web]'"
        ) from None
    console = WebConsole(settings, rec, gallery_path, source, shots)
    try:
        port = console.start()
    except WebConsoleError as exc:
        console.stop()
        raise click.ClickException(str(exc)) from None
    parts.console = console
    parts.outputs.append(console.output)
    token_note = " (token generated for this run)" if settings.token_generated else ""
    click.echo(
        f"dmf-run: web console on {settings.scheme}://{settings.host}:{port}{token_note}; open", err=True
    )
    for url in console.urls():
        click.echo(f"dmf-run:     {url}", err=True)
    return parts
