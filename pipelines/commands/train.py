"""``anomaly train``: train a slice VAE and/or its latent healer from a recipe YAML into a model folder."""

from __future__ import annotations

import argparse

from anomaly.training.config import STAGES, load_recipe
from pipelines.commands.common import new_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "train", "Train a model from a recipe (configs/train/NAME.yaml): healthy slices of the "
                   "listed volumes, a slice VAE, then its restoration stage (stage denoiser: an image-space denoising "
                   "UNet; stage healer: a latent diffusion healer); writes OUT/model, a model "
                   "folder that `anomaly score --model OUT/model` accepts. Re-running resumes from checkpoints.",
                   "anomaly train --config configs/train/default.yaml --out runs/default")
    p.add_argument("--config", required=True, metavar="YAML", help="training recipe")
    p.add_argument("--out", metavar="DIR", help="work folder (default: the recipe's `out`)")
    p.add_argument("--stage", choices=STAGES, help="override the recipe's stage")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.train import run_recipe

    recipe = load_recipe(args.config, stage=args.stage)
    folder = run_recipe(recipe, out=args.out, resume=not args.fresh, progress=not args.quiet)
    print(f"model folder: {folder}")
    print(f"score with: anomaly score SCANS --model {folder} --out results/{recipe.name}")
    return 0
