"""Own-images measurements, one JSON line each (never part of the unit tests).

    python benchmarks/own_images.py                       # the defaults below
    python benchmarks/own_images.py --count 2000 --big-count 20000 --feature-count 500

- first pass: images/s of decoding `--count` generated 640x480 JPEGs (a 4-class tree) into the
  pixel cache, at 224 px (what the backbones take) and at 32 px (the colour CNN);
- resnet18 features/s at 224 px, over `--feature-count` of those images (CPU, torch's threads);
- one round's training (`train_classifier`, preset `saturate`) of a head on frozen-resnet18 features
  vs the colour CNN at 32 px from scratch, on the same `--labeled` files, and their ratio;
- resident memory (peak RSS from getrusage; RssAnon/RssFile from /proc) loading a flat folder of
  `--big-count` small JPEGs, cold and warm, and after a pass over every pool item;
- start-up (load) time of a second run with warm caches;
- fine-tune mode's training images/s (resnet18 whole, 224 px, batches of 16).

Each load runs in a fresh child process, so its peak RSS and its time are its own. No pretrained
weights are downloaded: the backbone is a randomly initialised resnet18 saved as a local weights
file, which costs the same time per image as the pretrained one (accuracies are not the point here).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool as ProcessPool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ("ellipses", "boxes", "lines", "triangles")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def memory() -> dict:
    """Peak RSS of this process and of its finished children (getrusage, MiB) and the current split."""
    status = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                status[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MiB
    except OSError:
        pass
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "children_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "rss_mib": status.get("VmRSS"), "rss_anon_mib": status.get("RssAnon"),
            "rss_file_mib": status.get("RssFile")}


# --------------------------------------------------------------------------------------------
# Generated pictures


def _picture(seed: int, width: int, height: int, noise_level: float):
    """A photo-like picture: a smooth random background, noise, and shapes that give the class."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    label = seed % len(CLASSES)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    scale = min(width, height)
    for _ in range(3):
        cx, cy = rng.integers(scale // 6, width - scale // 6), rng.integers(scale // 6, height - scale // 6)
        r = int(rng.integers(scale // 16, scale // 4)) + 1
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if label == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif label == 1:
            draw.rectangle((cx - r, cy - r // 2, cx + r, cy + r // 2), fill=colour)
        elif label == 2:
            draw.line((cx - r, cy - r, cx + r, cy + r), fill=colour, width=max(1, r // 4))
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    if noise_level:
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        base = Image.blend(base, noise, noise_level)
    return label, base


def _write_one(job) -> int:
    folder, seed, width, height, noise, tree = job
    label, picture = _picture(seed, width, height, noise)
    target = Path(folder) / CLASSES[label] if tree else Path(folder)
    picture.save(target / f"img_{seed:06d}.jpg", quality=90)
    return label


def generate(folder: Path, count: int, width: int, height: int, noise: float, tree: bool) -> float:
    """Write `count` JPEGs (a class tree, or flat) with two processes; returns seconds."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    if tree:
        for name in CLASSES:
            (folder / name).mkdir(exist_ok=True)
    with ProcessPool(max(1, min(2, os.cpu_count() or 1))) as workers:
        list(workers.imap_unordered(_write_one, [(str(folder), seed, width, height, noise, tree)
                                                 for seed in range(count)], chunksize=256))
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Child processes: one measurement each, so RSS and time are their own


def child_load(args) -> None:
    from al_engine.data import LoadOptions, load_dataset

    classes = None if args.tree else ["a", "b"]
    baseline = memory()  # torch and the engine imported, nothing loaded
    start = time.perf_counter()
    dataset = load_dataset("imagefolder", LoadOptions(
        data_dir=args.dir, image_size=args.size, cache_dir=args.cache, classes=classes, progress=False))
    seconds = time.perf_counter() - start
    record = {"pool": int(dataset.train_images.shape[0]), "seconds": round(seconds, 3),
              "images_per_s": round(dataset.train_images.shape[0] / seconds, 1), "baseline": baseline,
              "after_load": memory(), "load_average_1min": round(os.getloadavg()[0], 2)}
    if args.touch:  # a pass over every pool item, in batches, like scoring the pool does
        import torch

        total = 0.0
        for chunk in torch.arange(dataset.train_images.shape[0]).split(4096):
            total += float(dataset.normalize(dataset.train_images[chunk]).mean())
        record["after_full_pass"] = memory()
    print(json.dumps(record))


def child_features(args) -> None:
    """Warm or cold: load pixels, build the backbone from the local file, build the feature dataset."""
    import torch

    from al_engine.backbones import build_backbone, build_feature_dataset
    from al_engine.data import LoadOptions, load_dataset, take_subset

    start = time.perf_counter()
    pixels = load_dataset("imagefolder", LoadOptions(data_dir=args.dir, image_size=224, cache_dir=args.cache,
                                                     progress=False))
    pixels = take_subset(pixels, args.subset, seed=0)
    loaded = time.perf_counter()
    backbone = build_backbone("resnet18", weights=args.weights, image_size=224, progress=False)
    built = time.perf_counter()
    features = build_feature_dataset(pixels, backbone, cache_dir=args.cache, device=torch.device("cpu"),
                                     progress=False)
    done = time.perf_counter()
    print(json.dumps({"pool": int(features.train_images.shape[0]), "feature_dim": backbone.feature_dim,
                      "pixels_s": round(loaded - start, 3), "backbone_s": round(built - loaded, 3),
                      "features_s": round(done - built, 3), "total_s": round(done - start, 3),
                      "after": memory(), "load_average_1min": round(os.getloadavg()[0], 2)}))


def child_weights(args) -> None:
    """Save a randomly initialised torchvision resnet18 as the local weights file (seeded)."""
    import torch

    from al_engine.backbones import _get_model

    torch.manual_seed(0)
    torch.save(_get_model("resnet18", weights=None).state_dict(), args.weights)
    print(json.dumps({"weights": args.weights}))


def child_finetune(args) -> None:
    """Training images/s of a whole resnet18 under the head at 224 px (fine-tune mode), batches of 16."""
    import torch
    from torch.nn import functional as F

    from al_engine.backbones import build_backbone, build_finetune_model

    model = build_finetune_model(build_backbone("resnet18", args.weights, 224, progress=False), 4).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(16, 3, 224, 224)
    labels = torch.arange(16) % 4
    rates = []
    for step in range(4):  # the first step warms up
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rates.append(16 / (time.perf_counter() - start))
    print(json.dumps({"train_images_per_s": round(float(np.median(rates[1:])), 2),
                      "load_average_1min": round(os.getloadavg()[0], 2)}))


def run_child(*arguments: str, all_lines: bool = False):
    """Run this script in a child mode; its last JSON line (or all of them)."""
    completed = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"child {arguments} failed:\n{completed.stderr[-3000:]}")
    lines = [json.loads(line) for line in completed.stdout.strip().splitlines() if line.startswith("{")]
    return lines if all_lines else lines[-1]


# --------------------------------------------------------------------------------------------
# The round-training comparison (in this process: it reads only warm caches)


def child_round(args) -> None:
    """Train one round of each model on the same labeled files; prints its records (warm caches only)."""
    import torch

    from al_engine.backbones import build_backbone, build_feature_dataset, build_head
    from al_engine.data import LoadOptions, load_dataset, take_subset
    from al_engine.models import build_model
    from al_engine.train import predict_logits, train_classifier, train_preset

    photos, cache, weights, feature_count, labeled_count = args.dir, args.cache, args.weights, args.subset, args.labeled
    device = torch.device("cpu")
    pixels224 = take_subset(load_dataset("imagefolder", LoadOptions(
        data_dir=photos, image_size=224, cache_dir=cache, progress=False)), feature_count, seed=0)
    pixels32 = take_subset(load_dataset("imagefolder", LoadOptions(
        data_dir=photos, image_size=32, cache_dir=cache, progress=False)), feature_count, seed=0)
    assert pixels224.file_names == pixels32.file_names  # the same files at two sizes
    backbone = build_backbone("resnet18", weights=weights, image_size=224, progress=False)
    features = build_feature_dataset(pixels224, backbone, cache_dir=cache, device=device, progress=False)
    rng = np.random.default_rng(0)
    order = rng.permutation(feature_count)
    labeled, held_out = np.sort(order[:labeled_count]), np.sort(order[labeled_count:])
    labels = pixels32.train_labels[labeled].numpy()
    config = train_preset("saturate")
    results = {}
    for name, dataset, model in (
            ("frozen-resnet18-head", features, build_head(features)),
            ("colour-cnn-32px", pixels32, build_model("colour-cnn", pixels32.image_shape, pixels32.num_classes))):
        torch.manual_seed(0)
        result = train_classifier(model, dataset, labeled, labels, config, device, seed=0)
        accuracy = None
        if len(held_out):
            predicted = predict_logits(model, dataset, held_out, device).argmax(1).cpu()
            accuracy = round(float((predicted == dataset.train_labels[held_out]).float().mean()), 4)
        results[name] = result
        emit({"bench": "round_training", "model": name, "labeled": int(labeled_count),
              "train_s": round(result.seconds, 3), "epochs": result.epochs,
              "s_per_epoch": round(result.seconds / max(result.epochs, 1), 4),
              "held_out_accuracy": accuracy, "load_average_1min": round(os.getloadavg()[0], 2),
              "note": "random-init backbone: accuracy is not the point"})
    head, cnn = results["frozen-resnet18-head"], results["colour-cnn-32px"]
    emit({"bench": "round_training_ratio", "cnn_over_head_train_s": round(cnn.seconds / head.seconds, 2),
          "cnn_over_head_s_per_epoch": round((cnn.seconds / cnn.epochs) / (head.seconds / head.epochs), 2)})


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="generated 640x480 JPEGs (default 10000)")
    parser.add_argument("--big-count", type=int, default=100_000, help="small JPEGs for the memory test")
    parser.add_argument("--feature-count", type=int, default=2000, help="images whose resnet18 features are computed")
    parser.add_argument("--labeled", type=int, default=1000, help="labeled items of the training round")
    parser.add_argument("--workdir", default=None, help="where pictures and caches go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    # Child-process modes (internal).
    parser.add_argument("--child", choices=["load", "features", "round", "weights", "finetune"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--tree", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--touch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--subset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "load":
        return child_load(args)
    if args.child == "features":
        return child_features(args)
    if args.child == "round":
        return child_round(args)
    if args.child == "weights":
        return child_weights(args)
    if args.child == "finetune":
        return child_finetune(args)

    # This process never imports torch: children inherit its resident memory in getrusage's peak
    # (ru_maxrss counts the parent's pages a child shared before exec), so it stays small.
    from importlib.metadata import version

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="own-images-"))
    work.mkdir(parents=True, exist_ok=True)
    photos, small, cache = work / "photos", work / "small", work / "cache"
    emit({"bench": "machine", "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
          "torch": version("torch"), "torchvision": version("torchvision"), "pillow": version("pillow"),
          "count": args.count, "big_count": args.big_count,
          "feature_count": args.feature_count, "labeled": args.labeled})
    try:
        seconds = generate(photos, args.count, 640, 480, noise=0.12, tree=True)
        sizes = [p.stat().st_size for p in photos.rglob("*.jpg")]
        emit({"bench": "generate", "files": len(sizes), "side": "640x480", "seconds": round(seconds, 1),
              "mean_kib": round(float(np.mean(sizes)) / 1024, 1)})

        for side in (224, 32):  # first pass: decode + resize + crop + write the cache
            cold = run_child("--child", "load", "--dir", str(photos), "--cache", str(cache), "--size", str(side),
                             "--tree")
            warm = run_child("--child", "load", "--dir", str(photos), "--cache", str(cache), "--size", str(side),
                             "--tree")
            cache_bytes = sum(p.stat().st_size for p in (cache / "pixels").rglob("pixels-*")
                              if p.parent.name.startswith(f"{side}px-"))
            emit({"bench": "first_pass", "image_size": side, "files": cold["pool"], "seconds": cold["seconds"],
                  "images_per_s": cold["images_per_s"], "baseline_rss_mib": cold["baseline"]["rss_mib"],
                  "peak_rss_mib": cold["after_load"]["peak_rss_mib"],
                  "decoder_peak_rss_mib": cold["after_load"]["children_peak_rss_mib"],
                  "cache_mib": round(cache_bytes / 2 ** 20, 1), "load_average_1min": cold["load_average_1min"]})
            emit({"bench": "warm_start", "what": f"load {cold['pool']} files at {side} px", "seconds": warm["seconds"],
                  "peak_rss_mib": warm["after_load"]["peak_rss_mib"], "rss_file_mib": warm["after_load"]["rss_file_mib"]})

        weights = work / "resnet18-random.pth"
        run_child("--child", "weights", "--weights", str(weights))
        subset = min(args.feature_count, args.count)
        cold = run_child("--child", "features", "--dir", str(photos), "--cache", str(cache), "--weights", str(weights),
                         "--subset", str(subset))
        emit({"bench": "features", "model": "resnet18", "image_size": 224, "images": cold["pool"],
              "seconds": cold["features_s"], "features_per_s": round(cold["pool"] / cold["features_s"], 1),
              "feature_dim": cold["feature_dim"], "peak_rss_mib": cold["after"]["peak_rss_mib"],
              "load_average_1min": cold["load_average_1min"]})
        warm = run_child("--child", "features", "--dir", str(photos), "--cache", str(cache), "--weights", str(weights),
                         "--subset", str(subset))
        emit({"bench": "warm_start", "what": f"load {args.count} files at 224 px + build resnet18 + "
                                             f"{subset} cached features",
              "seconds": warm["total_s"], "pixels_s": warm["pixels_s"], "backbone_s": warm["backbone_s"],
              "features_s": warm["features_s"], "peak_rss_mib": warm["after"]["peak_rss_mib"]})

        for record in run_child("--child", "round", "--dir", str(photos), "--cache", str(cache), "--weights",
                                str(weights), "--subset", str(subset), "--labeled", str(min(args.labeled, subset - 1)),
                                all_lines=True):
            emit(record)
        finetune = run_child("--child", "finetune", "--weights", str(weights))
        emit({"bench": "finetune_training", "model": "resnet18 (whole network + head)", "image_size": 224,
              "batch": 16, **finetune})

        seconds = generate(small, args.big_count, 64, 48, noise=0.0, tree=False)
        emit({"bench": "generate", "files": args.big_count, "side": "64x48", "seconds": round(seconds, 1)})
        for phase in ("cold", "warm"):
            result = run_child("--child", "load", "--dir", str(small), "--cache", str(cache), "--size", "32",
                               "--touch")
            emit({"bench": "big_folder_memory", "phase": phase, "files": result["pool"], "image_size": 32,
                  "seconds": result["seconds"], "images_per_s": result["images_per_s"], "baseline": result["baseline"],
                  "pixel_bytes_mib": round(result["pool"] * 3 * 32 * 32 / 2 ** 20, 1),
                  "after_load": result["after_load"], "after_full_pass": result["after_full_pass"]})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
