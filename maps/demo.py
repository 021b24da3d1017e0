"""``maps demo``: the whole pipeline of the paper on this machine, in minutes.

The demo goes through the machinery a cluster user goes through, only smaller: the synthetic
suite of the registry (``experiments/synthetic/main.yaml``), the run store, the submitit
launcher with its local executor, W&B (offline unless configured) and :mod:`maps.report`.
What it adds is the glue a fresh checkout needs -- the dataset, the memory bank and the
neighbour caches -- and a schedule that fits two CPU cores: each training is one process with
one intra-op thread (the tiny config is 10-20x slower with two threads on a loaded 2-core
machine), ``parallel`` of them at a time.

Everything is idempotent: the dataset, the memory and the runs are reused when they are
there (the run store refuses to launch a finished run twice), unless ``fresh``.

The demo deletes only what it made: its folder (``fresh``), and the memory and runs it built
from an earlier dataset, which it tells apart by the dataset fingerprint their maps markers
recorded (:mod:`maps.io`). A folder without such a marker is never deleted: the demo stops
and names it instead.

:func:`same_scene_rate` is the check behind the claim that memory can help here: the fraction
of retrieved neighbours from the query's own scene type, next to the rate chance gives.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from maps.errors import ConfigError, DatasetError, MapsError
from maps.io import NotMadeByMapsError, made_by_maps, make_dir, remove_made

logger = logging.getLogger(__name__)

#: the rows of the synthetic main-results table the demo can train (registry names)
DEMO_EXPERIMENTS: Tuple[str, ...] = (
    "synthetic/main/mask2former",
    "synthetic/main/maps",
    "synthetic/main/maps-aug",
)
#: what the default demo trains: the comparison it measures (MAPS-Aug on request, --with-aug:
#: three more runs do not fit in its ten minutes on two cores)
MEASURED_EXPERIMENTS: Tuple[str, ...] = DEMO_EXPERIMENTS[:2]
TRAIN_TASK = "maps.engine.train:run_training"
DATASET_NAMES = ("synthetic_train", "synthetic_val")
#: the kind of the demo folder's maps marker: what ``--fresh`` may delete
DEMO_KIND = "demo"
#: the fact of a memory's or a run's marker naming the dataset it was built from
FINGERPRINT_FACT = "dataset_fingerprint"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: dataset images, training iterations, seeds."""

    train_images: int
    val_images: int
    iterations: int
    seeds: Tuple[int, ...] = (0,)
    #: evaluations during training (the plots' points); the last one is at the end
    evals: int = 2


#: the default demo: Mask2Former and MAPS, 3 seeds each, 1000 iterations (long enough for
#: things to be segmented; see docs/demo.md for the measured wall time)
FULL = DemoSize(train_images=400, val_images=200, iterations=1000, seeds=(0, 1, 2), evals=2)
#: ``--quick``: a smoke run of every stage (mostly the start-up of three trainings); its
#: numbers mean nothing
QUICK = DemoSize(train_images=40, val_images=12, iterations=20, evals=1)


