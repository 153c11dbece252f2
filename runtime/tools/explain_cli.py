"""`dmf-explain`: the figure of what the model aligned for one query image against one class.

    dmf-explain --bundle B --gallery G --frame query.png --class NAME --out fig.png [--json arrays.json]
    dmf-explain --bundle B --support support.png --frame query.png --out fig.png

With --support in place of a gallery, the support image is enrolled (in memory) as the class NAME
(default "support") and the figure shows it on the right. Every failure is one line on stderr and exit
status 2: a missing or unreadable image, a class that is not enrolled, a bundle without explain.onnx.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import cv2
import numpy as np

from dmf_deploy.atomic import atomic_write_bytes
from dmf_deploy.cli_support import DmfCommand, version_option
from dmf_deploy.manifest import BundleError
from dmf_deploy.preprocess import ImageFileError, InvalidFrame, read_image_file
from dmf_deploy.runtime.explain import Explanation
from dmf_deploy.runtime.gallery import GalleryError


def encode_png(image: np.ndarray, path: Path) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ImageFileError(f"OpenCV could not encode the figure for {path}")
    return buf.tobytes()


def explanation_json(ex: Explanation) -> dict:
    return {
        "class": ex.class_name,
        "score": ex.score,
        "image_size": ex.preprocess.image_size,
        "best_position": ex.best_position,
        "query_points": ex.query_points.tolist(),
        "sampled_points": ex.sampled_points.tolist(),
        "contributions": ex.contributions.tolist(),
        "aligned": ex.aligned.tolist(),
    }


@click.command("dmf-explain", cls=DmfCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("dmf-explain")
@click.option("--bundle", default="demo", show_default=True, help='Bundle folder, or "demo".')
@click.option(
    "--gallery", type=click.Path(path_type=Path), default=None, help="Gallery (.dmfg) with the class."
)
@click.option(
    "--support",
    type=click.Path(path_type=Path),
    default=None,
    help="A support image to enrol as the class, in place of a gallery.",
)
@click.option("--frame", "frame_path", required=True, type=click.Path(path_type=Path), help="Query image.")
@click.option("--class", "name", default=None, help='Class to explain (with --support: default "support").')
@click.option(
    "--position",
    type=int,
    default=None,
    help="Query feature position p = i*w + j to show (default: the best-contributing one).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Figure to write (.png).")
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the arrays."
)
def main(
    bundle: str,
    gallery: Path | None,
    support: Path | None,
    frame_path: Path,
    name: str | None,
    position: int | None,
    out: Path,
    json_path: Path | None,
) -> None:
    """Explain one query image's score for one class: the paper's dynamic-sampling figure."""
    from dmf_deploy.runtime.recognizer import Recognizer

    try:
        if (gallery is None) == (support is None):
            raise click.UsageError("give exactly one of --gallery and --support")
        frame = read_image_file(frame_path, "query image")
        if support is not None:
            support_image = read_image_file(support, "support image")
            name = name or "support"
            rec = Recognizer.open(bundle)
            rec.enroll(name, [support_image])
        else:
            if not gallery.is_file():
                raise GalleryError(f"gallery {gallery} does not exist")
            if name is None:
                raise click.UsageError("--class is required with --gallery")
            rec = Recognizer.open(bundle, gallery=gallery)
            support_image = None
        ex = rec.explain(frame, name)
        figure = ex.render(frame, support_image, position)
        atomic_write_bytes(out, encode_png(figure, out))
        if json_path is not None:
            atomic_write_bytes(json_path, json.dumps(explanation_json(ex)).encode())
    except click.UsageError:
        raise
    except (BundleError, GalleryError, InvalidFrame, ImageFileError, ValueError) as exc:
        click.echo(f"dmf-explain: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"dmf-explain: error: {exc}", err=True)  # reading a file, or writing the output
        sys.exit(2)
    written = f"{out} and {json_path}" if json_path else f"{out}"
    click.echo(f"dmf-explain: '{name}' score {ex.score:.4f}; wrote {written}")


if __name__ == "__main__":
    main()
