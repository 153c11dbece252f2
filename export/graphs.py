"""The three bundle graphs as small torch modules, and their export to ONNX.

The solver is unrolled in Python at trace time, so head.onnx holds plain arithmetic: no Loop, no
torchdiffeq. Dynamic axes are traced with example sizes >= 2 (a size-1 example is silently made static).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from dmf_deploy.bundle_head import form_head_scores, stored_bank
from dmf_deploy.head import ClassBank
from dmf_deploy.manifest import BACKBONE, CLASS_BANK, HEAD, SUPPORT, graph_io
from dmf_deploy.model import DMFNet

EXAMPLE_SIZES = {"B": 2, "N": 3, "Q": 2}  # distinct and >= 2, so no axis is specialised away


class BackboneGraph(nn.Module):
    def __init__(self, model: DMFNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


class SupportGraph(nn.Module):
    def __init__(self, model: DMFNet, form: str = "gather", bank_dtype: str = "float32") -> None:
        super().__init__()
        self.model, self.form, self.bank_dtype = model, form, bank_dtype

    def forward(self, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(stored_bank(self.model.class_bank(prototypes), self.form, self.bank_dtype))


class HeadGraph(nn.Module):
    def __init__(self, model: DMFNet, solver: str, steps: int, form: str = "gather") -> None:
        super().__init__()
        self.model, self.solver, self.steps, self.form = model, solver, steps, form

    def forward(
        self,
        query_features: torch.Tensor,
        support_offset: torch.Tensor,
        tap_projections: torch.Tensor,
        class_weight: torch.Tensor,
    ) -> torch.Tensor:
        bank = ClassBank(support_offset, tap_projections, class_weight)
        return form_head_scores(self.model, query_features, bank, self.form, self.solver, self.steps)


def graph_modules(
    model: DMFNet, solver: str, steps: int, form: str = "gather", bank_dtype: str = "float32"
) -> dict[str, nn.Module]:
    return {
        BACKBONE: BackboneGraph(model).eval(),
        SUPPORT: SupportGraph(model, form, bank_dtype).eval(),
        HEAD: HeadGraph(model, solver, steps, form).eval(),
    }


def example_inputs(
    model: DMFNet, io_spec: dict, form: str = "gather", bank_dtype: str = "float32"
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Random example tensors with the shapes of `io_spec` (`graph_io`), dynamic axes at example sizes."""
    gen = torch.Generator().manual_seed(0)

    def make(shape: list) -> torch.Tensor:
        dims = [EXAMPLE_SIZES[d] if isinstance(d, str) else d for d in shape]
        return torch.randn(*dims, generator=gen)

    with torch.no_grad():
        images = make(io_spec[BACKBONE]["inputs"]["images"])
        prototypes = make(io_spec[SUPPORT]["inputs"]["prototypes"])
        bank = stored_bank(model.class_bank(prototypes), form, bank_dtype)
        query = make(io_spec[HEAD]["inputs"]["query_features"])
    return {BACKBONE: (images,), SUPPORT: (prototypes,), HEAD: (query, *bank)}


def export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], spec: dict, path: Path, opset: int
) -> None:
    """Export with the dynamo exporter at an explicit opset: its default (20) breaks TensorRT GridSample."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str) -> torch.export.Dim:
        return dims.setdefault(name, torch.export.Dim(name, min=1, max=1 << 16))

    dynamic_shapes = tuple(
        {axis: dim(d) for axis, d in enumerate(shape) if isinstance(d, str)}
        for shape in spec["inputs"].values()
    )
    # The exporter narrates every pass on stdout and warns about harmless details; keep the CLI readable.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(spec["inputs"]),
            output_names=list(spec["outputs"]),
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))


def export_all(
    model: DMFNet,
    solver: str,
    steps: int,
    out_dir: Path,
    opset: int,
    on_graph=None,
    form: str = "gather",
    bank_dtype: str = "float32",
    io_spec: dict | None = None,
) -> dict[str, Path]:
    """Write backbone.onnx, support.onnx and head.onnx (of head form `form`) into out_dir; their paths.

    `io_spec` is the graphs' I/O (`graph_io(model.config, form, bank_dtype)` when not given).
    """
    io_spec = graph_io(model.config, form, bank_dtype) if io_spec is None else io_spec
    modules = graph_modules(model, solver, steps, form, bank_dtype)
    examples = example_inputs(model, io_spec, form, bank_dtype)
    paths = {}
    for name in (BACKBONE, SUPPORT, HEAD):
        path = out_dir / f"{name}.onnx"
        export_graph(modules[name], examples[name], io_spec[name], path, opset)
        paths[name] = path
        if on_graph is not None:
            on_graph(name)
    assert set(io_spec[SUPPORT]["outputs"]) == set(CLASS_BANK)
    return paths
