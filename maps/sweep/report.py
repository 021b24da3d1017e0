"""After a study: its best trial, registering it as a named experiment, and a written report.

``--best --register NAME`` appends an entry to the registry file that declares the study's
base experiment (``experiments/synthetic/main.yaml`` for ``synthetic/main/maps``): the base's
base config, iterations, seeds, datasets and overrides plus the best trial's values, so the
new experiment is launched with seeds like any other and its ``build_config`` gives the best
values. The registry requires each (suite, table) to be declared by one file, so a separate
sweeps file would be refused; the entry is appended as text (comments of the file are kept),
the file is replaced atomically, and the registry is loaded again to check the round trip -
on any problem the old file is put back.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import yaml

from maps.io import atomic_write_bytes, atomic_write_text
from maps.sweep.spec import SweepError, SweepSpec
from maps.sweep.study import open_study

if TYPE_CHECKING:
    import optuna

__all__ = ["BestTrial", "best_trials", "register_best", "write_report"]


@dataclass(frozen=True)
class BestTrial:
    """A best (or Pareto-optimal) trial: its number, config values, objectives and metrics."""

    number: int
    params: Dict[str, Any]
    values: Dict[str, float]
    metrics: Dict[str, float]
    run_dir: Optional[str]

    def to_dict(self) -> Dict[str, Any]:
        return {"trial": self.number, "params": self.params, "values": self.values,
                "metrics": self.metrics, "run_dir": self.run_dir}


def _decoded_params(spec: SweepSpec, trial: "optuna.trial.FrozenTrial") -> Dict[str, Any]:
    out = {}
    for p in spec.space:
        if p.key in trial.params:
            out[p.key] = p.decode(trial.params[p.key])
    return out


def best_trials(spec: SweepSpec, storage: Any) -> List[BestTrial]:
    """The best trial (single objective) or the Pareto front (several), best first."""
    study = open_study(spec, storage)
    try:
        trials = [study.best_trial] if not spec.multi_objective else list(study.best_trials)
    except ValueError:
        trials = []
    if not trials:
        raise SweepError(f"study '{spec.name}' has no completed trial yet (run `maps sweep {spec.name}`)")
    trials.sort(key=lambda t: t.number)
    return [BestTrial(t.number, _decoded_params(spec, t), dict(zip(spec.objectives, t.values)),
                      dict(t.user_attrs.get("metrics") or {}), t.user_attrs.get("run_dir"))
            for t in trials]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


#: lock file of ``--register`` in the registry folder (flock: two sweeps registering at once
#: on a shared file system must not lose one of the entries)
REGISTER_LOCK = ".maps-register.lock"


def register_best(spec: SweepSpec, best: BestTrial, name: str,
                  experiments_root: Optional[os.PathLike] = None) -> Path:
    """Add ``best`` to the registry as experiment ``name``; returns the file written.

    The entry carries the base experiment's full setup (so the file's defaults do not
    matter) plus the trial's values as overrides. Refuses a name already in the registry.
    The whole read-check-append-write holds a file lock on the registry folder, and the file
    is replaced atomically.
    """
    from filelock import FileLock

    from maps.registry import load_registry

    root = Path(load_registry(experiments_root, validate=False).root)
    with FileLock(str(root / REGISTER_LOCK)):
        return _register_best(spec, best, name, experiments_root)


def _register_best(spec: SweepSpec, best: BestTrial, name: str,
                   experiments_root: Optional[os.PathLike]) -> Path:
    from maps.registry import load_registry
    from maps.registry.experiments import _NAME_RE
    from maps.registry.schema import CONFIGS_DIR

    registry = load_registry(experiments_root, validate=False)
    if not _NAME_RE.match(name):
        raise SweepError(f"--register {name!r}: not a valid experiment name (lower-case words "
                         "joined by '/', e.g. 'synthetic/sweeps/retrieval-best')")
    if name in registry:
        raise SweepError(f"--register {name}: an experiment of that name already exists "
                         f"({registry.get(name).source})")
    base = registry.get(spec.experiment)
    if not base.runnable:
        raise SweepError(f"{spec.where}: experiment '{spec.experiment}' is not runnable")
    target = registry.get(base.canonical_name)
    configs = (registry.root / CONFIGS_DIR).resolve()
    try:
        base_rel = Path(target.base_config).resolve().relative_to(configs).as_posix()
    except ValueError:
        raise SweepError(f"{target.source}: base config {target.base_config} is not under {configs}") from None
    overrides = {k: _plain(v) for k, v in target.overrides.items()}
    overrides.update({k: _plain(v) for k, v in spec.overrides.items()})
    overrides.update({k: _plain(v) for k, v in best.params.items()})
    iterations = spec.iterations if spec.iterations is not None else target.iterations
    if spec.iterations is not None:  # the trials' learning-rate drops, not a rescaling of them
        from maps.sweep.spec import base_config

        overrides["SOLVER.STEPS"] = [int(s) for s in base_config(spec, registry).SOLVER.STEPS]
    entry: Dict[str, Any] = {
        "name": name,
        "row": f"{spec.name} best (trial {best.number})",
        "base": base_rel,
        "iterations": int(iterations),
        "seeds": len(target.seeds) if list(target.seeds) == list(range(len(target.seeds))) else list(target.seeds),
        "datasets": {k: list(v) for k, v in target.datasets.items()},
        "memory_dataset": target.memory_dataset,
        "overrides": overrides,
        "notes": (f"best trial {best.number} of sweep '{spec.name}' from '{spec.experiment}': "
                  + ", ".join(f"{k}={v:.4g}" for k, v in best.values.items())),
    }
    source = Path(base.source)
    old = source.read_text()
    new = _append_entry(old, entry, source)
    atomic_write_text(source, new)
    try:
        reloaded = load_registry(experiments_root, validate=True)
        got = reloaded.get(name).build_config()
        for key, value in best.params.items():
            node = got
            for part in key.split("."):
                node = node[part]
            if _norm(node) != _norm(value):
                raise SweepError(f"{source}: entry '{name}': {key} is {node!r} after reloading, "
                                 f"not the best value {value!r}")
    except BaseException:
        atomic_write_text(source, old)
        raise
    return source


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and math.isfinite(v):
        return round(v, 12)
    return v


def _append_entry(text: str, entry: Dict[str, Any], source: Path) -> str:
    """``text`` with ``entry`` appended to its ``entries:`` list, or an error if ``entries`` is
    not the file's last key (then the text cannot be extended without rewriting it)."""
    # memory_dataset: null stays: it overrides a file default of a memory dataset
    clean = {k: v for k, v in entry.items() if v is not None or k == "memory_dataset"}
    item = yaml.safe_dump([clean], sort_keys=False, default_flow_style=None, width=100)
    block = "".join("  " + line if line.strip() else line for line in item.splitlines(True))
    new = text if text.endswith("\n") else text + "\n"
    new += f"  # added by `maps sweep --register`\n{block}"
    before = yaml.safe_load(text)
    try:
        after = yaml.safe_load(new)
    except yaml.YAMLError:
        after = None
    expected = dict(before)
    expected["entries"] = list(before["entries"]) + [clean]
    if after != expected:
        raise SweepError(f"{source}: cannot append the entry '{entry['name']}' (its 'entries' "
                         "list is not the last key of the file); add it by hand:\n" + item)
    return new


