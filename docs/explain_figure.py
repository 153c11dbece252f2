"""Make docs/explain_demo.png: two `dmf-explain` figures of the demo model, one right and one confused.

The characters are the demo's hand-drawn stroke-font letters (`dmf_deploy.symbols`), which the
demo model never saw (it was trained on Omniglot with the Latin alphabet held out), so no Omniglot image
is involved. Every symbol of the font is enrolled from one drawing; other drawings are classified until
one is recognised and one is confused, and each is explained by the `dmf-explain` command line against
the class it was given (the right one, and the wrong one). Runs on the torch-free runtime:

    python docs/explain_figure.py [--out docs/explain_demo.png] [--seed 0]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import cv2
import numpy as np

from dmf_deploy.runtime import Recognizer
from dmf_deploy.symbols import STROKE_FONT, render_symbol

CAPTION_HEIGHT = 28


def draw(symbol: str, seed: int, index: int) -> np.ndarray:
    return render_symbol(STROKE_FONT[symbol], np.random.default_rng([seed, index, ord(symbol)]))


def dmf_explain_command() -> list[str]:
    script = Path(sys.executable).with_name("dmf-explain")
    found = str(script) if script.exists() else shutil.which("dmf-explain")
    return [found] if found else [sys.executable, "-m", "dmf_deploy.runtime.tools.explain_cli"]


def captioned(figure: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((CAPTION_HEIGHT, figure.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (10, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, figure])


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path(__file__).with_name("explain_demo.png"))
@click.option("--seed", default=0, show_default=True)
def main(out: Path, seed: int) -> None:
    symbols = sorted(STROKE_FONT)
    rec = Recognizer.open("demo")
    for symbol in symbols:
        rec.enroll(symbol, [draw(symbol, seed, 0)])
    right = confused = None
    for index in range(1, 20):
        for symbol in symbols:
            label = rec.classify(draw(symbol, seed, index)).label
            if label == symbol and right is None:
                right = (symbol, index, label)
            elif label is not None and label != symbol and confused is None:
                confused = (symbol, index, label)
        if right and confused:
            break
    if not (right and confused):
        raise click.ClickException("no confused drawing found; try another --seed")
    with tempfile.TemporaryDirectory() as tmp:
        gallery = rec.save(Path(tmp) / "letters.dmfg")
        panels = []
        for symbol, index, label in (right, confused):
            query = Path(tmp) / f"{symbol}-{index}.png"
            figure = Path(tmp) / f"{symbol}-{index}-explained.png"
            cv2.imwrite(str(query), draw(symbol, seed, index))
            command = [*dmf_explain_command(), "--bundle", "demo", "--gallery", str(gallery)]
            command += ["--frame", str(query), "--class", label, "--out", str(figure)]
            subprocess.run(command, check=True)
            verdict = "recognised" if label == symbol else "confused"
            text = f"a drawn '{symbol}', {verdict} as '{label}' (1 shot each of {len(symbols)} symbols)"
            panels.append(captioned(cv2.imread(str(figure)), text))
    cv2.imwrite(str(out), np.vstack(panels))
    click.echo(f"wrote {out}: '{right[0]}' recognised; '{confused[0]}' taken for '{confused[2]}'")


if __name__ == "__main__":
    main()
