"""torchvision, imported once with a clear error where it does not match torch.

A torchvision built for another torch fails inside its own import with errors that do not say so
(`RuntimeError: operator torchvision::nms does not exist`, or an OSError from its compiled
extension). `import_torchvision` turns each into one line naming both versions and how to install a
matching pair. dmf-deploy needs torchvision only for the literal reference head (`deform_conv2d`).
"""

from __future__ import annotations

from importlib import metadata
from types import ModuleType

# The pair README.md's CPU install line pins (tests/test_readme.py checks that it does).
CPU_PAIR = "torch==2.14.1 torchvision==0.29.1"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class TorchvisionMismatch(ImportError):
    """torchvision is installed but does not import with this torch (another torch's build)."""


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def import_torchvision() -> ModuleType:
    """`import torchvision`, or ImportError: TorchvisionMismatch when it is installed but broken."""
    try:
        import torchvision
    except (RuntimeError, OSError, AttributeError) as exc:
        torch_version, vision_version = installed_version("torch"), installed_version("torchvision")
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TorchvisionMismatch(
            f"torch {torch_version} and torchvision {vision_version} do not match (importing torchvision "
            f"failed: {first_line}); install a matching pair, e.g. pip install {CPU_PAIR} --index-url "
            f'{CPU_INDEX}, and check with: python -c "import torchvision"'
        ) from None
    return torchvision
