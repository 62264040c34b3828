"""Rendering of one cine run: anatomy + C-arm view + contrast bolus -> frames and labels.

Physics in the log domain: every structure contributes a line integral of attenuation
(soft tissue, lungs as air, bone, iodine).  The detector signal exp(-A) gets quantum
noise (more in dense regions), the display is log (or linear) with a per-run window,
detector blur, edge enhancement, vignetting and collimation (round image-intensifier
field or rectangular shutters).  Vessels are splatted as Gaussian tubes whose
line-integral profile matches a cylinder of the local radius (foreshortening included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

from inference.types import CLASS_NAMES

from .anatomy import Anatomy, Heart, Tree, catheter_path, catmull_rom, child_rng, resample, sample_anatomy
from .lesions import Lesion, apply_lesions
from .projection import CArm, chord_ellipsoid, view_name

MU_SOFT = 0.02  # per mm, water-equivalent
MU_BONE = 0.028  # extra per mm of bone (trabecular, effective)
K_IODINE = 0.15  # display-window fraction per mm of full-strength contrast path

# typical views: (primary, secondary, weight)
LCA_VIEWS = [(-30, -25, 3), (45, 25, 3), (50, -25, 2), (-30, 30, 2), (0, 30, 1.5), (0, -30, 1), (-10, 40, 1)]
RCA_VIEWS = [(40, 0, 4), (-30, 0, 3), (30, 20, 1.5), (0, 25, 1)]


@dataclass
class RunSpec:
    side: str = "LCA"
    primary: float = -30.0
    secondary: float = -25.0
    size: int = 512
    n_frames: int = 40
    frame_time_ms: float = 66.67
    sid: float = 1100.0
    sod: float = 760.0
    fov_mm: float = 200.0
    heart_rate: float = 70.0
    phase0: float = 0.0
    # bolus timing in seconds
    t_inj: float = 0.5
    inj_dur: float = 1.8
    v_fill: float = 220.0  # mm/s of path
    v_wash: float = 120.0
    tau_in: float = 0.15
    tau_out: float = 0.35
    contrast: float = 1.0  # iodine strength (low -> poorly opacified run)
    noise: float = 2.5  # grey levels of quantum noise in bright areas
    blur: float = 0.7  # detector blur sigma, px
    edge: float = 0.6  # edge-enhancement gain
    intensity: str = "log"  # log | lin
    collimation: str = "circle"  # circle | rect | none
    collim: tuple = (0.48, 0.0, 0.0, 0.0, 0.0)  # circle: (radius frac, dx, dy); rect: (l, r, t, b)
    white: float = 200.0
    black: float = 55.0
    gamma: float = 1.0
    vignette: float = 0.2
    approach: str = "femoral"
    pan: list = field(default_factory=list)  # per-frame (dx, dy) integer pixel offsets
    shake: list = field(default_factory=list)  # per-frame motion-blur length in px (0 = none)
    pan_angle: float = 0.0  # direction of the pan / motion blur (radians)
    blades: list = field(default_factory=list)  # (angle rad, distance from centre, transmission)
    aim: tuple = (0.0, 0.0)  # offset of the vessel tree's centre from the image centre (fraction)
    catheter: bool = True  # draw the guiding catheter
    device: str = ""  # "" | wire | balloon | stent : PCI hardware in the run
    device_branch: str = ""  # branch the wire runs down (LAD, LCx, RCA, ...)
    device_pos: float = 0.5  # balloon/stent position along the wire (fraction)
    reflux: float = 0.0  # contrast puff into the aortic root
    kvp: float = 80.0
    ma: float = 600.0
    exposure_ms: float = 6.0
    view: str = ""
    quality: str = "good"  # good | low_contrast | low_dose | motion | partial
    # domain randomisation ("wide"); the defaults are the original ("narrow") generator
    domain: str = "narrow"  # wide | narrow: how this spec was drawn
    better_contrast: float = 0.6  # min iodine strength of a "_better" frame (wide: 0.4)
    texture_gain: float = 1.0  # x the coarse soft-tissue texture amplitude
    fine_gain: float = 1.0  # x the fine texture amplitude
    lung_markings: float = 0.0  # amplitude of the lung-marking streaks (attenuation units)
    rib_cortex: float = 0.0  # strength of the cortical rims of the ribs (0 = solid ribs)
    soft_tissue: int = 0  # extra overlapping soft-tissue masses (breast, fat folds)
    bowel_gas: int = 0  # gas blobs below the diaphragm

    def to_dict(self) -> dict:
        return asdict(self)


def _choice_view(rng, side):
    views = LCA_VIEWS if side == "LCA" else RCA_VIEWS
    w = np.array([v[2] for v in views], float)
    p, s, _ = views[int(rng.choice(len(views), p=w / w.sum()))]
    return p + rng.normal(0, 5), s + rng.normal(0, 4)


#: iodine strength of ordinary runs / of weak ("low_contrast") runs, and the minimum of a
#: "_better" frame, per domain.  Wide: real diagnostic runs show vessels anywhere from faint
#: to dark, so ordinary runs span 0.45-1.15 and "better" needs >= 0.4; weak runs stay
#: below it (0.15-0.35) and are never "better".
CONTRAST = {
    "narrow": {"normal": (0.8, 1.15), "low": (0.25, 0.45), "better": 0.6},
    "wide": {"normal": (0.45, 1.15), "low": (0.15, 0.35), "better": 0.4},
}
QUALITIES = ("good", "low_contrast", "low_dose", "motion", "partial")


def sample_run_spec(
    rng: np.random.Generator,
    side: str,
    size: int = 512,
    n_frames: int = 40,
    view: Optional[tuple] = None,
    quality: Optional[str] = None,
    domain: str = "wide",
) -> RunSpec:
    """Draw acquisition parameters for one run.  ``quality``: None (random), 'good',
    'low_contrast', 'low_dose', 'motion', 'partial' (wide domain only: a weak or short
    injection that fills the tree only proximally).  ``domain``: 'wide' (default: domain
    randomisation of contrast, background texture, blur, aim and zoom) or 'narrow' (the
    original generator, draw for draw)."""
    if domain not in CONTRAST:
        raise ValueError(f"domain must be 'wide' or 'narrow', not {domain!r}")
    wide = domain == "wide"
    if quality is not None and quality not in (QUALITIES if wide else QUALITIES[:-1]):
        raise ValueError(f"quality must be one of {QUALITIES if wide else QUALITIES[:-1]} ({domain}), not {quality!r}")
    partial = False
    if view is None:
        prim, sec = _choice_view(rng, side)
    else:
        prim, sec = view
    fps = float(rng.choice([15.0, 15.0, 15.0, 12.5, 30.0]))
    ft = 1000.0 / fps
    T = n_frames * ft / 1000.0
    drawn = quality is None
    if quality is None:
        quality = str(rng.choice(["good", "low_contrast", "low_dose", "motion"], p=[0.72, 0.1, 0.1, 0.08]))
    cr = CONTRAST[domain]
    spec = RunSpec(side=side, primary=float(prim), secondary=float(sec), size=size, n_frames=n_frames)
    spec.domain = domain
    spec.better_contrast = cr["better"]
    spec.frame_time_ms = round(ft, 2)
    spec.sid = float(rng.uniform(950, 1200))
    spec.sod = float(rng.uniform(700, 800))
    spec.fov_mm = float(rng.choice([170.0, 200.0, 220.0, 250.0] if not wide else [150.0, 170.0, 200.0, 220.0, 250.0, 280.0]))
    spec.heart_rate = float(rng.uniform(55, 100))
    spec.phase0 = float(rng.random())
    # bolus: scaled to the run length so every run shows wash-in, plateau and (mostly) wash-out
    spec.t_inj = float(T * rng.uniform(0.06, 0.22))
    spec.inj_dur = float(T * rng.uniform(0.3, 0.55))
    spec.v_fill = float(200.0 / (T * rng.uniform(0.08, 0.18)))
    spec.v_wash = float(200.0 / (T * rng.uniform(0.25, 0.5)))
    spec.tau_in = float(T * rng.uniform(0.02, 0.05))
    spec.tau_out = float(T * rng.uniform(0.08, 0.16))
    spec.contrast = float(rng.uniform(*cr["normal"]))
    spec.noise = float(rng.uniform(0.8, 2.8))
    if quality == "low_contrast":
        spec.contrast = float(rng.uniform(*cr["low"]))
    elif quality == "low_dose":
        spec.noise = float(rng.uniform(3.5, 7))
        spec.blur = float(rng.uniform(0.9, 1.3))
    spec.blur = float(rng.uniform(0.5, 1.0 if not wide else 1.5)) if quality != "low_dose" else spec.blur
    spec.edge = float(rng.uniform(0.2, 1.0))
    spec.intensity = "log" if rng.random() < 0.85 else "lin"
    spec.gamma = float(rng.uniform(0.8, 1.6))
    spec.white = float(rng.uniform(120, 225))
    spec.black = float(rng.uniform(10, 65))
    kind = rng.random()
    if kind < 0.45:
        spec.collimation = "circle"
        spec.collim = (float(rng.uniform(0.44, 0.52)), float(rng.normal(0, 0.02)), float(rng.normal(0, 0.02)), 0.0, 0.0)
        spec.vignette = float(rng.uniform(0.15, 0.4))
    elif kind < 0.8:
        spec.collimation = "rect"
        spec.collim = tuple(float(x) for x in rng.uniform(0, 0.08, 4)) + (0.0,)
        spec.vignette = float(rng.uniform(0.0, 0.15))
    else:
        spec.collimation = "none"
        spec.vignette = float(rng.uniform(0.0, 0.15))
    blades = []
    if spec.collimation != "none" and rng.random() < 0.35:  # shutter blades
        for _ in range(int(rng.integers(1, 3))):
            blades.append((float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.3, 0.44)), 0.0))
    if rng.random() < 0.3:  # semi-transparent wedge filter over a lung field
        blades.append((float(rng.choice([0.0, np.pi]) + rng.normal(0, 0.3)), float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.55, 0.8))))
    spec.blades = blades
    spec.approach = "femoral" if rng.random() < 0.6 else "radial"
    spec.aim = (float(rng.normal(0, 0.05)), float(rng.normal(0, 0.05)))
    if wide:
        # a spawned generator: the draws of the narrow domain are unchanged
        partial = _wide_extras(spec, child_rng(rng), quality, T, drawn)
        if quality == "partial":
            quality = "good"  # acquisition otherwise like a good run
    if rng.random() < 0.15:  # a PCI run: guidewire, maybe a balloon or a stent on it
        spec.device = str(rng.choice(["wire", "balloon", "stent"], p=[0.4, 0.3, 0.3]))
        spec.device_branch = str(rng.choice(["LAD", "LCx"] if side == "LCA" else ["RCA", "PDA"]))
        spec.device_pos = float(rng.uniform(0.15, 0.6))
    spec.reflux = float(rng.uniform(0.2, 0.6)) if rng.random() < 0.35 else 0.0
    spec.kvp = float(round(rng.uniform(70, 95)))
    spec.ma = float(round(rng.uniform(400, 900)))
    spec.exposure_ms = float(round(rng.uniform(4, 8), 1))
    pan = [(0, 0)] * n_frames
    shake = [0.0] * n_frames
    if quality == "motion" or rng.random() < 0.1:
        # a table pan or patient motion over a few frames
        f0 = int(rng.integers(0, max(1, n_frames - 4)))
        dur = int(rng.integers(3, max(4, n_frames // 3)))
        ang = rng.uniform(0, 2 * np.pi)
        spec.pan_angle = float(ang)
        speed = rng.uniform(6, 16) * size / 512
        x = y = 0.0
        for f in range(n_frames):
            if f0 <= f < f0 + dur:
                x += speed * np.cos(ang)
                y += speed * np.sin(ang)
                shake[f] = float(1.5 * speed)
            pan[f] = (int(round(x)), int(round(y)))
    spec.pan = pan
    spec.shake = shake
    spec.view = view_name(spec.primary, spec.secondary)
    spec.quality = quality if quality != "motion" or any(shake) else "good"
    if quality == "good" and any(shake):
        spec.quality = "motion"
    if partial and spec.quality == "good":
        spec.quality = "partial"
    return spec


def _wide_extras(spec: RunSpec, sub: np.random.Generator, quality: str, T: float, drawn: bool = True) -> bool:
    """The wide-domain draws (each independent): partial injections (16% of the runs
    whose quality was drawn as good, ~10% of all), off-centre aim (20%), background texture
    gains and extras.  Returns whether the injection is partial."""
    coin = sub.random()
    partial = quality == "partial" or (drawn and quality == "good" and coin < 0.16)
    u = sub.random()
    if partial:
        # a short and/or weak injection: the bolus front never reaches the distal tree
        # before the proximal vessels wash out (labels follow from the computed fill)
        spec.inj_dur = float(T * sub.uniform(0.03, 0.1))
        spec.v_fill = float(spec.v_fill * sub.uniform(0.3, 0.6))
        spec.tau_out = float(T * sub.uniform(0.03, 0.06))  # a short puff clears quickly
        if u < 0.5:
            spec.contrast = float(spec.contrast * sub.uniform(0.5, 0.9))
    if sub.random() < 0.2:  # the tree off-centre (table not centred on it): x, y or both
        off = sub.uniform(0.06, 0.18, 2) * sub.choice([-1.0, 1.0], 2) * [(1, 0), (0, 1), (1, 1)][int(sub.integers(3))]
        spec.aim = (float(spec.aim[0] + off[0]), float(spec.aim[1] + off[1]))
    spec.texture_gain = float(np.exp(sub.uniform(np.log(0.6), np.log(4.0))))
    spec.fine_gain = float(np.exp(sub.uniform(np.log(0.6), np.log(2.5))))
    spec.lung_markings = float(sub.uniform(0.15, 0.6))
    spec.rib_cortex = float(sub.uniform(0.3, 1.0))
    spec.soft_tissue = int(sub.choice([0, 1, 2, 3], p=[0.35, 0.35, 0.2, 0.1]))
    spec.bowel_gas = int(sub.integers(1, 4)) if sub.random() < 0.3 else 0
    return partial


# ----------------------------------------------------------------------------- helpers


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Separable box blur of radius r (window 2r+1), edge-replicated, via cumulative sums."""
    if r <= 0:
        return img
    out = img
    for ax in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[ax] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=ax, dtype=np.float32)
        n = out.shape[ax]
        hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=ax)
        lo = np.take(c, np.arange(0, n), axis=ax)
        out = (hi - lo) / (2 * r + 1)
    return out


