"""Example contact sheets of the tiny world (the PNGs committed under docs/world/).

`python -m cns.world.sheets docs/world` regenerates them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cns.world.concepts import KINDS, concepts_of_kind, make_concept_images
from cns.world.render import contact_sheet, render, sample_scene


def write_example_sheets(out_dir: str | Path, seed: int = 0, n_scenes: int = 24, cols: int = 6) -> list[Path]:
    """Write train-scene sheets at 64 and 32 px and one 64 px sheet per concept kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, "train") for _ in range(n_scenes)]
    paths = []
    for size in (64, 32):
        path = out / f"train_scenes_{size}px.png"
        contact_sheet([render(s, size) for s in scenes], cols).save(path, optimize=True)
        paths.append(path)
    for kind in KINDS:
        images = [im for c in concepts_of_kind(kind) for im, _ in make_concept_images(c, 5, 64, seed)]
        path = out / f"concepts_{kind}.png"
        contact_sheet(images, 5).save(path, optimize=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write example contact sheets of the tiny world.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_example_sheets(args.out_dir, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
