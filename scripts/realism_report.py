#!/usr/bin/env python
"""Realism of synthetic pairs: Fréchet distance and KID in SAM-encoder feature space, against the real-vs-real
yardstick, plus a sample grid (real vs synthetic, mask outlines). No downloads: the features come from the SAM
image encoder the app ships (fine-tuned if apps/fetal_head/model holds one, else LiteMedSAM).

    python scripts/realism_report.py --src ../shared/data/hc18 --split test --n-real 40 \
        (--checkpoint CKPT --n-synthetic 20 | --synthetic-folder DIR) [--out docs/synthesis]

Writes <out>/realism.json, <out>/realism.md and <out>/sample_grid.png. The real images are split into two
disjoint halves (by subject order, fixed seed); "real vs real" compares them, "real vs synthetic" compares the
first half with the synthetic set (same size as a half, so the estimators' small-sample bias is comparable), and
"real vs noise" (uniform noise images) is the other end of the scale.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))

from fetal_head.io.hc18 import read_cases, select  # noqa: E402
from fetal_head.io import read_image, read_mask  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402
from fetal_head.synthesis.realism import compare, feature_scale, sam_features, sample_grid  # noqa: E402

ATTRIBUTION = ("Real images: HC18 (van den Heuvel et al., PLoS ONE 13(8): e0200412, 2018; "
               "Zenodo 10.5281/zenodo.1322001), CC BY 4.0.")


def synthetic_pairs(args):
    if args.synthetic_folder:
        from fetal_head.synthesis.store import read_folder_provenance

        folder = Path(args.synthetic_folder)
        ids = list(read_folder_provenance(str(folder)))[: args.n_synthetic]
        return [(read_image(folder / "images" / f"{i}.png"), read_mask(folder / "masks" / f"{i}_Mask.png")) for i in ids], {}
    from fetal_head.synthesis.sampling import PairGenerator, SamplingOptions, synthesize

    gen = PairGenerator(args.checkpoint, device=args.device, sampler=args.sampler, steps=args.steps)
    pairs = []
    # unfiltered samples: the report measures the generator itself (QC pass rate reported by synthesize.py)
    result = synthesize(gen, args.n_synthetic, args.seed, lambda p, prov: pairs.append((p.image, p.mask)),
                        options=SamplingOptions(qc="shape-only", max_candidates_factor=1.0, batch_size=args.batch_size))
    while len(pairs) < args.n_synthetic:  # joint-scheme candidates failing the shape gate: take them raw
        extra = gen.generate(args.seed, [10_000_000 + len(pairs)])[0]
        pairs.append((extra.image, extra.mask))
    return pairs, {"generator_version": gen.version, "scheme": gen.config.scheme, "trained_steps": gen.trained_steps,
                   "image_size": gen.config.image_size, "sampler": gen.sampler_name, "steps": gen.steps,
                   "shape_gate": result["qc"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n-real", type=int, default=40)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint")
    src.add_argument("--synthetic-folder")
    ap.add_argument("--n-synthetic", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", choices=("ddim", "dpm"))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", default=str(REPO / "apps" / "fetal_head" / "model"))
    ap.add_argument("--out", default=str(REPO / "docs" / "synthesis"))
    args = ap.parse_args(argv)

    cases = [c for c in select(read_cases(args.src), split=args.split or None) if c.mask_path]
    rng = np.random.default_rng(args.seed)
    cases = [cases[i] for i in sorted(rng.choice(len(cases), size=min(args.n_real, len(cases)), replace=False))]
    # halves by subject, so no subject's images sit on both sides of the yardstick
    subjects = sorted({c.subject or c.image_id for c in cases})
    first = set(subjects[::2])
    half_a = [c for c in cases if (c.subject or c.image_id) in first]
    half_b = [c for c in cases if (c.subject or c.image_id) not in first]
    predictor = ModelSource(args.model_dir, device=args.device).load()
    real_a = [read_image(c.image_path) for c in half_a]
    real_b = [read_image(c.image_path) for c in half_b]
    f_a, f_b = sam_features(predictor, real_a), sam_features(predictor, real_b)
    scale = feature_scale(np.concatenate([f_a, f_b]))
    noise = [np.random.default_rng(i).integers(0, 256, size=(540, 800), dtype=np.uint8) for i in range(len(real_b))]
    report = {
        "feature_space": f"SAM image encoder ({predictor.version}), global average pooled, standardised by the real features",
        "real_images": {"split": args.split, "half_a": len(half_a), "half_b": len(half_b)},
        "real_vs_real": compare(f_a, f_b, scale),
        "real_vs_noise": compare(f_a, sam_features(predictor, noise), scale),
    }
    grid_synth = []
    if args.checkpoint or args.synthetic_folder:
        synth, meta = synthetic_pairs(args)
        report["synthetic"] = meta
        report["real_vs_synthetic"] = compare(f_a, sam_features(predictor, [p[0] for p in synth]), scale)
        grid_synth = synth
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_real = [(read_image(c.image_path), read_mask(c.mask_path)) for c in half_a[:4]]
    sample_grid(grid_real, grid_synth, str(out / "sample_grid.png"), title="real HC18 (top, CC BY 4.0) vs synthetic (bottom), mask outlines in yellow")
    (out / "realism.json").write_text(json.dumps(report, indent=2))
    rows = [(k, report[k]) for k in ("real_vs_real", "real_vs_synthetic", "real_vs_noise") if k in report]
    md = ["# Realism of synthetic pairs (SAM-feature FD / KID)", "",
          f"Feature space: {report['feature_space']}.", "",
          "| comparison | n | FD | KID (mean +- std over subsets) |", "| --- | --- | --- | --- |"]
    md += [f"| {k.replace('_', ' ')} | {v['n'][0]} vs {v['n'][1]} | {v['fd']:.1f} | {v['kid']:.3f} +- {v['kid_std']:.3f} |"
           for k, v in rows]
    if "synthetic" in report:
        md += ["", f"Generator: `{json.dumps(report['synthetic'])}`"]
    md += ["", "Real vs real is the yardstick: a generator whose real-vs-synthetic distance approaches it produces "
           "images as close to the real distribution as a second real sample is. Values are only comparable at "
           "equal sample sizes.", "", "![sample grid](sample_grid.png)", "", ATTRIBUTION, ""]
    (out / "realism.md").write_text("\n".join(md))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
