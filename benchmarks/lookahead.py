"""Lookahead modes on Fashion-MNIST: seconds per round and agreement with the exact references.

One JSON line per mode (and one for distillation). The set-up is one round of the issue's
benchmark: 5000 labeled items, the rest split 80/20 into candidates (about 44k) and evaluation
items (about 11k). The references (the exact loops) are timed on a few hundred candidates and
extrapolated to the whole candidate set; agreement is measured in the same run:
- top-100 overlap: |top 100 by the mode  &  top 100 by the reference| / 100 on a random candidate sample;
- Spearman rank correlation of the two sets of distances on that sample.

    python benchmarks/lookahead.py                      # the full benchmark (about 10-15 minutes on 2 cores)
    python benchmarks/lookahead.py --labeled 1000 --exact-full 40 --agreement 500   # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from al_engine.data import LoadOptions, Pool, load_dataset  # noqa: E402
from al_engine.models import build_model  # noqa: E402
from al_engine.strategies.base import QueryState  # noqa: E402
from al_engine.strategies.lookahead import candidate_distances, last_layer_distances, merge_shortlist  # noqa: E402
from al_engine.strategies.lookahead_round import LookaheadOptions, auto_step, prepare_round  # noqa: E402
from al_engine.strategies.lookahead_exact import StepRule  # noqa: E402
from al_engine.strategies.lookahead_fast import is_certified  # noqa: E402
from al_engine.train import (DistillConfig, distill_student, embed_pool, feature_distance,  # noqa: E402
                             fresh_copy, train_classifier, train_preset)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def overlap(first: np.ndarray, second: np.ndarray, top: int = 100) -> float:
    """Share of the `top` lowest distances the two rankings have in common."""
    return len(set(np.argsort(first, kind="stable")[:top]) & set(np.argsort(second, kind="stable")[:top])) / top


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def sweep(state, round_, options, scales, common) -> None:
    """Does SGD on one example work? The share of candidates whose steps help, per step scale."""
    norms = round_.rule.lr / options.lr_scale  # lr = lr_scale / mean ||h~||^2
    default = candidate_distances(state, round_, round_.candidates, options)
    for scale in scales:
        scaled = dataclasses.replace(round_, rule=StepRule(scale * norms, options.momentum, options.steps))
        distances = candidate_distances(state, scaled, round_.candidates, options)
        emit({"mode": "lr-sweep", "lr_scale": scale, "lr": scale * norms,
              "helped_fraction": float(np.mean(distances < round_.baseline)),
              "best_change": float(distances.min() - round_.baseline),
              "median_change": float(np.median(distances) - round_.baseline),
              "top100_overlap_with_default": overlap(distances, default), **common})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labeled", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=12, help="classifier epochs (fixed)")
    parser.add_argument("--agreement", type=int, default=2000, help="candidates for the last-layer agreement")
    parser.add_argument("--exact-full", type=int, default=200, help="candidates for the full-network agreement")
    parser.add_argument("--batched", type=int, default=32, help="candidates for batched vs exact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distill-epochs", type=int, default=15, help="cap on distillation epochs (both losses)")
    parser.add_argument("--lr-scale", type=float, default=LookaheadOptions.lr_scale, help="the auto step's scale")
    parser.add_argument("--fast-sample-only", action="store_true",
                        help="score full-fast on the agreement sample only (no timed full-fast round)")
    parser.add_argument("--skip-distill-compare", action="store_true")
    parser.add_argument("--sweep-lr-scale", default="", help="comma-separated lr_scale values: helped fraction "
                        "and top-100 overlap with the default, last-layer closed form, then stop")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    dataset = load_dataset("fashion-mnist", LoadOptions())
    pool = Pool(len(dataset.train_labels))
    labeled = pool.initial_indices(args.labeled, args.seed)
    pool.add_labels(labeled, dataset.train_labels[labeled].numpy(), -1)
    model = build_model("auto", dataset.image_shape, dataset.num_classes).to(device)
    config = train_preset("saturate", max_epochs=args.epochs, fixed_epochs=True)
    result, train_s = timed(train_classifier, model, dataset, labeled, dataset.train_labels[labeled].numpy(),
                            config, device, args.seed)
    state = QueryState(model=model, dataset=dataset, pool=pool, device=device, seed=args.seed, train_config=config)
    common = {"labeled": args.labeled, "threads": torch.get_num_threads(), "device": str(device),
              "note": "CPU shared with other jobs; timings under load"}

    options = LookaheadOptions(mode="last-layer", distill_epochs=args.distill_epochs, lr_scale=args.lr_scale)
    round_, prepare_s = timed(prepare_round, state, options)
    candidates, evaluation = round_.candidates, round_.evaluation
    emit({"mode": "setup", "classifier_train_s": round(train_s, 1), "prepare_s": round(prepare_s, 1),
          "candidates": len(candidates), "evaluation": len(evaluation), "distill_epochs": round_.distill.epochs,
          "distill_distance_l2": round_.distill_distance, "last_layer_lr": round_.rule.lr, **common})

    if not args.skip_distill_compare:  # how well the mean-feature loss distils, on the same evaluation items
        student = fresh_copy(model, 31)
        mean_result, mean_s = timed(distill_student, student, model, dataset, pool.labeled_indices,
                                    DistillConfig(loss="mean", max_epochs=args.distill_epochs), device, 32)
        emit({"mode": "distill", "l2_distance": round_.distill_distance,
              "mean_distance": feature_distance(student, model, dataset, evaluation, device),
              "mean_epochs": mean_result.epochs, "mean_s": round(mean_s, 1),
              "l2_epochs": round_.distill.epochs, **common})

    if args.sweep_lr_scale:
        sweep(state, round_, options, [float(v) for v in args.sweep_lr_scale.split(",")], common)
        return

    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(candidates, size=min(args.agreement, len(candidates)), replace=False))

    # last-layer: the whole round, then agreement with the exact last-layer loop on the sample.
    distances, round_s = timed(candidate_distances, state, round_, candidates, options)
    baseline = round_.baseline
    reference_options = dataclasses.replace(options, mode="exact", last_layer=True)
    reference, reference_s = timed(candidate_distances, state, round_, sample, reference_options)
    approximate, exact, _ = last_layer_distances(state, round_, sample, options.shortlist)
    fixed_only = approximate
    size = options.shortlist
    while True:  # the strategy's select(): grow the shortlist until the top 100 is certain
        known = ~np.isnan(exact)
        if is_certified(exact[known], approximate, np.flatnonzero(known), 100) or size >= len(sample):
            break
        size *= 2
        approximate, exact, _ = last_layer_distances(state, round_, sample, size)
    merged = merge_shortlist(approximate, exact)
    emit({"mode": "last-layer", "round_s": round(round_s, 2), "candidates": len(candidates),
          "reference": "exact last_layer=true", "reference_s_per_candidate": reference_s / len(sample),
          "reference_round_s_extrapolated": round(reference_s / len(sample) * len(candidates), 1),
          "agreement_candidates": len(sample), "top100_overlap": overlap(merged, reference),
          "top100_overlap_fixed_pattern_only": overlap(fixed_only, reference),
          "spearman": float(spearmanr(merged, reference)[0]),
          "spearman_fixed_pattern_only": float(spearmanr(fixed_only, reference)[0]),
          "max_abs_error_shortlist": float(np.nanmax(np.abs(exact - reference))), "shortlist": int(size),
          "lr": round_.rule.lr, "baseline_distance": baseline,
          "helped_fraction": float(np.mean(reference < baseline)),
          "helped_fraction_round": float(np.mean(distances < baseline)), **common})

    # Full network: the exact loop on a few hundred candidates, full-fast on all, batched beside exact.
    full_options = LookaheadOptions(mode="exact", lr_scale=args.lr_scale)
    full_round = dataclasses.replace(round_, cache={}, rule=StepRule(
        auto_step(round_.student, state, lambda idx: embed_pool(model, dataset, idx, device), full_options),
        options.momentum, options.steps))
    full_sample = sample[:args.exact_full]
    exact_full, exact_s = timed(candidate_distances, state, full_round, full_sample, full_options)
    emit({"mode": "exact", "s_per_candidate": exact_s / len(full_sample),
          "round_s_extrapolated": round(exact_s / len(full_sample) * len(candidates), 1),
          "timed_candidates": len(full_sample), "lr": full_round.rule.lr, "baseline_distance": baseline,
          "helped_fraction": float(np.mean(exact_full < baseline)), **common})

    fast_options = LookaheadOptions(mode="full-fast", lr_scale=args.lr_scale)
    fast_set = full_sample if args.fast_sample_only else candidates
    fast_all, fast_round_s = timed(candidate_distances, state, full_round, fast_set, fast_options)
    fast_sample = fast_all[np.searchsorted(fast_set, full_sample)]
    last_layer_sample = distances[np.searchsorted(candidates, full_sample)]
    emit({"mode": "full-fast", "round_s": round(fast_round_s, 2), "candidates": len(fast_set),
          "reference": "exact (full network)", "agreement_candidates": len(full_sample),
          "spearman": float(spearmanr(fast_sample, exact_full)[0]),
          "top10_overlap": overlap(fast_sample, exact_full, 10), "top20_overlap": overlap(fast_sample, exact_full, 20),
          "spearman_last_layer_vs_full_exact": float(spearmanr(last_layer_sample, exact_full)[0]),
          "trunk_rank": fast_options.trunk_rank, "helped_fraction": float(np.mean(fast_all < baseline)),
          "exact_top10_in_fast_top20": len(set(np.argsort(exact_full)[:10]) & set(np.argsort(fast_sample)[:20])) / 10,
          **common})

    rank0 = dataclasses.replace(fast_options, trunk_rank=0)
    fast_rank0, _ = timed(candidate_distances, state, dataclasses.replace(full_round, cache={}), full_sample, rank0)
    emit({"mode": "full-fast trunk_rank=0", "agreement_candidates": len(full_sample),
          "spearman": float(spearmanr(fast_rank0, exact_full)[0]), **common})

    batch_sample = full_sample[:args.batched]
    batched_options = LookaheadOptions(mode="batched")
    batched, batched_s = timed(candidate_distances, state, full_round, batch_sample, batched_options)
    reference_part = exact_full[:len(batch_sample)]
    emit({"mode": "batched", "s_per_candidate": batched_s / len(batch_sample),
          "exact_s_per_candidate": exact_s / len(full_sample), "timed_candidates": len(batch_sample),
          "max_abs_difference": float(np.max(np.abs(batched - reference_part))),
          "identical_order": bool((np.argsort(batched, kind="stable") == np.argsort(reference_part, kind="stable")).all()),
          "top10_overlap": overlap(batched, reference_part, 10), **common})


if __name__ == "__main__":
    main()