# ---------------------------------------------------------------------------------------------
# Environment of the launched trainings
# ---------------------------------------------------------------------------------------------
def configure_environment(datasets_root: Path, wandb_dir: Optional[Path] = None) -> Dict[str, str]:
    """Set what the launched jobs inherit: one intra-op thread, the datasets, W&B's mode.

    Local submitit jobs are children of this process and read their environment from it, so
    this is how a setting reaches them. W&B stays offline unless the user configured a mode.
    """
    env = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "DETECTRON2_DATASETS": str(Path(datasets_root).absolute()),
        "WANDB_MODE": os.environ.get("WANDB_MODE") or "offline",
        "WANDB_SILENT": os.environ.get("WANDB_SILENT") or "true",
    }
    if wandb_dir is not None:
        env["WANDB_DIR"] = str(Path(wandb_dir).absolute())
    os.environ.update(env)
    return env


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------
def ensure_dataset(root: Path, size: DemoSize, seed: int = 0, progress: bool = True,
                   before_regenerating: Optional[Callable[[], None]] = None) -> Tuple[Path, bool]:
    """The synthetic dataset at ``root`` with the demo's sizes: reused if it matches, else
    (re)generated, after ``before_regenerating()`` (which may refuse). Returns (root, generated)."""
    from maps.data.synthetic import MANIFEST_NAME, generate_synthetic_dataset, read_manifest

    from maps.errors import DatasetError

    root = Path(root).absolute()
    want = {"train": size.train_images, "val": size.val_images}
    if (root / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(root)
        except DatasetError as e:  # another format version: drawn by an older maps
            logger.info("%s; regenerating", e)
        else:
            have = {split: (n or {}).get("images") for split, n in (manifest.get("splits") or {}).items()}
            if have == want and manifest.get("seed") == seed:
                return root, False
            logger.info("%s holds another dataset (%s); regenerating", root, manifest.get("splits"))
    if before_regenerating is not None and (root.exists() or root.is_symlink()):
        before_regenerating()
    generate_synthetic_dataset(root, size.train_images, size.val_images, seed=seed,
                               overwrite=True, progress=progress)
    return root, True


def _recorded_fingerprint(folder: Path, kind: str) -> Optional[str]:
    return (made_by_maps(folder, kind) or {}).get(FINGERPRINT_FACT)


def refuse_unjudgeable(products: Sequence[Tuple[Path, str]]) -> None:
    """Before the dataset is replaced: refuse if one of the demo's memory or run folders has no
    recorded dataset fingerprint (made before maps marked its folders, or by ``maps launch``).
    Once the dataset changed it could not be told stale or not; nothing is deleted, the
    dataset is not replaced, and the error names the folder."""
    unknown = [Path(f) for f, kind in products
               if (Path(f).exists() or Path(f).is_symlink()) and _recorded_fingerprint(Path(f), kind) is None]
    if unknown:
        raise NotMadeByMapsError(
            f"{unknown[0]} may be built from the previous dataset, but has no maps marker with "
            f"its dataset fingerprint: not deleting it; remove it yourself if it is stale"
            + (f" (and {len(unknown) - 1} more like it)" if len(unknown) > 1 else ""))


def drop_stale_products(products: Sequence[Tuple[Path, str]], fingerprint: str,
                        say: Callable[[str], None] = print) -> List[Path]:
    """Remove the demo's memory and runs that were built from another dataset than
    ``fingerprint`` (:func:`maps.data.synthetic.dataset_fingerprint`), so they are rebuilt and
    retrained, not reused; returns the folders removed.

    ``products`` are the exact folders the demo is about to use, with the kind of their maps
    marker (``memory``, ``run``). Each is judged by the fingerprint its marker recorded: the
    same, kept; another, removed (:func:`maps.io.remove_made`). One without a recorded
    fingerprint is kept (see :func:`refuse_unjudgeable` for when the dataset changes).
    """
    stale = []
    for folder, kind in products:
        folder = Path(folder)
        if not (folder.exists() or folder.is_symlink()):
            continue
        recorded = _recorded_fingerprint(folder, kind)
        if recorded is not None and recorded != fingerprint:
            stale.append((folder, kind, recorded))
    for folder, kind, recorded in stale:
        say(f"      the dataset changed: removing {folder} (built from dataset {recorded})")
        remove_made(folder, kind)
    return [folder for folder, _, _ in stale]


def demo_products(exps: Sequence[Any], seeds: Sequence[int], store: Any,
                  memory: Optional[Any]) -> List[Tuple[Path, str]]:
    """The folders the demo's memory and runs live in, with the kind of their maps marker."""
    from maps.launch.runstore import RUN_KIND
    from maps.memory.prepare import MEMORY_KIND

    out: List[Tuple[Path, str]] = [(Path(memory.output_dir), MEMORY_KIND)] if memory is not None else []
    for exp in exps:
        for seed in seeds:
            experiment, _, _ = exp.run_name(seed).rpartition("/")
            out.append((store.run_dir(experiment, seed), RUN_KIND))
    return out


def register_dataset(root: Path) -> None:
    """Point ``synthetic_train`` / ``synthetic_val`` at ``root`` in this process."""
    from maps.data.datasets import register_synthetic

    register_synthetic("synthetic", str(root))


def scenes_of(dataset_root: Path, split: str) -> Dict[Any, str]:
    """image id -> scene type, from the ``scene`` field of the panoptic JSON's images."""
    path = Path(dataset_root) / f"panoptic_{split}.json"
    try:
        images = json.loads(path.read_text())["images"]
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"{path}: cannot read the images' scenes ({e})") from None
    missing = [im.get("id") for im in images if "scene" not in im]
    if missing:
        raise DatasetError(f"{path}: images {missing[:3]} have no 'scene' field")
    return {im["id"]: im["scene"] for im in images}


