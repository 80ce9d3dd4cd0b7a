"""Score maps -> coloured overlays, PNG files and a contact sheet."""
from __future__ import annotations

import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

DEFAULT_CMAP = "coolwarm"  # the reference's default


def colorize(score: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Scores in [0, 1] [H,W] -> uint8 RGB [H,W,3] through a matplotlib colormap."""
    rgba = matplotlib.colormaps[cmap](np.clip(score, 0.0, 1.0))
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(region: np.ndarray, score: np.ndarray, alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """alpha * colormap(score) + (1 - alpha) * region, rounded to uint8 (cv2.addWeighted)."""
    if region.shape[:2] != score.shape:
        raise ValueError(f"score map {score.shape} does not match region {region.shape[:2]}")
    mixed = alpha * colorize(score, cmap).astype(np.float32) + (1.0 - alpha) * region.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


REGION_LEGEND = "percentile rank within the region (per head and level)"


def legend_strip(width: int, cmap: str, meaning: str) -> np.ndarray:
    """A colour bar with what the colours mean, uint8 [h, width, 3] (h: 36 px plus 10 per line
    of text): placed outside the maps (below the slide map and the contact sheet, or as
    NAME_legend.png), so the per-head maps stay pixel-aligned with the region."""
    import textwrap

    fontsize = 7 if width >= 300 else 5
    char_px = fontsize * 100 / 72 * 0.6  # average glyph width of DejaVu Sans at 100 dpi
    lines = textwrap.wrap(f"{cmap}: {meaning}, low -> high", max(12, int((width - 8) / char_px)))
    line_px = fontsize * 100 / 72 + 3
    height = int(round(30 + line_px * len(lines)))
    fig = plt.figure(figsize=(width / 100.0, height / 100.0), dpi=100)
    bar_top = 1.0 - (line_px * len(lines) + 3) / height  # figure fraction under the text
    ax = fig.add_axes((0.08, bar_top - 10.0 / height, 0.84, 10.0 / height))
    ax.imshow(np.linspace(0.0, 1.0, 256)[None, :], aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_yticks([])
    ax.set_xticks([0, 255], ["0 low", "1 high"], fontsize=fontsize)
    ax.tick_params(length=2, pad=1)
    fig.text(0.5, 1.0 - 2.0 / height, "\n".join(lines), ha="center", va="top", fontsize=fontsize)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb[:, :width] if rgb.shape[1] >= width else np.pad(rgb, ((0, 0), (0, width - rgb.shape[1]), (0, 0)),
                                                                constant_values=255)


def with_legend(image: np.ndarray, cmap: str, meaning: str) -> np.ndarray:
    """``image`` [H,W,3] with a legend strip below it (its pixels unchanged at the top)."""
    return np.concatenate([image, legend_strip(image.shape[1], cmap, meaning)], axis=0)


def save_png(path: str, image: np.ndarray) -> str:
    from hipt_jax.outputs import atomic_path

    with atomic_path(path) as tmp:  # a full disk leaves no truncated PNG
        Image.fromarray(image).save(tmp)
    return path


def write_region_heatmaps(heatmaps, out_dir: str, name: str = "region", *, alpha: float = 0.5,
                          cmap: str = DEFAULT_CMAP, blends: str = "all",
                          blend_weighting: str = "official") -> dict[str, list[str]]:
    """Write every map of a ``RegionHeatmaps`` as overlay PNGs plus a contact sheet.

    Files (in ``out_dir``): ``{name}_region.png`` (the region as RGB; never ``{name}.png``, which
    is what the input image is usually called: written into the image's own folder, the copy
    replaced it), ``{name}_256_head{j}.png``,
    ``{name}_4k_head{i}.png``, ``{name}_blend_4k_head{i}_256_head{j}.png`` (``blends``: "all" pairs,
    "diagonal" i == j, or "none"), ``{name}_contact_sheet.png`` (with a colour bar),
    ``{name}_legend.png`` (the colour bar of every map: the maps stay the region's size) and
    ``{name}_scores.npz`` (raw maps; crop_box: top, left, height, width of the region in the input).
    Returns the written paths grouped by kind.
    """
    if blends not in ("all", "diagonal", "none"):
        raise ValueError(f"blends must be all, diagonal or none, got {blends!r}")
    os.makedirs(out_dir, exist_ok=True)
    path = lambda suffix: os.path.join(out_dir, f"{name}{suffix}.png")  # noqa: E731
    written = {"region": [save_png(path("_region"), heatmaps.region)], "256": [], "4k": [], "blend": []}
    ov256 = [overlay(heatmaps.region, s, alpha, cmap) for s in heatmaps.scores256]
    for j, img in enumerate(ov256):
        written["256"].append(save_png(path(f"_256_head{j}"), img))
    ov4k, ovblend = [], {}
    if heatmaps.scores4k is not None:
        ov4k = [overlay(heatmaps.region, s, alpha, cmap) for s in heatmaps.scores4k]
        for i, img in enumerate(ov4k):
            written["4k"].append(save_png(path(f"_4k_head{i}"), img))
        if blends != "none":
            for i in range(len(heatmaps.scores4k)):
                for j in range(len(heatmaps.scores256)):
                    if blends == "diagonal" and i != j:
                        continue
                    ovblend[i, j] = overlay(heatmaps.region, heatmaps.blend(i, j, blend_weighting), alpha, cmap)
                    written["blend"].append(save_png(path(f"_blend_4k_head{i}_256_head{j}"), ovblend[i, j]))
    npz = os.path.join(out_dir, f"{name}_scores.npz")
    arrays = {"scores256": heatmaps.scores256, "count256": heatmaps.count256,
              "crop_box": np.asarray(heatmaps.crop_box, np.int64)}  # maps -> input image px
    if heatmaps.scores4k is not None:
        arrays.update(scores4k=heatmaps.scores4k, count4k=heatmaps.count4k)
    np.savez_compressed(npz, **arrays)
    written["scores"] = [npz]
    written["contact_sheet"] = [contact_sheet(path("_contact_sheet"), heatmaps.region, ov256, ov4k, ovblend,
                                              legend=(cmap, REGION_LEGEND))]
    written["legend"] = [save_png(path("_legend"), legend_strip(max(300, heatmaps.region.shape[1]), cmap,
                                                                REGION_LEGEND))]
    return written


def contact_sheet(path: str, region: np.ndarray, ov256: list, ov4k: list, ovblend: dict,
                  thumb_px: int = 192, title: Optional[str] = None,
                  legend: Optional[tuple[str, str]] = None) -> str:
    """One PNG: the region, the 4K-level heads, the 256-level heads, and the blend grid;
    ``legend`` (cmap, meaning): a colour bar below them."""
    heads = max(len(ov256), len(ov4k), 1)
    rows = [("region", [region])]
    if ov4k:
        rows.append(("4K head", ov4k))
    rows.append(("256 head", ov256))
    blend_rows = sorted({i for i, _ in ovblend})
    if ovblend and all(i == j for i, j in ovblend):  # --blends diagonal: one row, not a staircase
        rows.append(("4K x 256 head", [ovblend.get((j, j)) for j in range(len(ov256))]))
        blend_rows = []
    for i in blend_rows:
        rows.append((f"4K {i} x 256", [ovblend.get((i, j)) for j in range(len(ov256))]))
    inch = thumb_px / 100.0
    fig, axes = plt.subplots(len(rows), heads, figsize=(heads * inch, len(rows) * inch * 1.12),
                             squeeze=False, dpi=100)
    for r, (label, images) in enumerate(rows):
        for c in range(heads):
            ax = axes[r, c]
            ax.axis("off")
            img = images[c] if c < len(images) else None
            if img is None:
                continue
            ax.imshow(img)
            head_label = "" if label == "region" else f" {c}"
            ax.set_title(f"{label}{head_label}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    fig.canvas.draw()
    sheet = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return save_png(path, with_legend(sheet, *legend) if legend else sheet)
