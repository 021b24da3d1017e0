"""What a run needs from the cache: the config keys that load pretrained files, the refusal
when one is missing (one fix-it line each), the resolved paths, and the record a run keeps."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from maps.io import file_sha256

from maps.weights.cache import DENSE_KEY, MEMORY_KEY, MODEL_KEY, PRETRAINED, PretrainedWeight, WeightsError, _KNOWN_SOURCES, _fix_hint, cache_status, is_weight_name, resolve_weight, weights_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSlot:
    """A config key that names a pretrained file, and the backbone it initialises."""

    key: str
    value: str
    kind: str   # resnet | clip | dino
    arch: str


def _object_memory_used(m) -> bool:
    return bool(list(m.SCENE_LAYERS if m.SWAPPED else m.OBJECT_LAYERS))


def weight_slots(cfg) -> List[WeightSlot]:
    """The keys of ``cfg`` that load pretrained files in this run (MODEL.WEIGHTS; the key
    encoder's when memory is on; the dense extractor's when object memory is on and the
    extractor is another backbone than the key encoder -- otherwise it shares that file)."""
    from maps.memory.encoders import DEFAULT_ARCH, DENSE_ENCODERS

    slots = [WeightSlot(MODEL_KEY, str(cfg.MODEL.WEIGHTS), "resnet",
                        f"{cfg.MODEL.BACKBONE.NAME}:R{cfg.MODEL.RESNETS.DEPTH}")]
    m = cfg.MODEL.MAPS
    if not m.ENABLED:
        return slots
    mem = m.MEMORY
    key_kind = str(mem.KEY_ENCODER)
    slots.append(WeightSlot(MEMORY_KEY, str(mem.WEIGHTS), key_kind,
                            str(mem.KEY_ARCH or DEFAULT_ARCH.get(key_kind, ""))))
    dense_kind = DENSE_ENCODERS.get(str(mem.DENSE), (key_kind,))[0]
    if _object_memory_used(m) and dense_kind != key_kind:
        slots.append(WeightSlot(DENSE_KEY, str(mem.DENSE_WEIGHTS), dense_kind,
                                str(mem.DENSE_ARCH or DEFAULT_ARCH.get(dense_kind, ""))))
    return slots


def weights_needed(cfg) -> List[str]:
    """Cache names this resolved config loads (each once, in key order)."""
    out: List[str] = []
    for s in weight_slots(cfg):
        if is_weight_name(s.value) and s.value not in out:
            out.append(s.value)
    return out


def _paper_weight_for(slot: WeightSlot) -> Optional[PretrainedWeight]:
    for w in PRETRAINED.values():
        if w.kind == slot.kind and slot.arch in w.archs:
            return w
    if slot.kind == "clip" and slot.arch == "ViT-B-16":
        return PRETRAINED["clip-vit-b16-openai"]  # the paper's CLIP, in its GELU spelling
    return None


def _cfg_get(cfg, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _requirement_problems(slot: WeightSlot, entry: PretrainedWeight, cfg) -> List[str]:
    out = []
    if entry.kind != slot.kind:
        out.append(f"{slot.key} names {entry.name} ({entry.title}) but that key loads a "
                   f"{slot.kind} backbone here")
        return out
    if slot.arch not in entry.archs:
        act = f" ({entry.activation}, as it was trained)" if entry.activation else ""
        out.append(f"{slot.key} names {entry.name}, made for {entry.arch}{act}, but the "
                   f"architecture is {slot.arch}; set it to {entry.arch}")
    for key, want in entry.requires.items():
        have = _cfg_get(cfg, key)
        if (list(have) if isinstance(have, (list, tuple)) else have) != want:
            out.append(f"{slot.key} names {entry.name}, which needs {key} = {want} "
                       f"(the config has {have})")
    return out


def _problems(cfg) -> List[Tuple[bool, str]]:
    """``(missing, message)`` per problem: ``missing`` when a random initialisation could
    stand in for the file (``--allow-random-weights``), False when the config is wrong."""
    problems: List[Tuple[bool, str]] = []
    for slot in weight_slots(cfg):
        value = slot.value
        if not value:
            paper = _paper_weight_for(slot)
            if paper is not None:
                problems.append((True, f"{slot.key} is empty: the paper's {slot.arch} starts "
                                       f"from {paper.name} ({paper.title}); set {slot.key} "
                                       f"{paper.name} and {_fix_hint(paper.name)}, or pass "
                                       f"--allow-random-weights"))
            continue
        if is_weight_name(value):
            problems.extend((False, p) for p in _requirement_problems(slot, PRETRAINED[value], cfg))
            status = cache_status(value)
            if not status.verified:
                problems.append((True, f"{slot.key} {value}: {status.problem} ({weights_dir()}); "
                                       + (f"run `maps weights verify {value}`" if status.present
                                          else _fix_hint(value))))
        elif value in _KNOWN_SOURCES:
            name = _KNOWN_SOURCES[value]
            problems.append((False, f"{slot.key} {value} is a download URL: name the cache "
                                    f"entry {name} instead and {_fix_hint(name)}"))
        elif not os.path.isfile(value):
            problems.append((False, f"{slot.key} {value}: no such file and no cached weight of "
                                    f"that name (known: {', '.join(PRETRAINED)})"))
    return problems


def check_weights(cfg, allow_random: bool = False) -> List[str]:
    """One message per pretrained file this config needs and cannot use, each saying how
    to fix it; empty when the run may start.

    Refused: a cache name not (or no longer) verified in the cache, a path that does not
    exist, a library URL instead of a cache name, a name whose architecture or input
    normalisation differs from the config's, and an empty key where the paper starts from
    a pretrained file. ``allow_random`` (``--allow-random-weights``) forgives the missing
    and empty ones, never a wrong config. Configs whose backbones have no paper weights
    (the synthetic suite's tiny ResNet and ViTs) need none.
    """
    return [msg for missing, msg in _problems(cfg) if not (allow_random and missing)]


def resolve_config_weights(cfg, allow_random: bool = False):
    """A copy of ``cfg`` ready for detectron2: MODEL.WEIGHTS a file path (detectron2's
    checkpointer reads it and would silently start from scratch on a name). The memory keys
    keep their cache names (the encoders resolve them, and banks record them).

    With ``allow_random`` a weight that is missing becomes empty (random initialisation,
    logged); any other problem of :func:`check_weights` raises.

    Raises:
        WeightsError: the problems of :func:`check_weights`, joined (commands print them one
            line each from :func:`check_weights` first).
    """
    problems = check_weights(cfg, allow_random=allow_random)
    if problems:
        raise WeightsError("; ".join(problems))
    out = cfg.clone()
    out.defrost()
    for slot in weight_slots(cfg):
        try:
            path = resolve_weight(slot.value)
        except WeightsError as e:  # only a missing file gets here (allow_random)
            logger.warning("%s: %s; starting from a random initialisation "
                           "(--allow-random-weights)", slot.key, e)
            node, leaf = _parent(out, slot.key)
            node[leaf] = ""
            continue
        if slot.key == MODEL_KEY:
            out.MODEL.WEIGHTS = path or ""
    if cfg.is_frozen():
        out.freeze()
    return out


def _parent(cfg, dotted: str):
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node[p]
    return node, parts[-1]


class MissingWeights(WeightsError):
    """Pretrained files a run needs are missing or unverified: ``lines`` holds one problem per
    file, each with the command that fixes it (the CLI prints one ``error:`` line each)."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines) + ["(or pass --allow-random-weights: the runs then start from "
                                    "random weights and record it)"]
        super().__init__("; ".join(self.lines))


def require_weights(cfg, allow_random: bool = False) -> None:
    """:func:`check_weights`, raising :class:`MissingWeights` when it finds problems."""
    problems = check_weights(cfg, allow_random=allow_random)
    if problems:
        raise MissingWeights(problems)


def random_weight_keys(cfg) -> List[str]:
    """The keys of a resolved config that start from a random initialisation (empty: the
    synthetic suite's encoders, or a file let through by ``--allow-random-weights``)."""
    return [slot.key for slot in weight_slots(cfg) if not slot.value]


def weights_record(cfg) -> List[Dict[str, Any]]:
    """What a run starts from: ``[{"key", "name", "path", "sha256"}]`` for every non-empty
    weights key of ``cfg`` (cache names resolved; sha256 from the verified manifest, or
    hashed for a plain path). Written into the run record beside the config."""
    out = []
    for slot in weight_slots(cfg):
        if not slot.value:
            continue
        name = slot.value if is_weight_name(slot.value) else _name_of_file(slot.value)
        path = resolve_weight(slot.value)
        status = cache_status(name) if name else None
        sha = status.sha256 if status is not None and status.verified else file_sha256(path)
        out.append({"key": slot.key, "name": name, "path": str(Path(path).resolve()),
                    "sha256": sha})
    return out


def _name_of_file(path: str) -> Optional[str]:
    """The cache name whose file ``path`` is (a config already resolved), else None."""
    try:
        p = Path(path).resolve()
        root = weights_dir().resolve()
    except OSError:
        return None
    if p.parent.parent == root and p.parent.name in PRETRAINED:
        return p.parent.name
    return None


