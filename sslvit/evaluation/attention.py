"""Attention analysis of any saved encoder: mean attention distance per head and layer, and class-token maps.

Mean attention distance is the ViT paper's Figure 7 [0]: how far, in pixels, each head looks. For query patch
``i`` and key patch ``j`` with centres ``c_i``, ``c_j`` (pixels at the evaluation resolution, ``patch`` pixels
apart per grid step), ``d_ij = |c_i - c_j|``. One head's distance for one image is the mean over query patches of
``sum_j a_ij d_ij / sum_j a_ij``, with ``a`` the head's softmax weights from that query to the patch keys. Prefix
tokens (the class token and any registers) are left out as queries and as keys, as in the paper, which used patch
tokens; the weights over patch keys are renormalised to sum to 1, so attention a query parks on the class token
counts as neither near nor far. How much attention goes to prefix tokens is reported beside it (``prefix_mass``).
Averaged over images, that gives a ``(layers, heads)`` table.

A CNN's receptive field grows with depth; in a trained ViT some heads attend globally already in the first
layers while others stay local, and the spread narrows with depth. Two references come with every table: the
distance of a head that attends evenly to every patch (``uniform_distance``), and the largest possible distance
(``max_distance``, corner patch to corner patch).

``eval/attention_distance.py --encoder ENC --data DATA`` writes the table as JSON, the plot as PNG, class-token
attention maps of a few images (DINO's ``visualize_attention.py``) as PNG, and all of it to TensorBoard.

[0]: Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021, https://arxiv.org/abs/2010.11929
     (Figure 7 and Appendix D.7: distances averaged over 128 example images, the default here too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from sslvit.errors import UserError
from sslvit.viz import attention_weights, has_timm_attention, patch_grid

KIND = "attention_distance"


def patch_distances(grid: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """``(h * w, h * w)`` pixel distances between the centres of the patches of an ``h x w`` grid, row-major.

    Args:
        grid: ``(h, w)`` patches per column and per row.
        patch: ``(height, width)`` of one patch in pixels.
    """
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten() * patch[0], cols.flatten() * patch[1]], dim=1).double()
    return torch.cdist(centres, centres)


def distance_per_head(weights: Tensor, num_prefix: int, distances: Tensor) -> tuple[Tensor, Tensor]:
    """Mean attention distance and prefix share of every head of one block, per image.

    Args:
        weights: ``(N, heads, T, T)`` softmax attention weights, ``num_prefix`` prefix tokens first.
        num_prefix: class and register tokens before the patches.
        distances: ``(P, P)`` pixel distances between patch centres (``P = T - num_prefix``).

    Returns:
        ``(distance, prefix_mass)``, both ``(N, heads)``: the mean over query patches of the attention-weighted
        distance to the patch keys (weights renormalised over the patch keys), and the mean weight the query
        patches give to prefix tokens.
    """
    patches = weights[:, :, num_prefix:, num_prefix:].double()  # (N, heads, P queries, P keys)
    mass = patches.sum(dim=-1)  # (N, heads, P): what each query gives to patch keys
    weighted = torch.einsum("nhqk,qk->nhq", patches, distances.to(patches.device))
    return (weighted / mass.clamp_min(1e-12)).mean(dim=-1), (1.0 - mass).mean(dim=-1)


@torch.no_grad()
def mean_attention_distance(vit: torch.nn.Module, batches: Iterable[Tensor]) -> dict[str, Any]:
    """The ViT paper's mean attention distance of every head in every block, averaged over images.

    Args:
        vit: a timm ``VisionTransformer`` (eval mode), on the device of the batches.
        batches: ``(B, 3, H, W)`` normalised images; any size the model accepts.

    Returns:
        ``distance`` and ``prefix_mass``: ``(layers, heads)`` float64 arrays (pixels; share of attention), and
        ``num_images``, ``grid`` (patches), ``patch`` (pixels), ``uniform_distance``, ``max_distance``.

    Raises:
        UserError: ``vit`` is not a ViT whose blocks use timm's attention, or ``batches`` holds no image.
    """
    if not isinstance(vit, VisionTransformer) or not has_timm_attention(vit):
        raise UserError(f"attention distance needs a ViT (a timm VisionTransformer with timm's attention blocks), "
                        f"not a {type(vit).__name__}")  # fmt: skip
    sums = torch.zeros(2, len(vit.blocks), vit.blocks[0].attn.num_heads, dtype=torch.float64)
    patch = tuple(int(p) for p in vit.patch_embed.patch_size)
    seen = {"grid": None, "distances": None, "count": 0}

    def add(block: int, weights: Tensor) -> None:
        distance, prefix_mass = distance_per_head(weights, vit.num_prefix_tokens, seen["distances"])
        sums[0, block] += distance.sum(dim=0).cpu()
        sums[1, block] += prefix_mass.sum(dim=0).cpu()

    with attention_weights(vit, add):
        for images in batches:
            if patch_grid(vit, images) != seen["grid"]:
                seen["grid"] = patch_grid(vit, images)
                seen["distances"] = patch_distances(seen["grid"], patch).to(images.device)
            vit.forward_features(images)
            seen["count"] += len(images)
    count, grid = seen["count"], seen["grid"]
    if count == 0:
        raise UserError("attention distance got no images: check --data, --split and --num-images")
    reference = patch_distances(grid, patch)
    return {"distance": (sums[0] / count).numpy(), "prefix_mass": (sums[1] / count).numpy(), "num_images": count,
            "grid": list(grid), "patch": list(patch), "uniform_distance": float(reference.mean()),
            "max_distance": float(reference.max())}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    from sslvit.evaluation.options import add_encoder_arguments

    about = "Mean attention distance per head and layer (ViT paper, Figure 7) and class-token attention maps."
    p = argparse.ArgumentParser(prog="eval/attention_distance.py", description=about)
    add_encoder_arguments(p)
    p.add_argument("--data", required=True, help="digits, an image folder, parquet/arrow files or a Hub dataset id")
    p.add_argument("--split", default="train", help="which split's images to look at (labels are not needed)")
    p.add_argument("--image-column", default="", help="table sources: the image column (default: inferred)")
    p.add_argument("--num-images", type=int, default=128, help="images averaged over, evenly spaced in the split")
    p.add_argument("--num-maps", type=int, default=4, help="images in the attention-map PNG (0: none)")
    p.add_argument("--img-size", type=int, help="analysis resolution (default: the encoder's; pos-embed resampled)")
    p.add_argument("--crop-pct", type=float, help="Resize to img_size / crop_pct, CenterCrop img_size "
                   "(default: 1.0 up to 64 px, else 0.875)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=-1, help="data loader workers (-1: min(8, cores))")
    p.add_argument("--title", help="plot title (default: the encoder and the data)")
    p.add_argument(
        "--json-out",
        help="the JSON report; the PNGs go beside it (default: <run>/eval/"
        "attention_distance.json for an encoder in a run folder, else ./eval_attention_distance.json)",
    )
    p.add_argument("--tb-dir", help="TensorBoard folder (default: <run>/tensorboard/attention_distance, else "
                   "<json-out stem>_tensorboard)")  # fmt: skip
    return p


def _outputs(args: argparse.Namespace, identity: dict[str, Any]) -> dict[str, Path]:
    from sslvit.evaluation.cli import json_out_path

    json_out = json_out_path(KIND, identity, args.json_out)
    stem = json_out.with_suffix("")
    run_dir = identity.get("run_dir")
    default_tb = Path(run_dir) / "tensorboard" / KIND if run_dir else Path(f"{stem}_tensorboard")
    return {"json": json_out, "plot": json_out.with_suffix(".png"), "maps": Path(f"{stem}_maps.png"),
            "tensorboard": Path(args.tb_dir) if args.tb_dir else default_tb}  # fmt: skip


def _images(args: argparse.Namespace, img_size: int, crop_pct: float, device: torch.device):
    """The source's description and a generator of ``(B, 3, H, W)`` eval-transformed images on ``device``."""
    from sslvit.data import open_source
    from sslvit.evaluation.features import eval_loader
    from sslvit.recipe import DataConfig
    from sslvit.views import eval_transform

    if args.num_images < 1:
        raise UserError(f"--num-images {args.num_images} must be at least 1")
    cfg = DataConfig(path=args.data, image_column=args.image_column, num_workers=args.num_workers)
    source = open_source(cfg, args.split)
    n = min(args.num_images, len(source))
    indices = np.unique(np.linspace(0, len(source) - 1, n).round().astype(np.int64))
    loader = eval_loader(source, indices, eval_transform(img_size, crop_pct), img_size, args.batch_size, cfg, None)
    batches = (images[ok.bool()] for images, _, _, ok in loader)  # undecodable images are left out
    return source.description, (images.to(device) for images in batches if len(images))


