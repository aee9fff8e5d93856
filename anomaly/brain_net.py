"""deepbet's two networks as plain PyTorch modules, loaded from safetensors made once from its wheel.

deepbet ships its networks only as TorchScript archives (``model.pt``, ``bbox_model.pt``), which
``torch.load(weights_only=True)`` refuses and ``torch.jit.load`` would run as code. Here the archives
are read without executing anything (the project's restricted unpickler keeps only tensors), their
tensors are checked against the architecture below (a 3D LinkNet, written from the layer list the
archives declare) and saved once as safetensors in a user cache; every later run loads only those.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_NAMES = ("model", "bbox_model")
DEEPBET_VERSION = "1.0.2"
KNOWN_WEIGHTS = {
    "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
    "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
}
"""SHA-256 of the networks of deepbet 1.0.2, the ones measured in the README."""


def _norm_relu(conv: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, nn.InstanceNorm3d(conv.out_channels), nn.ReLU(inplace=True))  # type: ignore[arg-type]


class _Block(nn.Module):
    """Residual block: two 3x3x3 convolutions, a strided 1x1x1 shortcut when the grid halves."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.InstanceNorm3d(cout), nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.InstanceNorm3d(cout))
        self.downsample = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride, 0, bias=False), nn.InstanceNorm3d(cout))
                           if stride != 1 else None)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.double_conv(x) + shortcut)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block1 = _Block(cin, cout, stride)
        self.block2 = _Block(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class _Up(nn.Module):
    """Decoder step: 1x1x1 squeeze to a quarter, transposed 3x3x3 convolution, 1x1x1 expand."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cin // 4
        self.conv1 = _norm_relu(nn.Conv3d(cin, mid, 1, bias=False))
        self.tp_conv = _norm_relu(nn.ConvTranspose3d(mid, mid, 3, stride, 1, output_padding=stride - 1, bias=False))
        self.conv2 = _norm_relu(nn.Conv3d(mid, cout, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """deepbet's segmentation network (both of its networks share it): input 1 x D x H x W with sides
    divisible by 32, output the softmax over background and brain."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Sequential(nn.Conv3d(1, 16, 7, 2, 3, bias=False), nn.InstanceNorm3d(16), nn.ReLU(inplace=True),
                                  nn.MaxPool3d(3, 2, 1))
        self.down0, self.down1 = _Down(16, 16, 1), _Down(16, 32, 2)
        self.down2, self.down3 = _Down(32, 64, 2), _Down(64, 128, 2)
        self.up0, self.up1 = _Up(128, 64, 2), _Up(64, 32, 2)
        self.up2, self.up3 = _Up(32, 16, 2), _Up(16, 16, 1)
        self.tp_conv1 = _norm_relu(nn.ConvTranspose3d(16, 8, 3, 2, 1, output_padding=1))
        self.conv = _norm_relu(nn.Conv3d(8, 8, 3, 1, 1))
        self.tp_conv2 = nn.ConvTranspose3d(8, 2, 2, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.init(x)
        d1 = self.down0(x0)
        d2 = self.down1(d1)
        d3 = self.down2(d2)
        u = self.up0(self.down3(d3)) + d3
        u = self.up1(u) + d2
        u = self.up2(u) + d1
        u = self.up3(u) + x0
        return torch.softmax(self.tp_conv2(self.conv(self.tp_conv1(u))), dim=1)


class WeightsError(RuntimeError):
    """deepbet's weight files are missing, altered, or do not fit the network."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors(obj: Any, prefix: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in the inert module tree the restricted unpickler built."""
    if depth > 32 or id(obj) in seen:
        return
    seen.add(id(obj))
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value
        elif getattr(value, "state", None) is not None:
            yield from _tensors(value, f"{prefix}{key}.", seen, depth + 1)


def state_dict_from_archive(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a deepbet TorchScript archive, read without running its code, checked to be
    exactly the parameters of :class:`LinkNet3d` (names and shapes)."""
    from anomaly.models.safe_unpickle import CheckpointFormatError, safe_load

    try:
        root = safe_load(path)
    except CheckpointFormatError as exc:
        raise WeightsError(f"{path}: not a readable deepbet archive ({exc})") from exc
    found = {name: t.detach().clone().contiguous() for name, t in _tensors(root, "", set())}
    expected = {k: tuple(v.shape) for k, v in LinkNet3d().state_dict().items()}
    got = {k: tuple(v.shape) for k, v in found.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        raise WeightsError(f"{path}: tensors do not fit deepbet's network (missing {missing}, unexpected {extra}, "
                           "or shapes differ)")
    return {k: v.float() for k, v in found.items()}


def cache_dir() -> Path:
    """Where the converted weights live: ``ANOMALY_CACHE_DIR`` or ``~/.cache/anomaly``, per deepbet version."""
    root = Path(os.environ.get("ANOMALY_CACHE_DIR") or Path.home() / ".cache" / "anomaly")
    return root / f"deepbet-{DEEPBET_VERSION}"


def convert(archive: Path, out: Path) -> Path:
    """Write the archive's tensors as safetensors (atomically), recording the archive's SHA-256."""
    from safetensors.torch import save_file

    tensors = state_dict_from_archive(archive)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"source": archive.name, "source_sha256": sha256(archive),
                                          "deepbet": DEEPBET_VERSION})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_network(weights: Path, source_sha256: str | None = None) -> LinkNet3d:
    """A :class:`LinkNet3d` in eval mode with the safetensors weights (strict: every tensor must fit).
    With ``source_sha256`` the file must also record that it was made from that archive."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if source_sha256 is not None:
        with safe_open(str(weights), framework="pt") as fh:
            recorded = (fh.metadata() or {}).get("source_sha256")
        if recorded != source_sha256:
            raise WeightsError(f"{weights} was not made from the expected deepbet archive")
    net = LinkNet3d()
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{weights}: weights do not fit deepbet's network ({str(exc)[:200]})") from exc
    return net.eval()


def cached_networks(archives: dict[str, Path], folder: Path | None = None) -> dict[str, LinkNet3d]:
    """Both networks, from safetensors in ``folder`` (the cache by default), converted from the SHA-256
    checked archives the first time (and again whenever a cached file is absent or not from them)."""
    folder = cache_dir() if folder is None else folder
    nets: dict[str, LinkNet3d] = {}
    for name in WEIGHT_NAMES:
        archive = archives[name]
        expected = KNOWN_WEIGHTS[f"{name}.pt"]
        target = folder / f"{name}.safetensors"
        try:
            nets[name] = load_network(target, expected)
            continue
        except Exception:  # noqa: BLE001 - absent, partial, corrupt or stale: convert it again
            pass
        if not archive.is_file() or sha256(archive) != expected:
            raise WeightsError(f"deepbet weights {archive} are missing or not those of deepbet {DEEPBET_VERSION}")
        nets[name] = load_network(convert(archive, target), expected)
    return nets
