"""``maps memory``: build the banks, compute the neighbour cache, inspect a bank."""
from __future__ import annotations

import click


@click.group("memory")
def memory() -> None:
    """The external memory: scene and object banks, index, neighbour cache."""


@memory.command("build")
@click.option("--dataset", required=True, help="detectron2 DatasetCatalog name of the memory set.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bank directory.")
@click.option("--encoder", type=click.Choice(["clip", "dino"]), default="clip", show_default=True,
              help="Key (CLS) encoder.")
@click.option("--arch", default=None, help="Key encoder architecture (default "
              "ViT-B-16-quickgelu, OpenAI's CLIP / vit_base_patch16_224; tiny: ViT-Tiny-16, "
              "vit_tiny2_patch16_224).")
@click.option("--dense", type=click.Choice(["clip", "dino", "maskclip", "tiledclip"]),
              default="tiledclip", show_default=True, help="Dense extractor of the object memory.")
@click.option("--dense-arch", default=None, help="Dense architecture when its backbone differs.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="Key encoder weights: a weights-cache name (maps weights list, e.g. "
                   "clip-vit-b16-openai) or a local file; none: random init from --seed.")
@click.option("--dense-weights", default=None, type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--shards", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--executor", type=click.Choice(["local", "slurm", "debug"]), default="local",
              show_default=True)
@click.option("--slurm", "slurm", multiple=True, metavar="KEY=VALUE",
              help="submitit executor parameter for the shard jobs (repeatable), e.g. "
                   "--slurm slurm_partition=gpu --slurm gpus_per_node=1.")
@click.option("--index", type=click.Choice(["hnsw", "flat"]), default="hnsw", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True)
def build(dataset, out, encoder, arch, dense, dense_arch, weights, dense_weights, seed,
          batch_size, shards, executor, slurm, index, dtype) -> None:
    """Encode a dataset into the scene and object banks and index them."""
    from maps.memory.build import build_bank

    params = {}
    for item in slurm:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--slurm")
        params[key] = int(value) if value.lstrip("-").isdigit() else value

    bank = build_bank(dataset, out, encoder=encoder, arch=arch, dense=dense,
                      dense_arch=dense_arch, weights=weights, dense_weights=dense_weights,
                      seed=seed, batch_size=batch_size, shards=shards, executor=executor,
                      slurm_params=params or None, index=index, dtype=dtype)
    click.echo(f"{bank.path}: {bank.num_images} images, {bank.num_objects} object tokens "
               f"(scene dim {bank.scene_keys.shape[1]}, object dim "
               f"{bank.arrays.object_tokens.shape[1]})")


@memory.command("neighbors")
@click.option("--bank", required=True, type=click.Path(file_okay=False))
@click.option("--dataset", required=True, help="Dataset whose images query the memory.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON lines file.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Neighbours per image (>= NUM_RETRIEVED, or POOL_SIZE with random sampling).")
@click.option("--search", type=click.Choice(["exact", "hnsw"]), default="exact",
              show_default=True)
@click.option("--first-pass", type=click.Choice(["auto", "fp32", "bf16", "pca", "ivf"]),
              default="auto", show_default=True,
              help="Candidate pass of exact search (ivf: inverted file, approximate).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
def neighbors(bank, dataset, out, k, search, first_pass, batch_size) -> None:
    """Nearest memory images of every image of a dataset (its own image excluded)."""
    from maps.memory.bank import MemoryBank
    from maps.memory.dataset import load_dataset_dicts
    from maps.memory.encoders import EncoderSpec, build_from_spec
    from maps.memory.retrieval import compute_neighbors, write_neighbor_cache

    b = MemoryBank(bank)
    # the keys (and, searched with HNSW, the index) against the manifest's sha256: a cache
    # computed from a tampered bank would be trusted by every run that reads it
    b.verify(index=search == "hnsw")
    dicts = load_dataset_dicts(dataset)
    key_encoder = None
    if any(b.row(d["image_id"]) is None for d in dicts):
        spec = b.manifest.get("encoder_specs", {}).get("key")
        if not spec:
            raise click.ClickException(f"{bank}: manifest has no key encoder spec")
        key_encoder = build_from_spec(EncoderSpec(**spec), "key")
    ids, nn, scores = compute_neighbors(b, dicts, k, key_encoder=key_encoder, search=search,
                                        batch_size=batch_size, first_pass=first_pass)
    write_neighbor_cache(out, b, ids, nn, scores, dataset)
    click.echo(f"{out}: {len(ids)} images, {min((len(n) for n in nn), default=0)} neighbours each")


@memory.command("info")
@click.option("--bank", required=True, type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Re-hash every array and the index against the "
              "manifest, ignoring (and renewing) the verification cache that runs rely on.")
def info(bank, verify) -> None:
    """Describe (and optionally verify) a bank."""
    from maps.memory.bank import MemoryBank
    from maps.memory.encoders import describe_identity

    b = MemoryBank(bank, verify=verify)
    click.echo(repr(b))
    click.echo(f"key encoder:   {describe_identity(b.key_encoder)}")
    click.echo(f"dense encoder: {describe_identity(b.dense_encoder)}")
    if verify:
        indexed = "and the index " if "index" in b.manifest else ""
        click.echo(f"all array hashes {indexed}match the manifest")


@memory.command("index")
@click.option("--bank", required=True, type=click.Path(file_okay=False))
@click.option("--index", type=click.Choice(["hnsw", "flat"]), default=None,
              help="Index kind (default: the stored index's, else hnsw).")
def index(bank, index) -> None:
    """Rebuild a bank's FAISS index from its verified keys and record its sha256.

    What a bank built before indexes were hashed needs before a run accepts it."""
    from dataclasses import asdict

    from maps.memory.bank import MemoryBank
    from maps.memory.index import IndexParams, load_or_build_index

    b = MemoryBank(bank)
    b.verify(index=False)  # the keys the index is built from
    params = IndexParams(kind=index) if index else _stored_index_params(b)
    load_or_build_index(b.path, b.scene_keys, params, rebuild=True)
    b = MemoryBank(bank)
    b.verify()
    click.echo(f"{b.path / 'index.faiss'}: {params.kind} index over {b.num_images} keys, sha256 "
               f"{b.manifest['index']['sha256'][:12]}... recorded in the manifest "
               f"({asdict(params)})")


def _stored_index_params(bank):
    """The settings of the bank's current index (manifest, else index.json), or the defaults."""
    import json

    from maps.memory.index import IndexParams

    stored = bank.manifest.get("index", {}).get("params")
    if stored is None:
        try:
            stored = json.loads((bank.path / "index.json").read_text()).get("params")
        except (OSError, ValueError, AttributeError):
            stored = None
    try:
        return IndexParams(**stored) if isinstance(stored, dict) else IndexParams()
    except TypeError:
        return IndexParams()


COMMANDS = [memory]
