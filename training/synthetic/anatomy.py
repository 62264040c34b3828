"""Coronary anatomy as 3-D centreline trees with radii, in a heart frame.

Heart frame: ``w`` along the long axis (base -> apex), ``a`` (anterior-ish) and ``s``
(towards the LV, patient's left-ish) across it.  Azimuth ``phi`` is measured from
``a`` towards ``s``.  The anterior interventricular groove (LAD) lies at ``phi_aiv``
(anterior-left), the posterior one (PDA) at ``phi_aiv + 180`` (inferior wall), the
atrioventricular groove is the ring ``w ~ 0`` (RCA on the right half, LCx on the left).

Everything is generated from a numpy ``Generator`` so a seed gives the same anatomy.
AHA segment numbers (1-15) are attached per centreline sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STEP_MM = 0.5  # sampling of the stored centrelines


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def catmull_rom(ctrl: np.ndarray, step: float = STEP_MM) -> np.ndarray:
    """Smooth centripetal Catmull-Rom curve through control points, resampled at ``step`` mm
    (centripetal knots: no loops or cusps with unevenly spaced points)."""
    ctrl = np.asarray(ctrl, float)
    keep = np.concatenate([[True], np.linalg.norm(np.diff(ctrl, axis=0), axis=1) > 1e-6])
    ctrl = ctrl[keep]
    if len(ctrl) < 2:
        return ctrl.copy()
    p = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    dense = []
    for i in range(1, len(p) - 2):
        P0, P1, P2, P3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        t0 = 0.0
        t1 = t0 + max(np.linalg.norm(P1 - P0), 1e-6) ** 0.5
        t2 = t1 + max(np.linalg.norm(P2 - P1), 1e-6) ** 0.5
        t3 = t2 + max(np.linalg.norm(P3 - P2), 1e-6) ** 0.5
        n = max(4, int(np.linalg.norm(P2 - P1) / (step * 0.5)) + 1)
        t = np.linspace(t1, t2, n, endpoint=False)[:, None]
        A1 = (t1 - t) / (t1 - t0) * P0 + (t - t0) / (t1 - t0) * P1
        A2 = (t2 - t) / (t2 - t1) * P1 + (t - t1) / (t2 - t1) * P2
        A3 = (t3 - t) / (t3 - t2) * P2 + (t - t2) / (t3 - t2) * P3
        B1 = (t2 - t) / (t2 - t0) * A1 + (t - t0) / (t2 - t0) * A2
        B2 = (t3 - t) / (t3 - t1) * A2 + (t - t1) / (t3 - t1) * A3
        dense.append((t2 - t) / (t2 - t1) * B1 + (t - t1) / (t2 - t1) * B2)
    dense.append(p[-2][None])
    return resample(np.vstack(dense), step)


def resample(pts: np.ndarray, step: float) -> np.ndarray:
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return pts[:1].copy()
    n = max(2, int(np.ceil(s[-1] / step)) + 1)
    t = np.linspace(0, s[-1], n)
    return np.stack([np.interp(t, s, pts[:, k]) for k in range(3)], axis=1)


def arclen(pts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])


@dataclass
class Branch:
    name: str
    pts: np.ndarray  # (n,3) heart-local (w, a, s) mm
    radius: np.ndarray  # (n,) mm
    segment: np.ndarray  # (n,) AHA segment (0 = unnumbered)
    parent: int = -1  # index of the parent branch in the tree
    parent_idx: int = 0  # sample index on the parent where it starts
    s0: float = 0.0  # path length from the ostium to this branch's first sample

    @property
    def s(self) -> np.ndarray:
        return self.s0 + arclen(self.pts)


@dataclass
class Tree:
    side: str  # "LCA" | "RCA"
    branches: list[Branch]

    def index(self, name: str) -> int:
        for i, b in enumerate(self.branches):
            if b.name == name:
                return i
        raise KeyError(name)

    def children(self, i: int) -> list[int]:
        return [j for j, b in enumerate(self.branches) if b.parent == i]

    def descendants(self, i: int) -> list[int]:
        out, todo = [], self.children(i)
        while todo:
            j = todo.pop()
            out.append(j)
            todo.extend(self.children(j))
        return out


@dataclass
class Heart:
    """The heart frame in patient coordinates and the surface shape."""

    center: np.ndarray  # base centre (patient mm, isocentre origin)
    e_w: np.ndarray
    e_a: np.ndarray
    e_s: np.ndarray
    L: float  # base -> apex length
    Rm: float  # max radius
    w0: float  # position of max radius
    phi_aiv: float  # degrees
    dominance: str = "right"
    ao_local: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def basis(self) -> np.ndarray:
        return np.stack([self.e_w, self.e_a, self.e_s])  # rows

    def to_patient(self, local: np.ndarray) -> np.ndarray:
        return self.center + local @ self.basis

    def to_local(self, pts: np.ndarray) -> np.ndarray:
        return (pts - self.center) @ self.basis.T

    def radius_at(self, w) -> np.ndarray:
        w = np.asarray(w, float)
        lo = 1 - ((w - self.w0) / (self.w0 + 18.0)) ** 2
        hi = 1 - ((w - self.w0) / (self.L - self.w0)) ** 2
        f = np.where(w < self.w0, lo, hi)
        return self.Rm * np.sqrt(np.clip(f, 0.0025, 1.0))

    def surf(self, w, phi_deg, h=1.5) -> np.ndarray:
        w = np.asarray(w, float)
        ph = np.deg2rad(np.asarray(phi_deg, float))
        r = self.radius_at(w) + h
        return np.stack([w, r * np.cos(ph), r * np.sin(ph)], axis=-1)


def sample_heart(rng: np.random.Generator) -> Heart:
    # long axis: towards the patient's left, anterior and inferior (LPS: +x, -y, -z)
    e_w = _unit([0.62 + rng.normal(0, 0.06), -0.55 + rng.normal(0, 0.06), -0.50 + rng.normal(0, 0.07)])
    ant = np.array([0.0, -1.0, 0.0])
    e_a = _unit(ant - (ant @ e_w) * e_w)
    e_s = _unit(np.cross(e_w, e_a))
    if e_s[0] < 0:
        e_s = -e_s
    L = rng.uniform(80, 98)
    # base centre placed so that the heart's centre sits near the isocentre
    mid = np.array([rng.normal(0, 8), rng.normal(0, 8), rng.normal(0, 8)])
    center = mid - e_w * L * 0.42
    # azimuth of the anterior interventricular groove: the septum is seen edge-on in LAO ~45
    lao = _unit([1.0, -1.0, 0.0])
    phi_aiv = np.rad2deg(np.arctan2(lao @ e_s, lao @ e_a)) + rng.normal(0, 6)
    heart = Heart(
        center=center,
        e_w=e_w,
        e_a=e_a,
        e_s=e_s,
        L=L,
        Rm=rng.uniform(44, 52),
        w0=L * rng.uniform(0.27, 0.33),
        phi_aiv=float(phi_aiv),
        dominance="left" if rng.random() < 0.12 else "right",
    )
    # aortic root (sinus level): anterior-superior and to the right of the LV base, level with
    # the top of the tilted AV ring so the RCA drops straight into the right AV groove
    ao = center + np.array([7.0, -12.0, 16.0]) + rng.normal(0, 2.5, 3)
    heart.ao_local = heart.to_local(ao[None])[0]
    return heart


def ostium_local(heart: Heart, side: str) -> np.ndarray:
    """Coronary ostium in heart-local coordinates (left: left-posterior sinus; right: anterior)."""
    ao = heart.to_patient(heart.ao_local)
    if side == "LCA":
        d = _unit([1.0, 0.15, 0.1])
    else:
        d = _unit([-0.45, -1.0, -0.05])
    return heart.to_local(ao + 13.0 * d)


def _wiggle(rng, n, amp):
    k = rng.uniform(1.5, 4.0)
    ph = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 1, n)
    return amp * np.sin(2 * np.pi * k * t + ph)


def _taper(n, r0, r1, power=1.0):
    t = np.linspace(0, 1, n) ** power
    return r0 + (r1 - r0) * t


def _surface_branch(heart, rng, ws, phis, h=1.5, wig=2.0):
    ws = np.asarray(ws, float)
    phis = np.asarray(phis, float) + _wiggle(rng, len(ws), wig)
    return heart.surf(ws, phis, h)


def _along(parent: np.ndarray, frac: float) -> int:
    return int(np.clip(round(frac * (len(parent) - 1)), 0, len(parent) - 1))


def build_lca(heart: Heart, rng: np.random.Generator) -> Tree:
    L, pa = heart.L, heart.phi_aiv
    br: list[Branch] = []
    ost = ostium_local(heart, "LCA")
    # --- left main: ostium -> bifurcation towards the left AV groove
    ring_lm = heart.surf(2.0, pa + 32 + rng.normal(0, 6), 3.0)
    lm_len = rng.uniform(8, 15)
    bif = ost + _unit(ring_lm - ost) * lm_len
    lm = catmull_rom([ost, (ost + bif) / 2 + rng.normal(0, 1, 3), bif])
    r_lm = rng.uniform(2.0, 2.5)
    br.append(Branch("LM", lm, np.full(len(lm), r_lm), np.full(len(lm), 5)))

    # --- LAD: from the bifurcation round the pulmonary trunk into the anterior groove to the apex
    ws = np.linspace(12, L * 0.96, 8)
    ctrl = [bif, heart.surf(5.0, pa + 12, 2.5)]
    ctrl += list(_surface_branch(heart, rng, ws, pa + rng.normal(0, 3) + np.linspace(0, rng.normal(0, 8), len(ws)), 1.5, 2.5))
    if rng.random() < 0.6:  # wraps round the apex
        ctrl += list(heart.surf([L + 3.0, L - 8.0], [pa + 90, pa + 170], 2.0))
    lad = catmull_rom(ctrl)
    r_lad = _taper(len(lad), r_lm * rng.uniform(0.78, 0.88), rng.uniform(0.55, 0.75), 0.8)
    seg = np.full(len(lad), 8)
    br.append(Branch("LAD", lad, r_lad, seg, parent=0, parent_idx=len(lm) - 1))
    i_lad = 1
    lad_w = lad[:, 0]

    # diagonals over the LV free wall
    n_d = rng.choice([2, 3], p=[0.55, 0.45])
    d_ws = np.sort(rng.uniform(0.12, 0.55, n_d)) * L
    d_ws[0] = max(d_ws[0], 10)
    for k, wd in enumerate(d_ws):
        j = int(np.argmin(np.abs(lad_w - wd) + 1e6 * (np.arange(len(lad)) > len(lad) * 0.8)))
        length = rng.uniform(40, 65) * (1.0 - 0.2 * k)
        ws = np.linspace(wd, min(wd + length * 0.8, L * 0.9), 6)
        phis = pa + np.linspace(0, rng.uniform(45, 75), 6)
        d_pts = catmull_rom([lad[j]] + list(_surface_branch(heart, rng, ws[1:], phis[1:], 1.5, 3)))
        r0 = r_lad[j] * rng.uniform(0.6, 0.75)
        br.append(Branch(f"D{k + 1}", d_pts, _taper(len(d_pts), r0, 0.35), np.full(len(d_pts), 9 if k == 0 else 10 if k == 1 else 0), parent=i_lad, parent_idx=j))
    # LAD segments: 6 until the first septal/D1, 7 until D2, 8 beyond
    j1 = br[2].parent_idx
    j2 = br[3].parent_idx if n_d > 1 else int(len(lad) * 0.6)
    seg[: j1 + 1] = 6
    seg[j1 + 1 : j2 + 1] = 7

    # septal perforators: into the septum (inwards, towards the apex)
    n_s = rng.integers(3, 6)
    for k, ws_ in enumerate(np.sort(rng.uniform(0.1, 0.6, n_s)) * L):
        j = int(np.argmin(np.abs(lad_w[: int(len(lad) * 0.8)] - ws_)))
        p0 = lad[j]
        radial = np.array([0.0, p0[1], p0[2]])
        radial /= np.linalg.norm(radial) + 1e-9
        dirn = _unit(-radial * rng.uniform(0.6, 0.9) + np.array([1.0, 0, 0]) * rng.uniform(0.4, 0.8))
        length = rng.uniform(18, 35)
        ctrl = [p0 + dirn * t + rng.normal(0, 1.0, 3) * (t > 0) for t in np.linspace(0, length, 4)]
        sp = catmull_rom(ctrl)
        br.append(Branch(f"S{k + 1}", sp, _taper(len(sp), rng.uniform(0.5, 0.75), 0.3), np.zeros(len(sp), int), parent=i_lad, parent_idx=j))

    # --- LCx along the left AV groove
    phi_end = pa + (rng.uniform(175, 190) if heart.dominance == "left" else rng.uniform(110, 150))
    phis = np.linspace(pa + 55, phi_end, 8)
    ws = np.linspace(0, 6, 8) + rng.normal(0, 1.5, 8)
    lcx = catmull_rom([bif] + list(_surface_branch(heart, rng, ws, phis, 3.0, 2.0)))
    r_lcx = _taper(len(lcx), r_lm * rng.uniform(0.7, 0.82), 0.9 if heart.dominance == "left" else 0.6)
    seg_cx = np.full(len(lcx), 13)
    br.append(Branch("LCx", lcx, r_lcx, seg_cx, parent=0, parent_idx=len(lm) - 1))
    i_cx = len(br) - 1
    # obtuse marginals down the lateral wall
    n_om = rng.choice([1, 2, 3], p=[0.25, 0.5, 0.25])
    fr = np.sort(rng.uniform(0.2, 0.85, n_om))
    for k, f in enumerate(fr):
        j = _along(lcx, f)
        w0, ph0 = lcx[j, 0], np.rad2deg(np.arctan2(lcx[j, 2], lcx[j, 1]))
        length = rng.uniform(45, 75)
        ws = np.linspace(w0, min(w0 + length, L * 0.85), 6)
        phis = ph0 + np.linspace(0, rng.uniform(-15, 10), 6)
        om = catmull_rom([lcx[j]] + list(_surface_branch(heart, rng, ws[1:], phis[1:], 1.5, 3)))
        r0 = r_lcx[j] * rng.uniform(0.65, 0.85)
        br.append(Branch(f"OM{k + 1}", om, _taper(len(om), r0, 0.35), np.full(len(om), 12 if k == 0 else 0), parent=i_cx, parent_idx=j))
    j_om = br[i_cx + 1].parent_idx
    seg_cx[: j_om + 1] = 11
    if heart.dominance == "left":
        # LCx gives the PDA (segment 15) down the posterior groove and a PL (14)
        crux = lcx[-1]
        ws = np.linspace(crux[0], L * 0.75, 6)
        pda = catmull_rom([crux] + list(_surface_branch(heart, rng, ws[1:], np.full(5, pa + 180), 1.5, 2)))
        br.append(Branch("PDA", pda, _taper(len(pda), r_lcx[-1] * 0.9, 0.35), np.full(len(pda), 15), parent=i_cx, parent_idx=len(lcx) - 1))
        j = _along(lcx, 0.9)
        ws = np.linspace(lcx[j, 0], lcx[j, 0] + 40, 5)
        ph0 = np.rad2deg(np.arctan2(lcx[j, 2], lcx[j, 1]))
        pl = catmull_rom([lcx[j]] + list(_surface_branch(heart, rng, ws[1:], np.full(4, ph0), 1.5, 3)))
        br.append(Branch("PL", pl, _taper(len(pl), 0.9, 0.35), np.full(len(pl), 14), parent=i_cx, parent_idx=j))
    tree = Tree("LCA", br)
    add_twigs(tree, heart, rng, int(rng.integers(8, 16)))
    return _finish(tree)


def build_rca(heart: Heart, rng: np.random.Generator) -> Tree:
    L, pa = heart.L, heart.phi_aiv
    br: list[Branch] = []
    ost = ostium_local(heart, "RCA")
    crux_phi = pa - 180 + rng.normal(0, 5)
    right_dom = heart.dominance == "right"
    phi_end = crux_phi if right_dom else pa - rng.uniform(110, 140)
    phis = np.linspace(pa - 55, phi_end, 10)
    ws = np.linspace(-3, 2, 10) + rng.normal(0, 1.5, 10)
    ws[-1] = 1.0
    first = heart.surf(-3.0, pa - 45 + rng.normal(0, 5), 4.0)
    rca = catmull_rom([ost, first] + list(_surface_branch(heart, rng, ws, phis, 3.0, 2.0)))
    r0 = rng.uniform(1.8, 2.3)
    r_rca = _taper(len(rca), r0, r0 * (0.7 if right_dom else 0.35))
    s = arclen(rca)
    # segments: 1 proximal (to half-way to the acute margin), 2 mid (to the acute margin), 3 distal
    phi_pts = np.rad2deg(np.unwrap(np.arctan2(rca[:, 2], rca[:, 1])))
    acute = pa - 135
    j_acute = int(np.argmin(np.abs(phi_pts - acute)))
    j_half = max(3, int(np.argmin(np.abs(s - s[j_acute] / 2))))
    seg = np.full(len(rca), 3)
    seg[: j_half + 1] = 1
    seg[j_half + 1 : j_acute + 1] = 2
    br.append(Branch("RCA", rca, r_rca, seg))
    # conus branch: first branch, anterior over the RV outflow tract
    j = _along(rca, 0.04)
    ctrl = [rca[j], heart.surf(-8.0, pa - 35, 4.0), heart.surf(-2.0, pa - 15 + rng.normal(0, 5), 3.0)]
    cn = catmull_rom(ctrl)
    br.append(Branch("CONUS", cn, _taper(len(cn), 0.7, 0.35), np.zeros(len(cn), int), parent=0, parent_idx=j))
    # RV branches / acute marginal: down the RV free wall towards the apex
    n_rv = rng.integers(2, 4)
    for k, f in enumerate(np.sort(rng.uniform(0.2, 0.7, n_rv))):
        j = _along(rca, f)
        w0, ph0 = rca[j, 0], phi_pts[j]
        length = rng.uniform(40, 70)
        ws = np.linspace(max(w0, 0) + 5, min(w0 + length, L * 0.8), 5)
        phis = ph0 + np.linspace(0, rng.uniform(10, 40), 5)
        rv = catmull_rom([rca[j]] + list(_surface_branch(heart, rng, ws, phis, 1.5, 3)))
        br.append(Branch(f"RV{k + 1}", rv, _taper(len(rv), rng.uniform(0.7, 1.0), 0.35), np.zeros(len(rv), int), parent=0, parent_idx=j))
    if right_dom:
        crux = rca[-1]
        ws = np.linspace(crux[0] + 6, L * rng.uniform(0.6, 0.85), 6)
        pda = catmull_rom([crux] + list(_surface_branch(heart, rng, ws, np.full(6, crux_phi + 360 - 360), 1.5, 2)))
        br.append(Branch("PDA", pda, _taper(len(pda), r_rca[-1] * 0.75, 0.35), np.full(len(pda), 4), parent=0, parent_idx=len(rca) - 1))
        # posterolateral continuation along the left AV groove, with small descending branches
        phis = crux_phi - np.linspace(0, rng.uniform(30, 55), 5)
        pl = catmull_rom([crux] + list(_surface_branch(heart, rng, np.linspace(1, 3, 5)[1:], phis[1:], 3.0, 1.5)))
        i_pl = len(br)
        br.append(Branch("PL", pl, _taper(len(pl), r_rca[-1] * 0.7, 0.5), np.full(len(pl), 4), parent=0, parent_idx=len(rca) - 1))
        for k in range(rng.integers(1, 3)):
            j = _along(pl, rng.uniform(0.4, 1.0))
            ph0 = np.rad2deg(np.arctan2(pl[j, 2], pl[j, 1]))
            ws = np.linspace(pl[j, 0] + 5, pl[j, 0] + rng.uniform(25, 45), 4)
            pb = catmull_rom([pl[j]] + list(_surface_branch(heart, rng, ws, np.full(4, ph0), 1.5, 3)))
            br.append(Branch(f"PLB{k + 1}", pb, _taper(len(pb), 0.7, 0.35), np.zeros(len(pb), int), parent=i_pl, parent_idx=j))
    tree = Tree("RCA", br)
    add_twigs(tree, heart, rng, int(rng.integers(5, 11)))
    return _finish(tree)


def add_twigs(tree: Tree, heart: Heart, rng: np.random.Generator, n: int) -> None:
    """Small unnamed side branches (10-30 mm) along the epicardial vessels."""
    cands = [i for i, b in enumerate(tree.branches) if not b.name.startswith(("S", "T")) and len(b.pts) > 20]
    lens = np.array([len(tree.branches[i].pts) for i in cands], float)
    for k in range(n):
        i = cands[int(rng.choice(len(cands), p=lens / lens.sum()))]
        b = tree.branches[i]
        j = int(rng.integers(5, len(b.pts) - 5))
        if b.radius[j] < 0.7:
            continue
        p0 = b.pts[j]
        t = _unit(b.pts[min(j + 2, len(b.pts) - 1)] - b.pts[max(j - 2, 0)])
        radial = np.array([0.0, p0[1], p0[2]])
        radial = _unit(radial) if np.linalg.norm(radial) > 1e-6 else np.array([0.0, 1.0, 0.0])
        side = _unit(np.cross(t, radial)) * (1 if rng.random() < 0.5 else -1)
        length = rng.uniform(10, 30)
        ctrl = [p0]
        for f in (0.35, 0.7, 1.0):
            q = p0 + length * f * _unit(0.6 * t + side + rng.normal(0, 0.25, 3))
            ph = np.rad2deg(np.arctan2(q[2], q[1]))
            ctrl.append(heart.surf(q[0], ph, 1.5))
        if not all(-3.0 <= c[0] <= 0.88 * heart.L for c in ctrl[1:]):
            continue  # would run off the base or round the apex
        tw = catmull_rom(np.asarray(ctrl))
        r0 = min(b.radius[j] * 0.45, rng.uniform(0.45, 0.65))
        tree.branches.append(Branch(f"T{k + 1}", tw, _taper(len(tw), r0, 0.3), np.zeros(len(tw), int), parent=i, parent_idx=j))


def _finish(tree: Tree) -> Tree:
    for b in tree.branches:
        if b.parent >= 0:
            p = tree.branches[b.parent]
            b.s0 = float(p.s[b.parent_idx])
    return tree


#: no implanted hardware (the "narrow" domain, and the default of a hand-made Anatomy)
NO_HARDWARE = {"sternal_wires": 0, "clips": 0, "lead": "", "seed": 0}


@dataclass
class Anatomy:
    heart: Heart
    lca: Tree
    rca: Tree
    #: patient-level randomisation (JSON-able, recorded in the run meta):
    #: ``vessel_scale`` (radius factor), ``tortuosity`` (mm), ``hardware`` (see
    #: :data:`NO_HARDWARE`: number of sternal wires, of surgical clips, pacing lead
    #: "" | "pacemaker" | "icd", seed of their geometry)
    params: dict = field(default_factory=lambda: {"vessel_scale": 1.0, "tortuosity": 0.0, "hardware": dict(NO_HARDWARE)})

    def tree(self, side: str) -> Tree:
        return self.lca if side == "LCA" else self.rca

    @property
    def hardware(self) -> dict:
        """Implanted hardware (mutable: set ``anatomy.hardware["sternal_wires"] = 6`` to force wires)."""
        return self.params.setdefault("hardware", dict(NO_HARDWARE))


def child_rng(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator spawned from ``rng``'s seed sequence *without* drawing from
    ``rng``: the wide domain's extra draws leave the original stream (views, bolus, lesions,
    ...) untouched, so a seed gives the same run in both domains, plus the randomisation.
    Deterministic (the n-th spawn of a seed sequence is always the same)."""
    try:
        return rng.spawn(1)[0]
    except (TypeError, ValueError, AttributeError):  # no seed sequence (e.g. a restored state)
        return np.random.default_rng(int(rng.integers(2**63)))


