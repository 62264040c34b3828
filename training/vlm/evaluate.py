"""Evaluation of generated reports.

1. Clinical correctness against the structured ground truth: findings parsed from the
   generated text (side, vessel, segment, severity) -> micro precision / recall / F1 per
   level, and treatment agreement; always next to a no-image baseline (the most common
   training report), so the numbers show whether the model reads the image.  A model trained
   with the lesion model's findings ("concepts") is given them per study (``concepts_for``);
   the templated report from the concepts alone is scored next to it (``concepts_clinical``).
2. BLEU-4 and ROUGE-L per language (words for English, characters for Japanese).
3. VLScore (Dawidowicz et al. 2024): a = img - gen, b = img - ref,
   area = 0.5 * sqrt(|a|^2 |b|^2 - (a.b)^2), score = max(1 - area / C, 0), with a pluggable
   local image-text encoder.  C is fitted per encoder (``fit_vlscore_c``): the given
   percentile (default 95th) of the triangle area over *mismatched* triples (image i,
   reference i, reference j != i) of a fitting set, so a report unrelated to the image
   scores ~0 and the reference itself scores 1.
4. Clinician rating: export CSV/JSONL with 0-10 review fields, import the filled file and
   summarise (mean, sd, median per field and per model).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Sequence

import numpy as np

from inference.vlm.findings import (  # noqa: F401  (re-exported: the parser lives with the node)
    AHA, RCA_VESSELS, TREATMENTS, VESSEL_ALIASES, normalise_finding, normalise_segment, normalise_vessel,
    parse_findings, parse_treatment, report_content, side_of,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- clinical metrics

LEVELS = {
    "side": lambda f: (f["side"],),
    "vessel": lambda f: (f["vessel"],),
    "segment": lambda f: (f["vessel"], f["segment"]),
    "severity": lambda f: (f["vessel"], f["segment"], f["severity"]),
}


def _prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    r = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "tp": tp, "fp": fp, "fn": fn}


def clinical_scores(pred: Sequence[list[dict]], truth: Sequence[list[dict]],
                    pred_treat: Sequence[Optional[str]] = (), true_treat: Sequence[Optional[str]] = ()) -> dict:
    """Micro P/R/F1 per level over studies + exact-match rate + treatment agreement."""
    out: dict = {}
    for level, key in LEVELS.items():
        tp = fp = fn = 0
        for p, t in zip(pred, truth):
            ps = {key(normalise_finding(f)) for f in p}
            ts = {key(normalise_finding(f)) for f in t}
            tp += len(ps & ts)
            fp += len(ps - ts)
            fn += len(ts - ps)
        out[level] = _prf(tp, fp, fn)
    exact = [
        {LEVELS["severity"](normalise_finding(f)) for f in p} == {LEVELS["severity"](normalise_finding(f)) for f in t}
        for p, t in zip(pred, truth)
    ]
    out["exact_match"] = round(sum(exact) / len(exact), 4) if exact else 0.0
    pairs = [(a, b) for a, b in zip(pred_treat, true_treat) if b is not None]
    out["treatment_agreement"] = round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None
    out["n"] = len(exact)
    return out


# --------------------------------------------------------------------------- BLEU / ROUGE-L

def tokens(text: str, language: str) -> list[str]:
    if language == "ja":
        return [c for c in (text or "") if not c.isspace()]
    return re.findall(r"\w+|[^\w\s]", (text or "").lower())


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[str], language: str = "en", max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al.): geometric mean of clipped n-gram precisions x brevity
    penalty; orders with no n-grams in the hypotheses are left out; add-one smoothing for
    orders with zero matches.  Identical corpora score 1."""
    match = [0] * max_n
    total = [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hypotheses, references):
        ht, rt = tokens(h, language), tokens(r, language)
        hyp_len += len(ht)
        ref_len += len(rt)
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(ht, n), _ngrams(rt, n)
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(ht) - n + 1, 0)
    logs = []
    for n in range(max_n):
        if total[n] == 0:
            continue
        m, t = match[n], total[n]
        if m == 0:
            m, t = 1, t + 1
        logs.append(math.log(m / t))
    if not logs or hyp_len == 0:
        return 0.0
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return round(bp * math.exp(sum(logs) / len(logs)), 4)


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str, language: str = "en", beta: float = 1.2) -> float:
    h, r = tokens(hypothesis, language), tokens(reference, language)
    lcs = _lcs(h, r)
    if lcs == 0:
        return 0.0
    p, rc = lcs / len(h), lcs / len(r)
    return round((1 + beta ** 2) * p * rc / (rc + beta ** 2 * p), 4)


