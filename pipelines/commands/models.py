"""``anomaly models``: list known models, import the public Medical-VAE checkpoint safely."""

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
    p.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    from anomaly.models import available_models, models_dir

    print(f"models folder: {models_dir()}  (set ANOMALY_MODELS_DIR to change)")
    for name, description, where in available_models():
        print(f"  {name:15s} {'ready' if where else 'absent':7s} {description}" + (f"\n  {'':15s} {'':7s} {where}" if where and where != "built in" else ""))
    return 0


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
