"""Pictures: which image patches a method kept, drawn over the image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def kept_patches_overlay(image: Image.Image, kept: list[int], grid: tuple[int, int], scale: int = 6,
                         title: str | None = None) -> Image.Image:
    """The image enlarged `scale` times, dropped patches dimmed, kept ones in full colour and outlined in red."""
    rows, cols = grid
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    shade = Image.new("RGB", big.size, (255, 255, 255))
    dimmed = Image.blend(big, shade, 0.75)
    canvas = dimmed.copy()
    cell_w, cell_h = big.width / cols, big.height / rows
    kept_set = set(kept)
    draw = ImageDraw.Draw(canvas)
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w) - 1, round((r + 1) * cell_h) - 1)
        if index in kept_set:
            canvas.paste(big.crop(box), box[:2])
            draw.rectangle(box, outline=(220, 30, 30), width=2)
        else:
            draw.rectangle(box, outline=(215, 215, 215), width=1)
    if title:
        header = Image.new("RGB", (canvas.width, 22), (255, 255, 255))
        ImageDraw.Draw(header).text((4, 5), title, fill=(0, 0, 0))
        stacked = Image.new("RGB", (canvas.width, canvas.height + header.height), (255, 255, 255))
        stacked.paste(header, (0, 0))
        stacked.paste(canvas, (0, header.height))
        canvas = stacked
    return canvas


def save_side_by_side(panels: list[Image.Image], path: Path) -> Path:
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 8
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