def gauss_blur_small(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur for small sigma (<= ~2 px)."""
    if sigma <= 0.05:
        return img
    h = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-h, h + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    out = img
    for ax in (0, 1):
        p = np.pad(out, [(h, h) if a == ax else (0, 0) for a in (0, 1)], mode="edge")
        acc = np.zeros_like(out)
        n = out.shape[ax]
        for i, kv in enumerate(k):
            acc += kv * (p[i : i + n] if ax == 0 else p[:, i : i + n])
        out = acc
    return out


def splat(shape: tuple, x: np.ndarray, y: np.ndarray, sig: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Sum of isotropic Gaussians amp*exp(-r^2/2sig^2) at (x, y) (col, row) on an image."""
    H, W = shape
    P = 24
    Wp = W + 2 * P
    hw = np.clip(np.ceil(2.5 * sig).astype(int), 1, P - 1)
    ok = (x > hw - P) & (x < W + P - hw - 1) & (y > hw - P) & (y < H + P - hw - 1) & (amp != 0)
    idxs, valss = [], []
    for h in np.unique(hw[ok]):
        m = ok & (hw == h)
        xs, ys, ss, ws = x[m], y[m], sig[m], amp[m]
        ix = np.floor(xs).astype(np.int64)
        iy = np.floor(ys).astype(np.int64)
        off = np.arange(-h + 1, h + 1)
        inv = (-0.5 / (ss * ss))[:, None]
        gx = np.exp(((off[None, :] - (xs - ix)[:, None]) ** 2) * inv).astype(np.float32)
        gy = np.exp(((off[None, :] - (ys - iy)[:, None]) ** 2) * inv).astype(np.float32)
        gy *= ws[:, None].astype(np.float32)
        valss.append((gy[:, :, None] * gx[:, None, :]).ravel())
        rows = (iy[:, None] + off[None, :] + P) * Wp
        cols = ix[:, None] + off[None, :] + P
        idxs.append((rows[:, :, None] + cols[:, None, :]).ravel())
    if not idxs:
        return np.zeros((H, W), np.float32)
    out = np.bincount(np.concatenate(idxs), np.concatenate(valss), minlength=(H + 2 * P) * Wp)
    return out.astype(np.float32).reshape(H + 2 * P, Wp)[P : P + H, P : P + W]


def tube_amplitudes(r_mm, conc, step_mm, mag, pixel_mm, min_sigma=0.55, blur=0.0):
    """Gaussian splat parameters so the summed profile of a sampled tube has peak
    2*r*conc (mm of iodine path) and the same area as a cylinder of radius r
    (``blur``: detector blur sigma in px, folded into the Gaussian)."""
    r_px = r_mm * mag / pixel_mm
    sig = np.sqrt(np.maximum(0.627 * r_px, min_sigma) ** 2 + blur**2)
    step_px = step_mm * mag / pixel_mm
    amp = 2.0 * r_mm * conc * step_px / (np.sqrt(2 * np.pi) * sig)
    return sig, amp


def cardiac_k(t: np.ndarray | float, hr: float, phase0: float) -> np.ndarray:
    """Contraction 0..1 over the cycle (systole in the first ~40% of the cycle)."""
    ph = (np.asarray(t) * hr / 60.0 + phase0) % 1.0
    return np.where(ph < 0.4, 0.5 * (1 - np.cos(2 * np.pi * ph / 0.4)), 0.0) ** 0.8


def deform(local: np.ndarray, heart: Heart, k: float) -> np.ndarray:
    """Heart-local points at contraction k: base descends, radius shrinks, apex twists."""
    w = local[:, 0]
    frac = np.clip(w / heart.L, -0.3, 1.1)
    w2 = w + 9.0 * k * (1 - frac)
    sc = 1 - 0.11 * k
    th = np.deg2rad(7.0 * k * frac)
    a, s = local[:, 1], local[:, 2]
    ca, sa = np.cos(th), np.sin(th)
    return np.stack([w2, sc * (a * ca - s * sa), sc * (a * sa + s * ca)], axis=1)


# ----------------------------------------------------------------------------- background


def _body_background(
    carm: CArm, heart: Heart, shape_px: int, margin_px: int, rng_bg: np.random.Generator, spec: Optional[RunSpec] = None
) -> np.ndarray:
    """Static attenuation (chest wall, lungs, spine, sternum, ribs) on the padded canvas.
    ``spec`` (wide domain): texture gains, lung markings, rib cortices, soft-tissue masses
    and bowel gas (their random geometry from a sub-generator of ``rng_bg``; without
    extras the draws are the original ones)."""
    spec = spec or RunSpec()
    extras = spec.lung_markings > 0 or spec.rib_cortex > 0 or spec.soft_tissue > 0 or spec.bowel_gas > 0
    rng_x = child_rng(rng_bg) if extras else None
    n_lo = max(32, shape_px // 4)
    big = _scaled(carm, shape_px, n_lo)
    S, dirs = big.rays(n_lo)
    I3 = np.eye(3)
    hz = heart.center[2]
    A = MU_SOFT * chord_ellipsoid(S, dirs, [0, 15, 0], I3, [165, 115, np.inf])
    # lungs: the bases form the diaphragm domes below the heart
    lz = hz - 40
    lung = np.zeros(A.shape, np.float32) if spec.lung_markings > 0 else None
    for cx, cz, semi in ((-88.0, lz + 125, (78, 92, 150)), (92.0, lz + 115, (72, 92, 150))):
        ch = chord_ellipsoid(S, dirs, [cx, 18, cz], I3, semi)
        A -= 0.85 * MU_SOFT * ch
        if lung is not None:
            lung += ch
    if spec.soft_tissue > 0:  # overlapping soft tissue: breast shadows, fat folds, arms
        for _ in range(spec.soft_tissue):
            c = [rng_x.uniform(-140, 140), rng_x.uniform(-120, -40), hz + rng_x.uniform(-140, 90)]
            semi_st = [rng_x.uniform(40, 95), rng_x.uniform(15, 45), rng_x.uniform(35, 80)]
            A += rng_x.uniform(0.4, 1.0) * MU_SOFT * chord_ellipsoid(S, dirs, c, _rand_rot(rng_x, 0.5), semi_st)
    if spec.bowel_gas > 0:  # gas in the stomach / colon below the diaphragm: a chain of pockets
        for _ in range(spec.bowel_gas):
            c = np.array([rng_x.uniform(-50, 130), rng_x.uniform(-60, 40), lz - rng_x.uniform(45, 130)])
            d = _rand_unit(rng_x) * [1.0, 0.5, 0.6]
            for j in range(int(rng_x.integers(1, 6))):
                q = c + j * rng_x.uniform(14, 26) * d
                semi_g = [rng_x.uniform(9, 28), rng_x.uniform(8, 22), rng_x.uniform(7, 20)]
                A -= rng_x.uniform(0.6, 0.95) * MU_SOFT * chord_ellipsoid(S, dirs, q, _rand_rot(rng_x, 3.0), semi_g)
    # heart/mediastinum shadow of great vessels, liver under the right dome
    A += 1.0 * MU_SOFT * chord_ellipsoid(S, dirs, [-12, 10, hz + 80], I3, [38, 45, 90])
    A += 0.9 * MU_SOFT * chord_ellipsoid(S, dirs, [24, 52, 0], I3, [13, 13, np.inf])  # descending aorta
    A += 0.25 * MU_SOFT * chord_ellipsoid(S, dirs, [-40, 10, lz - 120], I3, [140, 100, 80])
    # spine: a column of vertebral bodies (elliptic cylinder) with faint disc spaces, and
    # posterior elements; z of each ray where it passes the spinal axis gives the level
    o = S
    den = dirs[..., 0] ** 2 + dirs[..., 1] ** 2 + 1e-9
    t_ax = -(o[0] * dirs[..., 0] + (o[1] - 80.0) * dirs[..., 1]) / den
    z_ax = o[2] + t_ax * dirs[..., 2]
    period = 30.0 + rng_bg.uniform(-2, 2)
    zph = (z_ax - rng_bg.uniform(0, period)) / period
    disc = 0.5 + 0.5 * np.cos(2 * np.pi * zph)  # 1 at disc centre
    body = chord_ellipsoid(S, dirs, [0, 80, 0], I3, [21, 16, np.inf])
    A += MU_BONE * body * (0.9 - 0.22 * disc ** 8)
    ped = chord_ellipsoid(S, dirs, [0, 112, 0], I3, [26, 12, np.inf])
    A += 0.45 * MU_BONE * ped * (0.9 - 0.3 * disc ** 4)
    A += 0.5 * MU_BONE * chord_ellipsoid(S, dirs, [0, -118, hz + 30], I3, [14, 6, 110])
    A = box_blur(A.astype(np.float32), max(1, n_lo // 70))  # no sharp phantom edges
    # soft-tissue / lung-marking texture: smooth random fields at two scales
    tex = box_blur(box_blur(rng_bg.standard_normal(A.shape).astype(np.float32), 3), 3)
    A += (0.06 * rng_bg.uniform(0.5, 1.5) * spec.texture_gain / max(float(tex.std()), 1e-6)) * tex
    if extras:  # a third, coarser scale (overlapping soft tissue, uneven lung aeration)
        tex3 = box_blur(box_blur(rng_x.standard_normal(A.shape).astype(np.float32), 7), 7)
        A += (0.05 * rng_x.uniform(0.3, 1.5) * spec.texture_gain / max(float(tex3.std()), 1e-6)) * tex3
    img = np.asarray(Image.fromarray(A.astype(np.float32), mode="F").resize((shape_px, shape_px), Image.BILINEAR))
    fine = box_blur(rng_bg.standard_normal(img.shape).astype(np.float32), max(1, shape_px // 256))
    img = img + (0.025 * rng_bg.uniform(0.5, 1.5) * spec.fine_gain / max(float(fine.std()), 1e-6)) * fine
    if lung is not None:
        img = img + spec.lung_markings * _lung_markings(carm, heart, shape_px, margin_px, lung, rng_x)
    # ribs: curved bony tubes, splatted like vessels
    pts, rad = [], []
    for i in range(13):
        z_post = hz + 190 - i * 24 + rng_bg.normal(0, 2)
        for sgn in (-1, 1):
            th = np.linspace(0.05, 0.9 * np.pi, 40)
            x = sgn * (20 + 150 * np.sin(th))
            y = 100 * np.cos(th) + 10
            z = z_post - 70 * (th / np.pi) ** 1.4
            c = catmull_rom(np.stack([x, y, z], 1)[::4], step=2.0)
            pts.append(c)
            rad.append(np.full(len(c), 5.0 if spec.rib_cortex <= 0 else float(rng_x.uniform(4.0, 6.5))))
    rib_curves = list(zip(pts, rad))
    pts = np.vstack(pts)
    rad = np.concatenate(rad)
    cx, cy, mag = carm.project(pts)
    sig, amp = tube_amplitudes(rad, 1.0, 2.0, mag, carm.pixel_mm)
    rib = splat((shape_px, shape_px), cx + margin_px, cy + margin_px, sig, amp)
    if spec.rib_cortex <= 0:
        img = img + 0.5 * MU_BONE * rib
    else:
        # hollow ribs: a dense cortical shell seen tangentially at the two silhouette edges
        # (rays along the shell cross ~2*sqrt(2*R*t) mm of cortex): two thin dense lines
        # along each rib on top of a lighter (trabecular) core
        rim = _rib_rims(carm, rib_curves, shape_px, margin_px)
        img = img + 0.5 * MU_BONE * (rib * np.float32(1.0 - 0.55 * spec.rib_cortex) + np.float32(3.0 * spec.rib_cortex) * rim)
    # ECG electrodes and lead wires on the chest wall (static, very radio-opaque)
    pts, rad = [], []
    for _ in range(int(rng_bg.integers(0, 4))):
        x0, z0 = rng_bg.uniform(-120, 140), heart.center[2] + rng_bg.uniform(-140, 120)
        walk = np.cumsum(rng_bg.normal(0, 1, (6, 2)) * 25 + rng_bg.normal(0, 1, 2) * 40, axis=0)
        ctrl = np.stack([x0 + walk[:, 0], np.full(6, -125.0), z0 + walk[:, 1]], 1)
        c = catmull_rom(np.vstack([[x0, -125.0, z0], ctrl]), step=1.0)
        pts.append(c)
        rad.append(np.full(len(c), 0.5))
        pts.append(np.array([[x0, -126.0, z0]]))
        rad.append(np.array([6.0]))
    if pts:
        pts = np.vstack(pts)
        rad = np.concatenate(rad)
        cx, cy, mag = carm.project(pts)
        sig, amp = tube_amplitudes(rad, 1.0, 1.0, mag, carm.pixel_mm)
        big_disc = rad > 3  # electrode snap: one sample, make it a disc of the right size
        amp[big_disc] = 1.2
        img = img + 0.12 * splat((shape_px, shape_px), cx + margin_px, cy + margin_px, sig, amp)
    return img.astype(np.float32)


def _box1(a: np.ndarray, axis: int, r: int, wrap: bool = False) -> np.ndarray:
    """Box blur of radius ``r`` along one axis (edge-replicated or wrapped)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="wrap" if wrap else "edge"), axis=axis, dtype=np.float32)
    n = a.shape[axis]
    return (np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis) - np.take(c, np.arange(n), axis=axis)) / (2 * r + 1)


def _rand_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _rand_rot(rng: np.random.Generator, spread: float) -> np.ndarray:
    """A random rotation matrix (rows = axes), angles ~ N(0, spread) rad about random axes."""
    k = _rand_unit(rng)
    a = float(rng.normal(0, spread))
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * (K @ K)


def _rib_rims(carm: CArm, curves: list, shape_px: int, margin_px: int) -> np.ndarray:
    """Line integrals (mm, in units of the solid-rib splat) of the cortical shells of ribs
    (``curves``: [(centreline (n,3), radius (n,))]): thin lines at the silhouette edges."""
    step = 0.6
    fine = [resample(c, step) for c, _ in curves]
    pts = np.vstack(fine)
    rad = np.concatenate([np.full(len(f), r[0]) for f, (_, r) in zip(fine, curves)])
    tan = np.vstack([np.gradient(f, axis=0) for f in fine])
    # the cortex is uneven along a rib: slow random-looking modulation (deterministic)
    mod = 0.75 + 0.25 * np.sin(pts[:, 0] * 0.05 + pts[:, 2] * 0.08) * np.sin(pts[:, 2] * 0.031 - pts[:, 1] * 0.04)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True) + 1e-9
    ray = pts - carm.source
    ray /= np.linalg.norm(ray, axis=1, keepdims=True)
    nrm = np.cross(tan, ray)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
    r_c = 0.9  # mm: blur of the rim (cortex ~1 mm, rib edges not perfectly round)
    out = None
    for sgn in (-1.0, 1.0):
        q = pts + sgn * (rad[:, None] - r_c) * nrm
        cx, cy, mag = carm.project(q)
        # peak ~ 2*sqrt(2*R*1mm) mm of cortex, denser than the trabecular core (x1.8)
        conc = mod * 1.8 * 2.0 * np.sqrt(2.0 * rad) / (2.0 * r_c)
        sig, amp = tube_amplitudes(np.full(len(q), r_c), conc, step, mag, carm.pixel_mm)
        o = splat((shape_px, shape_px), cx + margin_px, cy + margin_px, sig, amp)
        out = o if out is None else out + o
    return out


def _lung_markings(carm: CArm, heart: Heart, shape_px: int, margin_px: int, lung_lo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lung markings on the canvas: thin vessel-like streaks radiating from the two hila
    (zero crossings of noise that is smooth along the radius and rough across it, a
    branching network of lines), thinner and fainter towards the periphery, only over the
    lungs.  Computed at half resolution; unit peak."""
    m = max(16, shape_px // 2)
    hz = heart.center[2]
    hila = np.array([[-48.0, 15.0, hz + 45.0], [52.0, 15.0, hz + 40.0]]) + rng.normal(0, 6, (2, 3))
    hx, hy, _ = carm.project(hila)
    hx = (hx + margin_px + 0.5) / 2.0 - 0.5  # half-resolution canvas pixels
    hy = (hy + margin_px + 0.5) / 2.0 - 0.5
    px_mm = 2.0 * carm.pixel_mm_iso  # mm (at the isocentre) per half-res pixel
    jj, ii = np.meshgrid(np.arange(m, dtype=np.float32), np.arange(m, dtype=np.float32))
    out = np.zeros((m, m), np.float32)
    # log-polar noise grid (angle x log radius): streaks ~5x longer than wide at every
    # distance from the hilum; 0.25 deg x 1.6% of the radius, 5 mm .. 300 mm
    n_th, n_r, lr0, lr1 = 1440, 256, np.log(5.0), np.log(300.0)
    for k in range(2):
        dx, dy = jj - np.float32(hx[k]), ii - np.float32(hy[k])
        r_mm = np.maximum(np.hypot(dx, dy) * np.float32(px_mm), np.float32(5.0))
        th = np.arctan2(dy, dx)
        P = rng.standard_normal((n_th, n_r)).astype(np.float32)
        P = _box1(_box1(P, 0, 5, wrap=True), 0, 5, wrap=True)  # across: ~3 deg
        P = _box1(_box1(P, 1, 7), 1, 7)  # along: ~25% of the radius
        P /= max(float(P.std()), 1e-6)
        P = np.pad(P, ((0, 1), (0, 1)), mode="wrap")
        ft = (th + np.float32(np.pi)) * np.float32(n_th / (2 * np.pi))
        fr = (np.log(r_mm) - np.float32(lr0)) * np.float32((n_r - 1) / (lr1 - lr0))
        fr = np.clip(fr, 0, n_r - 1.001)
        t0, r0 = np.minimum(ft.astype(np.int32), n_th - 1), fr.astype(np.int32)
        at, ar = ft - t0, fr - r0
        v = (P[t0, r0] * (1 - at) + P[t0 + 1, r0] * at) * (1 - ar) + (P[t0, r0 + 1] * (1 - at) + P[t0 + 1, r0 + 1] * at) * ar
        # zero crossings -> lines; width ~ w x 2.7 deg x r: ~2 mm 40 mm from the hilum, ~1 mm at 150 mm
        w = np.minimum(np.float32(0.7) * (np.float32(40.0) / r_mm) ** np.float32(0.9), np.float32(0.7))
        lines = np.exp(-((v / w) ** 2)) * np.exp(-r_mm / np.float32(rng.uniform(70, 120)))
        # each hilum feeds its own lung: fade across the bisector between the two hila
        o = 1 - k
        ax_, ay_ = hx[k] - hx[o], hy[k] - hy[o]
        side = ((jj - np.float32(0.5 * (hx[0] + hx[1]))) * ax_ + (ii - np.float32(0.5 * (hy[0] + hy[1]))) * ay_) / max(np.hypot(ax_, ay_), 1e-6)
        out += lines * _smoothstep((r_mm - 12.0) / 20.0) * _smoothstep(side / 20.0 + 0.5)
        out += np.float32(0.5) * np.exp(-((r_mm / np.float32(20.0)) ** 2))  # the hilar vessels themselves
    lung = np.asarray(Image.fromarray(lung_lo.astype(np.float32)).resize((m, m), Image.BILINEAR))
    lung = np.clip(lung / max(float(np.percentile(lung, 99)), 1e-6), 0, 1)
    out = out * lung
    return np.asarray(Image.fromarray(out).resize((shape_px, shape_px), Image.BILINEAR))


def _device_path(tree: Tree, spec: RunSpec, heart: Heart, ost_local: np.ndarray, step: float):
    """Guidewire (heart-local samples, radius, strength) from the ostium down one branch,
    with a balloon (contrast-filled) or a stent (denser mesh) part-way along it."""
    names = [b.name for b in tree.branches]
    name = spec.device_branch if spec.device_branch in names else ("LAD" if tree.side == "LCA" else "RCA")
    chain = []
    i = names.index(name)
    while i >= 0:
        chain.append(i)
        i = tree.branches[i].parent
    pts = [ost_local[None]]
    for j in reversed(chain):
        b = tree.branches[j]
        nxt = chain[chain.index(j) - 1] if chain.index(j) > 0 else None
        end = tree.branches[nxt].parent_idx + 1 if nxt is not None else len(b.pts)
        pts.append(b.pts[:end])
    path = resample(np.vstack(pts), step)
    n = len(path)
    r = np.full(n, 0.22)
    c = np.full(n, 3.5)  # much denser than iodine: a thin but very dark line
    if spec.device in ("balloon", "stent"):
        s = np.arange(n) * step
        centre = spec.device_pos * s[-1]
        half = 8.0 if spec.device == "balloon" else 9.0
        m = np.abs(s - centre) < half
        if spec.device == "balloon":
            r[m] = 1.3
            c[m] = 0.9
        else:
            r[m] = 1.4
            c[m] = 0.35
        for e in (centre - half, centre + half):  # radio-opaque markers
            mk = np.abs(s - e) < 0.8
            r[mk] = 0.6
            c[mk] = 4.0
    return path, r, c


def _scaled(carm: CArm, canvas_px: int, n_lo: int) -> CArm:
    """The same C-arm seen on a (larger) canvas of ``canvas_px`` pixels, sampled at ``n_lo``."""
    fov = carm.fov_mm * canvas_px / carm.size
    k = carm.pixel_mm / (fov / n_lo)
    return CArm(carm.primary, carm.secondary, carm.sid, carm.sod, fov, n_lo, pan=(carm.pan[0] * k, carm.pan[1] * k))


def _heart_shadow(S, dirs, heart: Heart, k: float) -> np.ndarray:
    L = heart.L
    ax = heart.basis
    sc = 1 - 0.1 * k
    c_v = heart.to_patient(np.array([(L - 8) / 2 + 4.5 * k, 0, 0]))
    A = chord_ellipsoid(S, dirs, c_v, ax, [(L + 8) / 2 * (1 - 0.04 * k), heart.Rm * sc, heart.Rm * sc])
    c_a = heart.to_patient(np.array([-28 + 4 * k, -12, -5]))
    A += 0.6 * chord_ellipsoid(S, dirs, c_a, ax, [34, 45, 50])
    return MU_SOFT * 1.4 * box_blur(A.astype(np.float32), max(1, A.shape[0] // 80))


# ----------------------------------------------------------------------------- the run


@dataclass
class _VesselSet:
    local: np.ndarray  # (N,3) heart-local
    radius: np.ndarray  # stenosed lumen radius, mm
    s: np.ndarray  # path length (+ delay) from the ostium, mm
    filled: np.ndarray
    step: float
    pos: np.ndarray = None  # sample index within its branch
    left: np.ndarray = None  # samples left in the branch (including this one)
    ref: np.ndarray = None  # reference (un-stenosed) radius, mm
    branch: np.ndarray = None  # index of the branch in the tree
    index: np.ndarray = None  # nearest sample index on the branch's stored centreline
    segment: np.ndarray = None  # AHA segment of that sample (0 = unnumbered)


def _vessels(tree: Tree, lesions: list[Lesion], step: float) -> _VesselSet:
    radii, filled, delay = apply_lesions(tree, lesions)
    L, R, S, F, Pi, Le, Rf, Bi, Ix, Sg = [], [], [], [], [], [], [], [], [], []
    for j, (b, r, f, dl) in enumerate(zip(tree.branches, radii, filled, delay)):
        s = b.s
        n = max(2, int(np.ceil((s[-1] - s[0]) / step)) + 1)
        t = np.linspace(s[0], s[-1], n)
        L.append(np.stack([np.interp(t, s, b.pts[:, k]) for k in range(3)], 1))
        R.append(np.interp(t, s, r))
        S.append(t + np.interp(t, s, dl))
        F.append(np.interp(t, s, f.astype(float)) > 0.5)
        Pi.append(np.arange(n))
        Le.append(n - np.arange(n))
        Rf.append(np.interp(t, s, b.radius))
        Bi.append(np.full(n, j))
        ix = np.clip(np.rint(np.interp(t, s, np.arange(len(s)))).astype(np.int64), 0, len(s) - 1)
        Ix.append(ix)
        Sg.append(np.asarray(b.segment)[ix])
    return _VesselSet(np.vstack(L), np.concatenate(R), np.concatenate(S), np.concatenate(F), step,
                      np.concatenate(Pi), np.concatenate(Le), np.concatenate(Rf), np.concatenate(Bi),
                      np.concatenate(Ix), np.concatenate(Sg))


@dataclass
class RunGeometry:
    """The geometry :func:`render_frames` uses for a run (no random draws): the C-arm with
    the table position that centres the tree (``pan=base``), the canvas margin ``margin``
    (the canvas is ``canvas`` = size + 2 margin px, frame f is its window shifted by
    ``pans[f]``), the vessel samples at ``step`` mm and the cardiac contraction ``ks[f]``
    at the frame times.  A sample projected at (col, row) = ``carm.project`` lands at frame
    pixel index (col + dx, row + dy) of frame f with ``(dx, dy) = pans[f]``."""

    carm: CArm
    base: tuple
    margin: int
    canvas: int
    pans: list
    step: float
    vs: _VesselSet
    times: np.ndarray
    ks: np.ndarray


def run_geometry(anatomy: Anatomy, lesions: list[Lesion], spec: RunSpec) -> RunGeometry:
    """The run's projection geometry, exactly as :func:`render_frames` computes it."""
    heart = anatomy.heart
    n = spec.size
    carm = CArm(spec.primary, spec.secondary, spec.sid, spec.sod, spec.fov_mm, n)
    # the operator centres the injected tree in the field (table position), give or take
    tree = anatomy.tree(spec.side)
    main = np.vstack([b.pts for b in tree.branches if not b.name.startswith(("S", "T"))])
    cx, cy, _ = carm.project(heart.to_patient(main))
    aim = spec.aim or (0.0, 0.0)
    base = (n / 2 - 0.5 * (cx.min() + cx.max()) + aim[0] * n, n / 2 - 0.5 * (cy.min() + cy.max()) + aim[1] * n)
    carm = CArm(spec.primary, spec.secondary, spec.sid, spec.sod, spec.fov_mm, n, pan=base)
    M = max(4, n // 8)  # canvas margin for pans
    N = n + 2 * M
    pmax = M - 1
    pans = [(int(np.clip(dx, -pmax, pmax)), int(np.clip(dy, -pmax, pmax))) for dx, dy in (spec.pan or [(0, 0)] * spec.n_frames)]
    step = min(0.5, 0.9 * carm.pixel_mm_iso)
    vs = _vessels(tree, lesions, step)
    times = np.arange(spec.n_frames) * spec.frame_time_ms / 1000.0
    ks = cardiac_k(times, spec.heart_rate, spec.phase0)
    return RunGeometry(carm, base, M, N, pans, step, vs, times, ks)


def field_mask(spec: RunSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The collimated field of a run's frames, float32 (n, n) 0..1 (round field or
    rectangular shutters, shutter blades, semi-transparent wedge filters), and the radius
    of each pixel centre from the image centre (fraction of the width, for the vignette)."""
    ii, jj = np.mgrid[0:n, 0:n]
    rr = np.hypot((jj - n / 2 + 0.5) / n, (ii - n / 2 + 0.5) / n)
    if spec.collimation == "circle":
        rad, cdx, cdy = spec.collim[0], spec.collim[1], spec.collim[2]
        dist = np.hypot((jj + 0.5) / n - 0.5 - cdx, (ii + 0.5) / n - 0.5 - cdy)
        fm = _smoothstep((rad - dist) * n / 2.0 + 0.5)
    elif spec.collimation == "rect":
        l, r, t_, b = spec.collim[:4]
        x = (jj + 0.5) / n
        y = (ii + 0.5) / n
        fm = (
            _smoothstep((x - l) * n / 2 + 0.5)
            * _smoothstep((1 - r - x) * n / 2 + 0.5)
            * _smoothstep((y - t_) * n / 2 + 0.5)
            * _smoothstep((1 - b - y) * n / 2 + 0.5)
        )
    else:
        fm = np.ones((n, n))
    for th, dist, trans in spec.blades:  # shutter blades (trans 0) and wedge filters (trans > 0)
        proj = ((jj + 0.5) / n - 0.5) * np.cos(th) + ((ii + 0.5) / n - 0.5) * np.sin(th)
        cover = _smoothstep((proj - dist) * n / 3.0 + 0.5)
        fm = fm * (1 - (1 - trans) * cover)
    return fm.astype(np.float32), rr


def concentration(vs: _VesselSet, spec: RunSpec, t: float) -> np.ndarray:
    t_arr = spec.t_inj + vs.s / spec.v_fill
    c_in = _smoothstep((t - t_arr) / spec.tau_in + 0.5)
    t_clear = spec.t_inj + spec.inj_dur + vs.s / spec.v_wash
    c_out = 1.0 - _smoothstep((t - t_clear) / spec.tau_out + 0.5)
    return c_in * c_out * vs.filled


def frame_label(side: str, fill: float, cmax: float, contrast: float, shake: float, min_contrast: float = 0.6) -> str:
    """``_other`` without contrast in the tree; ``_better`` when >= 85% of the tree is
    opacified at a normal iodine strength (``contrast >= min_contrast``: the spec's
    ``better_contrast``, 0.6 narrow / 0.4 wide) without motion; else ``_bad``."""
    if cmax < 0.08:
        return f"{side}_other"
    if fill >= 0.85 and contrast >= min_contrast and shake < 1.0:
        return f"{side}_better"
    return f"{side}_bad"


def run_labels(anatomy: Anatomy, lesions: list[Lesion], spec: RunSpec) -> tuple[list[str], list[float], list[float]]:
    """Frame labels (and per-frame fill fraction, max concentration) without rendering."""
    carm = CArm(spec.primary, spec.secondary, spec.sid, spec.sod, spec.fov_mm, spec.size)
    step = min(0.5, 0.9 * carm.pixel_mm_iso)
    vs = _vessels(anatomy.tree(spec.side), lesions, step)
    seg_len = vs.step * (vs.radius >= 0.45) * vs.filled  # occluded (never-filling) parts do not count
    labels, fills, cmaxs = [], [], []
    for f in range(spec.n_frames):
        t = f * spec.frame_time_ms / 1000.0
        conc = concentration(vs, spec, t)
        fill = float((np.minimum(conc / 0.8, 1.0) * seg_len).sum() / max(seg_len.sum(), 1e-9))
        cmax = float(conc.max()) if len(conc) else 0.0
        fills.append(fill)
        cmaxs.append(cmax)
        labels.append(frame_label(spec.side, fill, cmax, spec.contrast, spec.shake[f] if spec.shake else 0.0, spec.better_contrast))
    return labels, fills, cmaxs


def render_frames(
    anatomy: Anatomy,
    lesions: list[Lesion],
    spec: RunSpec,
    rng: np.random.Generator,
    bits: int = 8,
) -> tuple[np.ndarray, list[str], dict]:
    """Render a run: (frames (F, H, W), frame labels, meta).  ``bits`` 8 -> uint8 frames;
    10 or 12 -> uint16 frames with that many stored bits (same image, finer grey levels)."""
    if bits not in (8, 10, 12):
        raise ValueError(f"bits must be 8, 10 or 12, not {bits}")
    vmax = float(2**bits - 1)
    heart = anatomy.heart
    n = spec.size
    geo = run_geometry(anatomy, lesions, spec)  # shared with the per-pixel targets (targets.py)
    carm, M, N, pans, step, vs = geo.carm, geo.margin, geo.canvas, geo.pans, geo.step, geo.vs

    # static background on the canvas (full res), heart shadow per frame at low res
    bg = _body_background(carm, heart, N, M, np.random.default_rng(rng.integers(2**32)), spec)
    n_lo = max(32, N // 4)
    big = _scaled(carm, N, n_lo)
    S_lo, dirs_lo = big.rays(n_lo)

    cath = catheter_path(heart, spec.side, np.random.default_rng(rng.integers(2**32)), spec.approach)
    cath = resample(cath, step * 2)
    ost = cath[-1]
    d_tip = np.linalg.norm(cath - ost, axis=1)
    w_tip = np.exp(-d_tip / 40.0)[:, None]
    ost_local = heart.to_local(ost[None])[0]
    wire = wire_r = wire_c = None
    wire_step = step
    if spec.device:
        wire, wire_r, wire_c = _device_path(anatomy.tree(spec.side), spec, heart, ost_local, wire_step)
    # implanted hardware (sternal wires, clips, pacing lead): static, from its own seed
    hw_layer = hardware_layer(anatomy, carm, N, M, spec.blur * n / 512)
    ao = heart.to_patient(heart.ao_local)
    reflux_pts = ao + np.random.default_rng(rng.integers(2**32)).normal(0, 5.0, (6, 3)) + 0.4 * (ost - ao)
    visible = (vs.radius >= 0.45) & vs.filled  # occluded (never-filling) parts do not count
    seg_len = vs.step * visible
    # wide vessels need fewer samples: keep every m-th (weight m) where sigma >> step
    sig0 = np.sqrt(np.maximum(0.627 * vs.radius * carm.magnification / carm.pixel_mm, 0.55) ** 2 + (spec.blur * n / 512) ** 2)
    mult = np.maximum(1, np.floor(sig0 / (vs.step * carm.magnification / carm.pixel_mm))).astype(np.int64)
    keep = (vs.pos % mult) == 0
    mult = np.minimum(mult, vs.left)  # the last kept sample of a branch stands only for its own

    times, ks = geo.times, geo.ks
    frames = np.empty((spec.n_frames, n, n), np.uint8 if bits == 8 else np.uint16)
    labels, fills, cmaxs = [], [], []

    # display window from the background (frame 0, inside the field)
    fmask, rr = field_mask(spec, n)
    vign = (1 - spec.vignette * (rr / 0.5) ** 2).astype(np.float32)
    lo = hi = None
    noise_rng = np.random.default_rng(rng.integers(2**32))
    # a few noise fields per run, re-used with random shifts (cheap, still uncorrelated-looking)
    # detector blur: folded into the vessel Gaussians and pre-applied to the noise fields
    blur_px = spec.blur * n / 512
    pool = []
    for _ in range(3):
        z = noise_rng.standard_normal((n, n), dtype=np.float32)
        if blur_px > 0.3:
            zb = gauss_blur_small(z, blur_px)
            z = zb * np.float32(1.0 / max(float(zb.std()), 1e-6) * (1.0 / (1.0 + 0.5 * blur_px)))
        pool.append(z)
    out_gain = (vign * fmask).astype(np.float32)
    out_bias = ((1 - fmask) * 4.0).astype(np.float32)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** spec.gamma + 0.5, 0, 255).astype(np.uint8)
    heart_cache: dict = {}
    from PIL import ImageFilter

    for f, t in enumerate(times):
        k = float(ks[f])
        # geometry at this phase
        conc = concentration(vs, spec, t)
        fill = float((np.minimum(conc / 0.8, 1.0) * seg_len).sum() / max(seg_len.sum(), 1e-9))
        cmax = float(conc.max()) if len(conc) else 0.0
        fills.append(fill)
        cmaxs.append(cmax)
        labels.append(frame_label(spec.side, fill, cmax, spec.contrast, spec.shake[f] if spec.shake else 0.0, spec.better_contrast))

        kq = round(k * 20) / 20
        if kq not in heart_cache:
            hs = _heart_shadow(S_lo, dirs_lo, heart, kq).astype(np.float32)
            heart_cache[kq] = np.asarray(Image.fromarray(hs, mode="F").resize((N, N), Image.BILINEAR))
        iod = np.zeros((N, N), np.float32)
        m = conc > 0.01
        m &= keep
        if m.any():
            pts = heart.to_patient(deform(vs.local[m], heart, k))
            cx, cy, mag = carm.project(pts)
            sig, amp = tube_amplitudes(vs.radius[m], conc[m] * spec.contrast, vs.step, mag, carm.pixel_mm, blur=blur_px)
            iod += splat((N, N), cx + M, cy + M, sig, amp * mult[m])
        # catheter (radio-opaque wall, filled with contrast while injecting); tip follows the heart
        shift = heart.to_patient(deform(ost_local[None], heart, k))[0] - ost
        cpts = cath + w_tip * shift
        inj = float(_smoothstep((t - spec.t_inj) / 0.1 + 0.5) * (1 - _smoothstep((t - spec.t_inj - spec.inj_dur) / 0.1 + 0.5)))
        cx, cy, mag = carm.project(cpts)
        sig, amp = tube_amplitudes(np.full(len(cpts), 1.0), 0.75 + 0.5 * inj * spec.contrast, step * 2, mag, carm.pixel_mm, blur=blur_px)
        if spec.catheter:
            iod += splat((N, N), cx + M, cy + M, sig, amp)
        if wire is not None:
            wpts = heart.to_patient(deform(wire, heart, k))
            cx, cy, mag = carm.project(wpts)
            sig, amp = tube_amplitudes(wire_r, wire_c, wire_step, mag, carm.pixel_mm, min_sigma=0.45, blur=blur_px)
            iod += splat((N, N), cx + M, cy + M, sig, amp)
        if spec.reflux > 0 and inj > 0:  # contrast spilling back into the aortic sinus
            cx, cy, mag = carm.project(reflux_pts + shift)
            sig = np.full(len(cx), 14.0 * n / 512)
            iod += splat((N, N), cx + M, cy + M, sig, np.full(len(cx), spec.reflux * inj * spec.contrast * 0.35))
        if hw_layer is not None:
            iod += hw_layer
        dx, dy = pans[f]
        sl = (slice(M - dy, M - dy + n), slice(M - dx, M - dx + n))
        if lo is None:
            A0 = bg[sl] + heart_cache[kq][sl]
            inside = A0[fmask > 0.5] if (fmask > 0.5).any() else A0.ravel()
            lo, hi = np.percentile(inside, [2.0, 99.0])
            hi = max(hi, lo + 0.3)
            inv = np.float32(1.0 / (hi - lo))
        # log-domain signal; the window comes from the background, iodine adds on top
        An = (bg[sl] + heart_cache[kq][sl] - np.float32(lo)) * inv
        An += np.float32(K_IODINE) * iod[sl]
        if spec.intensity == "lin":
            val = np.exp(np.float32(-1.6) * An)
            val = (val - np.float32(np.exp(-1.6))) * np.float32(1 / (1 - np.exp(-1.6)))
        else:
            val = np.float32(1.0) - An
        D = np.float32(spec.black) + np.float32(spec.white - spec.black) * val
        # quantum noise: stronger where fewer photons reach the detector (dense, dark areas)
        nz = np.roll(pool[f % 3], (int(noise_rng.integers(n)), int(noise_rng.integers(n))), axis=(0, 1))
        D += nz * (np.float32(spec.noise) * (np.float32(1.0) + np.float32(0.8) * np.clip(An, 0, 2.5)))
        D = D * out_gain + out_bias
        if bits != 8:  # high bit depth: the same processing in floating point
            frames[f] = _finish_high(D * np.float32(vmax / 255.0), spec, f, n, vmax)
            continue
        img = Image.fromarray(np.clip(D + 0.5, 0, 255).astype(np.uint8), mode="L")
        fr = np.asarray(img)
        if spec.edge > 0:  # edge enhancement (unsharp mask with a box kernel)
            lowp = np.asarray(img.filter(ImageFilter.BoxBlur(max(1, int(round(2.5 * n / 512))))), np.float32)
            fr = np.clip(fr + np.float32(spec.edge) * (fr - lowp) + 0.5, 0, 255).astype(np.uint8)
        if spec.shake and spec.shake[f] >= 1.0:
            sh = int(round(spec.shake[f]))
            ang = spec.pan_angle
            acc = np.zeros((n, n), np.float32)
            for j in range(sh):
                o = j - sh // 2
                acc += np.roll(fr, (int(round(o * np.sin(ang))), int(round(o * np.cos(ang)))), axis=(0, 1))
            fr = (acc / sh + 0.5).astype(np.uint8)
        frames[f] = lut[fr] if spec.gamma != 1.0 else fr

    meta = {
        "view": spec.view,
        "primary_angle": round(spec.primary, 1),
        "secondary_angle": round(spec.secondary, 1),
        "frame_time_ms": spec.frame_time_ms,
        "fill": [round(x, 3) for x in fills],
        "cmax": [round(x, 3) for x in cmaxs],
        "cardiac_k": [round(float(x), 3) for x in ks],
        "spec": spec.to_dict(),
        "anatomy": json_params(anatomy),
    }
    return frames, labels, meta


def json_params(anatomy: Anatomy) -> dict:
    """The anatomy's randomisation parameters (vessel scale, tortuosity, hardware), a copy."""
    p = dict(anatomy.params)
    p["hardware"] = dict(anatomy.hardware)
    return p


# ----------------------------------------------------------------------------- hardware

STEEL = 7.0  # iodine-equivalent strength of stainless steel (sternal wires, clips)


def hardware_geometry(anatomy: Anatomy) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Implanted hardware of a patient as tubes: [(points (n,3) patient mm, radius (n,),
    strength (n,), step mm)], from ``anatomy.hardware`` (counts and a seed: the same
    geometry in every run of the patient)."""
    hw = anatomy.hardware
    if not (hw.get("sternal_wires") or hw.get("clips") or hw.get("lead")):
        return []
    rng = np.random.default_rng([int(hw.get("seed", 0)), 1729])
    heart = anatomy.heart
    hz = float(heart.center[2])
    ao = heart.to_patient(heart.ao_local)
    out = []
    step = 0.3
    n_w = int(hw.get("sternal_wires") or 0)
    if n_w:  # sternotomy wires: loops round the two sternal halves, twisted at the front
        zs = np.linspace(hz + 118, hz - 45, n_w) + rng.normal(0, 4, n_w)
        x0 = rng.normal(0, 3)
        for z in zs:
            loops = 2 if rng.random() < 0.3 else 1  # figure-of-eight in some
            for j in range(loops):
                a, b = rng.uniform(9, 14), rng.uniform(5, 8)
                tilt = np.deg2rad(rng.uniform(15, 60)) * (1 if j == 0 else -1)
                u = np.linspace(0, 2 * np.pi, int(2 * np.pi * a / step) + 1)
                loc = np.stack([a * np.cos(u), b * np.sin(u), np.zeros_like(u)], 1)
                c, sn = np.cos(tilt), np.sin(tilt)
                loc = loc @ np.array([[1, 0, 0], [0, c, sn], [0, -sn, c]])  # about the x axis
                ctr = np.array([x0 + rng.normal(0, 1.5), -118.0 + rng.normal(0, 1.5), z + (j - 0.5 * (loops - 1)) * 9])
                pts = ctr + loc
                out.append((pts, np.full(len(pts), 0.45), np.full(len(pts), STEEL), step))
            # the twisted ends: two strands wound round each other, pointing anterior-lateral
            p0 = ctr + np.array([rng.normal(0, 3), -b, 0.0])
            d = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 1.0), -rng.uniform(0.3, 0.8), rng.uniform(-0.4, 0.4)])
            d /= np.linalg.norm(d)
            e1 = np.cross(d, [0.0, 0.0, 1.0])
            e1 /= np.linalg.norm(e1) + 1e-9
            e2 = np.cross(d, e1)
            t = np.arange(0, rng.uniform(6, 11), step / 2)[:, None]
            for ph in (0.0, np.pi):
                w = 2 * np.pi * t / 1.8 + ph
                pts = p0 + d * t + 0.5 * (np.cos(w) * e1 + np.sin(w) * e2)
                out.append((pts, np.full(len(pts), 0.45), np.full(len(pts), STEEL), step / 2))
    n_c = int(hw.get("clips") or 0)
    if n_c:  # surgical clips: along the internal mammary (LIMA) bed, or round the heart
        top = np.array([38.0, -105.0, hz + 150])
        lad = heart.to_patient(heart.surf(0.35 * heart.L, heart.phi_aiv, 4.0))
        for _ in range(n_c):
            if rng.random() < 0.6:
                c = top + rng.uniform(0, 1) * (lad - top) + rng.normal(0, 4, 3)
            else:
                c = heart.to_patient(heart.surf(rng.uniform(-5, 0.6 * heart.L), rng.uniform(0, 360), 5.0))
            e = _rand_unit(rng)
            f = np.cross(e, _rand_unit(rng))
            f /= np.linalg.norm(f) + 1e-9
            half = np.deg2rad(rng.uniform(2, 12))
            length = rng.uniform(4.5, 7.5)
            t = np.arange(0, length, 0.2)[:, None]
            r_c = rng.uniform(0.3, 0.4)
            for sg in (-1, 1):  # the two jaws of a V-shaped clip, joined at the hinge
                leg = c + t * (np.cos(half) * e + sg * np.sin(half) * f)
                out.append((leg, np.full(len(leg), r_c), np.full(len(leg), STEEL), 0.2))
    lead = hw.get("lead") or ""
    if lead:  # transvenous lead: left subclavian -> SVC -> RA -> RV apex (and an RA lead)
        tip = heart.to_patient(heart.surf(0.82 * heart.L, heart.phi_aiv - 35 + rng.normal(0, 8), -10.0))
        rv_mid = heart.to_patient(heart.surf(0.45 * heart.L, heart.phi_aiv - 75, -16.0))
        tric = heart.to_patient(heart.surf(2.0, heart.phi_aiv - 115, -16.0))
        j = lambda s=4.0: rng.normal(0, s, 3)  # noqa: E731
        venous = [ao + np.array([125, -35, 160]), ao + np.array([70, -18, 128]) + j(), ao + np.array([15, -5, 105]) + j(),
                  ao + np.array([-28, 0, 70]) + j(), ao + np.array([-34, 5, 25]) + j()]
        ra = ao + np.array([-42, 12, -12]) + j()
        leads = [(venous + [ra, tric, rv_mid, tip], "rv")]
        if rng.random() < 0.5:  # dual chamber: a J-shaped atrial lead into the RA appendage
            leads.append((venous[:-1] + [ao + np.array([-38, 8, -28]) + j(), ao + np.array([-30, -18, -5]) + j(2),
                                         ao + np.array([-24, -24, 6]) + j(2)], "ra"))
        for ctrl, kind in leads:
            pts = catmull_rom(np.asarray(ctrl), step=0.5)
            s = np.arange(len(pts))[::-1] * 0.5  # distance from the tip
            r = np.full(len(pts), 0.9)
            c = np.full(len(pts), 2.2)
            if lead == "icd" and kind == "rv":  # shock coils: RV and SVC
                for lo, hi in ((12.0, 62.0), (150.0, 210.0)):
                    m = (s > lo) & (s < hi)
                    r[m], c[m] = 1.3, 4.5
            tipm = s < 6.0
            r[tipm], c[tipm] = 1.2, 5.0
            out.append((pts, r, c, 0.5))
    return out


def hardware_layer(anatomy: Anatomy, carm: CArm, canvas: int, margin: int, blur_px: float) -> Optional[np.ndarray]:
    """The static hardware of ``anatomy`` splatted on the (canvas x canvas) image in iodine
    units (added to the iodine image every frame), or None without hardware."""
    geo = hardware_geometry(anatomy)
    if not geo:
        return None
    pts = np.vstack([g[0] for g in geo])
    rad = np.concatenate([g[1] for g in geo])
    conc = np.concatenate([g[2] for g in geo])
    stp = np.concatenate([np.full(len(g[0]), g[3]) for g in geo])
    cx, cy, mag = carm.project(pts)
    sig, amp = tube_amplitudes(rad, conc, stp, mag, carm.pixel_mm, min_sigma=0.45, blur=blur_px)
    return splat((canvas, canvas), cx + margin, cy + margin, sig, amp)


def _finish_high(D: np.ndarray, spec: RunSpec, f: int, n: int, vmax: float) -> np.ndarray:
    D = np.clip(D, 0, vmax)
    if spec.edge > 0:
        D = D + np.float32(spec.edge) * (D - box_blur(D, max(1, int(round(2.5 * n / 512)))))
    if spec.shake and spec.shake[f] >= 1.0:
        sh = int(round(spec.shake[f]))
        acc = np.zeros_like(D)
        for j in range(sh):
            o = j - sh // 2
            acc += np.roll(D, (int(round(o * np.sin(spec.pan_angle))), int(round(o * np.cos(spec.pan_angle)))), axis=(0, 1))
        D = acc / sh
    D = np.clip(D, 0, vmax)
    if spec.gamma != 1.0:
        D = vmax * (D / vmax) ** spec.gamma
    return (D + 0.5).astype(np.uint16)


def render_run(
    seed: int | np.random.Generator = 0,
    side: str | None = None,
    size: int = 256,
    n_frames: int = 30,
    *,
    anatomy: Anatomy | None = None,
    lesions: list[Lesion] | None = None,
    view: tuple | None = None,
    quality: str | None = None,
    spec: RunSpec | None = None,
    bits: int = 8,
    domain: str = "wide",
) -> tuple[np.ndarray, list[str], dict]:
    """Fast in-memory API: one synthetic run without DICOM I/O.

    Returns ``(frames uint8 (n_frames, size, size), frame_labels, meta)``; labels are
    names from ``inference.types.CLASS_NAMES``; meta has the view, per-frame fill, the
    side, lesions, the run spec and the anatomy's randomisation.  Deterministic for an
    integer seed.  ``domain``: "wide" (domain randomisation, default) or "narrow" (the
    original generator)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if anatomy is None:
        anatomy = sample_anatomy(rng, domain=domain)
        if lesions is None:
            from .lesions import sample_lesions

            lesions = sample_lesions(anatomy, rng)
    lesions = lesions or []
    if side is None:
        side = "LCA" if rng.random() < 0.6 else "RCA"
    if spec is None:
        spec = sample_run_spec(rng, side, size=size, n_frames=n_frames, view=view, quality=quality, domain=domain)
    frames, labels, meta = render_frames(anatomy, lesions, spec, rng, bits=bits)
    assert all(lab in CLASS_NAMES for lab in labels)
    meta["side"] = side
    meta["lesions"] = [l.finding() for l in lesions if l.side == side]
    return frames, labels, meta