def places_of(dataset_root: Path, split: str) -> Dict[Any, str]:
    """image id -> recurring place (the ``place`` field of street and lake images, dataset
    format 3); images of no place are left out."""
    path = Path(dataset_root) / f"panoptic_{split}.json"
    try:
        images = json.loads(path.read_text())["images"]
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"{path}: cannot read the images' places ({e})") from None
    return {im["id"]: im["place"] for im in images if im.get("place")}


# ---------------------------------------------------------------------------------------------
# Memory: bank + neighbour caches
# ---------------------------------------------------------------------------------------------
def memory_spec(experiments: Sequence[Any]) -> Optional[Dict[str, Any]]:
    """The one memory spec the experiments share (None if none uses memory)."""
    specs = [e.memory_spec() for e in experiments]
    specs = [s for s in specs if s is not None]
    if not specs:
        return None
    first = specs[0]
    for s in specs[1:]:
        if s != first:
            raise ConfigError(f"the demo's experiments need different memories ({first} vs {s})")
    return first


def ensure_memory(spec: Mapping[str, Any], runs_root: Path, data_root: Path,
                  made_facts: Optional[Mapping[str, Any]] = None) -> Tuple[Any, bool]:
    """The memory of ``spec`` as the launcher's prerequisite, built now if it is not complete.

    It is the same :class:`maps.launch.PrereqSpec` ``maps launch`` uses (bank and neighbour
    caches under ``<runs root>/_memory/...``, see :mod:`maps.memory.prepare`); the demo builds
    it in this process, before launching, so its progress bars are on screen and the
    same-scene rate can be shown before training starts. Returns (prereq, built).
    ``made_facts`` go into the marker of the memory folder if this call makes it.
    """
    from maps.launch import PrereqTask
    from maps.launch.memory_jobs import memory_prereq

    prereq = memory_prereq(spec, runs_root, str(data_root))
    if prereq.is_complete():
        return prereq, False
    make_dir(prereq.output_dir, prereq.kind, **dict(made_facts or {}))
    PrereqTask(prereq)()  # builds, then writes the marker the launcher checks
    return prereq, True


@dataclass(frozen=True)
class SceneRetrieval:
    """How often retrieval returns images of the query's own scene type."""

    rate: float      # fraction of retrieved neighbours with the query's scene
    chance: float    # the same fraction for neighbours drawn at random from the memory
    queries: int
    k: int

    def describe(self) -> str:
        return (f"same-scene retrieval {100 * self.rate:.1f}% of top-{self.k} neighbours "
                f"({self.queries} queries; chance {100 * self.chance:.1f}%)")


