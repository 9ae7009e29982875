"""Images/s of nanollava.image.process vs transformers' CLIPImageProcessor (PIL backend).

One image per call, as a DataLoader worker sees them. HF "pad" = LLaVA's expand2square (PIL)
followed by the HF processor, which is what the original LLaVA does.

    python bench/bench_image.py [--size 336] [--repeat 5]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from nanollava import image  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "logo", "camera"]


def images_per_s(fns, imgs, repeat):
    """Best-of-`repeat` images/s of each fn; the fns take turns so machine load hits them alike."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn(imgs[0])                                    # warm up
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            for im in imgs:
                fn(im)
            best[k] = min(best[k], time.perf_counter() - t0)
    return [len(imgs) / b for b in best]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=336, help="image_size (CLIP input side)")
    p.add_argument("--repeat", type=int, default=5, help="timed passes over the images (best kept)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from skimage import data as skdata
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    hf = CLIPImageProcessorPil(size={"shortest_edge": args.size},
                               crop_size={"height": args.size, "width": args.size})
    imgs = [Image.fromarray(getattr(skdata, n)()) for n in PHOTOS]
    bg = tuple(int(m * 255) for m in image.CLIP_MEAN)

    def hf_crop(im):
        return hf(im, return_tensors="pt")["pixel_values"]

    def hf_pad(im):
        return hf(image.expand2square(im.convert("RGB"), bg), return_tensors="pt")["pixel_values"]

    print(f"{len(imgs)} skimage photos ({', '.join(f'{n} {im.size[0]}x{im.size[1]} {im.mode}' for n, im in zip(PHOTOS, imgs))}), "
          f"image_size {args.size}, 1 thread, best of {args.repeat}")
    print(f"{'mode':6s} {'nanollava img/s':>16s} {'HF PIL img/s':>14s} {'speedup':>8s}")
    for mode, ref in (("crop", hf_crop), ("pad", hf_pad)):
        ours, theirs = images_per_s([lambda im: image.process(im, mode, args.size), ref], imgs, args.repeat)
        print(f"{mode:6s} {ours:16.1f} {theirs:14.1f} {ours / theirs:7.2f}x")


if __name__ == "__main__":
    main()
