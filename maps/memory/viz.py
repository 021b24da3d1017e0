"""Pictures of what the memory retrieves (paper Fig. 3 and Fig. 4).

Row 1 (Fig. 3): the query image, then its k retrieved memory images with their similarity.
Row 2 (Fig. 4): the query's own segments, then each retrieved image with the segments the
object memory holds for it (the tokens the model attends to) filled and outlined in
per-category colours, and the category names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from maps.memory.bank import MemoryBank

__all__ = ["plot_retrievals", "segment_overlay"]


def _color(cat: int) -> np.ndarray:
    rng = np.random.default_rng(int(cat) * 7919 + 17)
    return rng.integers(40, 256, 3).astype(np.float32)


def segment_overlay(image: np.ndarray, seg_map: np.ndarray, segment_ids: Sequence[int],
                    categories: Sequence[int], alpha: float = 0.45) -> np.ndarray:
    """The image with the given segments filled (alpha) and outlined, per-category colour."""
    out = image.astype(np.float32).copy()
    for sid, cat in zip(segment_ids, categories):
        m = seg_map == sid
        if not m.any():
            continue
        c = _color(cat)
        out[m] = (1 - alpha) * out[m] + alpha * c
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = c
    return out.clip(0, 255).astype(np.uint8)


def _label_segments(ax, seg_map, segment_ids, categories, names: Dict[int, str]) -> None:
    for sid, cat in zip(segment_ids, categories):
        ys, xs = np.nonzero(seg_map == sid)
        if len(ys):
            ax.text(xs.mean(), ys.mean(), names.get(int(cat), str(int(cat))), fontsize=6,
                    ha="center", va="center", color="white",
                    bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))


def plot_retrievals(bank: MemoryBank, query: Dict, neighbor_ids: Sequence,
                    scores: Sequence[float], out, dataset_dicts: Optional[Dict] = None,
                    names: Optional[Dict[int, str]] = None) -> Path:
    """Write the figure for one query dataset dict and its retrieved memory images.

    ``dataset_dicts``: image id -> dataset dict of the bank's dataset (for the retrieved
    images' panoptic PNGs); without it only file names are known and row 2 shows no masks.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maps.io import atomic_write_bytes
    from maps.memory.dataset import read_image, read_segment_map

    names = names or {}
    k = len(neighbor_ids)
    fig, axes = plt.subplots(2, k + 1, figsize=(2.6 * (k + 1), 5.4), squeeze=False)
    q_img = read_image(query)
    axes[0, 0].imshow(q_img)
    axes[0, 0].set_title(f"query {query['image_id']}", fontsize=8)
    segs = [s for s in query.get("segments_info", []) if not s.get("iscrowd", 0)]
    if segs and query.get("pan_seg_file_name"):
        seg = read_segment_map(query)
        ids, cats = [s["id"] for s in segs], [s["category_id"] for s in segs]
        axes[1, 0].imshow(segment_overlay(q_img, seg, ids, cats))
        _label_segments(axes[1, 0], seg, ids, cats, names)
    else:
        axes[1, 0].imshow(q_img)
    axes[1, 0].set_title("query segments", fontsize=8)
    for j, (iid, s) in enumerate(zip(neighbor_ids, scores), start=1):
        row = bank.row(iid)
        d = (dataset_dicts or {}).get(iid) or {"file_name": bank.arrays.file_names[row],
                                                 "image_id": iid}
        img = read_image(d)
        axes[0, j].imshow(img)
        axes[0, j].set_title(f"#{j} id {iid}  sim {float(s):.3f}", fontsize=8)
        sl = bank.objects(row)
        seg_ids = np.asarray(bank.arrays.object_segment_ids[sl])
        cats = np.asarray(bank.arrays.object_categories[sl])
        if d.get("pan_seg_file_name"):
            seg = read_segment_map(d)
            axes[1, j].imshow(segment_overlay(img, seg, seg_ids, cats))
            _label_segments(axes[1, j], seg, seg_ids, cats, names)
        else:
            axes[1, j].imshow(img)
        axes[1, j].set_title(f"{len(seg_ids)} object tokens", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("scene memory (top) and object memory (bottom) retrievals", fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)
