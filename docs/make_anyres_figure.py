"""Draw docs/anyres.png: what LLaVA-NeXT AnyRes does to one real photo (skimage.data.coffee).

    python docs/make_anyres_figure.py            # writes docs/anyres.png next to this script

Every number in the picture comes from nanollava.anyres (HF convention, LLaVA-v1.6 pinpoints,
CLIP ViT-L/14 at 336 px), so the figure cannot drift from the code:
  1. the photo; 2. the base view (squashed to 336 x 336); 3. the canvas of the best pinpoint,
  image fitted and padded with black, cut into 336 px tiles; 4. the feature grid: 24 x 24 features
  per tile, the rows that only saw padding struck out by unpad, an image_newline after each row.
"""
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanollava import anyres, image  # noqa: E402

TILE, SIDE = 336, 24                       # CLIP-L/336: a tile gives 24 x 24 features
BG, INK, PAD, NEWLINE = (255, 255, 255), (30, 30, 30), (60, 60, 60), (245, 130, 20)


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                      # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def fit_height(img, height):
    return img.resize((round(img.width * height / img.height), height), Image.Resampling.BICUBIC)


def tiles_panel(views, grid, scale, gap=6):
    """The gh x gw tiles (views[1:]) drawn apart by `gap` pixels, each shrunk by `scale`."""
    gh, gw = grid
    t = round(TILE * scale)
    panel = Image.new("RGB", (gw * t + (gw - 1) * gap, gh * t + (gh - 1) * gap), BG)
    for k, tile in enumerate(views[1:]):
        r, c = divmod(k, gw)
        panel.paste(tile.resize((t, t), Image.Resampling.BICUBIC), (c * (t + gap), r * (t + gap)))
    return panel


def token_panel(canvas, size, grid, cell=6):
    """(gh*24, gw*24) feature cells coloured by the canvas pixels they see; unpadded rows/cols
    kept, the rest struck through; one orange image_newline cell closes every kept row."""
    gh, gw = grid
    rows, cols = gh * SIDE, gw * SIDE
    kept_h, kept_w = anyres.unpad_shape((rows, cols), size)
    top, left = (rows - kept_h) // 2, (cols - kept_w) // 2
    colours = np.asarray(canvas.resize((cols, rows), Image.Resampling.BOX))      # mean colour per feature
    panel = Image.new("RGB", ((cols + 1) * cell + 4, rows * cell), BG)
    draw = ImageDraw.Draw(panel)
    for r in range(rows):
        kept_row = top <= r < top + kept_h
        for c in range(cols):
            x, y = c * cell, r * cell
            if kept_row and left <= c < left + kept_w:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tuple(int(v) for v in colours[r, c]))
            else:
                draw.rectangle((x, y, x + cell - 2, y + cell - 2), outline=PAD)
                draw.line((x, y + cell - 2, x + cell - 2, y), fill=PAD)
        if kept_row:
            x = cols * cell + 4
            draw.rectangle((x, r * cell, x + cell - 2, r * cell + cell - 2), fill=NEWLINE)
    return panel, (kept_h, kept_w)


def main(out=None):
    import skimage.data
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "anyres.png")
    photo = Image.fromarray(skimage.data.coffee())                 # 600 x 400 (w x h)
    size = (photo.height, photo.width)
    pinpoints = anyres.DEFAULT_PINPOINTS
    canvas_hw = anyres.select_best_resolution(size, pinpoints)
    grid = anyres.grid_shape(size, pinpoints, TILE)
    views = image.tiles(photo, canvas_hw, TILE)
    canvas = image.resize_and_pad(photo, canvas_hw)
    n_tokens = anyres.num_tokens(size, pinpoints, TILE, SIDE)

    h = 300
    panels = [
        (fit_height(photo, h), f"image {size[1]} x {size[0]} (w x h)"),
        (views[0].resize((h * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC),
         "1. base view: squashed to 336 x 336"),
        (tiles_panel(views, grid, scale=(h - 6 * (grid[0] - 1)) / (grid[0] * TILE)),
         f"2. canvas {canvas_hw[1]} x {canvas_hw[0]}: fit, pad black, {grid[0]} x {grid[1]} tiles"),
    ]
    tokens, (kh, kw) = token_panel(canvas, size, grid)
    panels.append((tokens, f"3. features {grid[0] * SIDE} x {grid[1] * SIDE} -> unpad {kh} x {kw} + newline"))

    title, label = font(20), font(15)
    gap, margin = 28, 20
    width = sum(p.width for p, _ in panels) + gap * (len(panels) - 1) + 2 * margin
    height = margin + 30 + max(p.height for p, _ in panels) + 60 + margin
    fig = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(fig)
    draw.text((margin, margin), "LLaVA-NeXT AnyRes (v1.6 pinpoints, CLIP-L/336)", fill=INK, font=title)
    x, y = margin, margin + 34
    for panel, text in panels:
        fig.paste(panel, (x, y))
        draw.text((x, y + panel.height + 8), text, fill=INK, font=label)
        x += panel.width + gap
    draw.text((margin, height - margin - 18),
              f"visual tokens = {SIDE * SIDE} (base) + {kh} rows x ({kw} + 1 newline) = {n_tokens}"
              "      struck-out cells: features of the black padding, removed by unpad",
              fill=INK, font=label)
    fig = fig.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    fig.save(out, optimize=True)
    print(f"wrote {out} ({os.path.getsize(out) // 1024} KB, {fig.width} x {fig.height}), {n_tokens} tokens")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
