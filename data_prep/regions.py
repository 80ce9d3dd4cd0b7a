"""Per-slide work of `hipt-prep regions`: one slide -> one region shard + status + QC pictures.

`process_slide` is a top-level, spawn-safe function used unchanged by the process pool and by
the Apache Beam pipeline (data_prep.runner), so both produce identical shards. Outputs per slide:

    OUT/regions/<slide_id>.array_record   one record per kept region (schema: data_prep.shards.REGION)
    OUT/status/<slide_id>.json            result: done/failed, counts, geometry, error, timings
    OUT/qc/<slide_id>_mask.png            tissue mask next to the thumbnail
    OUT/qc/<slide_id>_regions.png         kept region grid over the thumbnail

Every file is written to a temporary name and renamed, and the status file is written last, so a
slide counts as finished only when all of its outputs are complete.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback

import cv2
import numpy as np

from data_prep.shards import (REGION, encode_jpeg, input_identity, item_status_path, open_shard_writer,
                              params_digest, product_identity, shard_path, write_item_status)
from data_prep.slide_io import (DEFAULT_MPP_TOLERANCE, SlideError, check_upsample, colour_counts,
                                colourless_problem, open_slide, read_region_geometry, region_geometry,
                                resolve_mpp, snap_scale)
from data_prep.tissue import TissueParams, low_res_view, region_fraction, segment_slide


_LATER_OPTIONS = ("allow_upsample", "codec", "annotations", "include_classes", "exclude_classes",
                  "annotation_overlap")


@dataclasses.dataclass(frozen=True)
class RegionParams:
    """Everything that decides the content of a region shard (recorded in the manifest)."""
    target_mpp: float = 0.5
    region_px: int = 4096
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE
    assume_mpp: float | None = None
    min_tissue_fraction: float = 0.1
    jpeg_quality: int = 90
    tissue: TissueParams = TissueParams()
    qc_max_px: int = 1024
    allow_upsample: bool = False
    codec: str = "jpeg"            # "jpeg" (jpeg_quality) or "png" (lossless)
    annotations: str | None = None  # folder of QuPath GeoJSON files, one per slide
    include_classes: str = ""       # comma-separated; empty = every non-excluded polygon
    exclude_classes: str = "Exclude,Ignore"
    annotation_overlap: float = 0.5

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # Options added later are recorded only when set, so existing output folders (whose
        # manifest predates them) can still be resumed with the same command.
        for f in dataclasses.fields(self):
            if f.name in _LATER_OPTIONS and d[f.name] == f.default:
                del d[f.name]
        return d


@dataclasses.dataclass(frozen=True)
class SlideTask:
    slide_id: str
    path: str


def status_path(out_dir: str, slide_id: str) -> str:
    return item_status_path(out_dir, slide_id)


def region_grid(width: int, height: int, read_px: int) -> list[tuple[int, int]]:
    """Level-0 top-left corners of a non-overlapping grid covering the slide, row-major.

    The grid starts at (0, 0); the last row/column may extend past the border (padded white).
    A slide smaller than one region gives one region at (0, 0).
    """
    rows = max(1, math.ceil(height / read_px))
    cols = max(1, math.ceil(width / read_px))
    return [(c * read_px, r * read_px) for r in range(rows) for c in range(cols)]


def select_regions(slide, params: RegionParams, mpp: float, annotations=None):
    """Geometry, tissue mask and the kept [(x, y, tissue_fraction)] of one open slide.

    `annotations` (data_prep.annotations.Annotations) further restricts the kept regions."""
    geom = region_geometry(slide, mpp, params.region_px, params.target_mpp, params.mpp_tolerance)
    tm = segment_slide(slide, geom.read_px / geom.region_px, params.tissue)
    w, h = slide.dimensions
    kept = []
    for x, y in region_grid(w, h, geom.read_px):
        frac = region_fraction(tm, x, y, geom.read_px)
        if frac >= params.min_tissue_fraction:
            kept.append((x, y, frac))
    if annotations is not None:
        from data_prep.annotations import filter_regions

        kept = filter_regions(kept, geom.read_px, (w, h), annotations, params.annotation_overlap)
    return geom, tm, kept


def _load_slide_annotations(task: SlideTask, params: RegionParams, slide_wh: tuple[int, int]):
    """The slide's Annotations when --annotations is set (SlideError if its file is missing or
    cannot be used for this slide of level-0 size ``slide_wh``)."""
    if not params.annotations:
        return None
    from data_prep.annotations import AnnotationError, check_inside_slide, find_annotation_file, load_annotations

    try:
        path = find_annotation_file(params.annotations, task.slide_id, task.path)
        if path is None:
            raise SlideError(f"{task.path}: no annotation file {task.slide_id}.geojson in {params.annotations}")
        annotations = load_annotations(path, params.include_classes, params.exclude_classes)
        check_inside_slide(annotations, slide_wh)
    except AnnotationError as e:
        raise SlideError(str(e)) from None
    return annotations


def slide_source(task: SlideTask, params: RegionParams) -> dict:
    """What a slide's finished output is made from, compared on a rerun: the slide file and,
    with --annotations, its annotation file. An annotation file edited after a run changes the
    selection, so the slide is redone rather than its old regions reused."""
    source = input_identity(task.path)
    if params.annotations:
        from data_prep.annotations import AnnotationError, annotation_identity, find_annotation_file

        try:
            path = find_annotation_file(params.annotations, task.slide_id, task.path)
        except AnnotationError:
            path = None  # the slide fails when it is processed, naming the files
        source["annotations"] = annotation_identity(path)
    return source


def _qc_thumbnail(slide, tm, max_px: int) -> tuple[np.ndarray, float]:
    """Thumbnail for the QC pictures -> (uint8 [h,w,3], level-0 px per thumbnail px).

    Finer than the tissue mask when a pyramid level makes that cheap (the mask is often only
    a few hundred pixels wide); otherwise the mask-resolution view is reused.
    """
    w0, h0 = slide.dimensions
    down = max(w0, h0) / max_px
    finest_cheap = max(d for d in slide.level_downsamples if d <= max(down, 1.0) * 1.01)
    if down < tm.downsample and finest_cheap >= down / 4:  # read at most ~16x the output pixels
        return low_res_view(slide, down), down
    return tm.thumb, tm.downsample


def _qc_pictures(out_dir: str, slide_id: str, slide, tm, geom, kept, max_px: int,
                 annotations=None) -> None:
    """Save <id>_mask.png (thumbnail | mask) and <id>_regions.png (kept grid over thumbnail)."""
    qc = os.path.join(out_dir, "qc")
    thumb, down = _qc_thumbnail(slide, tm, max_px)
    scale = min(1.0, max_px / max(thumb.shape[:2]))
    size = (max(1, int(thumb.shape[1] * scale)), max(1, int(thumb.shape[0] * scale)))
    small = cv2.resize(thumb, size, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(tm.mask * 255, size, interpolation=cv2.INTER_NEAREST)
    pair = np.concatenate([small, np.repeat(mask[:, :, None], 3, axis=2)], axis=1)
    overlay = small.copy()
    c_scale = tm.downsample / down * scale  # mask px -> picture px
    contours = [np.round(c * c_scale).astype(np.int32) for c in tm.contours]
    holes = [np.round(c * c_scale).astype(np.int32) for c in tm.holes]
    cv2.drawContours(overlay, contours, -1, (0, 160, 0), 2)
    cv2.drawContours(overlay, holes, -1, (0, 0, 255), 2)
    f = scale / down  # level-0 px -> picture px
    for x, y, _ in kept:
        p0 = (int(round(x * f)), int(round(y * f)))
        p1 = (int(round((x + geom.read_px) * f)) - 1, int(round((y + geom.read_px) * f)) - 1)
        cv2.rectangle(overlay, p0, p1, (255, 0, 0), 2)
    if annotations is not None:  # inclusions yellow, exclusions magenta (RGB)
        from data_prep.annotations import polygon_rings

        for polys, color in ((annotations.include, (230, 200, 0)), (annotations.exclude, (220, 0, 220))):
            rings = [np.round(np.asarray(r) * f).astype(np.int32) for r in polygon_rings(polys)]
            cv2.polylines(overlay, rings, True, color, 2)
    for name, img in (("mask", pair), ("regions", overlay)):
        path = os.path.join(qc, f"{slide_id}_{name}.png")
        tmp = f"{path}.tmp-{os.getpid()}.png"
        if not cv2.imwrite(tmp, img[:, :, ::-1]):  # a failed write (disk full, file too large) is only False
            if os.path.exists(tmp):
                os.remove(tmp)
            raise OSError(f"{path}: could not write the QC picture (disk full?)")
        os.replace(tmp, path)


def encode_region(img_bgr: np.ndarray, params: RegionParams) -> bytes:
    """uint8 [S,S,3] BGR -> the stored image bytes: JPEG, or lossless PNG with codec="png"."""
    if params.codec == "png":
        ok, buf = cv2.imencode(".png", img_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return buf.tobytes()
    return encode_jpeg(img_bgr, params.jpeg_quality, bgr=True)


def _write_region_shard(slide, slide_id: str, path: str, geom, kept, params: RegionParams) -> None:
    with open_shard_writer(path) as writer:
        for index, (x, y, frac) in enumerate(kept):
            img = read_region_geometry(slide, x, y, geom, order="bgr")  # [S,S,3] uint8, BGR
            # The field keeps its name; decoders (cv2.imdecode) read PNG bytes as well.
            writer.write(REGION.encode(
                image_jpeg=encode_region(img, params), slide_id=slide_id,
                x=x, y=y, level=geom.level, read_px=geom.read_px, mpp=geom.mpp,
                region_px=geom.region_px, tissue_fraction=frac, index=index))


def _write_coords(slide, slide_id: str, path: str, geom, kept, params: RegionParams, mpp: float,
                  mpp_source: str) -> None:
    from data_prep.coords import write_coords

    write_coords(path, [(x, y) for x, y, _ in kept], slide_id=slide_id, region_px=geom.region_px,
                 read_px=geom.read_px, slide_mpp=mpp, target_mpp=params.target_mpp,
                 width=slide.dimensions[0], height=slide.dimensions[1], mpp_source=mpp_source,
                 tissue_fraction=[f for _, _, f in kept])


def output_path(out_dir: str, slide_id: str, output: str) -> str:
    """Where one slide's product goes: the region shard, or (output="coords") its h5 coordinates."""
    if output == "coords":
        from data_prep.coords import coords_path

        return coords_path(out_dir, slide_id)
    return shard_path(out_dir, "regions", slide_id)


