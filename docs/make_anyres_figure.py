"""Draw docs/anyres.png: what LLaVA-NeXT AnyRes does to one real photo (skimage.data.coffee).

    python docs/make_anyres_figure.py            # writes docs/anyres.png next to this script

Every number in the picture comes from nanollava.anyres (HF convention, LLaVA-v1.6 pinpoints,
CLIP ViT-L/14 at 336 px), so the figure cannot drift from the code:
  1. the photo; 2. the base view (squashed to 336 x 336); 3. the canvas of the best pinpoint,
  image fitted and padded with black, cut into 336 px tiles; 4. the feature grid: 24 x 24 features
  per tile, the rows that only saw padding greyed out (unpad removes them), an image_newline after
  each row. Drawn with matplotlib.
"""
import io
import os
import sys

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanollava import anyres, image  # noqa: E402

TILE, SIDE = 336, 24                       # CLIP-L/336: a tile gives 24 x 24 features
PAD, NEWLINE = (0.85, 0.85, 0.85), (0.96, 0.51, 0.08)   # removed cells light grey, image_newline orange


def tiles_panel(views, grid, gap=12):
    """The gh x gw tiles (views[1:]) side by side, `gap` white pixels apart (uint8 RGB array)."""
    gh, gw = grid
    panel = np.full((gh * TILE + (gh - 1) * gap, gw * TILE + (gw - 1) * gap, 3), 255, np.uint8)
    for k, tile in enumerate(views[1:]):
        r, c = divmod(k, gw)
        panel[r * (TILE + gap):r * (TILE + gap) + TILE, c * (TILE + gap):c * (TILE + gap) + TILE] = np.asarray(tile)
    return panel


def token_grid(canvas, size, grid):
    """(gh*24, gw*24 + 1) cells: each kept feature coloured by the canvas pixels it sees, the
    padding's features (removed by unpad) grey, one image_newline cell closing every kept row."""
    gh, gw = grid
    rows, cols = gh * SIDE, gw * SIDE
    kept_h, kept_w = anyres.unpad_shape((rows, cols), size)
    top, left = (rows - kept_h) // 2, (cols - kept_w) // 2
    cells = np.ones((rows, cols + 1, 3))
    cells[:, :cols] = PAD
    colours = np.asarray(canvas.resize((cols, rows), Image.Resampling.BOX)) / 255    # mean colour per feature
    cells[top:top + kept_h, left:left + kept_w] = colours[top:top + kept_h, left:left + kept_w]
    cells[top:top + kept_h, cols] = NEWLINE
    return cells, (kept_h, kept_w)


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
    cells, (kh, kw) = token_grid(canvas, size, grid)

    fig = Figure(figsize=(17, 4.6), layout="constrained")
    axes = fig.subplots(1, 4, width_ratios=[photo.width / photo.height, 1, grid[1] / grid[0], (cells.shape[1]) / cells.shape[0]])
    panels = [(np.asarray(photo), f"image {size[1]} x {size[0]} (w x h)"),
              (np.asarray(views[0]), "1. base view: squashed to 336 x 336"),
              (tiles_panel(views, grid), f"2. canvas {canvas_hw[1]} x {canvas_hw[0]}: fit, pad black, "
                                         f"{grid[0]} x {grid[1]} tiles"),
              (cells, f"3. features {grid[0] * SIDE} x {grid[1] * SIDE} -> unpad {kh} x {kw} + newline")]
    for ax, (pixels, title) in zip(axes, panels):
        ax.imshow(pixels, interpolation="nearest" if pixels is cells else "antialiased")
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
    fig.suptitle("LLaVA-NeXT AnyRes (v1.6 pinpoints, CLIP-L/336)", fontsize=14)
    fig.text(0.01, 0.01, f"visual tokens = {SIDE * SIDE} (base) + {kh} rows x ({kw} + 1 newline) = {n_tokens}.   "
             "Grey cells: features of the black padding, removed by unpad; orange: image_newline.", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    buf.seek(0)                            # 128 colours keep the PNG small in the repository
    Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT,
                                            dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"wrote {out} ({os.path.getsize(out) // 1024} KB), {n_tokens} tokens")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
