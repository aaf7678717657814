"""The embedded default dataset: procedural 48x48 grayscale faces drawn deterministically from a seed.

Every face shows one of four expressions (:data:`CLASSES`) through its mouth (smile curve, open "O",
tight flat line), eyebrows (raised, furrowed, level) and eye openness. Gender and age change the face
itself: face width and jaw, hair (long for women, short for men, grey for seniors, sparse for babies),
wrinkles for seniors, bigger eyes and rounder faces for babies and children, stubble for some men.
Nuisance variation (pose, lighting gradient, contrast, background, Gaussian noise, per-image jitter of
every feature) is independent of the class, so only the face tells the expression.

Expression cues have a per-image intensity: a faint Happy face looks almost Neutral, which keeps a small
CNN below 100 % accuracy and lets a *planted* bias show up. Two biases can be planted for one group
(``bias_attr`` / ``bias_group``): its expression cues are drawn fainter (``faint_cues``), or one class
holds a chosen share of it (``overrep_class`` / ``overrep_share``). ``n_extra`` adds images of the group
alone, in subset ``"extra"``, like the real dataset's extra-female folder.

Drawing is numpy only: each primitive (ellipse, curved stroke, band between two curves) is a soft mask
computed on coordinate grids for a whole chunk of images at once, in face-local coordinates in which the
image spans [-1, 1]. Example::

    from fer_core.synthetic import make_dataset
    ds = make_dataset(n=2000, seed=0, faint_cues=0.8)   # a FaceDataset
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from fer_core.config import _check, _choice, from_dict, to_dict
from fer_core.data import BASE_SUBSET, FaceDataset, image_id

logger = logging.getLogger(__name__)

CLASSES = ("Focused", "Happy", "Neutral", "Surprised")
GENDERS = ("Female", "Male")
AGES = ("Adult", "Baby", "Children", "Senior")
GROUPS = {"gender": GENDERS, "age": AGES}
EXTRA_SUBSET = "extra"

_BAD_SHARES = "SyntheticConfig: key 'age_shares' must be {0} non-negative shares summing to 1, got {1!r}"
_BAD_GROUP = "SyntheticConfig: bias_group {0!r} is not a group of {1!r}; groups: {2}"
_DUPLICATES = "synthetic: {0} images still identical after re-drawing; raise `noise`"

# Expression targets, as offsets from the neutral face reached at full cue intensity.
# Columns: eye openness factor, brow raise (negative = up), brow inner drop (furrow), brow arch,
# mouth half-width, mouth bulge (positive = smile), mouth opening, lip thickness.
_EXPRESSION = {
    "Focused": (-0.45, 0.050, 0.070, -0.015, -0.040, -0.035, 0.00, -0.012),
    "Happy": (-0.30, -0.020, -0.010, 0.010, 0.100, 0.090, 0.035, 0.000),
    "Neutral": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "Surprised": (0.55, -0.100, -0.020, 0.040, -0.080, 0.000, 0.150, 0.000),
}
_EXPR_KEYS = ("eye_open", "brow_raise", "brow_inner", "brow_arch", "mouth_w", "mouth_bulge",
              "mouth_open", "lip")
# Resting face (Neutral) and the spread of individual differences around it, same columns.
_NEUTRAL = (1.0, 0.0, 0.0, 0.025, 0.20, 0.0, 0.0, 0.045)
_IDIOSYNCRATIC = (0.12, 0.012, 0.012, 0.010, 0.020, 0.012, 0.006, 0.006)

# Per age group: face half-width, face half-height, eye size factor, how much lower the features sit.
_AGE_SHAPE = {
    "Adult": (0.54, 0.78, 1.00, 0.00),
    "Baby": (0.64, 0.70, 1.40, 0.10),
    "Children": (0.58, 0.74, 1.20, 0.05),
    "Senior": (0.55, 0.78, 0.95, 0.00),
}


@dataclass(frozen=True)
class SyntheticConfig:
    """How many synthetic faces to draw, how hard they are, and which bias to plant.

    Nested in experiment TOMLs under ``[data.synthetic]``.

    Parameters
    ----------
    n
        Number of images in the dataset proper (subset ``"base"``); classes are balanced.
    seed
        Seed of every random choice; the same config gives identical bytes.
    image_size
        Height and width in pixels.
    female_share
        Share of ``"Female"`` images in every class (unless over-represented, see below).
    age_shares
        Shares of ``("Adult", "Baby", "Children", "Senior")`` in every class.
    cue_strength
        Global multiplier of expression cue intensity (lower is harder).
    noise
        Standard deviation of the Gaussian pixel noise, in units of the [0, 1] intensity range.
    pose
        Multiplier of the pose variation (shift, rotation, scale); 0 gives frontal, centred faces.
    bias_attr, bias_group
        The attribute and its group that receive the planted bias.
    faint_cues
        Expression cues of ``bias_group`` are multiplied by ``1 - faint_cues`` (0 = no bias).
    overrep_class
        ``""`` for none; else the class in which ``bias_group`` holds ``overrep_share``.
    overrep_share
        Share of ``bias_group`` inside ``overrep_class``; the other groups share the rest in their
        base proportions, and the other classes keep the base shares.
    n_extra
        Extra images, all of ``bias_group`` and balanced over classes, in subset ``"extra"``.
    """

    n: int = 2000
    seed: int = 0
    image_size: int = 48
    female_share: float = 0.5
    age_shares: tuple[float, ...] = (0.7, 0.05, 0.1, 0.15)
    cue_strength: float = 1.0
    noise: float = 0.03
    pose: float = 1.0
    bias_attr: str = "gender"
    bias_group: str = "Female"
    faint_cues: float = 0.0
    overrep_class: str = ""
    overrep_share: float = 0.5
    n_extra: int = 0

    def __post_init__(self) -> None:
        where = "SyntheticConfig"
        _check(where, "n", self.n, self.n >= 1, ">= 1")
        _check(where, "image_size", self.image_size, self.image_size >= 16, ">= 16")
        _check(where, "female_share", self.female_share, 0 <= self.female_share <= 1, "in [0, 1]")
        _check(where, "cue_strength", self.cue_strength, self.cue_strength >= 0, ">= 0")
        _check(where, "noise", self.noise, self.noise >= 0, ">= 0")
        _check(where, "pose", self.pose, self.pose >= 0, ">= 0")
        _check(where, "faint_cues", self.faint_cues, 0 <= self.faint_cues <= 1, "in [0, 1]")
        _check(where, "overrep_share", self.overrep_share, 0 <= self.overrep_share <= 1, "in [0, 1]")
        _check(where, "n_extra", self.n_extra, self.n_extra >= 0, ">= 0")
        _choice(where, "bias_attr", self.bias_attr, tuple(GROUPS))
        _choice(where, "overrep_class", self.overrep_class, ("", *CLASSES))
        if self.bias_group not in GROUPS[self.bias_attr]:
            raise ValueError(_BAD_GROUP.format(self.bias_group, self.bias_attr, list(GROUPS[self.bias_attr])))
        shares = np.asarray(self.age_shares, dtype=float)
        if len(shares) != len(AGES) or (shares < 0).any() or abs(shares.sum() - 1) > 1e-6:
            raise ValueError(_BAD_SHARES.format(len(AGES), self.age_shares))


def make_dataset(cfg: SyntheticConfig | None = None, **overrides) -> FaceDataset:
    """Draw the synthetic dataset described by ``cfg`` (defaults if None), updated by ``overrides``.

    Parameters
    ----------
    cfg
        The configuration; :class:`SyntheticConfig` defaults when None.
    **overrides
        Config fields to change, checked like TOML keys (unknown key or wrong type raises).

    Returns
    -------
    FaceDataset
        ``n + n_extra`` images named ``"synthetic"``, with columns ``image_id``, ``label``,
        ``source_path``, ``subset``, ``gender`` and ``age``, and a report of counts and the config.
    """
    cfg = cfg or SyntheticConfig()
    if overrides:
        cfg = from_dict(SyntheticConfig, {**to_dict(cfg), **overrides}, "make_dataset")
    # one stream per purpose: adding extras or planting faint cues leaves the other images as they were
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)]
    base, extra = _layout(cfg, cfg.n, BASE_SUBSET, rngs[0]), _layout(cfg, cfg.n_extra, EXTRA_SUBSET, rngs[1])
    rows = pd.concat([base, extra], ignore_index=True).astype(str)
    pixels = np.concatenate([_render_rows(base, cfg, rngs[2]), _render_rows(extra, cfg, rngs[3])])
    redrawn = _redraw_duplicates(pixels, rows, cfg, rngs[4])
    rows.insert(0, "image_id", [image_id(p) for p in pixels])
    rows.insert(2, "source_path", [f"synthetic/{i}" for i in range(len(rows))])
    report = _report(rows, cfg, redrawn)
    logger.info("synthetic: drew %d faces (seed %d, %d re-drawn)", len(rows), cfg.seed, redrawn)
    return FaceDataset(pixels=pixels, manifest=rows, classes=CLASSES, name="synthetic", report=report)


def _layout(cfg: SyntheticConfig, n: int, subset: str, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` rows (label, subset, gender, age), classes balanced, exact group counts per class, shuffled.

    Extra rows all belong to ``cfg.bias_group``; base rows follow the configured shares, with
    ``overrep_share`` of the bias group inside ``overrep_class``.
    """
    base = {"gender": dict(zip(GENDERS, (cfg.female_share, 1 - cfg.female_share), strict=True)),
            "age": dict(zip(AGES, cfg.age_shares, strict=True))}
    other = "age" if cfg.bias_attr == "gender" else "gender"
    parts = []
    for k, cls in enumerate(CLASSES):
        n_cls = n // len(CLASSES) + (k < n % len(CLASSES))
        shares = base[cfg.bias_attr]
        if subset != BASE_SUBSET:
            shares = {cfg.bias_group: 1.0}
        elif cls == cfg.overrep_class:
            shares = _with_share(shares, cfg.bias_group, cfg.overrep_share)
        groups = {cfg.bias_attr: _allocate(n_cls, shares, rng), other: _allocate(n_cls, base[other], rng)}
        parts.append(pd.DataFrame({"label": cls, "subset": subset, **groups}, index=range(n_cls)))
    rows = pd.concat(parts, ignore_index=True)
    return rows.iloc[rng.permutation(len(rows))].reset_index(drop=True)[["label", "subset", "gender", "age"]]