def same_place_rate(cache_path: Path, query_places: Mapping[Any, str], memory_places: Mapping[Any, str],
                    memory_size: int, k: Optional[int] = None) -> Optional[SceneRetrieval]:
    """:func:`same_scene_rate` for recurring places: over the queries that show one, the
    fraction of retrieved neighbours of the same place, next to chance (the share of the
    ``memory_size`` memory images that show it); None when no query shows a place."""
    from maps.memory.retrieval import NeighborCache

    counts = Counter(memory_places.values())
    hits = n = queries = k_used = 0
    chance_sum = 0.0
    for image_id, (neighbors, _scores) in NeighborCache(cache_path).items():
        place = query_places.get(image_id)
        if place is None:
            continue
        top = list(neighbors)[:k] if k else list(neighbors)
        k_used = max(k_used, len(top))
        hits += sum(memory_places.get(nb) == place for nb in top)
        n += len(top)
        own = 1 if image_id in memory_places else 0
        chance_sum += (counts[place] - own) / max(memory_size - own, 1)
        queries += 1
    if not queries or not n:
        return None
    return SceneRetrieval(hits / n, chance_sum / queries, queries, k_used)


def same_scene_rate(cache_path: Path, query_scenes: Mapping[Any, str], memory_scenes: Mapping[Any, str],
                    k: Optional[int] = None) -> SceneRetrieval:
    """Fraction of the (first ``k``) retrieved neighbours whose scene equals the query's.

    Chance is what uniform retrieval from the memory would give: for each query, the share of
    memory images (itself excluded) with its scene, averaged over queries.
    """
    from maps.memory.retrieval import NeighborCache

    cache = NeighborCache(cache_path)
    counts = Counter(memory_scenes.values())
    total = len(memory_scenes)
    hits = n = 0
    chance_sum = 0.0
    queries = 0
    k_used = 0
    for image_id, (neighbors, _scores) in cache.items():
        if image_id not in query_scenes:
            raise DatasetError(f"{cache_path}: image {image_id!r} is not in the query dataset")
        scene = query_scenes[image_id]
        top = list(neighbors)[:k] if k else list(neighbors)
        k_used = max(k_used, len(top))
        for nb in top:
            if nb not in memory_scenes:
                raise DatasetError(f"{cache_path}: neighbour {nb!r} is not in the memory dataset")
            hits += memory_scenes[nb] == scene
            n += 1
        own = 1 if image_id in memory_scenes else 0
        chance_sum += (counts[scene] - own) / max(total - own, 1)
        queries += 1
    if n == 0:
        raise DatasetError(f"{cache_path}: no neighbours to score")
    return SceneRetrieval(hits / n, chance_sum / queries, queries, k_used)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def resized_experiment(experiment: Any, iterations: int) -> Any:
    """The registry entry with its schedule shortened (SOLVER.STEPS scale with it)."""
    return dataclasses.replace(experiment, iterations=int(iterations))


def run_specs(experiments: Sequence[Any], size: DemoSize, memory: Optional[Any]) -> List[Any]:
    """One RunSpec per experiment and seed, at the demo's size; runs with memory read the
    prerequisite ``memory`` (a PrereqSpec) and list it, as ``maps launch`` does."""
    from maps.launch import RunSpec
    from maps.memory.prepare import apply_memory

    specs = []
    for exp in experiments:
        small = resized_experiment(exp, size.iterations)
        for seed in size.seeds:
            cfg = small.build_config(seed)
            cfg.TEST.EVAL_PERIOD = max(size.iterations // max(size.evals, 1), 1)
            cfg.SOLVER.CHECKPOINT_PERIOD = size.iterations
            # a very short schedule can round a scaled LR step onto MAX_ITER, which
            # detectron2's MultiStep scheduler refuses: drop such steps
            cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < size.iterations)
            prereqs = ()
            if memory is not None and cfg.MODEL.MAPS.ENABLED:
                apply_memory(cfg, memory.output_dir)
                prereqs = (memory,)
            experiment, _, _ = small.run_name(seed).rpartition("/")
            specs.append(RunSpec(experiment=experiment, seed=seed, config=cfg, task=TRAIN_TASK,
                                 prerequisites=prereqs))
    return specs


def seed_major(specs: Sequence[Any]) -> List[Any]:
    """The runs ordered seed by seed (Mask2Former, MAPS, ... of seed 0, then of seed 1): the
    models of one seed train side by side on the same load, and a demo stopped early has
    both sides of as many seeds as possible."""
    return sorted(specs, key=lambda spec: spec.seed)  # stable: the experiments keep their order


