"""Import a CompVis-LDM autoencoder checkpoint (e.g. the public Medical-VAE) as a diffusers `AutoencoderKL`.

The checkpoint is read with `safe_unpickle` (no pickled code runs), its weights are renamed to the
diffusers layout, checked strictly against a model built from a config inferred from the weights,
and saved as a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import shutil
import stat
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from anomaly.models.safe_unpickle import CheckpointFormatError, extract_state_dict, safe_load

__all__ = [
    "DROPPED_PREFIXES",
    "ImportReport",
    "LDMImportError",
    "diffusers_to_ldm_name",
    "import_ldm_checkpoint",
    "infer_diffusers_config",
    "ldm_to_diffusers_name",
    "ldm_to_diffusers_state_dict",
    "split_vae_weights",
]

# Parts of an LDM autoencoder that inference does not use: the training loss (LPIPS and the
# discriminator), EMA shadow weights, and the colour map of segmentation models.
DROPPED_PREFIXES: tuple[str, ...] = ("loss.", "model_ema.", "colorize")
SCALING_FACTOR = 0.18215
SAMPLE_SIZE = 256
_ANCHOR = "encoder.conv_in.weight"


class LDMImportError(ValueError):
    """An LDM checkpoint cannot be converted: missing, unexpected or misshapen weights, or an unsupported layout."""


# ---------------------------------------------------------------------------------------------
# Name mapping. Each rule pairs an LDM name template with a diffusers one; placeholders translate
# one way or the other: {io} encoder/decoder, {n}/{m} indices, {r} a decoder level (LDM counts
# from the lowest resolution, diffusers from the highest), {k} mid resnet (LDM 1/2, diffusers 0/1).

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

_RULES: tuple[tuple[str, str], ...] = (
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
    ("{io}.conv_in", "{io}.conv_in"),
    ("{io}.conv_out", "{io}.conv_out"),
    ("{io}.norm_out", "{io}.conv_norm_out"),
    ("encoder.down.{n}.block.{m}.{res}", "encoder.down_blocks.{n}.resnets.{m}.{res}"),
    ("encoder.down.{n}.downsample.conv", "encoder.down_blocks.{n}.downsamplers.0.conv"),
    ("decoder.up.{r}.block.{m}.{res}", "decoder.up_blocks.{r}.resnets.{m}.{res}"),
    ("decoder.up.{r}.upsample.conv", "decoder.up_blocks.{r}.upsamplers.0.conv"),
    ("{io}.mid.block_{k}.{res}", "{io}.mid_block.resnets.{k}.{res}"),
    ("{io}.mid.attn_1.{attn}", "{io}.mid_block.attentions.0.{attn}"),
)


def _alternation(words: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _placeholders(num_levels: int, to_diffusers: bool) -> dict[str, tuple[str, Callable[[str], str | None]]]:
    """Regex and translation for each placeholder, in the requested direction."""

    def table(mapping: Mapping[str, str]) -> tuple[str, Callable[[str], str | None]]:
        lookup = dict(mapping) if to_diffusers else {v: k for k, v in mapping.items()}
        return _alternation(lookup), lookup.get

    def level(text: str) -> str | None:
        index = int(text)
        return str(num_levels - 1 - index) if 0 <= index < num_levels else None

    mid = {"1": "0", "2": "1"}
    return {
        "io": (r"(?:encoder|decoder)", lambda s: s),
        "n": (r"\d+", lambda s: s),
        "m": (r"\d+", lambda s: s),
        "r": (r"\d+", level),
        "k": table(mid),
        "res": table(_RESNET_PARTS),
        "attn": table(_ATTN_PARTS),
    }


@functools.lru_cache(maxsize=32)
def _compiled_rules(num_levels: int, to_diffusers: bool) -> tuple[tuple[re.Pattern[str], str], ...]:
    holders = _placeholders(num_levels, to_diffusers)
    rules = []
    for ldm_template, diffusers_template in _RULES:
        source, target = (ldm_template, diffusers_template) if to_diffusers else (diffusers_template, ldm_template)
        pattern = re.escape(source)
        for key, (regex, _) in holders.items():
            pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>{regex})")
        rules.append((re.compile(pattern + r"\.(?P<param>weight|bias)"), target))
    return tuple(rules)


def _translate(name: str, num_levels: int, to_diffusers: bool) -> str | None:
    holders = _placeholders(num_levels, to_diffusers)
    for pattern, target in _compiled_rules(num_levels, to_diffusers):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        values: dict[str, str] = {}
        for key, text in match.groupdict().items():
            if key == "param":
                continue
            translated = holders[key][1](text)
            if translated is None:
                return None
            values[key] = translated
        return target.format(**values) + "." + match["param"]
    return None


def ldm_to_diffusers_name(name: str, num_levels: int) -> str | None:
    """The diffusers `AutoencoderKL` name of an LDM autoencoder weight, or None when no rule applies."""
    return _translate(name, num_levels, to_diffusers=True)


def diffusers_to_ldm_name(name: str, num_levels: int) -> str | None:
    """The LDM name of a diffusers `AutoencoderKL` weight (inverse of `ldm_to_diffusers_name`)."""
    return _translate(name, num_levels, to_diffusers=False)


def _levels(sd: Mapping[str, Any], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for key in sd if (m := re.match(pattern, key))})


def _num_levels(sd: Mapping[str, Any]) -> int:
    down = _levels(sd, r"encoder\.down\.(\d+)\.")
    up = _levels(sd, r"decoder\.up\.(\d+)\.")
    if not down or not up:
        raise LDMImportError("no encoder.down.N / decoder.up.N weights: not an LDM autoencoder")
    if down != list(range(len(down))) or up != list(range(len(up))) or len(down) != len(up):
        raise LDMImportError(f"encoder levels {down} and decoder levels {up} are not the same 0..N-1 sequence")
    return len(down)


def _is_dropped(name: str) -> bool:
    return name.startswith(DROPPED_PREFIXES)


def _to_linear(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM attention uses 1x1 convolutions; diffusers uses linear layers with the same weights."""
    if tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor[:, :, 0, 0]
    if tensor.ndim == 3 and tensor.shape[2] == 1:
        return tensor[:, :, 0]
    if tensor.ndim == 2:
        return tensor
    raise LDMImportError(f"{name}: attention weight of shape {tuple(tensor.shape)} is not a 1x1 convolution")


