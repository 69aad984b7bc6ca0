"""Richer frozen image features for the fashion benchmarks (issue 13 item 2): several views of each image
as its "frames", and several layers of the encoder in one vector.

    python bench/make_fashion_views.py --out /work/cache/fashion_views [--data ../shared/data/fashion]

Writes two zips in the preliminary layout (<id>.npy float16 [frames, D]) that bench/protocols.py
--feats-zip reads in place of the one-view export of bench/make_fashion_stores.py:
    views.zip   [V, 1280]: the embedded default encoder (EfficientNet-Lite0, its own preprocessing) on
                the whole image, its mirror image, and (--views up to 6) the corner crops of 80% of each
                side resized back to the input size: the linear probe's multi-crop trick
    layers.zip  [1, 1280 + 320 + 192 + 112]: the whole image's mean-pooled head features and the mean-pooled
                outputs of the last blocks of the three stages before it (each part scaled to the head's
                mean norm over the first batch, so no part is drowned by its width)
View 0 of views.zip is the store's current frame (equal to make_fashion_stores' export up to float16).
"""
import argparse
import io
import itertools
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from features.encoders import build_frame_encoder  # noqa: E402

CROP = 0.8                           # side of each corner crop, as a fraction of the image's side
STAGE_ENDS = (15, 14, 10)            # lite0 block indices ending the last three stages (320, 192, 112 ch)


def views(image, preprocess, n_views):
    """PIL image -> (n_views, 3, S, S): whole, mirrored, then up to four corner crops."""
    from PIL import ImageOps
    w, h = image.size
    cw, ch = round(w * CROP), round(h * CROP)
    corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]
    crops = [image.crop((x, y, x + cw, y + ch)).resize((w, h)) for x, y in corners[:max(0, n_views - 2)]]
    return torch.stack([preprocess(v) for v in ([image, ImageOps.mirror(image)] + crops)[:n_views]])


def head_and_stages(model, images):
    """(B, 3, S, S) -> (B, 1280) head features, [(B, C_s)] pooled stage outputs (320, 192, 112)."""
    x = model._swish(model._bn0(model._conv_stem(images)))
    pooled = {}
    for idx, block in enumerate(model._blocks):
        x = block(x)
        if idx in STAGE_ENDS:
            pooled[idx] = x.mean(dim=(2, 3))
    head = model._swish(model._bn1(model._conv_head(x))).mean(dim=(2, 3))
    return head, [pooled[i] for i in STAGE_ENDS]


def items(data):
    """(id, JPEG bytes) of every fashion item, in id order."""
    for path in sorted((Path(data) / "zip_frames").glob("*/*/*.zip")):
        with zipfile.ZipFile(path) as zf:
            yield path.stem, zf.read(sorted(zf.namelist())[0])


def batches(iterable, size):
    """Lists of up to `size` consecutive items."""
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def write_npy(zf, vid, array):
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float16))
    zf.writestr(f"{vid}.npy", buf.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/fashion"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=16, help="images per forward (x V views)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--views", type=int, default=6, choices=range(1, 7), help="whole, mirror, 4 corners")
    parser.add_argument("--limit", type=int, help="only the first N items (a check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image
    encoder = build_frame_encoder("efficientnet-lite0")
    model = encoder.net.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    part_scale = None
    start, n = time.time(), 0
    with zipfile.ZipFile(out / "views.zip.tmp", "w") as zv, zipfile.ZipFile(out / "layers.zip.tmp", "w") as zl:
        for chunk in batches(itertools.islice(items(args.data), args.limit), args.batch):
            batch = [(vid, views(Image.open(io.BytesIO(jpeg)).convert("RGB"), encoder.preprocess, args.views))
                     for vid, jpeg in chunk]
            with torch.inference_mode():
                flat = torch.cat([v for _, v in batch])                        # (B * V, 3, S, S)
                head, stages = head_and_stages(model, flat)
            head = head.view(len(batch), args.views, -1)                      # (B, V, 1280)
            whole = [s.view(len(batch), args.views, -1)[:, 0] for s in stages]         # [(B, C_s)] of view 0
            if part_scale is None:
                ref = head[:, 0].norm(dim=1).mean()
                part_scale = [float(ref / s.norm(dim=1).mean()) for s in whole]
            layers = torch.cat([head[:, 0]] + [s * k for s, k in zip(whole, part_scale)], dim=1)
            for i, (v, _) in enumerate(batch):
                write_npy(zv, v, head[i].numpy())
                write_npy(zl, v, layers[i:i + 1].numpy())
            n += len(batch)
            if n % 512 < args.batch:
                print(f"{n} items, {n / (time.time() - start):.1f} items/s", flush=True)
    (out / "views.zip.tmp").rename(out / "views.zip")
    (out / "layers.zip.tmp").rename(out / "layers.zip")
    print(f"{n} items in {time.time() - start:.0f} s -> {out}/views.zip, layers.zip; stage scales {part_scale}")


if __name__ == "__main__":
    main()
