"""Feature extractors: ResNet-12 as in the paper (official key names kept) and a small conv4."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmf_deploy.config import ModelConfig


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): zero square blocks of a feature map while training."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size

    def forward(self, x: torch.Tensor, gamma: float) -> torch.Tensor:
        if not self.training or gamma <= 0:
            return x
        b, c, h, w = x.shape
        size = min(self.block_size, h, w)
        seeds = torch.bernoulli(torch.full((b, c, h - size + 1, w - size + 1), gamma, device=x.device))
        # Each seed blanks the size x size block below-right of it, as in the official code.
        padded = F.pad(seeds, (size - 1, size - 1, size - 1, size - 1))
        block_mask = 1.0 - F.max_pool2d(padded, kernel_size=size, stride=1)
        kept = block_mask.sum().clamp_min(1.0)
        return x * block_mask * (block_mask.numel() / kept)


class BasicBlock(nn.Module):
    """Three 3x3 conv+BN+LeakyReLU(0.1), a 1x1 conv+BN shortcut, then an optional 2x2 ceil-mode pool."""

    def __init__(
        self, in_ch: int, out_ch: int, pool: bool, drop_rate: float, drop_block: bool, block_size: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv3 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.LeakyReLU(0.1)
        self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if pool else nn.Identity()
        self.drop_rate = drop_rate
        self.drop_block = DropBlock(block_size) if drop_block else None
        # Drives the DropBlock warm-up; the official checkpoints carry it at block level.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.pool(self.relu(out + self.downsample(x)))
        if not self.training or self.drop_rate <= 0:
            return out
        self.num_batches_tracked += 1
        if self.drop_block is None:
            return F.dropout(out, p=self.drop_rate, training=True)
        # Keep rate ramps from 1 down to 1 - drop_rate, as in the official schedule.
        keep = max(1.0 - self.drop_rate / 40000 * float(self.num_batches_tracked), 1.0 - self.drop_rate)
        side, size = out.shape[-1], self.drop_block.block_size
        gamma = (1 - keep) / size**2 * side**2 / max(side - size + 1, 1) ** 2
        return self.drop_block(out, gamma)


class ResNet12(nn.Module):
    def __init__(self, widths: tuple[int, ...], drop_rate: float = 0.1, dropblock_size: int = 5) -> None:
        super().__init__()
        chans = (3, *widths)
        for i in range(4):
            block = BasicBlock(
                chans[i],
                chans[i + 1],
                pool=i < 3,
                drop_rate=drop_rate,
                drop_block=i >= 2,
                block_size=dropblock_size,
            )
            self.add_module(f"layer{i + 1}", nn.Sequential(block))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Conv4(nn.Module):
    """Four 3x3 conv-BN-ReLU blocks; 2x2 ceil-mode pools after the first three."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        chans = (3, *widths)
        layers = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_backbone(config: ModelConfig) -> nn.Module:
    if config.backbone == "resnet12":
        return ResNet12(config.widths, config.drop_rate, config.dropblock_size)
    return Conv4(config.widths)
