"""User annotations (QuPath GeoJSON export, one file per slide) that restrict region selection.

A polygon whose classification name is in the exclude list is an exclusion; every other polygon
(or, when an include list is given, only those whose class is in it) is an inclusion. A region is
kept when at least `min_overlap` of its area inside the slide lies in the inclusion polygons
(all regions qualify when the file has no inclusion polygon) and less than `min_overlap` of it
lies in the exclusion polygons. A file with no polygon at all is refused: it would keep every region. Coordinates are level-0 pixels, as QuPath exports them.
"""
from __future__ import annotations

import dataclasses
import json
import os

import shapely
from shapely.geometry import box, shape


class AnnotationError(ValueError):
    """An annotation file that cannot be used (the message names the file and the problem)."""


@dataclasses.dataclass(frozen=True)
class Annotations:
    path: str
    include: list        # shapely polygons, level-0 px
    exclude: list

    def union(self, which: str):
        polys = getattr(self, which)
        return shapely.union_all(polys) if polys else None


def _names(csv: str) -> set[str]:
    return {n.strip().lower() for n in (csv or "").split(",") if n.strip()}


def _class_name(props: dict) -> str:
    cls = (props or {}).get("classification")
    if isinstance(cls, dict):
        return str(cls.get("name") or "")  # {"name": null}: unclassified, not "None"
    return str(cls or "")


def _features(doc, path: str) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        return list(doc.get("features") or [])
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise AnnotationError(f"{path}: not a GeoJSON Feature, FeatureCollection or list of features")


def find_annotation_file(folder: str, slide_id: str, slide_path: str = "") -> str | None:
    """DIR/<slide_id>.geojson (or .json, or <slide file name>.geojson as QuPath names it).
    Two of them is an AnnotationError: which one was meant (an old export beside a new one)
    cannot be told, and taking the first would select regions with the other one unsaid."""
    names = [slide_id + ".geojson", slide_id + ".json"]
    if slide_path:
        names.append(os.path.basename(slide_path) + ".geojson")
    found = [p for p in dict.fromkeys(os.path.join(folder, n) for n in names) if os.path.isfile(p)]
    if len(found) > 1:
        raise AnnotationError(f"{' and '.join(found)}: two annotation files for slide {slide_id}; "
                              "keep one")
    return found[0] if found else None


def annotation_identity(path: str | None) -> dict | None:
    """What says a slide's annotation file is the one its finished regions were selected with:
    its name and the SHA-256 of its bytes (an edit in QuPath often keeps the size). None when
    there is no file."""
    from data_prep.shards import file_sha256

    if path is None:
        return None
    try:
        return {"name": os.path.basename(path), "sha256": file_sha256(path)}
    except OSError:
        return None


