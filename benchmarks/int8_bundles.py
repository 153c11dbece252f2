"""Export the bundles the precision benchmark compares (benchmarks/README.md, "INT8 and the half bank").

    python benchmarks/int8_bundles.py DIR

writes, under DIR:

- r12-fp32/bundle: random-weight ResNet-12 (84 px, G = 64, k = 1, dopri5 x 8), float32
  (`pytorch_head.make_random_resnet12`, its checkpoint beside it);
- calib/: the demo's default calibration images as PNG files (`demo_calibration_frames`), the
  folder --calib reads;
- r12-int8-half: the same checkpoint, INT8 backbone (onnxruntime form) calibrated on calib/, float16
  bank; exported without the parity check (random weights make no decisions worth agreeing on);
- demo-int8-half: the demo model, INT8 (its default calibration) + float16 bank, parity-checked.

Then compare them in one run, e.g.

    dmf-bench --bundle DIR/r12-fp32/bundle --bundle DIR/r12-int8-half --bundle demo \\
        --bundle DIR/demo-int8-half --classes 1,100,1000 --threads 2 --json F --plot P
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from dmf_deploy.export.bundle import export_bundle
from dmf_deploy.export.quantize import demo_calibration_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    from pytorch_head import make_random_resnet12

    fp32 = out / "r12-fp32"
    if not (fp32 / "bundle" / "manifest.json").is_file():
        fp32.mkdir(exist_ok=True)
        make_random_resnet12(fp32)
    calib = out / "calib"
    calib.mkdir(exist_ok=True)
    for i, frame in enumerate(demo_calibration_frames()[0]):
        cv2.imwrite(str(calib / f"{i:04d}.png"), frame)
    say = print
    export_bundle(
        fp32 / "resnet12-random.pt",
        out / "r12-int8-half",
        force=True,
        check=False,
        precision="int8",
        calibration=calib,
        bank_dtype="float16",
        progress=say,
    )
    export_bundle(
        "demo", out / "demo-int8-half", force=True, precision="int8", bank_dtype="float16", progress=say
    )


if __name__ == "__main__":
    main()
