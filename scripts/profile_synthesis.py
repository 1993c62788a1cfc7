#!/usr/bin/env python
"""Where synthesis time goes, old code path vs new, on whatever device runs it (issue 14's "now vs after" table).

    python scripts/profile_synthesis.py --device cuda --out docs/benchmark/profile_gpu.txt          # a GPU
    python scripts/profile_synthesis.py --cpu-tiny --out docs/benchmark/profile_cpu.txt             # CPU smoke
    python scripts/profile_synthesis.py --semi-compare --out docs/benchmark/semi_vs_labelled_cpu.txt

Rows (each measured in this one run, old and new side by side):

- generator training, images/s, at the issue's 128 px config (channels 64-128-256-256, batch 16) and at the
  default 256 px config: ``train(..., legacy_loop=True)`` (the loop as it was: CPU-side batches, a ``.item()``
  per step, per-tensor EMA, no channels-last/fused AdamW) vs the new loop (data and random numbers on the
  device, one host sync per ``log_every`` steps, foreach EMA and clipping, fused AdamW, channels-last, bf16 on
  CUDA; ``--compile`` adds torch.compile);
- a torch.profiler table of one training step of each loop (top operators by self time);
- synthesis with full QC, accepted pairs/s: DDIM 50 steps with per-pair SAM encoding (old) vs DPM-Solver++
  with ``--dpm-steps`` and one batched SAM encoder call per batch (new), from a generator trained here for
  ``--gen-steps`` steps on 5 labels (so the QC pass rate it reports is that small generator's);
- SAM mask-decoder fine-tuning on cached embeddings, steps/s (one code path: the segmentation trainer).

``--cpu-tiny`` shrinks every size (batch, steps, candidates) so the whole run takes minutes on 2 CPU cores; its
numbers show the relative cost of the code paths on a CPU, not GPU throughput.

``--semi-compare`` trains a labelled-only and a semi-supervised mask-conditioned generator on the same budget
(5 labels; + ``--unlabelled`` pool images for the semi-supervised one), samples each with full QC and reports QC
pass rate and FD/KID in SAM feature space against the real-vs-real yardstick, side by side.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))

from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.synthesis.diffusion import make_config, train  # noqa: E402

ISSUE_128 = dict(image_size=128, block_out_channels=(64, 128, 256, 256), attention_levels=(False, False, True, False),
                 layers_per_block=2)
GEN_SMALL = dict(image_size=64, block_out_channels=(32, 64, 64), attention_levels=(False,) * 3, layers_per_block=1,
                 batch_size=8, learning_rate=1e-3, lr_warmup_steps=0, checkpoint_every=1000)


def device_name(dev: str) -> str:
    if dev.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def train_rate(config, dev, steps, legacy, tmp) -> float:
    """Images/s of the training loop, after one warm-up run of 2 steps (allocations, cuDNN autotuning)."""
    s = config.image_size
    n = 32
    images = torch.rand(n, 1, s, s) * 2 - 1
    masks = torch.where(torch.rand(n, 1, s, s) > 0.5, 1.0, -1.0)
    warm = steps_cfg(config, 2)
    train(warm, images, masks, os.path.join(tmp, "warm.pt"), device=dev, resume=False, progress=False,
          legacy_loop=legacy)
    cfg = steps_cfg(config, steps)
    sync(dev)
    t0 = time.perf_counter()
    train(cfg, images, masks, os.path.join(tmp, "rate.pt"), device=dev, resume=False, progress=False,
          legacy_loop=legacy)
    sync(dev)
    # checkpoint writes (one at the end) are part of the loop's cost, as in real runs
    return steps * config.batch_size / (time.perf_counter() - t0)


def steps_cfg(config, steps):
    from dataclasses import replace

    return replace(config, max_steps=steps, checkpoint_every=10**9, log_every=min(config.log_every, steps))


def profile_step(config, dev, legacy, tmp, rows=12) -> str:
    """torch.profiler over 3 training steps (after 2 warm-up steps): top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    s = config.image_size
    images = torch.rand(16, 1, s, s) * 2 - 1
    masks = torch.where(torch.rand(16, 1, s, s) > 0.5, 1.0, -1.0)
    train(steps_cfg(config, 2), images, masks, os.path.join(tmp, "pw.pt"), device=dev, resume=False, progress=False,
          legacy_loop=legacy)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        train(steps_cfg(config, 3), images, masks, os.path.join(tmp, "p.pt"), device=dev, resume=False,
              progress=False, legacy_loop=legacy)
    key = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def pool_cases(hc18):
    return [c for c in read_cases(hc18) if c.split == "pool" and c.mask_path]