_ATTN_WEIGHT = re.compile(r"(?:encoder|decoder)\.mid_block\.attentions\.0\.(?:to_q|to_k|to_v|to_out\.0)\.weight")


def _convert(
    sd: Mapping[str, torch.Tensor], num_levels: int
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Renamed weights, the LDM origin of each new name, and the LDM names no rule maps."""
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for name, tensor in sd.items():
        if _is_dropped(name):
            continue
        new = ldm_to_diffusers_name(name, num_levels)
        if new is None:
            unmapped.append(name)
            continue
        if _ATTN_WEIGHT.fullmatch(new):
            tensor = _to_linear(name, tensor)
        converted[new] = tensor
        origin[new] = name
    return converted, origin, unmapped


def ldm_to_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an LDM autoencoder state dict to diffusers `AutoencoderKL` names.

    Weights under `DROPPED_PREFIXES` (`loss.*`, ...) are left out; any other name without a rule
    raises `LDMImportError` listing them. Attention 1x1-conv weights become linear weights.
    """
    converted, _, unmapped = _convert(sd, _num_levels(sd))
    if unmapped:
        raise LDMImportError(f"no diffusers name for {len(unmapped)} weight(s): {_listing(unmapped)}")
    return converted


# ---------------------------------------------------------------------------------------------
# Selecting the autoencoder's weights and inferring its config.


def split_vae_weights(
    sd: Mapping[str, torch.Tensor], prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Autoencoder weights with their container prefix removed, and counts of left-out weights per prefix.

    The prefix (`""`, `first_stage_model.`, `model.`, ...) is found from where `encoder.conv_in.weight`
    sits unless given. Left out: weights outside the prefix (e.g. a full LDM's UNet) and `DROPPED_PREFIXES`.
    """
    if prefix is None:
        found = sorted(
            {k[: -len(_ANCHOR)] for k in sd if k.endswith(_ANCHOR) and (k == _ANCHOR or k[: -len(_ANCHOR)].endswith("."))}
        )
        found = [p for p in found if not _is_dropped(p)]
        if not found:
            raise LDMImportError(
                f"no autoencoder weights found (no '{_ANCHOR}' under any prefix among {len(sd)} tensors)"
            )
        if len(found) > 1:
            raise LDMImportError(f"several autoencoders in one checkpoint (prefixes {found}); pass prefix=")
        prefix = found[0]
    vae: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    for name, tensor in sd.items():
        if not name.startswith(prefix):
            dropped[name.split(".", 1)[0] + "."] += 1
            continue
        rest = name[len(prefix) :]
        hit = next((p for p in DROPPED_PREFIXES if rest.startswith(p)), None)
        if hit is not None:
            dropped[prefix + hit] += 1
        else:
            vae[rest] = tensor
    return vae, dict(sorted(dropped.items()))


def _need(sd: Mapping[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    if name not in sd:
        raise LDMImportError(f"cannot infer {what}: weight {name} is missing")
    return sd[name]


def _blocks_per_level(sd: Mapping[str, Any], side: str, num_levels: int) -> list[int]:
    return [len(_levels(sd, rf"{side}\.{i}\.block\.(\d+)\.")) for i in range(num_levels)]


def infer_diffusers_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A diffusers `AutoencoderKL` config read off LDM-named autoencoder weights.

    Channels in/out, `block_out_channels`, `layers_per_block`, latent channels, quant convs and mid
    attention come from the weights; `norm_num_groups` (32 in LDM), `sample_size` (256) and
    `scaling_factor` (0.18215) are the kl-f8 defaults.
    """
    num_levels = _num_levels(sd)
    if any(re.match(r"(?:encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in sd):
        raise LDMImportError("attention inside resolution levels (attn_resolutions) is not supported")
    in_channels = _need(sd, "encoder.conv_in.weight", "in_channels").shape[1]
    out_channels = _need(sd, "decoder.conv_out.weight", "out_channels").shape[0]
    block_out = [
        int(_need(sd, f"encoder.down.{i}.block.0.conv1.weight", "block_out_channels").shape[0])
        for i in range(num_levels)
    ]
    enc_blocks = _blocks_per_level(sd, "encoder.down", num_levels)
    dec_blocks = _blocks_per_level(sd, "decoder.up", num_levels)
    layers = enc_blocks[0]
    if set(enc_blocks) != {layers} or set(dec_blocks) != {layers + 1}:
        raise LDMImportError(
            f"resnet blocks per level are uneven (encoder {enc_blocks}, decoder {dec_blocks}); "
            "expected n per encoder level and n+1 per decoder level"
        )
    z_channels = int(_need(sd, "decoder.conv_in.weight", "latent channels").shape[1])
    encoder_out = int(_need(sd, "encoder.conv_out.weight", "latent channels").shape[0])
    if encoder_out != 2 * z_channels:
        raise LDMImportError(
            f"encoder.conv_out gives {encoder_out} channels, expected 2 x {z_channels} (a KL autoencoder with double_z)"
        )
    if "post_quant_conv.weight" in sd:
        embed_dim = int(sd["post_quant_conv.weight"].shape[1])
        if embed_dim != z_channels:
            raise LDMImportError(
                f"embed_dim {embed_dim} differs from z_channels {z_channels}; diffusers needs them equal"
            )
    return {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * num_levels,
        "up_block_types": ["UpDecoderBlock2D"] * num_levels,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": z_channels,
        "norm_num_groups": 32,
        "sample_size": SAMPLE_SIZE,
        "scaling_factor": SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


# ---------------------------------------------------------------------------------------------
# The import.


@dataclass(frozen=True)
class ImportReport:
    """What an import read, used, left out and wrote.

    `n_tensors` counts every tensor in the file, `n_used` those written to the diffusers model and
    `dropped` the left-out ones per name prefix; `sha256` identifies the source file.
    """

    source: Path
    sha256: str
    out_dir: Path
    n_tensors: int
    n_used: int
    dropped: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped_prefixes(self) -> tuple[str, ...]:
        """The name prefixes of the weights that were left out (e.g. `loss.`)."""
        return tuple(self.dropped)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        data = asdict(self)
        data["source"], data["out_dir"] = str(self.source), str(self.out_dir)
        data["dropped_prefixes"] = list(self.dropped)
        return data


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _build_model(config: Mapping[str, Any], source: Path) -> AutoencoderKL:
    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise LDMImportError(f"{source}: unknown AutoencoderKL config keys {unknown}; allowed: {sorted(allowed)}")
    try:
        with torch.device("meta"):
            return AutoencoderKL(**config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise LDMImportError(
            f"{source}: cannot build AutoencoderKL from {dict(config)}: {exc}; "
            "adjust config_overrides (e.g. norm_num_groups)"
        ) from exc


def _check_match(
    model: torch.nn.Module,
    converted: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    unmapped: list[str],
    num_levels: int,
    source: Path,
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [
        f"{diffusers_to_ldm_name(k, num_levels) or k} (diffusers {k})" for k in expected if k not in converted
    ]
    unexpected = unmapped + [origin[k] for k in converted if k not in expected]
    mismatched = [
        f"{origin[k]}: checkpoint {tuple(v.shape)}, model {expected[k]}"
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source}: the weights do not match the autoencoder they describe, so nothing was written."]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            lines.append(f"  {label} ({len(names)}): {_listing(names)}")
    lines.append("Check that the file is a complete LDM AutoencoderKL checkpoint, or fix the layout via config_overrides.")
    raise LDMImportError("\n".join(lines))


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise LDMImportError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LDMImportError(f"{out_dir}: folder is not empty; choose another folder or pass overwrite=True")


def _save_atomically(model: AutoencoderKL, out_dir: Path) -> None:
    """Write into a sibling temporary folder, then move into place, so a failure leaves no half model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # plain mkdir: honours the umask, unlike mkdtemp's 0700
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666
        for item in tmp.iterdir():
            item.chmod(file_mode)  # some writers create 0600 files; give them the folder's permissions
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return
        for item in tmp.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def import_ldm_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    prefix: str | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Convert an LDM `AutoencoderKL` checkpoint (pickled module or checkpoint dict) into a diffusers folder.

    Nothing in the file is executed. Every autoencoder weight must be used and every model
    parameter filled with an equal shape, otherwise `LDMImportError` lists the offending names.
    Writes `config.json` and `diffusion_pytorch_model.safetensors` into `out_dir`.
    """
    source, out_dir = Path(path), Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    digest = sha256_file(source) if source.is_file() else ""
    try:
        state = extract_state_dict(safe_load(source))
    except CheckpointFormatError as exc:
        message = str(exc)
        raise CheckpointFormatError(message if message.startswith(str(source)) else f"{source}: {message}") from None
    try:
        vae, dropped = split_vae_weights(state, prefix)
        num_levels = _num_levels(vae)
        config = infer_diffusers_config(vae)
    except LDMImportError as exc:
        raise LDMImportError(f"{source}: {exc}") from None
    config.update(config_overrides or {})
    converted, origin, unmapped = _convert(vae, num_levels)
    model = _build_model(config, source)
    _check_match(model, converted, origin, unmapped, num_levels, source)
    weights = {k: v.detach().clone().contiguous() for k, v in converted.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise LDMImportError(f"{source}: model tensors left without values: {_listing(still_meta)}")
    model.eval()
    _save_atomically(model, out_dir)
    return ImportReport(
        source=source,
        sha256=digest,
        out_dir=out_dir,
        n_tensors=len(state),
        n_used=len(weights),
        dropped=dropped,
        config={k: v for k, v in model.config.items() if not k.startswith("_")},
    )