def _attention_maps(encoder: VisionTransformer, images: list[Tensor], num_maps: int) -> Tensor | None:
    """DINO-style class-token maps of the first ``num_maps`` images as one ``(3, H', W')`` grid, or None.

    Images smaller than 128 px are enlarged (nearest) by a whole factor first: 32 px panels are too small to read.
    """
    from sslvit.viz import attention_grid, cls_attention_maps

    if num_maps < 1 or encoder.cls_token is None or not images:
        return None
    first = torch.cat(images)[:num_maps]
    maps = cls_attention_maps(encoder, first).cpu()
    scale = max(1, 128 // first.shape[-1])
    return attention_grid(F.interpolate(first.cpu(), scale_factor=scale, mode="nearest"), maps)


def _log_tensorboard(tb_dir: Path, result: dict[str, Any], plot: np.ndarray, maps: Tensor | None) -> None:
    """Scalars with the layer (1-based) as the step, so each head draws its distance against depth; then images."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    for layer, row in enumerate(result["distance"], start=1):
        writer.add_scalar(f"{KIND}/mean_over_heads", float(row.mean()), layer)
        for head, value in enumerate(row):
            writer.add_scalar(f"{KIND}/head_{head}", float(value), layer)
    writer.add_image(f"{KIND}/plot", plot, 0, dataformats="HWC")
    if maps is not None:
        writer.add_image("attention_maps/cls_last_block", maps, 0)
    writer.close()


def run_attention_distance(argv: list[str] | None = None) -> int:
    """``eval/attention_distance.py``: JSON + PNG plot + attention-map PNG + TensorBoard for one encoder."""
    from accelerate.state import PartialState

    from sslvit.evaluation.features import default_crop_pct
    from sslvit.evaluation.load import load_encoder
    from sslvit.evaluation.options import _parse_model_args

    args = _parser().parse_args(argv)
    started = time.perf_counter()
    if not PartialState().is_main_process:  # one image set, one table: nothing to share out
        return 0
    encoder, identity = load_encoder(args.encoder, args.weights, args.img_size, _parse_model_args(args.model_args))
    crop_pct = args.crop_pct or default_crop_pct(identity["img_size"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)
    description, batches = _images(args, identity["img_size"], crop_pct, device)
    kept: list[Tensor] = []

    def keep_first(images: Iterable[Tensor]):
        for batch in images:
            if sum(len(k) for k in kept) < args.num_maps:
                kept.append(batch)
            yield batch

    result = mean_attention_distance(encoder, keep_first(batches))
    maps = _attention_maps(encoder, kept, args.num_maps)
    _write(args, identity, result, maps, description, crop_pct, started)
    return 0


def _write(args, identity, result, maps, description: str, crop_pct: float, started: float) -> None:
    """Write the PNGs, TensorBoard and the JSON report; print the table."""
    from torchvision.utils import save_image

    from sslvit.viz import attention_distance_figure, figure_to_array

    out = _outputs(args, identity)
    out["json"].parent.mkdir(parents=True, exist_ok=True)
    who = Path(identity["run_dir"]).name if identity.get("run_dir") else identity["architecture"]
    title = args.title or f"{who} ({identity['kind']}, {identity['sha256'][:8]}): {description.split(' ')[0]} " \
        f"[{args.split}], {result['num_images']} images"  # fmt: skip
    fig = attention_distance_figure(result["distance"], title, result["uniform_distance"], result["max_distance"])
    fig.savefig(out["plot"])
    if maps is not None:
        save_image(maps, out["maps"])
    _log_tensorboard(out["tensorboard"], result, figure_to_array(fig), maps)
    report = _report(args, identity, result, description, crop_pct, started, out, maps is not None)
    out["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    _print_table(report, out)


def _report(args, identity, result, description, crop_pct, started, out, has_maps: bool) -> dict[str, Any]:
    import timm

    distance, prefix = result["distance"], result["prefix_mass"]
    return {"kind": KIND, "encoder": identity,
            "data": {"path": args.data, "split": args.split, "source": description, "num_images": result["num_images"],
                     "img_size": identity["img_size"], "crop_pct": crop_pct, "grid": result["grid"],
                     "patch": result["patch"]},
            "method": {"distance": "pixels between patch centres at img_size, weighted by attention, averaged over "
                                   "query patches and images (ViT paper, Figure 7)",
                       "prefix_tokens": "left out as queries and keys; weights over patch keys renormalised to 1; "
                                        "their share reported as prefix_mass",
                       "attention_maps": "class token -> patches, last block, one panel per head"},
            "metrics": {"distance": distance.round(4).tolist(), "mean_per_layer": distance.mean(1).round(4).tolist(),
                        "prefix_mass": prefix.round(4).tolist(),
                        "uniform_distance": round(result["uniform_distance"], 4),
                        "max_distance": round(result["max_distance"], 4)},
            "files": {"plot": str(out["plot"]), "attention_maps": str(out["maps"]) if has_maps else None,
                      "tensorboard": str(out["tensorboard"])},
            "wall_time_s": round(time.perf_counter() - started, 2), "command": " ".join(sys.argv),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "timm": timm.__version__}}  # fmt: skip


def _print_table(report: dict[str, Any], out: dict[str, Path]) -> None:
    enc, data, m = report["encoder"], report["data"], report["metrics"]
    print(f"mean attention distance of {enc['path']} [sha256 {enc['sha256']}]")
    print(f"data: {data['num_images']} of {data['source']}; {data['img_size']} px, {data['patch'][0]} px "
          f"patches; uniform attention {m['uniform_distance']:.2f} px, largest {m['max_distance']:.2f} px")  # fmt: skip
    rows = [("layer", "mean", "min head", "max head", "prefix share")]
    for layer, row in enumerate(m["distance"], start=1):
        rows.append((str(layer), f"{np.mean(row):.2f}", f"{min(row):.2f}", f"{max(row):.2f}",
                     f"{np.mean(m['prefix_mass'][layer - 1]):.3f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    maps = f", maps {out['maps']}" if report["files"]["attention_maps"] else ""
    print(f"wall time {report['wall_time_s']:.1f} s; JSON {out['json']}, plot {out['plot']}{maps}, "
          f"TensorBoard {out['tensorboard']}")  # fmt: skip