def load_annotations(path: str, include_classes: str = "", exclude_classes: str = "Exclude,Ignore"
                     ) -> Annotations:
    """Polygons of one QuPath GeoJSON file split into inclusions and exclusions."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # GeoJSON is UTF-8; an editor may add a BOM
            doc = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text (a binary file)
        raise AnnotationError(f"{path}: cannot read GeoJSON ({e})") from None
    inc_names, exc_names = _names(include_classes), _names(exclude_classes)
    include, exclude, seen = [], [], set()
    features = _features(doc, path)
    for n, feat in enumerate(features):
        _check_feature(feat, n, path)
        geom = (feat or {}).get("geometry")
        if not geom or geom.get("type") not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            continue  # points, lines: not areas
        try:
            poly = _area(_make_valid(shape(geom)))
        except Exception as e:
            raise AnnotationError(f"{path}: feature {n}: bad geometry ({e})") from None
        if poly is None:
            continue  # a collection of points or lines, or a polygon of no area
        seen.add(_class_name(feat.get("properties")))
        name = _class_name(feat.get("properties")).lower()
        if name in exc_names:
            exclude.append(poly)
        elif not inc_names or name in inc_names:
            include.append(poly)
    if not seen:
        # With no polygon at all every region would qualify: the slide as if unannotated.
        raise AnnotationError(f"{path}: no area annotation (Polygon or MultiPolygon) among its "
                              f"{len(features)} feature(s){_geometry_kinds(features)}; without one "
                              "every region of the slide would be kept")
    if inc_names and not include:
        # No inclusion polygon means "the whole slide": with a class list that matches nothing
        # (a typo, "Tumour" for "Tumor") every region would be kept, the opposite of the intent.
        found = ", ".join(sorted(repr(n) if n else "unclassified" for n in seen))
        raise AnnotationError(f"{path}: no polygon of the include classes ({include_classes}, --include-classes); "
                              f"its polygons are {found} (class names are matched case-insensitively)")
    return Annotations(path, include, exclude)


def _check_feature(feat, n: int, path: str) -> None:
    """A feature's parts must be JSON objects where GeoJSON has them (a string there failed the
    slide with an AttributeError that named neither the file nor the feature)."""
    if feat is None:
        return
    if not isinstance(feat, dict):
        raise AnnotationError(f"{path}: feature {n}: not a GeoJSON Feature object ({type(feat).__name__})")
    for key in ("geometry", "properties"):
        if feat.get(key) is not None and not isinstance(feat[key], dict):
            raise AnnotationError(f"{path}: feature {n}: its {key} is not a JSON object "
                                  f"({type(feat[key]).__name__})")


def _make_valid(geom):
    """A valid geometry of what a hand-made polygon means: its shell minus its holes, the parts
    of a MultiPolygon united. GEOS's default ("linework") rebuilds areas from the edges, so a
    hole sharing an edge with its shell vanished (its regions were kept) and two overlapping
    parts of a MultiPolygon lost their overlap (its regions were dropped)."""
    return shapely.make_valid(geom, method="structure", keep_collapsed=False)


def _area(geom):
    """The polygonal part of a valid geometry, None when it has no area. A GeometryCollection
    (a QuPath ROI of mixed parts, or make_valid's output) counts by its polygons."""
    parts = [g for g in getattr(geom, "geoms", [geom])
             if g.geom_type in ("Polygon", "MultiPolygon") and g.area > 0]
    return shapely.union_all(parts) if parts else None


def _geometry_kinds(features: list) -> str:
    """' (3 Point, 1 LineString)': what the features of a file without areas are."""
    import collections

    kinds = collections.Counter(
        str(((f or {}).get("geometry") or {}).get("type") or "no geometry") for f in features)
    return f" ({', '.join(f'{c} {k}' for k, c in kinds.most_common())})" if kinds else ""


def check_inside_slide(ann: Annotations, slide_wh: tuple[int, int]) -> None:
    """Refuse polygons that lie wholly outside the slide: an exclusion there excluded nothing
    and an inclusion included nothing, without a word. They come from another slide's file or
    coordinates that are not level-0 pixels (an export at a downsample, or in micrometres)."""
    w, h = slide_wh
    slide = box(0, 0, w, h)
    polys = [(p, "inclusion") for p in ann.include] + [(p, "exclusion") for p in ann.exclude]
    outside = [(p, kind) for p, kind in polys if p.intersection(slide).area == 0]
    if outside:
        p, kind = outside[0]
        x0, y0, x1, y1 = p.bounds
        raise AnnotationError(
            f"{ann.path}: {len(outside)} of {len(polys)} polygon(s) lie entirely outside the slide "
            f"({w} x {h} level-0 px), e.g. an {kind} at x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}: "
            "the annotations of another slide, or coordinates not in level-0 pixels (exported at a "
            "downsample?)")


def filter_regions(kept: list, read_px: int, slide_wh: tuple[int, int], ann: Annotations,
                   min_overlap: float = 0.5) -> list:
    """The (x, y, ...) entries of `kept` whose region passes the inclusion/exclusion rules."""
    inc, exc = ann.union("include"), ann.union("exclude")
    w, h = slide_wh
    out = []
    for item in kept:
        x, y = item[0], item[1]
        cell = box(x, y, min(x + read_px, w), min(y + read_px, h))  # the part inside the slide
        area = cell.area or 1.0
        if inc is not None and cell.intersection(inc).area / area < min_overlap:
            continue
        if exc is not None and cell.intersection(exc).area / area >= min_overlap:
            continue
        out.append(item)
    return out


def polygon_rings(polys: list) -> list:
    """Every ring of polygons, exterior and holes, as [(x, y), ...] level-0 point lists (for QC
    drawings: a hole cut out of an inclusion excludes its regions, so the picture shows it)."""
    rings = []
    for p in polys:
        for g in getattr(p, "geoms", [p]):
            if g.geom_type == "Polygon":
                rings.append(list(g.exterior.coords))
                rings.extend(list(r.coords) for r in g.interiors)
    return rings