def mean_rouge_l(hyps: Sequence[str], refs: Sequence[str], language: str = "en") -> float:
    vals = [rouge_l(h, r, language) for h, r in zip(hyps, refs)]
    return round(float(np.mean(vals)), 4) if vals else 0.0


# --------------------------------------------------------------------------- VLScore

class ImageTextEncoder(Protocol):
    def encode_image(self, images: list[np.ndarray]) -> np.ndarray: ...
    def encode_text(self, text: str) -> np.ndarray: ...


def triangle_area(img: np.ndarray, gen: np.ndarray, ref: np.ndarray) -> float:
    a = np.asarray(img, np.float64) - np.asarray(gen, np.float64)
    b = np.asarray(img, np.float64) - np.asarray(ref, np.float64)
    v = float(a @ a) * float(b @ b) - float(a @ b) ** 2
    return 0.5 * math.sqrt(max(v, 0.0))


def vlscore(img: np.ndarray, gen: np.ndarray, ref: np.ndarray, c: float) -> float:
    return max(1.0 - triangle_area(img, gen, ref) / c, 0.0)


def fit_vlscore_c(img_emb: Sequence[np.ndarray], ref_emb: Sequence[np.ndarray], percentile: float = 95.0,
                  seed: int = 0) -> float:
    """C for an encoder: the ``percentile`` of areas of mismatched triples (img_i, ref_j, ref_i)."""
    n = len(img_emb)
    if n < 2:
        raise ValueError("fitting C needs at least two image/report pairs")
    rng = np.random.default_rng(seed)
    areas = []
    for i in range(n):
        for j in rng.permutation([k for k in range(n) if k != i])[: min(8, n - 1)]:
            areas.append(triangle_area(img_emb[i], ref_emb[j], ref_emb[i]))
    c = float(np.percentile(areas, percentile))
    return c if c > 0 else 1.0