def _iteration_of(run_dir: Path) -> int:
    from maps.launch.runstore import read_metrics

    try:
        records = read_metrics(run_dir)
    except MapsError:
        return 0
    its = [int(r["iteration"]) + 1 for r in records if "iteration" in r]
    return max(its, default=0)


def launch_with_progress(specs: Sequence[Any], store: Any, parallel: int = 2,
                         console: Any = None, poll_s: float = 2.0) -> List[Any]:
    """Launch the runs through :func:`maps.launch.launch` (local executor), at most
    ``parallel`` at a time, with a progress bar per run read from its metrics.json.

    Runs the store already has as done (or active) are skipped by the launcher itself. Returns
    the launch outcomes in the order of ``specs``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    pending = list(specs)
    running: List[Tuple[Any, Any, Any]] = []  # (spec, job, task id)
    outcomes: Dict[Tuple[str, int], Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[state]}"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        tasks = {}
        for spec in specs:
            total = int(spec.config.SOLVER.MAX_ITER) if hasattr(spec.config, "SOLVER") else 1
            tasks[(spec.experiment, spec.seed)] = bar.add_task(
                f"{spec.experiment} seed {spec.seed}", total=total, state="waiting", start=False)
        try:
            with _interrupt_on_sigterm():
                _schedule(pending, running, outcomes, tasks, bar, store, parallel, poll_s)
        except BaseException:
            # local jobs are not children that die with us: stop them, or they train on
            for _spec, job, _task in running:
                job.cancel(check=False)
            raise
    return [outcomes[(s.experiment, s.seed)] for s in specs]


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM (a closed terminal, ``kill``) like Ctrl-C while runs are being watched."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _schedule(pending: List[Any], running: List[Tuple[Any, Any, Any]], outcomes: Dict[Tuple[str, int], Any],
              tasks: Mapping[Tuple[str, int], Any], bar: Any, store: Any, parallel: int, poll_s: float) -> None:
    """Start runs while a slot is free; follow the running ones until all have ended."""
    from maps.launch import launch

    while pending or running:
        while pending and len(running) < parallel:
            spec = pending.pop(0)
            key = (spec.experiment, spec.seed)
            report = launch([spec], executor="local", store=store, wait=False, retry_failed=True)
            outcome = report.outcomes[0]
            outcomes[key] = outcome
            if outcome.action != "submitted":
                bar.update(tasks[key], completed=bar.tasks[tasks[key]].total,
                           state=f"[green]{outcome.reason}, reused")
                continue
            bar.start_task(tasks[key])
            bar.update(tasks[key], state="[cyan]training")
            running.append((spec, report.jobs[0], tasks[key]))
        time.sleep(poll_s if running else 0)
        still = []
        for spec, job, task_id in running:
            run_dir = store.run_dir(spec.experiment, spec.seed)
            bar.update(task_id, completed=_iteration_of(run_dir))
            if job.done():
                status = store.read_status(run_dir) or {}
                state = status.get("state", "?")
                colour = "green" if state == "done" else "red"
                bar.update(task_id, state=f"[{colour}]{state}",
                           completed=bar.tasks[task_id].total if state == "done" else None)
                bar.stop_task(task_id)
            else:
                still.append((spec, job, task_id))
        running[:] = still


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def memory_verdict(table: Any, row: str = "synthetic/main/maps", metric: str = "PQ") -> str:
    """One sentence with the demo's result: the ``row`` - baseline difference of ``metric``
    over the seeds of each, with Welch's p (:func:`maps.report.welch_test`) and whether it is
    significant at :data:`maps.report.ALPHA`."""
    from maps.report import ALPHA

    try:
        mine, base = table.row(row), next(r for r in table.rows if r.is_baseline)
    except (KeyError, StopIteration):
        return f"no {row} row and baseline in the table: nothing to compare"
    cell, base_cell = mine.cells[metric], base.cells[metric]
    name = metric.replace("_", "^")
    if not cell.values or not base_cell.values:
        return f"{mine.label} or {base.label} has no finished run: nothing to compare"
    c = cell.comparison
    delta = cell.mean - base_cell.mean
    how = "beats" if delta > 0 else "trails"
    seeds = (f"{cell.n} seeds each" if cell.n == base_cell.n
             else f"{cell.n} / {base_cell.n} seeds")
    head = f"{mine.label} {how} {base.label} by {delta:+.2f} {name} over {seeds}"
    if c is None or c.p_value is None:
        return f"{head}: too few seeds for a significance test"
    verdict = (f"significant at {ALPHA:g}" if c.p_value < ALPHA
               else f"not significant at {ALPHA:g}")
    return f"{head} (Welch p = {c.p_value:.3g}): {verdict}"


@dataclass
class DemoResult:
    """Where the demo's outputs are."""

    runs_root: Path
    dataset_root: Path
    memory_dir: Optional[Path]
    table_files: List[Path]
    plot_files: List[Path]
    wandb_dirs: List[Path]
    retrieval: Optional[SceneRetrieval]
    failed: List[str]
    table_text: str
    seconds: float
    #: the result in one sentence (:func:`memory_verdict`)
    verdict: str = ""


