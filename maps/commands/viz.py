"""``maps viz``: pictures of the memory's retrievals (paper Fig. 3 / Fig. 4)."""
from __future__ import annotations

import click


@click.group("viz")
def viz() -> None:
    """Visualisations."""


def _parse_id(value: str):
    return int(value) if value.lstrip("-").isdigit() else value


@viz.command("retrievals")
@click.option("--bank", required=True, type=click.Path(file_okay=False))
@click.option("--dataset", required=True, help="Dataset of the query image.")
@click.option("--image", "image", required=True,
              help="Query image: its image id, or its file name (e.g. 000000000139.jpg).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file.")
@click.option("--k", default=5, show_default=True, type=click.IntRange(min=1))
def retrievals(bank, dataset, image, out, k) -> None:
    """The query image, its k retrieved scenes and their object-memory segments."""
    import os

    from maps.errors import DatasetError
    from maps.memory.bank import MemoryBank
    from maps.memory.dataset import category_names, load_dataset_dicts
    from maps.memory.encoders import EncoderSpec, build_from_spec
    from maps.memory.retrieval import Retriever
    from maps.memory.viz import plot_retrievals

    b = MemoryBank(bank)
    dicts = load_dataset_dicts(dataset)
    want = _parse_id(image)
    query = next((d for d in dicts if d["image_id"] == want
                  or os.path.basename(d["file_name"]) == image), None)
    if query is None:
        raise DatasetError(f"image {image!r} is neither an image id nor a file name of "
                           f"dataset {dataset!r}")
    row = b.row(query["image_id"])
    if row is not None:
        key = b.scene_keys[row][None]
    else:
        spec = EncoderSpec(**b.manifest["encoder_specs"]["key"])
        from maps.memory.dataset import read_image

        key = build_from_spec(spec, "key").encode([read_image(query)]).numpy()
    ids, scores = Retriever(b).search(key, k, query_ids=[query["image_id"]])
    bank_dicts = {d["image_id"]: d for d in (dicts if b.dataset == dataset
                                              else _maybe_dicts(b.dataset))}
    plot_retrievals(b, query, ids[0], scores[0], out, bank_dicts, category_names(dataset))
    click.echo(f"{out}: query {query['image_id']} and {len(ids[0])} retrievals")


def _maybe_dicts(name: str):
    from maps.errors import MapsError
    from maps.memory.dataset import load_dataset_dicts

    try:
        return load_dataset_dicts(name)
    except MapsError:
        return []


COMMANDS = [viz]
