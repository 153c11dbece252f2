"""The DMF head: the factored form (the product) against the literal pairwise reference, and the
factored sampling (grid_sample of projected taps) against torchvision's deformable conv."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from itertools import combinations
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from bundles import relative_error  # tests/bundles.py
from optional_imports import torchvision_or_skip

from dmf_deploy import DMFNet, ModelConfig, PreprocessConfig
from dmf_deploy.config import conv4_config
from dmf_deploy.head import TAP_SHIFTS, DMFHead

torchvision = torchvision_or_skip()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors (tests/conftest.py)


# Factored against literal in float32, the product dtype. The two forms sum in different orders (the
# offset conv split in two halves, the deformable conv projected before sampling, k = 1 in group space
# with the stability polynomial instead of stepping), so they differ by float32 rounding: measured
# 1e-7..1e-6 of the largest score. 1e-5 leaves headroom; a real mismatch (a wrong tap, swapped x/y,
# the filter in the wrong order, a sample outside the map not reading zero) costs 1e-3 or more.
REL_TOL = 1e-5


def undeformed_positions(h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """Where a plain 3x3 conv reads: output position + tap shift, [9, 2 (y, x), h, w]."""
    shifts = torch.tensor(TAP_SHIFTS, dtype=dtype).reshape(9, 2, 1, 1)
    return shifts + torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).to(dtype)


def sampling_positions(head: DMFHead, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Where each pair's deformable taps read the support map: [Q, N, 9, 2 (y, x), h, w]."""
    h, w = query.shape[-2:]
    offset = head.query_offset(query)[:, None] + head.class_bank(prototypes).support_offset[None]
    return offset.reshape(*offset.shape[:2], 9, 2, h, w) + undeformed_positions(h, w, query.dtype)


