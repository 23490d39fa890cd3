"""Training-step and input-pipeline throughput on one GPU. Run by hand, not a test.

Training step (default): torchvision ResNet-50, random init, 224x224, batch 256, synthetic data
resident on the GPU; one step = forward + cross-entropy over 1000 classes + backward + SGD
(momentum 0.9, weight decay 1e-4, fused kernel where available). Modes: fp32 (PyTorch defaults:
cuDNN convolutions may use TF32), bf16 autocast, + channels_last, + torch.compile, fp16 autocast
with GradScaler (NCHW and channels_last). ``cudnn.benchmark`` is on. Each mode: warm-up steps,
then ``--repeats`` timed runs of ``--steps`` steps between ``torch.cuda.synchronize()`` calls;
the table gives the median run's images/s and the spread.

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --modes bf16_cl,bf16_cl_compile --steps 50

Input pipeline (``--pipeline``): ``--images`` synthetic 500x375 JPEGs (see bench_decode.py) read
through a DataLoader (``pin_memory``, batch 256) for each worker count, RandomResizedCrop(224) +
horizontal flip, batches moved to the GPU and normalised there. Variants:

* ``pil-float``: the classic recipe, PIL decode + transforms + ToTensor + Normalize on the workers
  (float32 batches cross the process boundary and PCIe: 4x the bytes of uint8);
* ``pil-uint8``: PIL decode + crop/flip on the workers, uint8 to the GPU, normalised there;
* ``tv-uint8``: torchvision.io.decode_jpeg (libjpeg-turbo) on uint8 tensors, same otherwise;
* ``nvjpeg``: workers only read file bytes; the main process decodes on the GPU
  (``decode_jpeg(device='cuda')``, batched) and crops/resizes there;
* ``deepmetric``: the trainer's own loader (image list, ``imagenet`` preset with
  ``data.decoder=auto``, seeded per-sample augmentation, ``loader_settings``, uint8 batches
  normalised on the GPU as ``data.normalize_on_device=auto`` does).

``--e2e`` adds training (bf16 + channels_last) fed by the ``tv-uint8`` loader with the largest
worker count, to see whether the pipeline keeps the GPU busy.

    python benchmarks/bench_gpu.py --pipeline --workers 4,8,16 --e2e
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import make_jpegs  # noqa: E402  (same synthetic JPEGs as the decode benchmark)

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# name -> (label, autocast dtype or None, channels_last, compile, GradScaler)
MODES: Dict[str, Tuple[str, Optional[torch.dtype], bool, bool, bool]] = {
    "fp32": ("fp32", None, False, False, False),
    "bf16": ("bf16 autocast", torch.bfloat16, False, False, False),
    "bf16_cl": ("bf16 + channels_last", torch.bfloat16, True, False, False),
    "bf16_cl_compile": ("bf16 + channels_last + compile", torch.bfloat16, True, True, False),
    "fp16": ("fp16 + GradScaler", torch.float16, False, False, True),
    "fp16_cl": ("fp16 + GradScaler + channels_last", torch.float16, True, False, True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    if device.type == "cuda":
        try:
            return torch.optim.SGD(model.parameters(), fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.SGD(model.parameters(), foreach=True, **kw)


def make_step(
    model: torch.nn.Module, device: torch.device, amp: Optional[torch.dtype], use_scaler: bool, compiled: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    opt = make_optimizer(model, device)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    forward = torch.compile(model) if compiled else model

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(forward(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    return step


def build_model(device: torch.device, channels_last: bool, arch: str) -> torch.nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=1000).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def bench_mode(name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    label, amp, channels_last, compiled, use_scaler = MODES[name]
    torch.manual_seed(0)
    model = build_model(device, channels_last, args.arch)
    step = make_step(model, device, amp, use_scaler, compiled)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step(x, y)
    sync(device)
    warmup_s = time.perf_counter() - t0
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(x, y)
        sync(device)
        rates.append(args.batch * args.steps / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    out = dict(mode=label, rate=statistics.median(rates), lo=min(rates), hi=max(rates),
               warmup_s=warmup_s, peak_gib=peak, loss=float(loss.detach()))
    del model, step, x, y
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def train_table(args: argparse.Namespace, device: torch.device) -> str:
    rows = []
    for name in args.modes.split(","):
        try:
            r = bench_mode(name, args, device)
        except Exception as exc:  # one broken mode must not hide the others
            rows.append(f"| {MODES[name][0]} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | |")
            continue
        rows.append(
            f"| {r['mode']} | {r['rate']:.0f} | {r['lo']:.0f}-{r['hi']:.0f} | {r['peak_gib']:.1f} | {r['warmup_s']:.1f} |"
        )
        print(f"[progress] {rows[-1]}", file=sys.stderr, flush=True)
    head = [
        f"ResNet-50 train step, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"{args.steps} steps x {args.repeats} runs after {args.warmup} warm-up steps",
        "| mode | img/s (median) | min-max | peak GiB | warm-up s |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)


# ----------------------------------------------------------------------------- input pipeline
class JpegSet(torch.utils.data.Dataset):
    """``length`` samples cycling over ``paths``; ``variant`` picks the decode/augment path."""

    def __init__(self, paths: Sequence[str], length: int, variant: str, size: int = 224) -> None:
        from torchvision import transforms as T
        from torchvision.transforms import v2

        self.paths, self.length, self.variant = list(paths), length, variant
        if variant == "pil-float":
            self.tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                                 T.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])])
        elif variant == "pil-uint8":
            self.tf = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), v2.PILToTensor()])
        elif variant == "tv-uint8":
            self.tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.io import decode_jpeg, read_file

        path = self.paths[i % len(self.paths)]
        if self.variant == "nvjpeg":  # plain bytes: one tensor per image would cost a shared-memory fd each
            with open(path, "rb") as f:
                return f.read(), i % 1000
        if self.variant == "tv-uint8":
            return self.tf(decode_jpeg(read_file(path))), i % 1000
        return self.tf(Image.open(path).convert("RGB")), i % 1000


def _collate_bytes(batch):
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch])


class GpuInput:
    """Finishes a batch on the GPU: uint8 -> normalised float (channels_last), or nvjpeg decode + crop."""

    def __init__(self, device: torch.device, size: int = 224) -> None:
        self.device, self.size = device, size
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) * self.inv_std

    def nvjpeg(self, datas: List[bytes]) -> torch.Tensor:
        from torchvision.io import decode_jpeg
        from torchvision.transforms import v2

        imgs = decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in datas], device=self.device)
        crop = v2.RandomResizedCrop(self.size, antialias=True)
        out = torch.stack([v2.functional.horizontal_flip(c) if torch.rand(()) < 0.5 else c
                           for c in (crop(im) for im in imgs)])
        return self.normalise(out)


def deepmetric_loader(paths: Sequence[str], workers: int, args: argparse.Namespace, device: torch.device):
    """deepmetric's own training loader: image list + ``imagenet`` preset (data.decoder auto) +
    per-sample seeded augmentation + ``loader_settings`` (pinned on CUDA, 2 batches in flight per worker) +
    ``data.normalize_on_device: auto`` (CUDA: uint8 batches normalised on the GPU; CPU: float32)."""
    import numpy as np

    from deepmetric.data.io import ImageListDataset
    from deepmetric.data.loading import SeededBatchSampler, SeededDataset, loader_settings, normalisation_on_device
    from deepmetric.data.samplers import RandomBatchSampler
    from deepmetric.data.transforms import build_transform

    n = args.pipeline_batches * args.batch
    files = (list(paths) * (n // len(paths) + 1))[:n]
    ds = ImageListDataset(files, np.arange(n) % 1000, transform=build_transform("imagenet", train=True))
    ds, _ = normalisation_on_device(ds, "auto", device)  # CUDA: uint8 batches, normalised on the GPU
    batches = SeededBatchSampler(RandomBatchSampler(n, args.batch, seed=0), seed=0)
    settings = loader_settings(workers, "auto", device, persistent=False)
    return torch.utils.data.DataLoader(SeededDataset(ds), batch_sampler=batches, **settings.kwargs())


def loader_for(paths: Sequence[str], variant: str, workers: int, args: argparse.Namespace,
               device: torch.device = torch.device("cuda")):
    if variant == "deepmetric":
        return ((x, y) for x, y, _ in deepmetric_loader(paths, workers, args, device))
    ds = JpegSet(paths, args.pipeline_batches * args.batch, variant)
    return torch.utils.data.DataLoader(
        ds, batch_size=args.batch, shuffle=True, num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=True,
        prefetch_factor=4 if workers else None, persistent_workers=False, timeout=300 if workers else 0,
        collate_fn=_collate_bytes if variant == "nvjpeg" else None,
    )


def pipeline_rate(paths, variant: str, workers: int, args, device, gpu: GpuInput,
                  step: Optional[Callable] = None) -> float:
    """Images/s after the first ``skip`` batches (worker start-up and the first fill excluded)."""
    skip, seen, t0 = 3, 0, 0.0
    for i, (x, y) in enumerate(loader_for(paths, variant, workers, args, device)):
        if i == skip:
            sync(device)
            t0 = time.perf_counter()
        if variant == "nvjpeg":
            x = gpu.nvjpeg(x)
        elif variant == "pil-float" or x.dtype != torch.uint8:  # already normalised float32
            x = x.to(device, non_blocking=True)
        else:
            x = gpu.normalise(x)
        if step is not None:
            step(x, y.to(device, non_blocking=True))
        if i >= skip:
            seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - t0)


def pipeline_table(args: argparse.Namespace, device: torch.device) -> str:
    workers = [int(w) for w in args.workers.split(",")]
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = make_jpegs(tmp, args.images, 500, 375)
        size_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3
        print(f"{len(paths)} JPEGs 500x375 (mean {size_kb:.0f} KB) in {time.perf_counter() - t0:.1f} s", flush=True)
        gpu = GpuInput(device)
        lines = [
            f"Input pipeline, batch {args.batch}, {args.pipeline_batches} batches per cell, "
            f"{os.cpu_count()} CPUs, img/s",
            "| variant | " + " | ".join(f"{w} workers" for w in workers) + " |",
            "|---|" + "---|" * len(workers),
        ]
        for variant in variants:
            cells = []
            for w in workers:
                try:
                    cells.append(f"{pipeline_rate(paths, variant, w, args, device, gpu):.0f}")
                except Exception as exc:
                    cells.append(f"failed: {type(exc).__name__}: {str(exc)[:80]}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
            print(f"[progress] {lines[-1]}", file=sys.stderr, flush=True)
        if args.e2e:
            model = build_model(device, True, args.arch)
            step = make_step(model, device, torch.bfloat16, False, False)
            rate = pipeline_rate(paths, "tv-uint8", workers[-1], args, device, gpu, step=step)
            lines.append(f"\nEnd to end: {args.arch} bf16 + channels_last fed by tv-uint8 with {workers[-1]} "
                         f"workers: {rate:.0f} img/s")
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="ResNet-50 training step and input pipeline throughput")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pipeline", action="store_true", help="measure the input pipeline instead")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", default="4,8,16")
    ap.add_argument("--variants", default="pil-float,pil-uint8,tv-uint8,nvjpeg,deepmetric")
    ap.add_argument("--pipeline-batches", type=int, default=30)
    ap.add_argument("--e2e", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    import torchvision

    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {desc}; torch {torch.__version__}, torchvision {torchvision.__version__}", flush=True)
    print(pipeline_table(args, device) if args.pipeline else train_table(args, device))


if __name__ == "__main__":
    main()
