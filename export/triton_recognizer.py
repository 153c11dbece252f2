"""The `dmf_recognizer` model of a Triton repository: a Python-backend model holding a Recognizer.

REPO/dmf_recognizer/
    config.pbtxt          Python backend, dynamic batching, parameters `gallery` and `bundle`
    1/model.py            dmf_deploy/runtime/serve/triton_model.py, copied
    1/bundle/             the bundle's manifest and graphs (checked against their sha256 by the runtime)
    gallery.dmfg          written by the server at the first enrolment; never replaced by an export
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from dmf_deploy.atomic import atomic_write_bytes
from dmf_deploy.manifest import MANIFEST_NAME, Manifest, verify_graph

MODEL_NAME = "dmf_recognizer"
GALLERY_FILE = "gallery.dmfg"
BUNDLE_DIR = "bundle"
# Bounds on what one request may cost the server (issue 29, item 4). Frames per request and per formed
# batch: an enrolment of more shots is sent in several requests. Frame size: each side, and in all (a
# 1080p frame). A formed batch then holds at most 16 x 1920 x 1080 x 3 bytes = 100 MB of frames; Triton's
# Python backend copies them into shared memory, which it keeps once used (up to about two batches).
# Frames have 3 channels (BGR).
RECOGNIZER_MAX_BATCH = 16
MAX_FRAME_SIDE = 4096
MAX_FRAME_PIXELS = 1920 * 1080
# How long the dynamic batcher holds the first request of a batch for others to join: 0.5 ms,
# small next to one frame's backbone time on a CPU (~1 ms for the demo model, ~20 ms for ResNet-12).
QUEUE_DELAY_US = 500


def _model_source() -> Path:
    """dmf_deploy/runtime/serve/triton_model.py, wherever the package is installed.

    Found through the import system's spec of dmf_deploy.runtime, which locates the folder without
    importing the runtime: export does not import runtime code.
    """
    spec = importlib.util.find_spec("dmf_deploy.runtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the dmf_deploy.runtime package is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "serve" / "triton_model.py"


def recognizer_config_text(max_batch: int = RECOGNIZER_MAX_BATCH) -> str:
    """config.pbtxt of dmf_recognizer: see dmf_deploy/runtime/serve/triton_model.py for the protocol."""
    return f"""name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{
    name: "frames"
    data_type: TYPE_UINT8
    dims: [ -1, -1, 3 ]
    optional: true
  }},
  {{
    name: "control"
    data_type: TYPE_UINT8
    dims: [ 1 ]
    optional: true
  }}
]
output [
  {{
    name: "scores"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }},
  {{
    name: "score"
    data_type: TYPE_FP32
    dims: [ 1 ]
  }},
  {{
    name: "text"
    data_type: TYPE_UINT8
    dims: [ -1 ]
  }}
]
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
}}
parameters {{
  key: "bundle"
  value: {{ string_value: "{BUNDLE_DIR}" }}
}}
parameters {{
  key: "gallery"
  value: {{ string_value: "{GALLERY_FILE}" }}
}}
parameters {{
  key: "max_frame_side"
  value: {{ string_value: "{MAX_FRAME_SIDE}" }}
}}
parameters {{
  key: "max_frame_pixels"
  value: {{ string_value: "{MAX_FRAME_PIXELS}" }}
}}
"""


def write_recognizer_model(bundle_dir: Path, manifest: Manifest, out_dir: Path) -> Path:
    """Write out_dir/dmf_recognizer (config, model.py, a copy of the bundle); returns the model folder.

    A gallery already there (the server's state) is kept: re-exporting never deletes enrolled classes.
    """
    model_dir = out_dir / MODEL_NAME
    version_dir = model_dir / "1"
    bundle_copy = version_dir / BUNDLE_DIR
    bundle_copy.mkdir(parents=True, exist_ok=True)
    for graph in manifest.graphs:  # the three graphs and any optional ones the bundle declares
        verify_graph(bundle_dir, manifest, graph)
    for name in manifest.files():  # the graphs and the open-set record (checked again where it is read)
        shutil.copyfile(bundle_dir / name, bundle_copy / name)
    shutil.copyfile(bundle_dir / MANIFEST_NAME, bundle_copy / MANIFEST_NAME)
    atomic_write_bytes(version_dir / "model.py", _model_source().read_bytes())
    atomic_write_bytes(model_dir / "config.pbtxt", recognizer_config_text().encode("utf-8"))
    return model_dir