class VLMEmbeddingEncoder:
    """A simple local joint encoder from the VLM itself: an image is the mean of its projected
    image tokens (the multimodal projector maps them into the text embedding space), a text the
    mean of its input token embeddings.  Both are L2-normalised."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    def encode_image(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        from inference.vlm.base import to_pil

        pv = self.processor.image_processor(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
        p = next(self.model.parameters())
        with torch.inference_mode():
            feats = self.model.get_image_features(pixel_values=pv.to(p.device, p.dtype))
        if hasattr(feats, "pooler_output") and feats.pooler_output is not None:
            feats = feats.pooler_output
        elif not isinstance(feats, torch.Tensor):
            feats = feats[0]
        v = feats.float().reshape(-1, feats.shape[-1]).mean(0).cpu().numpy()
        return v / (np.linalg.norm(v) + 1e-8)

    def encode_text(self, text: str) -> np.ndarray:
        import torch

        ids = self.processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        emb = self.model.get_input_embeddings()
        with torch.inference_mode():
            v = emb(ids.to(emb.weight.device)).float().mean(1)[0].cpu().numpy()
        return v / (np.linalg.norm(v) + 1e-8)


# --------------------------------------------------------------------------- clinician rating

RATING_FIELDS = ("overall", "findings_accuracy", "impression_accuracy", "recommendation_appropriateness",
                 "language_quality")
RATING_NOTE = ("Score each field 0 (unusable) to 10 (as good as an expert report); 'overall' is the "
               "paper's single 0-10 clinician rating. Leave blank if not rated.")


def export_for_rating(rows: Iterable[dict], path: str | Path, blind: bool = True, seed: int = 0) -> Path:
    """Write a rating sheet (``.csv`` or ``.jsonl``): one row per (study, language, model).

    ``rows``: {study_uid, language, model, findings, impression, recommendation} (generated
    or reference). With ``blind`` the rows are shuffled and the model column is replaced by a
    code; the key is written next to the sheet (``<name>.key.json``).
    """
    path = Path(path)
    rows = list(rows)
    key: dict[str, str] = {}
    if blind:
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in rng.permutation(len(rows))]
    out_rows = []
    for i, r in enumerate(rows):
        item = f"item-{i + 1:04d}"
        key[item] = r.get("model", "")
        o = {"item": item, "study_uid": r.get("study_uid", ""), "language": r.get("language", ""),
             "model": "" if blind else r.get("model", ""),
             "findings": r.get("findings", ""), "impression": r.get("impression", ""),
             "recommendation": r.get("recommendation", "")}
        o.update({f: "" for f in RATING_FIELDS})
        o["comment"] = ""
        out_rows.append(o)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            for o in out_rows:
                fh.write(json.dumps(o, ensure_ascii=False) + "\n")
    else:
        with open(path, "w", encoding="utf-8-sig", newline="") as fh:  # BOM: Excel opens Japanese right
            w = csv.DictWriter(fh, fieldnames=list(out_rows[0].keys()) if out_rows else ["item"])
            w.writeheader()
            w.writerows(out_rows)
    path.with_suffix(".key.json").write_text(json.dumps({"note": RATING_NOTE, "key": key}, indent=1))
    return path


def import_ratings(path: str | Path, key_path: Optional[str | Path] = None) -> dict:
    """Read a filled rating sheet; summary stats per field, overall and per model."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    else:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
    kp = Path(key_path) if key_path else path.with_suffix(".key.json")
    key = json.loads(kp.read_text())["key"] if kp.is_file() else {}
    by_model: dict[str, dict[str, list[float]]] = {}
    errors = []
    for r in rows:
        model = r.get("model") or key.get(r.get("item", ""), "") or "?"
        for f in RATING_FIELDS:
            v = r.get(f)
            if v is None or str(v).strip() == "":
                continue
            try:
                x = float(v)
            except ValueError:
                errors.append(f"{r.get('item')}: {f}={v!r} is not a number")
                continue
            if not 0 <= x <= 10:
                errors.append(f"{r.get('item')}: {f}={x} outside 0-10")
                continue
            by_model.setdefault(model, {}).setdefault(f, []).append(x)
            by_model.setdefault("*", {}).setdefault(f, []).append(x)

    def stats(v: list[float]) -> dict:
        return {"n": len(v), "mean": round(statistics.fmean(v), 3),
                "sd": round(statistics.stdev(v), 3) if len(v) > 1 else 0.0,
                "median": statistics.median(v), "min": min(v), "max": max(v)}

    return {"rows": len(rows), "errors": errors,
            "by_model": {m: {f: stats(v) for f, v in fs.items()} for m, fs in by_model.items()}}


# --------------------------------------------------------------------------- whole evaluation

def most_common_reports(studies, languages=("en", "ja")) -> dict[str, dict]:
    """The no-image baseline: per language, the most common reference report of ``studies``."""
    from inference.vlm.base import format_report

    out = {}
    for lang in languages:
        texts = Counter(format_report(s.report[lang], lang) for s in studies if lang in s.report)
        if not texts:
            continue
        best = texts.most_common(1)[0][0]
        out[lang] = next(s.report[lang] for s in studies if lang in s.report
                         and format_report(s.report[lang], lang) == best)
    return out


def _truth(study, lang: str) -> list[dict]:
    if study.findings:
        return [normalise_finding(f) for f in study.findings]
    return parse_findings(study.report.get(lang, {}).get("findings", ""))


ConceptsFor = Callable[[object], Optional[list]]