def train_small_generator(hc18, dev, steps, tmp, n_labels=5, unlabelled=0, seed=0, **extra):
    from fetal_head.synthesis.pipeline import train_generator

    pool = pool_cases(hc18)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    labels = [pool[i] for i in order[:n_labels]]
    others = [pool[i] for i in order[n_labels : n_labels + unlabelled]]
    cfg = make_config("tiny", **{**GEN_SMALL, "max_steps": steps, "seed": seed, **extra,
                                 "unlabelled_images": unlabelled})
    ckpt = os.path.join(tmp, f"gen_u{unlabelled}_{steps}.pt")
    t0 = time.perf_counter()
    summary = train_generator([(c.image_id, c.image_path, c.mask_path) for c in labels], cfg, ckpt, device=dev,
                              resume=False, progress=False, unlabelled=[(c.image_id, c.image_path) for c in others])
    summary["wall_s"] = time.perf_counter() - t0
    return ckpt, summary, labels, others


def synth_rate(ckpt, dev, predictor, n_pairs, sampler, steps, batched, guidance=None):
    from fetal_head.synthesis.sampling import PairGenerator, SamplingOptions, synthesize

    gen = PairGenerator(ckpt, device=dev, sampler=sampler, steps=steps, guidance_scale=guidance)
    predictor.clear_cache()
    got = []
    opts = SamplingOptions(qc="full", predictor=predictor, batch_size=8, progress=False, batched_qc=batched,
                           max_candidates_factor=1.0)
    sync(dev)
    t0 = time.perf_counter()
    result = synthesize(gen, n_pairs, seed=0, on_accept=lambda p, prov: got.append(p), options=opts)
    sync(dev)
    dt = time.perf_counter() - t0
    qc = result["qc"]
    return {"seconds": dt, "candidates": qc["candidates"], "accepted": len(got),
            "accepted_per_s": len(got) / dt, "candidates_per_s": qc["candidates"] / dt, "qc": qc, "pairs": got}


