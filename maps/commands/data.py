"""``maps data``: write the synthetic scene dataset; check a registered dataset."""
from __future__ import annotations

import click


@click.group("data")
def data() -> None:
    """Datasets: the synthetic scene dataset and checks of registered datasets."""


@data.command("synth")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Dataset directory to create (COCO 2017 panoptic layout).")
@click.option("--train", "num_train", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Number of training images.")
@click.option("--val", "num_val", default=200, show_default=True, type=click.IntRange(min=1),
              help="Number of validation images.")
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=32),
              help="Image side in pixels (images are square).")
@click.option("--seed", default=0, show_default=True, type=int, help="Dataset seed.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes drawing images (the output does not depend on it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def synth(out: str, num_train: int, num_val: int, size: int, seed: int, workers: int,
          overwrite: bool) -> None:
    """Write the synthetic panoptic scene dataset (same bytes for the same seed)."""
    from maps.data.synthetic import generate_synthetic_dataset

    path = generate_synthetic_dataset(out, num_train, num_val, size, seed,
                                      overwrite=overwrite, workers=workers, progress=True)
    click.echo(f"wrote {num_train} train + {num_val} val images to {path}")
    click.echo(f"register it with maps.data.register_synthetic('<name>', '{path}'), or put it at "
               f"$DETECTRON2_DATASETS/synthetic for synthetic_train / synthetic_val")


@data.command("check")
@click.argument("names", nargs=-1, required=True)
@click.option("--synthetic-root", type=click.Path(file_okay=False), default=None,
              help="Register synthetic_train/val from this directory first.")
@click.option("--limit", default=0, type=click.IntRange(min=0),
              help="Read at most this many images per dataset (0: all).")
def check(names, synthetic_root, limit: int) -> None:
    """Load registered datasets and read every image and panoptic PNG through the mapper."""
    from detectron2.data import DatasetCatalog
    from tqdm import tqdm

    import maps.data
    from maps.errors import DatasetError

    if synthetic_root:
        maps.data.register_synthetic("synthetic", synthetic_root)
    # no augmentation: the check reads files at their own size
    mapper = maps.data.PanopticDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    for name in names:
        if name not in DatasetCatalog.list():
            raise DatasetError(f"{name}: no such registered dataset")
        dicts = DatasetCatalog.get(name)
        n = len(dicts) if not limit else min(limit, len(dicts))
        segments = 0
        for d in tqdm(dicts[:n], desc=name, unit="img"):
            segments += len(mapper(d)["instances"])
        click.echo(f"{name}: ok, {len(dicts)} images, {n} read, {segments} non-crowd segments")


COMMANDS = [data]
