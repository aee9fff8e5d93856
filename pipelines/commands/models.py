"""``anomaly models``: list known models, import the public Medical-VAE checkpoint safely, route a contrast
to its own model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.commands.common import UserError, new_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "models", "List the models this machine has, or import a checkpoint.",
                   "anomaly models list\n  anomaly models import VAE-Medical-klf8.pt --out ~/.cache/anomaly/models/medical-vae")
    verbs = p.add_subparsers(dest="action", metavar="ACTION")
    verbs.add_parser("list", help="models by name, and where their weights are").set_defaults(func=run_list)
    imp = verbs.add_parser("import", help="convert a pickled LDM AutoencoderKL checkpoint (never executes its code) "
                                          "into a diffusers folder",
                           epilog="example:\n  anomaly models import VAE-Medical-klf8.pt",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("checkpoint", metavar="FILE.pt")
    imp.add_argument("--out", metavar="DIR", help="output folder (default: the models folder /medical-vae)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    imp.set_defaults(func=run_import)
    route = verbs.add_parser("route", help="score scans of one contrast with another model folder (copied into "
                                           "MODEL/<contrast>)",
                             epilog="example:\n  anomaly models route runs/mine/model t2 runs/mine-t2/model",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    route.add_argument("model", metavar="MODEL", help="model folder that gains the route (anomaly train writes them)")
    route.add_argument("contrast", choices=("t1", "t2", "flair"))
    route.add_argument("route", metavar="ROUTE", help="model folder that scores scans of that contrast")
    route.set_defaults(func=run_route)
    p.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    from anomaly.models import available_models, models_dir

    print(f"models folder: {models_dir()}  (set ANOMALY_MODELS_DIR to change)")
    for name, description, where in available_models():
        print(f"  {name:15s} {'ready' if where else 'absent':7s} {description}" + (f"\n  {'':15s} {'':7s} {where}" if where and where != "built in" else ""))
        routes = _routes(Path(where)) if where and where != "built in" else {}
        for contrast, sub in routes.items():
            print(f"  {'':15s} {'':7s} {contrast.upper()} scans: {sub}")
    return 0


def _routes(folder: Path) -> dict[str, str]:
    """Per-contrast routes of a model folder, as ``contrast -> route name (grid)``; empty when it has none."""
    from anomaly.models.folder import MODEL_CONFIG, read_model_config

    found: dict[str, str] = {}
    for contrast, sub in ((read_model_config(folder) or {}).get("by_contrast") or {}).items():
        meta = read_model_config(folder / str(sub)) if (folder / str(sub) / MODEL_CONFIG).is_file() else None
        spec = (meta or {}).get("input_spec") or {}
        grid = f" ({spec.get('slice_size')} px at {spec.get('spacing', ['?'])[0]} mm)" if spec else ""
        found[str(contrast)] = f"{(meta or {}).get('name', sub)}{grid}" if meta else f"{sub} (missing)"
    return found


def run_import(args: argparse.Namespace) -> int:
    from anomaly.models import models_dir
    from anomaly.models.families import load_families
    from anomaly.models.ldm_import import LDMImportError, import_ldm_checkpoint
    from anomaly.models.safe_unpickle import CheckpointFormatError

    source = Path(args.checkpoint).expanduser()
    if not source.is_file():
        raise UserError(f"{source}: checkpoint not found; give the path of VAE-Medical-klf8.pt")
    out = Path(args.out).expanduser() if args.out else models_dir() / "medical-vae"
    try:
        report = import_ldm_checkpoint(source, out, overwrite=args.overwrite)
    except (LDMImportError, CheckpointFormatError) as exc:
        raise UserError(str(exc)) from exc
    print(f"imported {report.n_used} tensors into {out} (dropped: {', '.join(report.dropped_prefixes) or 'none'})")
    family = load_families().get("medical-vae")
    wrong = family.mismatches(json.loads((out / "config.json").read_text())) if family else []
    by_name = out == models_dir() / "medical-vae" and not wrong
    if wrong:
        print(f"note: this checkpoint is not the public Medical-VAE architecture ({'; '.join(wrong)}); "
              "load it by its folder path")
    print("use it with: anomaly score ... --model " + ("medical-vae" if by_name else str(out)))
    return 0


def run_route(args: argparse.Namespace) -> int:
    from anomaly.models import ModelLoadError, add_contrast_route, load_model_folder, model_for

    model, route = Path(args.model).expanduser(), Path(args.route).expanduser()
    for folder in (model, route):
        if not folder.is_dir():
            raise UserError(f"{folder}: model folder not found; give folders written by anomaly train")
    if model.resolve() == route.resolve() or model.resolve() in route.resolve().parents:
        raise UserError(f"{route}: a route must be another model folder, not {model} itself or inside it")
    try:
        target = add_contrast_route(model, args.contrast, route)
        loaded = load_model_folder(model)  # the routed folder must load before it is reported ready
    except ModelLoadError as exc:
        raise UserError(str(exc)) from exc
    spec = model_for(loaded, args.contrast).input_spec
    print(f"{args.contrast.upper()} scans scored with {target} ({spec.slice_size} px at {spec.spacing[0]:g} mm)")
    print(f"use it with: anomaly score ... --model {model}")
    return 0