def tilt_heart(heart: Heart, tilt_deg: float, turn_deg: float) -> None:
    """Rotate the heart (and with it both trees, the aortic root and the ostia, which live in
    its frame) about its middle, in place: ``tilt_deg`` about the patient's antero-posterior
    axis (negative: a more horizontal heart, positive: a more vertical one), then ``turn_deg``
    about the patient's head-foot axis."""
    b, g = np.deg2rad(tilt_deg), np.deg2rad(turn_deg)
    ry = np.array([[np.cos(b), 0.0, np.sin(b)], [0.0, 1.0, 0.0], [-np.sin(b), 0.0, np.cos(b)]])
    rz = np.array([[np.cos(g), -np.sin(g), 0.0], [np.sin(g), np.cos(g), 0.0], [0.0, 0.0, 1.0]])
    r = rz @ ry
    mid = heart.center + heart.e_w * heart.L * 0.42
    heart.e_w, heart.e_a, heart.e_s = r @ heart.e_w, r @ heart.e_a, r @ heart.e_s
    heart.center = mid - heart.e_w * heart.L * 0.42


#: ``pose`` of :func:`sample_anatomy`
POSES = ("typical", "broad")


def sample_anatomy(rng: np.random.Generator, domain: str = "wide", pose: str = "typical") -> Anatomy:
    """Heart + LCA and RCA trees.  ``domain="wide"`` (default) adds the patient-level
    randomisation: vessel calibre (radius x 0.75-1.25), tortuosity (low-frequency wiggle of
    every centreline, 0-3 mm) and implanted hardware (sternal wires in 15% of patients,
    surgical clips in 10%, a pacemaker/ICD lead in 5%), all drawn from a spawned generator
    (:func:`child_rng`) so ``domain="narrow"`` gives exactly the original anatomy and both
    domains share everything else.

    ``pose="broad"``: the heart's orientation varies more than the typical +-4 degrees of
    :func:`sample_heart` (:func:`tilt_heart`: tilt -25..+12 degrees, turn +-10 degrees), as
    horizontal and vertical hearts do; drawn from a later spawned generator, so the typical
    pose leaves every other draw as it was.  Why: the side of a run is read from the shape of
    the projected tree, and a heart axis fixed within a few degrees makes the right coronary in
    RAO a diagonal line at 50-62 degrees where real ones run at ~65-80 (docs/sim-to-real.md)."""
    if domain not in ("wide", "narrow"):
        raise ValueError(f"domain must be 'wide' or 'narrow', not {domain!r}")
    if pose not in POSES:
        raise ValueError(f"pose must be one of {POSES}, not {pose!r}")
    heart = sample_heart(rng)
    anatomy = Anatomy(heart, build_lca(heart, rng), build_rca(heart, rng))
    if domain == "wide":
        _randomize_patient(anatomy, child_rng(rng))
    if pose == "broad":
        prng = child_rng(rng)
        tilt, turn = float(prng.uniform(-25.0, 12.0)), float(prng.uniform(-10.0, 10.0))
        tilt_heart(heart, tilt, turn)
        anatomy.params = dict(anatomy.params, heart_tilt=round(tilt, 2), heart_turn=round(turn, 2))
    return anatomy


