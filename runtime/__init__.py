"""Torch-free inference. The modules here are the embeddable core (Recognizer, Gallery, backends);
app/ is the live app `dmf-run`, serve/ is `dmf-serve` and its client, tools/ holds dmf-bench, dmf-demo
and dmf-explain (docs/architecture.md, "Inside runtime/").

Imports numpy, OpenCV and onnxruntime only (tensorrt optionally, inside its backend).
"""

from dmf_deploy.runtime.gallery import Gallery, GalleryError
from dmf_deploy.runtime.recognizer import Prediction, Recognizer

__all__ = ["Gallery", "GalleryError", "Prediction", "Recognizer"]