def _no_tissue_reason(path: str, slide, geom, tm, params: RegionParams) -> str:
    """Why a slide has no tissue piece: a slide smaller than the smallest piece kept (a small
    crop that is all tissue) says so rather than "no tissue"."""
    scale = geom.read_px / geom.region_px  # level-0 px per target px
    width, height = (round(d / scale) for d in slide.dimensions)
    if width * height < params.tissue.min_tissue_area:
        side = round(params.tissue.min_tissue_area ** 0.5)
        return (f"{path}: the whole slide is {width} x {height} px at {geom.mpp:g} um/px, smaller than the "
                f"smallest tissue piece kept ({side} x {side} px, tissue min_tissue_area): nothing to cut")
    side = round(params.tissue.min_tissue_area ** 0.5)
    found = f"{path}: no tissue piece of at least {side} x {side} px at {geom.mpp:g} um/px found"
    if tm.threshold <= params.tissue.min_saturation:
        # The floor decided, not Otsu: naming Otsu sent the user after the wrong cause when the
        # floor was set too high (nothing is more saturated than 255).
        return (f"{found} (HSV saturation threshold {tm.threshold:.0f}: the --min-saturation floor, above "
                "Otsu's; bare glass, or a floor set too high: see the qc/ mask picture)")
    return (f"{found} (HSV saturation threshold {tm.threshold:.0f}, Otsu's; on a crop with no glass around "
            "the tissue Otsu's threshold splits the tissue itself: see the qc/ mask picture)")