def evaluate_backend(backend, studies, baseline: dict[str, dict], languages=("en", "ja"),
                     encoder: Optional[ImageTextEncoder] = None, vlscore_c: Optional[float] = None,
                     frame_cache=None, keep_outputs: bool = True,
                     concepts_for: Optional[ConceptsFor] = None) -> dict:
    """Generate for every study and score it (and the no-image baseline) against the truth.

    ``concepts_for(example) -> list[dict] | None``: the lesion model's findings to put into the
    prompt for a study (``[]``: it saw no stenosis; ``None``: no concepts line), e.g.
    ``training.vlm.concepts.concepts_source("truth" | "noisy")`` or a lesion model run on the
    study's key frames.  They are passed as given (the caller decides whether the model was
    trained with them); each language then also gets ``concepts_clinical``: the score of the
    templated report written from the concepts alone (what the node drafts without a VLM).
    """
    import time

    from inference.vlm.base import format_report
    from training.vlm.data import FrameCache

    frames = frame_cache or FrameCache()
    gens: dict[str, list] = {l: [] for l in languages}
    latencies = []
    outputs = []
    images_of = []
    given: list[Optional[list]] = []
    for s in studies:
        refs, sides = s.frames(backend.max_images)
        images = [frames(r) for r in refs]
        images_of.append(images)
        concepts = concepts_for(s) if concepts_for is not None else None
        given.append(concepts)
        t0 = time.perf_counter()
        if concepts is not None:
            rep = backend.generate_languages(images, list(languages), sides=sides, concepts=concepts)
        else:
            rep = backend.generate_languages(images, list(languages), sides=sides)
        for lang in languages:
            gens[lang].append(rep[lang])
        latencies.append(time.perf_counter() - t0)
        if keep_outputs:
            o = {"study_uid": s.study_uid, "report": {k: v.to_dict() for k, v in rep.items()}}
            if concepts is not None:
                o["concepts"] = concepts
            outputs.append(o)
    result: dict = {"n_studies": len(studies), "languages": list(languages)}
    if concepts_for is not None:
        result["n_with_concepts"] = sum(c is not None for c in given)
    enc_img = [encoder.encode_image(ims) for ims in images_of] if encoder is not None else None
    for lang in languages:
        idx = [i for i, s in enumerate(studies) if lang in s.report]
        truth = [_truth(studies[i], lang) for i in idx]
        true_treat = [studies[i].treatment or parse_treatment(studies[i].report[lang].get("recommendation", ""))
                      for i in idx]
        g = [gens[lang][i] for i in idx]
        content = [report_content(r) for r in g]  # (findings, treatment), as the node compares drafts
        pred = [c[0] for c in content]
        pred_treat = [c[1] for c in content]
        b = baseline.get(lang)
        base_pred = [parse_findings(b["findings"]) if b else [] for _ in idx]
        base_treat = [parse_treatment(b["recommendation"]) if b else None for _ in idx]
        hyp = [format_report(r.to_dict(), lang) if r.format_ok else r.findings for r in g]
        ref = [format_report(studies[i].report[lang], lang) for i in idx]
        bl = [format_report(b, lang) if b else "" for _ in idx]
        ref_parse = clinical_scores([parse_findings(studies[i].report[lang]["findings"]) for i in idx], truth)
        concepts_m = None
        if concepts_for is not None:
            from inference.reporting import templated_report

            # The concepts alone, written with the report templates and scored like a draft.
            tmpl = [report_content(templated_report(given[i] or [], languages=(lang,))[lang])
                    if given[i] is not None else ([], None) for i in idx]
            concepts_m = clinical_scores([t[0] for t in tmpl], truth, [t[1] for t in tmpl], true_treat)
        m = {
            "clinical": clinical_scores(pred, truth, pred_treat, true_treat),
            "baseline_clinical": clinical_scores(base_pred, truth, base_treat, true_treat),
            "parser_check_f1": ref_parse["severity"]["f1"],  # parser on the references themselves
            "bleu": bleu(hyp, ref, lang),
            "rouge_l": mean_rouge_l(hyp, ref, lang),
            "baseline_bleu": bleu(bl, ref, lang),
            "baseline_rouge_l": mean_rouge_l(bl, ref, lang),
            "format_ok": round(sum(r.format_ok for r in g) / max(len(g), 1), 4),
            "exact_report": round(sum(h == r for h, r in zip(hyp, ref)) / max(len(ref), 1), 4),
        }
        if concepts_m is not None:
            m["concepts_clinical"] = concepts_m
        if encoder is not None:
            ref_e = [encoder.encode_text(t) for t in ref]
            gen_e = [encoder.encode_text(t) for t in hyp]
            bl_e = [encoder.encode_text(t) for t in bl]
            img_e = [enc_img[i] for i in idx]
            c = vlscore_c or fit_vlscore_c(img_e, ref_e)
            m["vlscore"] = round(float(np.mean([vlscore(i, gg, r, c) for i, gg, r in zip(img_e, gen_e, ref_e)])), 4)
            m["baseline_vlscore"] = round(float(np.mean([vlscore(i, gg, r, c) for i, gg, r in zip(img_e, bl_e, ref_e)])), 4)
            m["vlscore_c"] = round(c, 6)
        result[lang] = m
    if len(languages) > 1:
        from inference.vlm.findings import language_discrepancies

        # The languages are generated separately: how often do the drafts say the same thing?
        n_agree = sum(not language_discrepancies({l: gens[l][i] for l in languages}, reference=languages[0])
                      for i in range(len(studies)))
        result["language_agreement"] = round(n_agree / max(len(studies), 1), 4)
    result["latency_s_per_study"] = {
        "mean": round(float(np.mean(latencies)), 3) if latencies else None,
        "p95": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "languages_per_study": len(languages),
    }
    if keep_outputs:
        result["outputs"] = outputs
    return result