def _randomize_patient(anatomy: Anatomy, sub: np.random.Generator) -> None:
    """The wide domain's patient-level draws (calibre, tortuosity, hardware), in place."""
    scale = float(sub.uniform(0.75, 1.25))
    tort = float(sub.uniform(0.0, 3.0))
    hw = {
        "sternal_wires": int(sub.integers(5, 8)) if sub.random() < 0.15 else 0,
        "clips": int(sub.integers(3, 13)) if sub.random() < 0.10 else 0,
        "lead": str(sub.choice(["pacemaker", "icd"], p=[0.6, 0.4])) if sub.random() < 0.05 else "",
        "seed": int(sub.integers(2**31)),
    }
    for tree in (anatomy.lca, anatomy.rca):
        # the two trees of one patient: the same calibre give or take 7%
        randomize_tree(tree, scale * float(sub.uniform(0.93, 1.07)), tort, sub)
    anatomy.params = {"vessel_scale": round(scale, 4), "tortuosity": round(tort, 4), "hardware": hw}


def randomize_tree(tree: Tree, radius_scale: float, tortuosity: float, rng: np.random.Generator) -> Tree:
    """Scale every radius by ``radius_scale`` and add a random low-frequency wiggle of
    amplitude ~``tortuosity`` mm to every centreline (in place).  Each branch gets its own
    wiggle across its course (mostly along the heart surface, wavelengths 12-40 mm), ramped
    in over its first 8 mm (peak ``tortuosity`` x 0.5-1), on top of its parent's displacement at the branch point: the
    tree stays connected and the ostium stays put.  Sample indices (lesions, segments) keep
    their meaning."""
    disp: list[np.ndarray] = []
    for b in tree.branches:
        b.radius = b.radius * radius_scale
        pts = b.pts
        n = len(pts)
        base = disp[b.parent][min(b.parent_idx, len(disp[b.parent]) - 1)] if b.parent >= 0 else np.zeros(3)
        if tortuosity <= 0 or n < 3:
            disp.append(np.repeat(base[None], n, axis=0))
            b.pts = pts + base
            continue
        s = arclen(pts)
        tan = np.gradient(pts, axis=0)
        tan /= np.linalg.norm(tan, axis=1, keepdims=True) + 1e-9
        radial = np.stack([np.zeros(n), pts[:, 1], pts[:, 2]], 1)  # out of the epicardium
        radial -= (radial * tan).sum(1, keepdims=True) * tan
        rn = np.linalg.norm(radial, axis=1, keepdims=True)
        radial = np.where(rn > 1e-6, radial / np.maximum(rn, 1e-9), 0.0)
        lateral = np.cross(tan, radial)  # along the surface, across the vessel
        amp = tortuosity * rng.uniform(0.5, 1.0)
        ramp = np.clip(s / 8.0, 0.0, 1.0)
        ramp = ramp * ramp * (3 - 2 * ramp)

        def wave(k):  # peak <= 1: sum of k sinusoids of wavelength 12-40 mm
            lam = rng.uniform(12.0, 40.0, k)
            ph = rng.uniform(0, 2 * np.pi, k)
            w = rng.uniform(0.5, 1.0, k)
            return (w[None] * np.sin(2 * np.pi * s[:, None] / lam[None] + ph[None])).sum(1) / w.sum()

        d = amp * ramp[:, None] * (wave(2)[:, None] * lateral + 0.4 * wave(1)[:, None] * radial)
        disp.append(base + d)
        b.pts = pts + base + d
    return _finish(tree)