# ---------------------------------------------------------------------------------------------
# --report
# ---------------------------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def write_report(spec: SweepSpec, storage: Any, out_dir: os.PathLike) -> Dict[str, Path]:
    """Write Optuna's own plots (``optuna.visualization.matplotlib``) and ``summary.md``.

    ``history.png``: the optimization history (each completed trial's objective and the best
    so far); ``importances.png``: parameter importances over completed trials (Optuna's
    default evaluator, PED-ANOVA: deterministic), when computable; with several objectives,
    ``history_<metric>.png`` and ``importances_<metric>.png`` for the others and
    ``pareto.png``, the Pareto front; ``intermediate.png``: the PQ each trial reported while
    training, pruned trials included (when any reported). Every file is written atomically.
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    study = open_study(spec, storage)
    trials = study.get_trials(deepcopy=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: Dict[str, Path] = {}

    def save(key: str, name: str, draw: Any) -> None:
        # optuna sets its style sheet globally: keep it inside this plot
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # "experimental" plots; a legend with nothing in it
            ax = draw()
            if hasattr(ax, "set_title"):
                ax.set_title(f"{spec.name}: {ax.get_title()}")
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            png = _png(fig)
            plt.close(fig)
        files[key] = out / name
        atomic_write_bytes(files[key], png)

    multi = spec.multi_objective
    for i, (metric, direction) in enumerate(zip(spec.objectives, spec.directions)):
        key, name = ("history", "history.png") if i == 0 else (f"history_{metric}", f"history_{metric}.png")
        save(key, name, lambda i=i, metric=metric, direction=direction: plots.plot_optimization_history(
            study, target=(lambda t: t.values[i]) if multi else None, target_name=f"{metric} ({direction})"))

    importances: Dict[str, Dict[str, float]] = {}
    why: Dict[str, str] = {}
    for i, metric in enumerate(spec.objectives):
        try:
            imp = optuna.importance.get_param_importances(
                study, target=(lambda t, i=i: t.values[i]) if multi else None)
        except (ValueError, RuntimeError) as e:  # too few trials, or one value everywhere
            importances[metric], why[metric] = {}, str(e)
            continue
        importances[metric] = {k: float(v) for k, v in imp.items()}
    for i, metric in enumerate(spec.objectives):
        if not importances[metric]:
            continue
        key = "importances" if "importances" not in files else f"importances_{metric}"
        save(key, f"{key}.png", lambda i=i, metric=metric: plots.plot_param_importances(
            study, target=(lambda t: t.values[i]) if multi else None, target_name=metric))
    if not multi and any(t.intermediate_values for t in trials):
        save("intermediate", "intermediate.png", lambda: plots.plot_intermediate_values(study))
    if multi and any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        save("pareto", "pareto.png", lambda: plots.plot_pareto_front(
            study, target_names=[f"{m} ({d})" for m, d in zip(spec.objectives, spec.directions)]))

    files["summary"] = out / "summary.md"
    atomic_write_text(files["summary"], _summary_md(spec, study, trials, importances, why, files))
    return files


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _summary_md(spec: SweepSpec, study: Any, trials: List[Any], importances: Dict[str, Dict[str, float]],
                why: Dict[str, str], files: Dict[str, Path]) -> str:
    counts: Dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    lines = [f"# Sweep `{spec.name}`", "",
             f"Experiment `{spec.experiment}`; objective "
             + ", ".join(f"{m} ({d})" for m, d in zip(spec.objectives, spec.directions))
             + f"; sampler {spec.sampler['name']}, pruner {spec.pruner['name']}.", "",
             "Trials: " + (", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"), ""]
    try:
        best = best_trials(spec, study._storage)
    except SweepError:
        best = []
    if best:
        lines += ["## Best" + (" (Pareto front)" if spec.multi_objective else ""), "",
                  "| trial | " + " | ".join(spec.objectives) + " | " + " | ".join(p.key for p in spec.space) + " |",
                  "|---" * (1 + len(spec.objectives) + len(spec.space)) + "|"]
        for b in best:
            lines.append(f"| {b.number} | " + " | ".join(_fmt(b.values[m]) for m in spec.objectives) + " | "
                         + " | ".join(_fmt(b.params.get(p.key)) for p in spec.space) + " |")
        lines.append("")
    lines += ["## Parameter importances", ""]
    for metric in spec.objectives:
        imp = importances.get(metric) or {}
        if imp:
            lines += [f"{metric}:", ""] + [f"- `{k}`: {v:.3f}" for k, v in imp.items()] + [""]
        else:
            lines += [f"{metric}: not computable ({why.get(metric, 'too few completed trials')})", ""]
    lines += ["## History", "", "| trial | state | " + " | ".join(spec.objectives) + " | "
              + " | ".join(p.key for p in spec.space) + " |",
              "|---" * (2 + len(spec.objectives) + len(spec.space)) + "|"]
    for t in trials:
        values = [_fmt(v) for v in t.values] if t.values else ["-"] * len(spec.objectives)
        params = _decoded_params(spec, t)
        lines.append(f"| {t.number} | {t.state.name.lower()} | " + " | ".join(values) + " | "
                     + " | ".join(_fmt(params.get(p.key, "-")) for p in spec.space) + " |")
    lines += ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for k, p in files.items() if k != "summary"), ""]
    return "\n".join(lines)
