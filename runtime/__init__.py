"""Torch-free inference: backends, Recognizer, Gallery, frame sources and `dmf-run`.

Imports numpy, OpenCV and onnxruntime only (tensorrt optionally, inside its backend).
"""

from dmf_deploy.runtime.gallery import Gallery, GalleryError
from dmf_deploy.runtime.recognizer import Prediction, Recognizer

__all__ = ["Gallery", "GalleryError", "Prediction", "Recognizer"]
