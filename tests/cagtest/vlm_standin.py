"""A small stand-in dataset (hospital JSONL format + PNG key frames) for VLM tests.

Each study has one LCA and one RCA run (2 key-frame candidates each).  Vessels are dark
bands on a bright background; a stenosis is a narrowing whose position encodes the segment
and whose depth encodes the severity.  Reports follow fixed EN/JA templates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

SEGMENTS = {"LCA": [("LAD", 6), ("LAD", 7), ("LCX", 11)], "RCA": [("RCA", 1), ("RCA", 2)]}
SEVERITIES = [75, 90, 100]
JA_VESSEL = {"LAD": "左前下行枝", "LCX": "左回旋枝", "RCA": "右冠動脈"}


def _draw(side: str, findings: list[dict], rng: np.random.Generator, size: int = 112) -> np.ndarray:
    img = np.full((size, size), 0.85, np.float32) + rng.normal(0, 0.03, (size, size)).astype(np.float32)
    segs = SEGMENTS[side]
    for k, (vessel, seg) in enumerate(segs):
        y = int((k + 1) * size / (len(segs) + 1))
        x0, x1 = 8, size - 8
        img[y - 4:y + 4, x0:x1] = 0.2  # vessel
        for f in findings:
            if f["segment"] == seg:
                cx = size // 2
                keep = {75: 2, 90: 1, 100: 0}[f["severity"]]
                img[y - 4:y + 4, cx - 5:cx + 5] = 0.85
                if keep:
                    img[y - keep:y + keep, cx - 5:cx + 5] = 0.2
    return np.clip(img, 0, 1)


def report_for(findings: list[dict]) -> dict:
    if not findings:
        en_f, ja_f = "No significant stenosis.", "有意狭窄なし。"
    else:
        en_f = " ".join(f"{f['vessel']} #{f['segment']}: " + ("total occlusion." if f["severity"] == 100
                        else f"{f['severity']}% stenosis.") for f in findings)
        ja_f = "".join(f"{JA_VESSEL[f['vessel']]} #{f['segment']}: " + ("完全閉塞。" if f["severity"] == 100
                       else f"{f['severity']}%狭窄。") for f in findings)
    n = len({f["vessel"] for f in findings if f["severity"] >= 75})
    en_i = {0: "No significant coronary artery disease.", 1: "Single-vessel disease.",
            2: "Two-vessel disease."}.get(n, "Three-vessel disease.")
    ja_i = {0: "有意な冠動脈疾患なし。", 1: "一枝病変。", 2: "二枝病変。"}.get(n, "三枝病変。")
    if n == 0:
        en_r, ja_r = "Medical therapy and follow-up.", "薬物療法と経過観察。"
    elif n == 1:
        en_r, ja_r = "PCI is recommended.", "PCIを推奨する。"
    else:
        en_r, ja_r = "CABG is recommended.", "CABGを推奨する。"
    return {"en": {"findings": en_f, "impression": en_i, "recommendation": en_r},
            "ja": {"findings": ja_f, "impression": ja_i, "recommendation": ja_r}}


def make_standin(out: Path, n_studies: int = 40, seed: int = 0) -> Path:
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    lines = []
    for i in range(n_studies):
        findings = []
        for side, segs in SEGMENTS.items():
            if rng.random() < 0.6:
                vessel, seg = rng.choice(segs)
                findings.append({"side": side, "vessel": vessel, "segment": seg,
                                 "severity": rng.choice(SEVERITIES)})
        images = []
        for side in ("LCA", "RCA"):
            fs = [f for f in findings if f["side"] == side]
            for k in range(2):
                p = out / "img" / f"s{i:03d}_{side}_{k}.png"
                Image.fromarray((_draw(side, fs, nrng) * 255).astype(np.uint8)).save(p)
                images.append({"file": f"img/{p.name}", "side": side})
        lines.append({"study_uid": f"1.2.3.{i}", "patient_id": f"P{i // 2:03d}", "images": images,
                      "findings": findings, "report": report_for(findings)})
    with open(out / "labels.jsonl", "w", encoding="utf-8") as fh:
        for r in lines:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out