def _wandb_dirs(store: Any, specs: Sequence[Any]) -> List[Path]:
    out = []
    for spec in specs:
        run_dir = store.run_dir(spec.experiment, spec.seed)
        record = store.read_wandb(run_dir) or {}
        d = record.get("offline_dir")
        if d and Path(d).exists():
            out.append(Path(d))
        else:
            out += sorted((run_dir / "wandb").glob("*run-*"))
    return out


def demo_registry(registry: Any, seeds: Sequence[int], iterations: int) -> Any:
    """The registry as the demo ran it: synthetic entries with the demo's seeds and schedule,
    so the table counts its runs as complete instead of "1/3 done"."""
    from maps.registry import Registry

    def resize(e: Any) -> Any:
        if e.suite != "synthetic" or not e.runnable:
            return e
        return dataclasses.replace(e, seeds=tuple(seeds), iterations=int(iterations))

    return Registry([resize(e) for e in registry], registry.tables, registry.root,
                    {k: resize(v) for k, v in registry.alias_setups.items()})


def write_report(store: Any, out_dir: Path, registry: Any, plots: bool = True
                 ) -> Tuple[str, List[Path], List[Path], List[str], str]:
    """The synthetic main table (Table 2 mirror) from the store into ``out_dir/synthetic``:
    (its Markdown, table files, plot files, warnings, :func:`memory_verdict`)."""
    from maps.report import build_tables, render, write_tables
    from maps.report.sources import RunStoreSource

    source = RunStoreSource(store)
    report = build_tables(registry, source, 2, "synthetic")
    tables = [Path(p) for p in write_tables(report, out_dir, ("md", "latex", "csv"))]
    plot_files: List[Path] = []
    if plots:
        from maps.report.plots import write_plots

        plot_files = [Path(p) for p in write_plots(report, source, registry, out_dir)]
    text = "\n".join(render(t, "md") for t in report.tables)
    return text, tables, plot_files, list(report.warnings), memory_verdict(report.tables[0])