def decoder_rate(hc18, dev, steps, tmp) -> float:
    from fetal_head.segmentation.predictor import SamPredictor
    from fetal_head.segmentation.training import TrainConfig, finetune, label_items

    pool = pool_cases(hc18)[:6]
    items = label_items(pool, os.path.join(tmp, "labels"))
    cache = str(REPO / ".data" / "emb_cache")
    # epochs of ceil(5 train images / batch 4) = 2 steps; the first epoch also fills the embedding cache
    warm = SamPredictor.litemedsam(device=dev)
    finetune(warm, items, TrainConfig(max_epochs=1, train_batch_size=4, val_split=0.17, localiser=False), cache)
    epochs = max(1, steps // 2)
    pred = SamPredictor.litemedsam(device=dev)
    t0 = time.perf_counter()
    finetune(pred, items, TrainConfig(max_epochs=epochs, train_batch_size=4, val_split=0.17, localiser=False), cache)
    return epochs * 2 / (time.perf_counter() - t0)


def realism(predictor, hc18, synthetic_images, n_real, seed=0):
    """FD/KID of real half A vs real half B (the yardstick) and of real half A vs the synthetic images."""
    from fetal_head.io import read_image
    from fetal_head.synthesis.realism import compare, feature_scale, sam_features

    test = [c for c in read_cases(hc18) if c.split == "test"]
    pick = np.random.default_rng(seed).permutation(len(test))[: 2 * n_real]
    real = sam_features(predictor, [read_image(test[i].image_path) for i in pick], progress=False)
    syn = sam_features(predictor, synthetic_images, progress=False)
    scale = feature_scale(real)
    return {"real_vs_real": compare(real[:n_real], real[n_real:], scale, kid_subsets=20),
            "real_vs_synthetic": compare(real[:n_real], syn, scale, kid_subsets=20)}


def semi_compare(args, out):
    from fetal_head.segmentation.predictor import SamPredictor

    dev = args.device
    predictor = SamPredictor.litemedsam(device=dev)
    tmp = tempfile.mkdtemp(prefix="semi_")
    out(f"# Semi-supervised vs labelled-only mask-conditioned generator — {device_name(dev)}")
    out(f"budget: {args.gen_steps} steps, 64 px (channels 32-64-64), batch 8, seed 0; 5 labelled HC18 pool images; "
        f"semi-supervised adds {args.unlabelled} unlabelled pool images (labelled share 0.5 of each batch, "
        f"cond dropout 0.1), sampled with guidance {args.guidance}; both sampled with DPM-Solver++ "
        f"{args.dpm_steps} steps, {args.candidates} candidates, full QC (LiteMedSAM zero-shot). FD/KID in SAM "
        f"feature space vs {args.n_real} real test images (yardstick: two disjoint halves of real test images).")
    rows = []
    for name, unl, extra, guidance in (("labelled-only", 0, {}, None),
                                       ("semi-supervised", args.unlabelled, {"cond_dropout": 0.1}, args.guidance)):
        ckpt, summary, _, _ = train_small_generator(args.hc18, dev, args.gen_steps, tmp, unlabelled=unl, **extra)
        res = synth_rate(ckpt, dev, predictor, args.candidates, "dpm", args.dpm_steps, True, guidance=guidance)
        from fetal_head.synthesis.sampling import PairGenerator

        images = [p.image for p in PairGenerator(ckpt, device=dev, sampler="dpm", steps=args.dpm_steps,
                                                 guidance_scale=guidance).generate(1, range(args.n_real))]
        real = realism(predictor, args.hc18, images, args.n_real)
        rows.append((name, summary, res, real))
        out(f"- {name}: trained {summary['step']} steps in {summary['wall_s']:.0f} s (final loss "
            f"{summary['final_loss']:.4f}, {summary['num_unlabelled']} unlabelled); QC "
            f"{res['accepted']}/{res['candidates']} passed, rejected {res['qc'].get('rejected')}; "
            f"FD {real['real_vs_synthetic']['fd']:.1f} KID {real['real_vs_synthetic']['kid']:.3f} "
            f"(real vs real FD {real['real_vs_real']['fd']:.1f} KID {real['real_vs_real']['kid']:.3f})")
    out("")
    out("| generator | unlabelled | QC pass | FD (real vs real) | KID (real vs real) |")
    out("| --- | --- | --- | --- | --- |")
    for name, summary, res, real in rows:
        out(f"| {name} | {summary['num_unlabelled']} | {res['accepted']}/{res['candidates']} "
            f"({100 * res['accepted'] / max(1, res['candidates']):.0f} %) | {real['real_vs_synthetic']['fd']:.1f} "
            f"({real['real_vs_real']['fd']:.1f}) | {real['real_vs_synthetic']['kid']:.3f} "
            f"({real['real_vs_real']['kid']:.3f}) |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hc18", default=os.environ.get("HC18_DIR", str(REPO.parent / "shared" / "data" / "hc18")))
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny sizes: a smoke run on a CPU")
    ap.add_argument("--semi-compare", action="store_true")
    ap.add_argument("--train-steps", type=int, default=50, help="timed generator training steps per row")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gen-steps", type=int, default=1500, help="training steps of the generator sampled from")
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--dpm-steps", type=int, default=20)
    ap.add_argument("--decoder-steps", type=int, default=100)
    ap.add_argument("--unlabelled", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--n-real", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time the new loop with torch.compile")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--skip", nargs="*", default=[], choices=("train", "profile", "synth", "decoder"))
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_tiny:
        args.train_steps, args.batch_size = min(args.train_steps, 10), min(args.batch_size, 8)
        args.gen_steps, args.candidates, args.decoder_steps = min(args.gen_steps, 30), min(args.candidates, 4), 4
    lines = []

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    if args.semi_compare:
        semi_compare(args, out)
    else:
        run_profile(args, out)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


def run_profile(args, out):
    dev = args.device
    tmp = tempfile.mkdtemp(prefix="profile_")
    out(f"# Synthesis profile, old vs new code path — device: {device_name(dev)}")
    out(f"torch {torch.__version__}; command: python scripts/profile_synthesis.py {' '.join(sys.argv[1:])}")
    if args.cpu_tiny:
        out("CPU smoke sizes (--cpu-tiny): batch and step counts are tiny; the numbers compare code paths on this "
            "CPU only and say nothing about GPU throughput.")
    out("")
    table = []
    configs = (("generator training, 128 px (64-128-256-256)", make_config("default", **ISSUE_128)),
               ("generator training, default 256 px", make_config("default")))
    if args.cpu_tiny:  # the 128/256 px UNets take minutes per step on a loaded 2-core CPU: a 64 px stand-in
        configs = (("generator training, 64 px stand-in (32-64-64, CPU only)", make_config("tiny", **GEN_SMALL)),)
    prof_cfg = configs[0][1]
    if "train" not in args.skip:
        for label, cfg in configs:
            from dataclasses import replace

            cfg = replace(cfg, batch_size=args.batch_size)
            old = train_rate(cfg, dev, args.train_steps, True, tmp)
            new = train_rate(cfg, dev, args.train_steps, False, tmp)
            row = [f"{label}, batch {args.batch_size}, images/s", f"{old:.2f}", f"{new:.2f}"]
            if args.compile:
                row.append(f"{train_rate(replace(cfg, compile=True), dev, args.train_steps, False, tmp):.2f}")
            table.append(row)
            out(f"{row[0]}: old {row[1]}, new {row[2]}" + (f", new+compile {row[3]}" if args.compile else ""))
    if "profile" not in args.skip:
        from dataclasses import replace

        cfg = replace(prof_cfg, batch_size=args.batch_size)
        for legacy in (True, False):
            out("")
            out(f"## torch.profiler, 3 training steps of the {'old' if legacy else 'new'} loop "
                f"({cfg.image_size} px config, batch {args.batch_size}), top operators by self time")
            out(profile_step(cfg, dev, legacy, tmp))
    if "synth" not in args.skip:
        from fetal_head.segmentation.predictor import SamPredictor

        predictor = SamPredictor.litemedsam(device=dev)
        ckpt, summary, _, _ = train_small_generator(args.hc18, dev, args.gen_steps, tmp)
        out(f"generator sampled from: 64 px, {summary['step']} steps on 5 labels ({summary['wall_s']:.0f} s)")
        old = synth_rate(ckpt, dev, predictor, args.candidates, "ddim", 50, False)
        new = synth_rate(ckpt, dev, predictor, args.candidates, "dpm", args.dpm_steps, True)
        table.append(["synthesis + full QC, 64 px generator, accepted pairs/s",
                      f"{old['accepted_per_s']:.3f}", f"{new['accepted_per_s']:.3f}"])
        table.append(["synthesis + full QC, candidates/s (DDIM 50 + per-pair SAM vs DPM++ "
                      f"{args.dpm_steps} + batched SAM)", f"{old['candidates_per_s']:.3f}", f"{new['candidates_per_s']:.3f}"])
        table.append([f"QC pass rate ({summary['step']}-step 64 px generator, 5 labels)",
                      f"{old['accepted']}/{old['candidates']}", f"{new['accepted']}/{new['candidates']}"])
        out(f"synthesis: old {old['accepted']}/{old['candidates']} in {old['seconds']:.1f} s, new "
            f"{new['accepted']}/{new['candidates']} in {new['seconds']:.1f} s; QC new {new['qc']}")
    if "decoder" not in args.skip:
        rate = decoder_rate(args.hc18, dev, args.decoder_steps, tmp)
        table.append(["SAM decoder fine-tuning on cached embeddings, steps/s (batch 4; one code path)",
                      f"{rate:.2f}", f"{rate:.2f}"])
    out("")
    head = ["row", "old (before issue 14)", "new"] + (["new + torch.compile"] if args.compile else [])
    out("| " + " | ".join(head) + " |")
    out("| " + " | ".join("---" for _ in head) + " |")
    for row in table:
        out("| " + " | ".join(row + [""] * (len(head) - len(row))) + " |")


if __name__ == "__main__":
    main()
