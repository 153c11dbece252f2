"""DMFNet: backbone + DMF head + (training only) global classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmf_deploy.backbones import build_backbone
from dmf_deploy.config import DEFAULT_STEPS, ModelConfig, Solver
from dmf_deploy.head import ClassBank, DMFHead

FORMS = ("factored", "literal")


class DMFNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.base = build_backbone(config)
        self.global_classifier = nn.Conv2d(config.channels, config.num_classes, 1)
        self.head = DMFHead(
            config.channels,
            config.groups,
            config.kernel,
            config.official_filter_order,
            dynamic_sampling=config.dynamic_sampling,
        )

    # ----- building blocks, shared with export and training --------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return self.base(images)

    @staticmethod
    def prototypes(features: torch.Tensor, labels: torch.Tensor, n_way: int | None = None) -> torch.Tensor:
        """Mean support feature map per class: [N, C, h, w]. Labels must cover 0..N-1."""
        labels = labels.long()
        if n_way is None:
            n_way = int(labels.max()) + 1 if labels.numel() else 0
        if labels.ndim != 1 or labels.numel() != features.shape[0]:
            raise ValueError(
                f"support_labels must be [S] with S={features.shape[0]}, got {tuple(labels.shape)}"
            )
        onehot = F.one_hot(labels, n_way).to(features.dtype)  # [S, N]
        counts = onehot.sum(0)
        if bool((counts == 0).any()):
            missing = [i for i in range(n_way) if counts[i] == 0]
            raise ValueError(f"support_labels must cover 0..{n_way - 1}; no shots for {missing}")
        summed = torch.matmul(onehot.t(), features.reshape(features.shape[0], -1))
        return (summed / counts.unsqueeze(1)).reshape(n_way, *features.shape[1:])

    def class_bank(self, prototypes: torch.Tensor) -> ClassBank:
        return self.head.class_bank(prototypes)

    def resolve_solver(self, solver: str | None, steps: int | None) -> tuple[str, int]:
        """None means the training solver (and its steps); another solver defaults to DEFAULT_STEPS."""
        solver = self.config.solver if solver is None else solver
        if steps is None:
            steps = self.config.steps if solver == self.config.solver else DEFAULT_STEPS
        checked = Solver.checked(solver, steps, self.config.kernel)
        return checked.name, checked.steps

    def score_map(
        self,
        query_features: torch.Tensor,
        bank: ClassBank,
        solver: str | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Factored per-position scores [Q, N, h, w]."""
        solver, steps = self.resolve_solver(solver, steps)
        return self.head.score_map(query_features, bank, solver, steps, self.config.rtol, self.config.atol)

    def head_scores(
        self,
        query_features: torch.Tensor,
        bank: ClassBank,
        solver: str | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """[Q, N] scores from query features and a class bank (what head.onnx computes, there from the
        bank in the bundle's layout: `dmf_deploy.bundle_head`)."""
        maps = self.score_map(query_features, bank, solver, steps)
        return maps.mean(dim=(2, 3)) * self.config.score_scale(tuple(maps.shape[-2:]))

    # ----- the public few-shot API -----------------------------------------------------------------
    def episode_scores(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        solver: str | None = None,
        steps: int | None = None,
        form: str = "factored",
    ) -> torch.Tensor:
        """support [S,3,H,W], labels [S] in 0..N-1, query [Q,3,H,W] (normalised) -> scores [Q, N]."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        solver, steps = self.resolve_solver(solver, steps)
        feats = self.features(torch.cat([support, query], dim=0))
        protos = self.prototypes(feats[: support.shape[0]], support_labels)
        query_feats = feats[support.shape[0] :]
        if form == "literal":
            maps = self.head.literal_score_map(
                query_feats, protos, solver, steps, self.config.rtol, self.config.atol
            )
            return maps.mean(dim=(2, 3)) * self.config.score_scale(tuple(maps.shape[-2:]))
        return self.head_scores(query_feats, self.class_bank(protos), solver, steps)

    # ----- training --------------------------------------------------------------------------------
    def loss_from_features(
        self,
        support_feats: torch.Tensor,
        support_labels: torch.Tensor,
        query_feats: torch.Tensor,
        query_labels: torch.Tensor,
        query_global_labels: torch.Tensor,
        fewshot_weight: float | None = None,
        solver: str | None = None,
        steps: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-position CE of the global classifier + w x per-position few-shot CE.

        The official code averages the few-shot term over its zero-padded (h+2)x(w+2) map, which only
        scales it by hw/((h+2)(w+2)); the default weight folds that factor into the paper's 0.5.
        """
        fewshot, accuracy = self.fewshot_loss(
            support_feats, support_labels, query_feats, query_labels, solver, steps
        )
        h, w = query_feats.shape[-2:]
        if fewshot_weight is None:
            fewshot_weight = 0.5 * (h * w) / ((h + 2) * (w + 2))
        logits = self.global_classifier(query_feats)
        global_ce = F.cross_entropy(logits, query_global_labels.long()[:, None, None].expand(-1, h, w))
        return {
            "loss": global_ce + fewshot_weight * fewshot,
            "global_ce": global_ce.detach(),
            "fewshot_ce": fewshot.detach(),
            "accuracy": accuracy,
        }

    def fewshot_loss(
        self,
        support_feats: torch.Tensor,
        support_labels: torch.Tensor,
        query_feats: torch.Tensor,
        query_labels: torch.Tensor,
        solver: str | None = None,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The episode's few-shot term (per-position CE of the aligned scores) and its accuracy."""
        n_way = int(support_labels.max()) + 1
        protos = self.prototypes(support_feats, support_labels, n_way)
        maps = self.score_map(query_feats, self.class_bank(protos), solver, steps)  # [Q, N, h, w]
        h, w = maps.shape[-2:]
        fewshot = F.cross_entropy(maps, query_labels.long()[:, None, None].expand(-1, h, w))
        with torch.no_grad():
            accuracy = (maps.mean(dim=(2, 3)).argmax(1) == query_labels).float().mean()
        return fewshot, accuracy