def process_slide(task: SlideTask, out_dir: str, params: RegionParams, output: str = "regions") -> dict:
    """Do one slide end to end; never raises for a bad slide (the error goes in the result).

    output="regions" writes the region shard; output="coords" the same selection as a
    CLAM/TRIDENT coordinate file with no pixels (data_prep.coords)."""
    t0 = time.time()
    product = output_path(out_dir, task.slide_id, output)
    result = dict(slide_id=task.slide_id, path=task.path, status="failed", n_regions=0, error=None,
                  shard=os.path.relpath(product, out_dir))
    for sub in (os.path.dirname(result["shard"]), "status", "qc"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    slide = None
    try:
        slide = open_slide(task.path)
        mpp, mpp_source = resolve_mpp(slide, params.assume_mpp, task.path)
        snapped = snap_scale(params.target_mpp, mpp, params.mpp_tolerance) != params.target_mpp / mpp
        result.update(slide_mpp=mpp, mpp_source=mpp_source + (", snapped" if snapped else ""))
        check_upsample(mpp, params.target_mpp, params.mpp_tolerance, params.allow_upsample, task.path)
        annotations = _load_slide_annotations(task, params, slide.dimensions)
        geom, tm, kept = select_regions(slide, params, mpp, annotations)
        result.update(width=slide.dimensions[0], height=slide.dimensions[1],
                      level=geom.level, read_px=geom.read_px, mpp=geom.mpp,
                      tissue_fraction=float(tm.mask.mean()),
                      n_candidates=len(region_grid(*slide.dimensions, geom.read_px)))
        _qc_pictures(out_dir, task.slide_id, slide, tm, geom, kept, params.qc_max_px, annotations)
        grey = colourless_problem(colour_counts(tm.thumb, step=1), task.path)
        if grey:  # no saturation anywhere: it was reported as "no tissue"
            raise SlideError(grey)
        if not tm.contours:
            raise SlideError(_no_tissue_reason(task.path, slide, geom, tm, params))
        if not kept:
            raise SlideError(f"{task.path}: tissue found but no {params.region_px} px region reaches "
                             f"tissue fraction {params.min_tissue_fraction}"
                             + (" inside the annotations" if annotations is not None else ""))
        if output == "coords":
            _write_coords(slide, task.slide_id, product, geom, kept, params, mpp, mpp_source)
        else:
            _write_region_shard(slide, task.slide_id, product, geom, kept, params)
        result.update(status="done", n_regions=len(kept), **product_identity(product),
                      source=slide_source(task, params), params_sha256=params_digest(params.to_dict()))
    except SlideError as e:
        result["error"] = str(e)
    except Exception as e:  # a bug or an OpenSlide read error mid-slide: keep the run going
        result["error"] = f"{task.path}: {type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=5)
    finally:
        if slide is not None:
            slide.close()
    result["seconds"] = round(time.time() - t0, 3)
    write_item_status(status_path(out_dir, task.slide_id), result, product)
    return result