def segment_location(tree: Tree, segment: int, rng: np.random.Generator, margin_mm: float = 3.0):
    """A random (branch index, sample index) inside ``segment`` on the tree (None if absent)."""
    cands = []
    for i, b in enumerate(tree.branches):
        idx = np.nonzero(b.segment == segment)[0]
        if len(idx) == 0:
            continue
        m = int(margin_mm / STEP_MM)
        if len(idx) > 2 * m + 2:
            idx = idx[m:-m]
        cands.append((i, idx))
    if not cands:
        return None
    i, idx = cands[0] if len(cands) == 1 else cands[int(rng.integers(len(cands)))]
    return i, int(rng.choice(idx))


def catheter_path(heart: Heart, side: str, rng: np.random.Generator, approach: str = "femoral") -> np.ndarray:
    """Guiding catheter centreline (patient mm) from outside the field to the ostium."""
    ao = heart.to_patient(heart.ao_local)
    ost = heart.to_patient(ostium_local(heart, side))
    j = lambda s=3.0: rng.normal(0, s, 3)  # noqa: E731
    asc_top = ao + np.array([-18, -12, 60]) + j()
    if approach == "femoral":
        ctrl = [
            ao + np.array([32, 60, -260]),
            ao + np.array([30, 58, -120]) + j(),
            ao + np.array([28, 50, 20]) + j(),
            ao + np.array([20, 30, 85]) + j(),
            ao + np.array([0, 5, 95]) + j(),
            asc_top,
        ]
    else:  # right radial: brachiocephalic trunk into the ascending aorta
        ctrl = [
            ao + np.array([-120, -10, 220]),
            ao + np.array([-60, -5, 140]) + j(),
            ao + np.array([-30, -10, 95]) + j(),
            asc_top,
        ]
    if side == "LCA":  # Judkins left: down the right wall, then the tip turns up-left into the ostium
        ctrl += [ao + np.array([-14, -6, 25]) + j(2), ao + np.array([-6, 0, 2]) + j(2), ost + np.array([-5, 0, -4]), ost]
    else:  # Judkins right: down the ascending aorta, tip turned anterior-right
        ctrl += [ao + np.array([-5, -5, 25]) + j(2), ost + np.array([8, 2, 6]), ost]
    return catmull_rom(np.asarray(ctrl), step=1.0)