def evaluate_bundle(data: str | Path, bundle_dir: str | Path, split: str = "val", seed: int = 0,
                    languages=("en", "ja"), limit: Optional[int] = None, vlscore: bool = True,
                    device: str = "cpu", max_new_tokens: int = 256, rating_export: Optional[str] = None,
                    concepts: Optional[str] = None, concepts_seed: int = 1,
                    concepts_for: Optional[ConceptsFor] = None) -> dict:
    """``cag-node evaluate vlm``: the bundle's VLM on a split of ``data`` (patient-level split with
    the same seed as training; ``split="all"`` uses every study).

    The lesion model's findings given to a VLM trained with them (manifest
    ``vlm.training.concepts``): ``concepts_for(example) -> list[dict] | None`` when given (e.g.
    a lesion model's findings for the study), else ``concepts``: "lesions" (the bundle's own
    lesion model on the key frames, as the node does), "truth" (the study's findings),
    "noisy" (the training perturbation drawn with ``concepts_seed``) or "none"; ``None`` = "noisy"
    for a model trained with concepts, "none" otherwise.  A model trained without concepts is
    never given any (as the node does); ``result["concepts"]`` says what was used.
    """
    from inference.bundle import Bundle
    from inference.vlm import load_backend
    from training.vlm.data import load_examples, split_examples

    if device == "cpu":
        import torch

        torch.set_num_threads(1)  # see TrainConfig.threads: far faster on a busy small machine
    bundle = Bundle.load(bundle_dir)
    studies = load_examples(data)
    vs = bundle.manifest.vlm
    split_seed = int((vs.training or {}).get("split_seed", seed)) if vs else seed
    val_frac = float((vs.training or {}).get("val_frac", 0.2)) if vs else 0.2
    parts = split_examples(studies, val_frac=val_frac, seed=split_seed)
    test = studies if split == "all" else parts.get(split) or parts["val"]
    train = parts["train"] or studies
    if limit:
        test = test[:limit]
    backend = load_backend({"backend": "bundle", "device": device, "max_new_tokens": max_new_tokens,
                            "max_images": int((vs.training or {}).get("max_images", 4)) if vs else 4,
                            "timeout_s": 600}, bundle)
    from training.vlm.concepts import check_mode, concepts_source

    if concepts_for is not None:
        used = "custom"
    elif concepts == "lesions":
        from training.lesions.evaluate import lesion_concepts

        concepts_for, used = lesion_concepts(bundle), "lesions (the bundle's lesion model)"
    else:
        mode = check_mode(concepts, ("none", "truth", "noisy")) if concepts is not None else (
            "noisy" if backend.uses_concepts else "none")
        concepts_for = concepts_source(mode, seed=concepts_seed)
        used = mode if mode != "noisy" else f"noisy (seed {concepts_seed})"
    if concepts_for is not None and not backend.uses_concepts:
        log.warning("evaluate vlm: the bundle's VLM was trained without concepts; none are given to it")
        concepts_for, used = None, f"none (asked for {used}; the model was trained without concepts)"
    encoder = None
    c = None
    if vlscore and hasattr(backend, "model"):
        encoder = VLMEmbeddingEncoder(backend.model, backend.processor)
        c = (vs.metrics or {}).get("vlscore_c") if vs else None
    res = evaluate_backend(backend, test, most_common_reports(train, languages), languages, encoder, c,
                           concepts_for=concepts_for)
    res["concepts"] = used
    res["split"] = split
    res["model"] = backend.model_info.to_dict()
    if rating_export:
        rows = []
        for o, s in zip(res.get("outputs", []), test):
            for lang, r in o["report"].items():
                rows.append({"study_uid": s.study_uid, "language": lang, "model": res["model"]["vlm"], **r})
                rows.append({"study_uid": s.study_uid, "language": lang, "model": "reference", **s.report[lang]})
        export_for_rating(rows, rating_export)
        res["rating_export"] = str(rating_export)
    return res