def run_demo(runs_root: Path, out_dir: Path, size: DemoSize = FULL, experiments: Sequence[str] = DEMO_EXPERIMENTS,
             parallel: int = 2, fresh: bool = False, plots: bool = True,
             say: Callable[[str], None] = print, console: Any = None) -> DemoResult:
    """Dataset -> memory -> trainings -> evaluation -> W&B (offline) -> the synthetic Table 2.

    ``runs_root`` holds everything the demo makes besides the table: ``datasets/synthetic``,
    ``_memory/``, the run store (``synthetic/main/<row>/seed<k>``) and W&B's offline runs in
    each run directory. ``fresh`` deletes it first, if the demo made it (its maps marker):
    another folder (a run store of real work, say) is refused, never deleted.
    """
    start = time.time()
    runs_root = Path(runs_root).absolute()
    if fresh and remove_made(runs_root, DEMO_KIND):  # refuses a folder the demo did not make
        say(f"--fresh: removed {runs_root}")
    make_dir(runs_root, DEMO_KIND)  # marked only if the demo makes it

    from maps.data.synthetic import dataset_fingerprint
    from maps.launch.memory_jobs import memory_prereq
    from maps.launch.runstore import RunStore
    from maps.registry import load_registry

    datasets_root = runs_root / "datasets"
    configure_environment(datasets_root)
    registry = load_registry()
    exps = [registry.get(name) for name in experiments]
    mem_spec = memory_spec(exps)

    planned = memory_prereq(mem_spec, runs_root, str(datasets_root)) if mem_spec is not None else None
    products = demo_products(exps, size.seeds, RunStore(runs_root), planned)

    say(f"[1/5] synthetic dataset: {size.train_images} train / {size.val_images} val images")
    dataset_root, made = ensure_dataset(datasets_root / "synthetic", size,
                                        before_regenerating=lambda: refuse_unjudgeable(products))
    say(f"      {'generated' if made else 'reused'} {dataset_root}")
    fingerprint = dataset_fingerprint(dataset_root)
    facts = {FINGERPRINT_FACT: fingerprint}
    store = RunStore(runs_root, made_facts=facts)
    drop_stale_products(products, fingerprint, say)
    register_dataset(dataset_root)

    memory = retrieval = None
    if mem_spec is not None:
        say(f"[2/5] memory: bank of {mem_spec['dataset']} with {mem_spec['key_encoder']} "
            f"{mem_spec['key_arch']} keys and {mem_spec['dense']} object tokens")
        if not mem_spec.get("weights"):
            say("      NOTE: the encoders are randomly initialised (no weights can be downloaded "
                "here), so retrieval ranks images by random-feature similarity")
        memory, built = ensure_memory(mem_spec, runs_root, datasets_root, made_facts=facts)
        say(f"      {'built' if built else 'reused'} {memory.output_dir}")
        k = max(int(e.build_config().MODEL.MAPS.NUM_RETRIEVED) for e in exps if e.memory_spec())
        retrieval = same_scene_rate(Path(memory.output_dir) / "neighbors" / "synthetic_val.jsonl",
                                    scenes_of(dataset_root, "val"), scenes_of(dataset_root, "train"), k=k)
        say(f"      val -> train {retrieval.describe()}")
        train_scenes = scenes_of(dataset_root, "train")
        places = same_place_rate(Path(memory.output_dir) / "neighbors" / "synthetic_val.jsonl",
                                 places_of(dataset_root, "val"), places_of(dataset_root, "train"),
                                 len(train_scenes), k=k)
        if places is not None:
            say(f"      of street and lake queries: {places.describe().replace('same-scene', 'same-place')}")
    else:
        say("[2/5] memory: none of the experiments uses memory")

    specs = seed_major(run_specs(exps, size, memory))
    say(f"[3/5] training + evaluation: {len(specs)} runs x {size.iterations} iterations, "
        f"{parallel} at a time, one thread each (W&B mode: {os.environ['WANDB_MODE']})")
    launch_with_progress(specs, store, parallel=parallel, console=console)
    failed = []
    for spec in specs:
        status = store.read_status(store.run_dir(spec.experiment, spec.seed)) or {}
        if status.get("state") != "done":
            failed.append(f"{spec.experiment} seed {spec.seed}: {status.get('state')} "
                          f"({status.get('error') or 'see ' + str(status.get('log_stderr'))})")

    say(f"[4/5] tables: synthetic Table 2 mirror -> {Path(out_dir) / 'synthetic'}")
    text, tables, plot_files, warnings, verdict = write_report(
        store, Path(out_dir), demo_registry(registry, size.seeds, size.iterations), plots=plots)
    for w in warnings:
        say(f"      warning: {w}")
    return DemoResult(runs_root, dataset_root, Path(memory.output_dir) if memory else None, tables, plot_files,
                      _wandb_dirs(store, specs), retrieval, failed, text, time.time() - start,
                      verdict)