def outside_map(positions: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DCN v1 reads zero where a coordinate is <= -1 or >= the side: no bilinear corner in the map."""
    y, x = positions[..., 0, :, :], positions[..., 1, :, :]
    return (y <= -1) | (y >= h) | (x <= -1) | (x >= w)


def strong_head(channels: int, groups: int, kernel: int, feature_rms: float, seed: int) -> DMFHead:
    """Head weights scaled so that offsets are about 1.5 px (some samples leave the map) and the
    pre-sigmoid filter is about 2 (sigmoid neither flat nor saturated). Default init moves ~0.3 px."""
    torch.manual_seed(seed)
    head = DMFHead(channels, groups, kernel)
    with torch.no_grad():
        head.off_conv.weight.normal_(0.0, 1.5 / (feature_rms * math.sqrt(2 * channels * 25)))
        head.kernel_conv.weight.normal_(0.0, 2.0 / (feature_rms * math.sqrt(9 * channels)))
    return head.eval()


# ----- a pairwise-covering sample of the head's parameters -----------------------------------------------
def pairwise_cases(
    factors: dict[str, list[Any]], valid: Callable[[dict[str, Any]], bool], seed: int = 0, tries: int = 30
) -> list[dict[str, Any]]:
    """Greedy AETG-style covering array: every allowed pair of values of every two factors appears in
    at least one case. Deterministic for a given seed."""
    rng = random.Random(seed)
    names = list(factors)

    def pairs(case: dict[str, Any]) -> set[tuple]:
        return {(a, case[a], b, case[b]) for a, b in combinations(names, 2) if a in case and b in case}

    uncovered = {
        (a, va, b, vb)
        for a, b in combinations(names, 2)
        for va in factors[a]
        for vb in factors[b]
        if valid({a: va, b: vb})
    }
    cases: list[dict[str, Any]] = []
    while uncovered:
        best, best_gain = None, 0
        ordered = sorted(uncovered, key=repr)
        for _ in range(tries):
            a, va, b, vb = rng.choice(ordered)
            case = {a: va, b: vb}
            rest = [n for n in names if n not in case]
            rng.shuffle(rest)
            for name in rest:
                options = [v for v in factors[name] if valid({**case, name: v})]
                gains = [len(pairs({**case, name: v}) & uncovered) for v in options]
                top = max(gains)
                case[name] = rng.choice([v for v, g in zip(options, gains) if g == top])
            gain = len(pairs(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        assert best is not None
        cases.append(best)
        uncovered -= pairs(best)
    return cases


SOLVERS = [
    ("euler", 1), ("euler", 3), ("midpoint", 2), ("rk4", 1), ("rk4", 3), ("rk4-38", 1), ("rk4-38", 2),
    ("dopri5", 1), ("dopri5", 3), ("dopri5", 8), ("exact", 1),
]  # fmt: skip
# dopri5-adaptive is excluded: its step control takes a norm over the whole batched state, so its
# result depends on the batch and on the form (group or channel space); docs/solvers.md.
FACTORS: dict[str, list[Any]] = {
    "kernel": [1, 3],
    "groups": [1, 64, 160],  # with C = 320 every G divides C (R = 320, 5, 2 channels per group)
    "n_way": [1, 2, 4, 7, 10],  # N from 1 to 10; every value would need >= 11 x 10 cases
    "shots": [1, 5],
    "solver": SOLVERS,
    "size": [(5, 6), (6, 5)],  # non-square, so that a swapped x/y in the sampling grid shows
}
C_HEAD, N_QUERY = 320, 2


def _valid(case: dict[str, Any]) -> bool:
    return not (case.get("kernel") == 3 and case.get("solver", ("",))[0] == "exact")  # exact: k = 1 only


CASES = pairwise_cases(FACTORS, _valid)


def _case_id(case: dict[str, Any]) -> str:
    solver, steps = case["solver"]
    h, w = case["size"]
    return f"k{case['kernel']}-G{case['groups']}-N{case['n_way']}-K{case['shots']}-{solver}x{steps}-{h}x{w}"


def test_cases_cover_all_pairs():
    covered = {(a, case[a], b, case[b]) for case in CASES for a, b in combinations(FACTORS, 2)}
    for a, b in combinations(FACTORS, 2):
        for va in FACTORS[a]:
            for vb in FACTORS[b]:
                if _valid({a: va, b: vb}):
                    assert (a, va, b, vb) in covered
    assert all(_valid(case) for case in CASES)
    assert len(CASES) < 70  # ~ |solvers| x |N| = 55 is the floor; keep the CPU time bounded


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_factored_equals_literal(case):
    kernel, groups, n_way, shots = case["kernel"], case["groups"], case["n_way"], case["shots"]
    solver, steps = case["solver"]
    h, w = case["size"]
    seed = CASES.index(case)
    gen = torch.Generator().manual_seed(1000 + seed)
    query = torch.randn(N_QUERY, C_HEAD, h, w, generator=gen)
    labels = torch.arange(n_way).repeat(shots)[torch.randperm(n_way * shots, generator=gen)]
    support = torch.randn(n_way * shots, C_HEAD, h, w, generator=gen)
    protos = DMFNet.prototypes(support, labels, n_way)  # the mean of K shots, before anything else
    head = strong_head(C_HEAD, groups, kernel, feature_rms=1.0, seed=seed)

    with torch.inference_mode():
        factored = head.score_map(query, head.class_bank(protos), solver, steps)
        literal = head.literal_score_map(query, protos, solver, steps)
        positions = sampling_positions(head, query, protos)
    assert factored.shape == literal.shape == (N_QUERY, n_way, h, w)

    # The head's weights are large enough to matter: some samples move by more than a pixel and
    # some fall outside the map (they read zero).
    offsets = positions - undeformed_positions(h, w, positions.dtype)
    assert (offsets.abs() > 1).any() and outside_map(positions, h, w).any(), "offsets too small"
    assert relative_error(factored.mean(dim=(2, 3)), literal.mean(dim=(2, 3))) < REL_TOL
    # Per position too (same tolerance, same reason): an error at a few positions cannot hide in a mean.
    assert relative_error(factored, literal) < REL_TOL


def test_offsets_in_the_pairwise_sample_are_large():
    """The strong head really moves samples: many by more than a pixel, some out of the map."""
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, C_HEAD, 5, 6, generator=gen)
    protos = torch.randn(4, C_HEAD, 5, 6, generator=gen)
    head = strong_head(C_HEAD, 64, 1, 1.0, seed=0)
    with torch.inference_mode():
        pos = sampling_positions(head, query, protos)
    offsets = pos - undeformed_positions(5, 6, pos.dtype)
    assert (offsets.abs() > 1).float().mean() > 0.2
    assert 0.05 < outside_map(pos, 5, 6).float().mean() < 0.7


# ----- sampling: grid_sample taps against torchvision.ops.deform_conv2d --------------------------------
@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_grid_sample_taps_equal_deform_conv2d(size):
    """Nine filter channels, channel t one-hot on tap t of input channel t: each filter channel is then
    exactly one tap's bilinear sample of one support channel, so the head's per-tap grid_sample is
    compared with torchvision's DCN v1 sampling tap by tap (pre-sigmoid, through logit)."""
    from torchvision.ops import deform_conv2d

    h, w = size
    channels = 9
    head = DMFHead(channels, groups=9, kernel=1).double().eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        head.off_conv.weight.copy_(
            torch.randn(head.off_conv.weight.shape, generator=gen, dtype=torch.float64)
        )
        head.off_conv.weight.mul_(2.5 / math.sqrt(2 * channels * 25))  # offsets of ~2.5 px on a 6x6 map
        onehot = torch.zeros_like(head.kernel_conv.weight)  # [9, 9, 3, 3]
        for t in range(9):
            onehot[t, t, t // 3, t % 3] = 1.0
        head.kernel_conv.weight.copy_(onehot)
    query = torch.randn(3, channels, h, w, generator=gen, dtype=torch.float64)
    protos = torch.randn(4, channels, h, w, generator=gen, dtype=torch.float64)

    with torch.inference_mode():
        ours = torch.logit(head.filters(query, head.class_bank(protos)))  # [Q, N, 9, h, w]
        qs = query.repeat_interleave(4, dim=0)
        ss = protos.repeat(3, 1, 1, 1)
        offset = head.off_conv(torch.cat([qs, ss], dim=1))
        ref = deform_conv2d(ss, offset, onehot, padding=(1, 1)).reshape(3, 4, 9, h, w)
        positions = sampling_positions(head, query, protos)

    # Cover every sampling case: fully outside (reads 0), straddling the border (some corners zero),
    # and fully inside, for every tap.
    out = outside_map(positions, h, w)
    y, x = positions[..., 0, :, :], positions[..., 1, :, :]
    straddle = ~out & ((y < 0) | (y > h - 1) | (x < 0) | (x > w - 1))
    inside = ~out & ~straddle
    for mask in (out, straddle, inside):
        assert mask.any(dim=(0, 1, 3, 4)).all(), "every tap needs samples of every kind"
    assert torch.all(ref[out] == 0)

    # float64 with O(1) values: the two samplers agree to rounding (~1e-15); logit of a sigmoid of an
    # O(1) value keeps ~1e-14; 1e-10 is far below any sampling mistake (a pixel step is O(1)).
    assert (ours - ref).abs().max() < 1e-10


def test_full_filters_equal_deform_conv2d():
    """Random (not one-hot) k = 3 kernel weights: the whole meta-filter equals sigmoid(deform_conv2d)."""
    from torchvision.ops import deform_conv2d

    gen = torch.Generator().manual_seed(9)
    channels, h, w = 8, 6, 6
    head = DMFHead(channels, groups=2, kernel=3).double().eval()
    with torch.no_grad():
        for p, scale in (
            (head.off_conv.weight, 2.5 / math.sqrt(2 * channels * 25)),
            (head.kernel_conv.weight, 1.0),
        ):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    query = torch.randn(2, channels, h, w, generator=gen, dtype=torch.float64)
    protos = torch.randn(3, channels, h, w, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        ours = head.filters(query, head.class_bank(protos))
        qs, ss = query.repeat_interleave(3, dim=0), protos.repeat(2, 1, 1, 1)
        offset = head.off_conv(torch.cat([qs, ss], dim=1))
        ref = torch.sigmoid(deform_conv2d(ss, offset, head.kernel_conv.weight, padding=(1, 1)))
    assert outside_map(sampling_positions(head, query, protos), h, w).any()
    # float64: both are sums of 9*8 bilinear samples; agreement to ~1e-15, 1e-10 is a safe bound.
    assert (ours - ref.reshape(2, 3, -1, h, w)).abs().max() < 1e-10


# ----- end to end: episode_scores, factored against literal, per backbone ---------------------------------
def _episode(n_way: int, shots: int, queries: int, size: int, seed: int):
    """Classes that really differ: smooth random patterns; shots and queries are noisy copies."""
    gen = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(n_way, 3, 8, 8, generator=gen), size=size, mode="bilinear")
    labels = torch.arange(n_way).repeat(shots)[torch.randperm(n_way * shots, generator=gen)]
    query_labels = torch.arange(queries) % n_way
    noise = 0.3
    support = patterns[labels] + noise * torch.randn(len(labels), 3, size, size, generator=gen)
    query = patterns[query_labels] + noise * torch.randn(queries, 3, size, size, generator=gen)
    return support, labels, query


@pytest.mark.parametrize(
    ("config", "solver", "steps"),
    [
        (conv4_config(32, groups=16, kernel=3), "rk4-38", 2),
        (ModelConfig(preprocess=PreprocessConfig(image_size=32), groups=160, kernel=1), "dopri5", 8),
    ],
    ids=["conv4-k3-G16-rk4-38x2", "resnet12-k1-G160-dopri5x8"],
)
def test_episode_scores_factored_equals_literal(config, solver, steps):
    torch.manual_seed(0)
    model = DMFNet(config).eval()
    support, labels, query = _episode(n_way=3, shots=2, queries=3, size=32, seed=1)
    with torch.inference_mode():
        feats = model.features(torch.cat([support, query]))
        rms = float(feats.pow(2).mean().sqrt())
        model.head.load_state_dict(
            strong_head(config.channels, config.groups, config.kernel, rms, 1).state_dict()
        )
        positions = sampling_positions(
            model.head, feats[len(labels) :], model.prototypes(feats[: len(labels)], labels)
        )
        factored = model.episode_scores(support, labels, query, solver=solver, steps=steps)
        literal = model.episode_scores(support, labels, query, solver=solver, steps=steps, form="literal")
    assert factored.shape == (3, 3)
    assert outside_map(positions, 4, 4).any()
    assert relative_error(factored, literal) < REL_TOL  # float32 rounding only; see REL_TOL


# ----- the bundle's head (bundle_head.py, a Gather sampler) against grid_sample and deform_conv -------
def _head(channels: int, groups: int, kernel: int, offset_px: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    head = DMFHead(channels, groups, kernel).double().eval()
    with torch.no_grad():
        w = torch.randn(head.off_conv.weight.shape, generator=gen, dtype=torch.float64)
        head.off_conv.weight.copy_(w * offset_px / math.sqrt(2 * channels * 25))
        w = torch.randn(head.kernel_conv.weight.shape, generator=gen, dtype=torch.float64)
        head.kernel_conv.weight.copy_(w * 2.0 / math.sqrt(9 * channels))
    return head, gen


@pytest.mark.parametrize(
    ("kernel", "groups", "size", "offset_px"),
    [(1, 4, (6, 6), 2.5), (1, 8, (5, 7), 1.0), (3, 2, (7, 5), 2.5), (1, 4, (1, 4), 1.5), (1, 4, (4, 1), 1.5)],
    ids=["k1-square", "k1-nonsquare", "k3", "one-row", "one-column"],
)
def test_bundle_head_equals_the_grid_sample_reference(kernel, groups, size, offset_px):
    """float64, offsets of pixels so that samples fall inside, across the border and outside the map:
    the gather sampler on the bundle's bank layout gives grid_sample's filters and scores."""
    from dmf_deploy import bundle_head

    h, w = size
    head, gen = _head(8, groups, kernel, offset_px, seed=h * 10 + w)
    query = torch.randn(3, 8, h, w, generator=gen, dtype=torch.float64)
    protos = torch.randn(4, 8, h, w, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        bank = head.class_bank(protos)
        py, px = head.sampling_positions(query, bank)
        outside = (py <= -1) | (py >= h) | (px <= -1) | (px >= w)
        straddle = ~outside & ((py < 0) | (py > h - 1) | (px < 0) | (px > w - 1))
        assert outside.any() and straddle.any()
        assert min(h, w) == 1 or (~outside & ~straddle).any()
        stored = bundle_head.bundle_bank(bank)
        positions = bundle_head.sampling_positions(head, query, stored)  # [Q, N, 2, hw, 9]
        for axis, ref in enumerate((py, px)):  # the same sums in another order: rounding apart
            assert (positions[:, :, axis] - ref.flatten(3).transpose(2, 3)).abs().max() < 1e-12
        filters = bundle_head.filters(head, query, stored)
        scores = bundle_head.head_scores(head, query, stored, "dopri5", 3)
        # grid_sample's align_corners=True divides by (h - 1): the reference needs h, w >= 2
        if min(h, w) > 1:
            assert (filters - head.filters(query, bank)).abs().max() < 1e-12
            ref = head.score_map(query, bank, "dopri5", 3).mean(dim=(2, 3))
            assert scores.shape == ref.shape == (3, 4)
            assert (scores - ref).abs().max() < 1e-12 * ref.abs().max()
    if kernel == 1:
        _check_against_deform_conv(head, query, protos, filters)


def _check_against_deform_conv(head, query, protos, filters):
    from torchvision.ops import deform_conv2d

    q, n = len(query), len(protos)
    qs, ss = query.repeat_interleave(n, dim=0), protos.repeat(q, 1, 1, 1)
    with torch.inference_mode():
        offset = head.off_conv(torch.cat([qs, ss], dim=1))
        ref = torch.sigmoid(deform_conv2d(ss, offset, head.kernel_conv.weight, padding=(1, 1)))
    assert (filters - ref.reshape(filters.shape)).abs().max() < 1e-12


def test_exported_head_uses_gather_and_passes_the_lint(tmp_path_factory):
    """A bundle's head has no GridSample, passes the TensorRT-readiness lint, and on ONNX Runtime equals
    the PyTorch grid_sample reference (N = 1, 3, 7: the class axis stays dynamic). The bundle is the
    small one the Recognizer tests share (tests/bundles.py)."""
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime as ort
    from bundles import checkpoint_of, export_small_bundle  # tests/bundles.py

    from dmf_deploy.bundle_head import bundle_bank
    from dmf_deploy.checkpoint import load_checkpoint
    from dmf_deploy.export.lint import lint_file
    from dmf_deploy.manifest import HEAD, graph_io, read_manifest

    bundle = export_small_bundle(tmp_path_factory, seed=1)
    path = bundle / "head.onnx"
    model = load_checkpoint(checkpoint_of(bundle))
    config = model.config
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" not in ops and {"Gather", "Floor"} <= ops
    report = lint_file(path, HEAD, graph_io(config)[HEAD])
    assert report.ok, report.errors

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    manifest = read_manifest(bundle)
    gen = torch.Generator().manual_seed(1)
    s = config.feature_size
    # Offsets are linear in the features: large features move samples across the border and out.
    scale = 25.0
    query = scale * torch.randn(2, config.channels, s, s, generator=gen)
    for n in (1, 3, 7):
        protos = scale * torch.randn(n, config.channels, s, s, generator=gen)
        with torch.inference_mode():
            bank = model.class_bank(protos)
            ref = model.head_scores(query, bank, manifest.solver, manifest.steps).numpy()
            py, px = model.head.sampling_positions(query, bank)
        assert ((py <= -1) | (py >= s) | (px <= -1) | (px >= s)).any()
        stored = bundle_bank(bank)  # the bundle's layout
        feeds = {"query_features": query.numpy(), **{k: v.numpy() for k, v in stored._asdict().items()}}
        got = session.run(["scores"], feeds)[0]
        assert got.shape == (2, n)
        assert relative_error(got, ref) < 1e-5  # float32 ORT against float32 PyTorch, as the parity check