def _render_rows(rows: pd.DataFrame, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Faces for layout rows; the bias group's expression cues are scaled by ``1 - faint_cues``."""
    cue = np.where(rows[cfg.bias_attr].eq(cfg.bias_group), 1.0 - cfg.faint_cues, 1.0) * cfg.cue_strength
    labels = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)
    return render_faces(labels, rows["gender"].to_numpy(), rows["age"].to_numpy(), rng, size=cfg.image_size,
                        cue=cue, noise=cfg.noise, pose=cfg.pose)


def _with_share(shares: dict[str, float], group: str, share: float) -> dict[str, float]:
    """``shares`` with ``group`` set to ``share`` and the other groups rescaled to fill the rest."""
    rest = sum(v for g, v in shares.items() if g != group)
    return {g: share if g == group else (1 - share) * (v / rest if rest > 0 else 1 / (len(shares) - 1))
            for g, v in shares.items()}


def _allocate(n: int, shares: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """``n`` group names in exact proportion to ``shares`` (largest remainder), shuffled."""
    names = list(shares)
    want = np.asarray([shares[g] for g in names], dtype=float) * n
    counts = np.floor(want).astype(int)
    short = n - counts.sum()
    # the largest remainders get the leftover images; ties are broken at random
    counts[np.lexsort((rng.permutation(len(names)), counts - want))[:short]] += 1
    return rng.permutation(np.repeat(np.asarray(names, dtype=object), counts))


def _redraw_duplicates(pixels: np.ndarray, rows: pd.DataFrame, cfg: SyntheticConfig,
                       rng: np.random.Generator) -> int:
    """Re-draw (in place) images whose bytes equal an earlier image's; return how many were re-drawn."""
    total = 0
    for _ in range(5):
        dup = pd.Series([image_id(p) for p in pixels]).duplicated().to_numpy()
        if not dup.any():
            return total
        total += int(dup.sum())
        pixels[dup] = _render_rows(rows[dup], cfg, rng)
    raise RuntimeError(_DUPLICATES.format(int(pd.Series([image_id(p) for p in pixels]).duplicated().sum())))


def _report(rows: pd.DataFrame, cfg: SyntheticConfig, redrawn: int) -> dict:
    """Counts per class, group, subset and class x gender, with the config that made them."""
    return {
        "generator": __name__,
        "config": to_dict(cfg),
        "classes": list(CLASSES),
        "n_images": len(rows),
        "counts": {col: _counts(rows[col]) for col in ("label", "subset", "gender", "age")},
        "label_by_gender": {cls: _counts(g["gender"]) for cls, g in rows.groupby("label")},
        "label_by_age": {cls: _counts(g["age"]) for cls, g in rows.groupby("label")},
        "redrawn_duplicates": redrawn,
    }


def _counts(column: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in column.value_counts().sort_index().items()}


def render_faces(labels: np.ndarray, gender: np.ndarray, age: np.ndarray, rng: np.random.Generator, *,
                 size: int = 48, cue: float | np.ndarray = 1.0, noise: float = 0.03, pose: float = 1.0,
                 chunk: int = 256) -> np.ndarray:
    """Draw one face per row.

    Parameters
    ----------
    labels
        Class indices (N,) into :data:`CLASSES`.
    gender, age
        Group names (N,) from :data:`GENDERS` and :data:`AGES`.
    rng
        Source of every random choice (consumed in row order, chunk by chunk).
    size
        Image height and width.
    cue
        Expression cue multiplier, scalar or (N,); 0 makes every face look Neutral.
    noise
        Gaussian pixel noise standard deviation (intensity range [0, 1]).
    pose
        Multiplier of the pose variation.
    chunk
        Images drawn at once (memory is about ``chunk * size**2 * 40`` bytes).

    Returns
    -------
    numpy.ndarray
        uint8 (N, size, size).
    """
    n = len(labels)
    cue = np.broadcast_to(np.asarray(cue, dtype=np.float32), (n,))
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        params = _sample_params(np.asarray(labels[sl]), np.asarray(gender[sl]), np.asarray(age[sl]),
                                cue[sl], pose, rng)
        out[sl] = _draw(params, size, noise, rng)
    return out


# ----------------------------------------------------------------------------------------------- sampling

def _sample_params(labels: np.ndarray, gender: np.ndarray, age: np.ndarray, cue: np.ndarray, pose: float,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every drawing parameter of every face, each an array (B,)."""
    params = _sample_scene(len(labels), pose, rng)
    params.update(_sample_identity(gender, age, rng))
    params.update(_sample_expression(labels, cue, rng))
    return params


def _sample_scene(b: int, pose: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Nuisance: pose, background, lighting, contrast."""
    u = partial(rng.uniform, size=b)
    return {
        "dx": u(-0.08, 0.08) * pose, "dy": u(-0.07, 0.07) * pose,
        "rot": np.deg2rad(u(-12, 12)) * pose, "scale": 1 + u(-0.08, 0.08) * pose,
        "bg": u(0.1, 0.9), "bg_gx": u(-0.2, 0.2), "bg_gy": u(-0.2, 0.2),
        "light_x": u(-0.25, 0.25), "light_y": u(-0.15, 0.15),
        "gain": u(0.85, 1.15), "contrast": u(0.7, 1.2),
    }


def _sample_identity(gender: np.ndarray, age: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Face geometry, skin and hair from gender and age, with individual jitter."""
    b = len(gender)
    u = partial(rng.uniform, size=b)
    shape = np.asarray([_AGE_SHAPE[a] for a in age], dtype=float)  # (B, 4)
    male = (gender == "Male").astype(float)
    young = np.isin(age, ("Baby", "Children")).astype(float)
    senior = (age == "Senior").astype(float)
    sex = male * (1 - 0.5 * young)  # gender shows less on young faces
    face_a = shape[:, 0] + 0.05 * sex + u(-0.03, 0.03)
    face_b = shape[:, 1] + u(-0.03, 0.03)
    hair_dark = u(0.05, 0.45)
    return {
        "face_a": face_a, "face_b": face_b, "face_cy": 0.10 + u(-0.02, 0.02), "face_p": 2.0 + 0.8 * sex,
        "chin": 0.22 * (1 - sex) * (1 - young) + 0.06 + u(0, 0.06),
        "eye_scale": shape[:, 2] * u(0.92, 1.08), "drop": shape[:, 3],
        "skin": u(0.45, 0.85), "hair": np.where(senior > 0, u(0.72, 0.92), hair_dark),
        "hair_long": (1 - male) * np.where(age == "Baby", 0.0, u(0.5, 1.0)),
        "hair_alpha": np.where(age == "Baby", u(0.2, 0.5), 1.0) * np.where(senior * male > 0, u(0.3, 1), 1),
        "hair_top": 0.62 + 0.02 * (1 - male) + 0.12 * (age == "Baby") + u(-0.05, 0.05),
        "fringe": (1 - male) * u(-0.25, 0.25),
        "wrinkle": senior * u(0.5, 1.0),
        "beard": male * (1 - young) * (rng.random(b) < 0.35) * u(0.25, 0.5),
        "brow_thick": 0.040 + 0.018 * sex + u(-0.006, 0.006),
        "eye_x": 0.21 + 0.02 * shape[:, 3] + u(-0.015, 0.015), "eye_dy": u(-0.03, 0.03),
        "mouth_dy": u(-0.03, 0.03), "strand_phase": u(0, 2 * np.pi),
    }


def _sample_expression(labels: np.ndarray, cue: np.ndarray,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Expression parameters: neutral + intensity * class target + individual differences."""
    target = np.asarray([_EXPRESSION[CLASSES[k]] for k in labels], dtype=float)  # (B, 8)
    intensity = cue * rng.uniform(0.35, 1.0, len(labels))
    values = (np.asarray(_NEUTRAL) + intensity[:, None] * target
              + rng.normal(size=target.shape) * np.asarray(_IDIOSYNCRATIC))
    params = dict(zip(_EXPR_KEYS, values.T, strict=True))
    params["mouth_open"] = np.abs(params["mouth_open"])
    params["eye_open"] = np.clip(params["eye_open"], 0.25, None)
    return params


# ------------------------------------------------------------------------------------------------ drawing

def _draw(params: dict[str, np.ndarray], size: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Render sampled parameters to uint8 images (B, size, size)."""
    p = {k: np.asarray(v, dtype=np.float32)[:, None, None] for k, v in params.items()}
    x, y, u, v = _grids(p, size)
    px = np.float32(2.0 / size)
    img = p["bg"] + p["bg_gx"] * x + p["bg_gy"] * y  # (B, H, W)
    face = _face_mask(p, u, v, px)
    img = _draw_head(img, p, u, v, face, px)
    img = _draw_age_marks(img, p, u, v, face, px)
    img = _draw_eyes(img, p, u, v, px)
    img = _draw_brows_nose(img, p, u, v, px)
    img = _draw_mouth(img, p, u, v, px)
    img = img * (p["gain"] + p["light_x"] * x + p["light_y"] * y)
    img = (img - 0.5) * p["contrast"] + 0.5
    img = _blur(img) + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _grids(p: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, ...]:
    """Image coordinates (1, H, W) and face-local coordinates (B, H, W), both spanning [-1, 1]."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(t, t, indexing="ij")
    x, y = x[None], y[None]
    cos, sin = np.cos(p["rot"]), np.sin(p["rot"])
    xs, ys = x - p["dx"], y - p["dy"]
    u = (cos * xs + sin * ys) / p["scale"]
    v = (-sin * xs + cos * ys) / p["scale"]
    return x, y, u, v


def _paint(img: np.ndarray, mask: np.ndarray, tone) -> np.ndarray:
    """Composite ``tone`` over ``img`` where ``mask`` (soft, [0, 1]) says."""
    return img + mask * (tone - img)


def _ramp(signed_dist: np.ndarray, px: float) -> np.ndarray:
    """Soft inside mask from a signed distance (positive inside), anti-aliased over one pixel."""
    return np.clip(0.5 + signed_dist / px, 0, 1)


def _ellipse(u, v, cx, cy, a, b, px, power=2.0) -> np.ndarray:
    """Soft (super)ellipse mask centred at (cx, cy) with half-axes a, b."""
    du, dv = np.abs(u - cx) / a, np.abs(v - cy) / b
    if np.isscalar(power) and power == 2.0:
        d = np.sqrt(du * du + dv * dv)
    else:
        d = (du**power + dv**power) ** (1 / power)
    return _ramp((1 - d) * np.minimum(a, b), px)


def _stroke(u, v, x0, x1, y0, y1, bulge, width, px) -> np.ndarray:
    """Soft curved line from (x0, y0) to (x1, y1), its middle pushed down by ``bulge`` (x1 > x0)."""
    span = x1 - x0
    t = (u - x0) / span
    centre = y0 + (y1 - y0) * t + 4 * bulge * t * (1 - t)
    slope = ((y1 - y0) + 4 * bulge * (1 - 2 * t)) / span
    dist = np.abs(v - centre) / np.sqrt(1 + slope * slope)
    return _ramp(width / 2 - dist, px) * _ramp(np.minimum(u - x0, x1 - u), px)


def _face_mask(p: dict[str, np.ndarray], u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """The face: a superellipse (squarer for men) whose lower half narrows towards the chin."""
    below = np.clip((v - p["face_cy"]) / p["face_b"], 0, 1)
    a = p["face_a"] * (1 - p["chin"] * below * below)
    return _ellipse(u, v, 0, p["face_cy"], a, p["face_b"], px, power=p["face_p"])


def _draw_head(img, p, u, v, face, px) -> np.ndarray:
    """Long hair behind, neck, ears, face, then the hair on top of the head."""
    a, b, cy, skin = p["face_a"], p["face_b"], p["face_cy"], p["skin"]
    hair_tone = p["hair"] * (1 + 0.05 * np.sin(u * 70 + 20 * v + p["strand_phase"]) + 0.1 * _grain(u, v))
    long_hair = _ellipse(u, v, 0, cy + 0.25 * p["hair_long"], a * 1.32, b * (1 + 0.45 * p["hair_long"]),
                         px, power=3.0) * (p["hair_long"] > 0)
    img = _paint(img, long_hair, hair_tone)
    neck = _ramp(a * 0.48 - np.abs(u), px) * _ramp(v - cy, px)
    img = _paint(img, neck, skin * 0.75)
    ears = _ellipse(np.abs(u), v, a * 0.97, cy - 0.06 + p["drop"], 0.07, 0.12, px) * (p["hair_long"] <= 0)
    img = _paint(img, ears, skin * 0.85)
    shade = 1 - 0.12 * np.clip((v - cy) / b, 0, 1) - 0.08 * (np.abs(u) / a) ** 2
    img = _paint(img, face, skin * shade)
    scalp = _ellipse(u, v, 0, cy - 0.01, a * 1.05, b * 1.01 + 0.03 * (p["hair_long"] > 0), px)
    hairline = cy - b * p["hair_top"] + 0.35 * b * (u / a) ** 2 + p["fringe"] * u
    return _paint(img, scalp * _ramp(hairline - v, px) * p["hair_alpha"], hair_tone)


def _eye_geometry(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eye centre height, half-width and half-height (openness) of every face."""
    eye_y = p["face_cy"] - 0.10 + p["drop"] + p["eye_dy"]
    eye_w = 0.11 * p["eye_scale"]
    return eye_y, eye_w, 0.062 * p["eye_scale"] * p["eye_open"]


def _draw_eyes(img, p, u, v, px) -> np.ndarray:
    """Both eyes at once (mirrored on |u|): white, iris clipped to the opening, upper lid line."""
    ua = np.abs(u)
    ey, ew, eh = _eye_geometry(p)
    white = _ellipse(ua, v, p["eye_x"], ey, ew, eh, px)
    img = _paint(img, white, np.minimum(p["skin"] + 0.3, 0.97))
    iris = _ellipse(ua, v, p["eye_x"], ey, ew * 0.5, ew * 0.5, px) * white
    img = _paint(img, iris, 0.08)
    lid = _stroke(ua, v, p["eye_x"] - ew, p["eye_x"] + ew, ey, ey, -1.1 * eh, px * 1.1, px)
    return _paint(img, lid, p["skin"] * 0.3)


def _draw_brows_nose(img, p, u, v, px) -> np.ndarray:
    """Eyebrows (raised, level or furrowed), frown lines between them, nose shading and nostrils."""
    ua = np.abs(u)
    ey, ew, _ = _eye_geometry(p)
    base = ey - 0.10 - 0.03 * p["eye_scale"] + p["brow_raise"]
    inner, outer = p["eye_x"] - ew * 0.95, p["eye_x"] + ew * 1.2
    brows = _stroke(ua, v, inner, outer, base + p["brow_inner"], base - 0.3 * p["brow_inner"],
                    -p["brow_arch"], p["brow_thick"], px)
    img = _paint(img, brows, 0.55 * p["skin"] * np.minimum(p["hair"] + 0.4, 1))
    furrow = _stroke(v, ua, base - 0.02, base + 0.09, 0.035, 0.045, 0, px, px)
    img = _paint(img, furrow * np.clip(p["brow_inner"] / 0.07, 0, 1) * 0.6, p["skin"] * 0.55)
    nose_y = _nose_y(p)
    bridge = _stroke(v, u, ey + 0.04, nose_y - 0.02, 0.045, 0.06, 0.0, 0.03, px)
    img = _paint(img, bridge * 0.5, p["skin"] * 0.7)
    nostrils = _ellipse(ua, v, 0.045, nose_y, 0.03, 0.017, px)
    return _paint(img, nostrils, p["skin"] * 0.5)


def _nose_y(p: dict[str, np.ndarray]) -> np.ndarray:
    return p["face_cy"] + 0.18 + 0.6 * p["drop"]


def _mouth_edges(p, u) -> tuple[np.ndarray, ...]:
    """Half-width, upper and lower edge (functions of u) of the mouth opening."""
    w = p["mouth_w"] * (1 - 1.5 * p["drop"])
    my = p["face_cy"] + 0.42 - 0.2 * p["drop"] + p["mouth_dy"]
    q = np.clip((u / w) ** 2, 0, 1)
    centre = my - 0.7 * p["mouth_bulge"] + p["mouth_bulge"] * (1 - q)
    gap = p["mouth_open"] / 2 * np.sqrt(1 - q)
    upper = centre - 0.4 * p["mouth_bulge"] * (1 - q) - gap - p["lip"] / 2
    return w, upper, centre + gap + p["lip"] / 2


def _draw_mouth(img, p, u, v, px) -> np.ndarray:
    """Lips, then the dark opening: smile curve, open O, or a flat (tight) line."""
    w, upper, lower = _mouth_edges(p, u)
    lips = _ramp(w + 0.02 - np.abs(u), px) * _ramp(v - upper + 0.025, px) * _ramp(lower + 0.03 - v, px)
    img = _paint(img, lips, p["skin"] * 0.72)
    opening = _ramp(w - np.abs(u), px) * _ramp(v - upper, px) * _ramp(lower - v, px)
    return _paint(img, opening, 0.12)


def _draw_age_marks(img, p, u, v, face, px) -> np.ndarray:
    """Forehead and nose-to-mouth wrinkles (seniors), stubble (some men)."""
    ua = np.abs(u)
    ey, _, _ = _eye_geometry(p)
    w, _, lower = _mouth_edges(p, np.float32(0))
    lines = sum(_stroke(u, v, -0.22, 0.22, y, y, -0.015, 0.022, px) for y in (ey - 0.26, ey - 0.34))
    folds = _stroke(v, ua, _nose_y(p) - 0.01, lower + 0.05, 0.09, w + 0.06, 0.02, 0.025, px)
    img = _paint(img, np.minimum(lines + folds, 1) * p["wrinkle"] * 0.55, p["skin"] * 0.55)
    edge = _nose_y(p) + 0.06 - 0.15 * (u / p["face_a"]) ** 2
    stubble = face * _ramp(v - edge, px) * (0.7 + 0.3 * _grain(u, v)) * p["beard"]
    return _paint(img, stubble, p["skin"] * 0.4)


def _grain(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random texture in [-1, 1] tied to face coordinates (hash of u, v)."""
    h = np.sin(u * 129.898 + v * 782.33) * 43758.5453
    return 2 * (h - np.floor(h)) - 1


def _blur(img: np.ndarray) -> np.ndarray:
    """Mild separable [1, 6, 1] / 8 blur, as a camera and JPEG would leave it."""
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = (pad[:, :-2] + 6 * pad[:, 1:-1] + pad[:, 2:]) / 8
    return (rows[:, :, :-2] + 6 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 8
