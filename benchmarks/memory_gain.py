"""Does memory help on the synthetic dataset? Mask2Former vs MAPS over seeds (not a test).

The synthetic scenes are built so that context matters (look-alike thing classes told apart
only by the scene around them). This trains the registry's ``synthetic/main/mask2former`` and
``synthetic/main/maps`` at the same (shortened) schedule over ``--seeds`` seeds, through the
same launcher and run store as ``maps demo``, and reports:

* PQ (and PQ_th, PQ_st, AP, mIoU) mean ± std of each, the MAPS - Mask2Former difference and
  Welch's two-sided t-test on it (scipy);
* the same-scene retrieval rate of the neighbour cache against chance: if retrieval does not
  find same-scene images, memory cannot carry scene context, whatever the model does.

One thread per training, ``--parallel`` trainings at a time (2 on 2 cores). Reruns reuse
finished runs (the run store), so an interrupted benchmark continues where it stopped.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_gain.py   # the README's result, ~30 min here
    .venv/bin/python benchmarks/memory_gain.py --seeds 2 --iterations 50         # smoke
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

import click

BASELINE = "synthetic/main/mask2former"
MEMORY = "synthetic/main/maps"
METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")


def collect(store: Any, specs: List[Any]) -> Dict[str, Dict[str, List[float]]]:
    """experiment -> metric -> values over the finished seeds (final.json)."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for spec in specs:
        final = store.read_final(store.run_dir(spec.experiment, spec.seed))
        if not final:
            continue
        per = out.setdefault(spec.experiment, {m: [] for m in METRICS})
        for m in METRICS:
            if m in final:
                per[m].append(float(final[m]))
    return out


def compare(values: Dict[str, Dict[str, List[float]]]) -> Dict[str, Dict[str, Any]]:
    """Per metric: mean/std/n of both, the difference and Welch's test."""
    from maps.report import summarize, welch_test

    rows = {}
    base, mem = values.get(BASELINE, {}), values.get(MEMORY, {})
    for m in METRICS:
        a, b = mem.get(m, []), base.get(m, [])
        ma, sa, na = summarize(a)
        mb, sb, nb = summarize(b)
        t, dof, p, ci = welch_test(a, b)
        rows[m] = {"maps": {"mean": ma, "std": sa, "n": na, "values": a},
                   "mask2former": {"mean": mb, "std": sb, "n": nb, "values": b},
                   "delta": ma - mb, "t": t, "dof": dof, "p_value": p,
                   "ci95": list(ci) if ci else None}
    return rows


def render(rows: Dict[str, Dict[str, Any]], retrieval: Any, meta: Dict[str, Any]) -> str:
    def fmt(s: Dict[str, Any]) -> str:
        return f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})"

    lines = [f"Memory gain on the synthetic dataset: {meta['iterations']} iterations, "
             f"{meta['train_images']} train / {meta['val_images']} val images, seeds {meta['seeds']}",
             "", "| metric | Mask2Former | MAPS | Δ | Welch p |", "|---|---|---|---|---|"]
    for m, r in rows.items():
        p = "n/a" if r["p_value"] is None else f"{r['p_value']:.3g}"
        lines.append(f"| {m} | {fmt(r['mask2former'])} | {fmt(r['maps'])} | {r['delta']:+.2f} | {p} |")
    if retrieval is not None:
        lines += ["", f"Retrieval (val -> train memory): {retrieval.describe()}"]
    lines += ["", f"Wall time: {meta['seconds'] / 60:.1f} min"]
    return "\n".join(lines)


@click.command()
@click.option("--seeds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--train-images", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--val-images", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--root", type=click.Path(file_okay=False), default="runs/benchmarks/memory_gain",
              show_default=True, help="Dataset, memory and run store of the benchmark.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON here (the markdown next to it).")
def main(seeds: int, iterations: int, train_images: int, val_images: int, parallel: int,
         root: str, out: str) -> None:
    from rich.console import Console

    from maps.data.synthetic import dataset_fingerprint
    from maps.demo import (FINGERPRINT_FACT, DemoSize, configure_environment, demo_products,
                           drop_stale_products, ensure_dataset, ensure_memory, launch_with_progress,
                           memory_spec, refuse_unjudgeable, register_dataset, resized_experiment,
                           run_specs, same_scene_rate, scenes_of)
    from maps.launch.memory_jobs import memory_prereq
    from maps.registry import load_registry
    from maps.launch.runstore import RunStore

    console = Console()
    start = time.time()
    size = DemoSize(train_images, val_images, iterations, tuple(range(seeds)), evals=1)
    root_p = Path(root).absolute()
    configure_environment(root_p / "datasets")
    registry = load_registry()
    exps = [registry.get(BASELINE), registry.get(MEMORY)]
    spec = memory_spec(exps)
    # memory and runs built from another dataset (an older format) are removed, as the demo does
    planned = memory_prereq(spec, root_p / "runs", str(root_p / "datasets"))
    products = demo_products(exps, size.seeds, RunStore(root_p / "runs"), planned)
    dataset_root, _ = ensure_dataset(root_p / "datasets" / "synthetic", size,
                                     before_regenerating=lambda: refuse_unjudgeable(products))
    facts = {FINGERPRINT_FACT: dataset_fingerprint(dataset_root)}
    store = RunStore(root_p / "runs", made_facts=facts)
    drop_stale_products(products, facts[FINGERPRINT_FACT], console.print)
    register_dataset(dataset_root)
    memory, _ = ensure_memory(spec, root_p / "runs", root_p / "datasets", made_facts=facts)
    k = int(resized_experiment(exps[1], iterations).build_config().MODEL.MAPS.NUM_RETRIEVED)
    retrieval = same_scene_rate(Path(memory.output_dir) / "neighbors" / "synthetic_val.jsonl",
                                scenes_of(dataset_root, "val"), scenes_of(dataset_root, "train"), k=k)
    console.print(f"val -> train {retrieval.describe()}")
    # interleave the two models so a stopped benchmark has both sides of as many seeds as possible
    specs = [s for pair in zip(*(run_specs([e], size, memory) for e in exps)) for s in pair]
    launch_with_progress(specs, store, parallel=parallel, console=console)
    rows = compare(collect(store, specs))
    meta = {"iterations": iterations, "train_images": train_images, "val_images": val_images,
            "seeds": list(size.seeds), "seconds": time.time() - start}
    text = render(rows, retrieval, meta)
    console.print(text)
    if out:
        from maps.io import atomic_write_json, atomic_write_text

        atomic_write_json(out, {"meta": meta, "metrics": rows,
                                "retrieval": {"rate": retrieval.rate, "chance": retrieval.chance,
                                              "queries": retrieval.queries, "k": retrieval.k}})
        atomic_write_text(str(Path(out).with_suffix(".md")), text + "\n")


if __name__ == "__main__":
    main()
