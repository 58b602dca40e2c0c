"""Where each image of a prompt lies among its tokens and which part of the picture each grid of tokens shows, as
the model's adapter says: the one source of image layout for answers, the CLI, eval and object recall, bench and
the server (never `vision_config.image_size // patch_size` or `image_token_index` read by hand).

An image is the unit a token budget counts. It is one grid of tokens (LLaVA-1.5, Gemma 3, Qwen-VL, Mistral 3), or
several: tiles plus a global view (Idefics3 / SmolVLM, InternVL), or a base view followed by unpadded
high-resolution tiles with newline tokens (LLaVA-NeXT, LLaVA-OneVision). Each grid is a `View`, with the region of
the picture it shows where that is known:
  - an image of one grid shows the whole picture;
  - tiles plus a global view (every grid the same size): the global view is the last grid and shows the whole
    picture; the tiles before it cover the picture in row-major order, rows x cols tiles, the arrangement whose
    shape is closest to the picture's (a square picture: n x n);
  - anyres images: the base view (the first side x side tokens) shows the whole picture; the unpadded tiles form
    no single grid and get no region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Region = tuple[float, float, float, float]  # (top, left, bottom, right) as shares of the picture's height / width
WHOLE: Region = (0.0, 0.0, 1.0, 1.0)


@dataclass
class View:
    """One grid of tokens of an image."""

    positions: torch.Tensor  # [n] positions in input_ids of its tokens, row-major over the grid
    grid: tuple[int, int]  # (rows, cols); (0, 0) when the tokens form no known grid
    region: Region | None  # the part of the picture it shows, None when unknown


@dataclass
class PromptImage:
    """One image of a prompt: all its visual tokens (what a budget counts) and its grids."""

    positions: torch.Tensor  # [n] positions in input_ids of its visual tokens (newline tokens excluded), sorted
    views: list[View] = field(default_factory=list)


def prompt_images(model, inputs, adapter=None) -> list[list[PromptImage]]:
    """Per sample of `inputs` (what the processor returned: input_ids, pixel values, image sizes / grids, ...):
    its images in order, from the model's adapter."""
    if adapter is None:
        from .models import adapter_for

        adapter = adapter_for(model)
    arguments = dict(inputs)
    call = adapter.read_entry_call((), arguments)
    visual = adapter.visual_mask(call)
    if call.attention_mask is not None:
        visual = visual & call.attention_mask[:, -visual.shape[1]:].to(device=visual.device, dtype=torch.bool)
    if call.image_inputs is None:
        return [[] for _ in range(visual.shape[0])]
    layout = adapter.image_layout(call, visual)
    base_side = getattr(adapter, "side", None)  # anyres: tokens per side of the base view
    return [_sample_images(layout, b, base_side) for b in range(visual.shape[0])]


def _sample_images(layout, b: int, base_side: int | None) -> list[PromptImage]:
    image_index = layout.image_index[b]
    images = []
    for image in range(int(image_index.max()) + 1 if image_index.numel() else 0):
        positions = (image_index == image).nonzero().flatten()
        if positions.numel() == 0:
            continue
        images.append(PromptImage(positions=positions, views=_views(layout, b, positions, base_side)))
    return images


def _views(layout, b: int, positions: torch.Tensor, base_side: int | None) -> list[View]:
    rows, cols = layout.grid_rows[b, positions], layout.grid_cols[b, positions]
    if layout.sub_image_index is None:  # one unit: one grid, or an anyres base view + tiles
        grid = (int(rows[0]), int(cols[0]))
        if grid[0] * grid[1] == positions.numel():
            return [View(positions, grid, WHOLE)]
        if base_side and positions.numel() > base_side * base_side:
            base = base_side * base_side
            return [View(positions[:base], (base_side, base_side), WHOLE), View(positions[base:], (0, 0), None)]
        return [View(positions, (0, 0), None)]
    sub = layout.sub_image_index[b, positions]
    views = []
    for index in range(int(sub.max()) + 1):
        inside = sub == index
        view_positions = positions[inside]
        grid = (int(rows[inside][0]), int(cols[inside][0]))
        known = grid[0] * grid[1] == view_positions.numel()
        views.append(View(view_positions, grid if known else (0, 0), None))
    _place_views(views)
    return views


def _place_views(views: list[View], aspect: float = 1.0) -> None:
    """Regions of the views of one image (see the module's notes); `aspect` is the picture's width / height."""
    if len(views) == 1:
        views[0].region = WHOLE if views[0].grid[0] else None
        return
    grids = {view.grid for view in views}
    if len(grids) != 1 or (0, 0) in grids:
        return  # grids of different sizes: no arrangement known
    views[-1].region = WHOLE  # the global view / thumbnail
    tiles = views[:-1]
    tile_rows, tile_cols = tile_arrangement(len(tiles), aspect)
    for k, view in enumerate(tiles):
        r, c = divmod(k, tile_cols)
        view.region = (r / tile_rows, c / tile_cols, (r + 1) / tile_rows, (c + 1) / tile_cols)


def tile_arrangement(count: int, aspect: float) -> tuple[int, int]:
    """(rows, cols) with rows * cols = count whose shape (cols / rows) is closest to `aspect` (width / height);
    between equally close ones, fewer rows."""
    pairs = [(rows, count // rows) for rows in range(1, count + 1) if count % rows == 0]
    return min(pairs, key=lambda pair: (abs(math.log(pair[1] / pair[0]) - math.log(aspect)), pair[0]))


def place_for_picture(images: list[PromptImage], width: int, height: int, image_processor=None) -> None:
    """Regions of `images` for a picture of width x height: tiles arranged to its shape (the default assumes a
    square picture), and, where `image_processor` centre-crops (CLIP's: the shorter side resized, then a square
    cut from the middle, as LLaVA-1.5's), a grid that showed the whole picture shows that middle part only."""
    crop = centre_crop_region(image_processor, width, height)
    for image in images:
        views = image.views
        if len(views) > 1 and all(view.grid != (0, 0) for view in views) and len({view.grid for view in views}) == 1:
            _place_views(views, width / height)
        elif len(views) == 1 and views[0].region == WHOLE:
            views[0].region = crop


def centre_crop_region(image_processor, width: int, height: int) -> Region:
    """The part of a width x height picture an image processor keeps: all of it, unless it resizes the shorter
    side to `size["shortest_edge"]` and then centre-crops `crop_size` (CLIP's preprocessing)."""
    if image_processor is None or not getattr(image_processor, "do_center_crop", False):
        return WHOLE
    size, crop = getattr(image_processor, "size", None) or {}, getattr(image_processor, "crop_size", None) or {}
    shortest = size.get("shortest_edge") if hasattr(size, "get") else None
    if not shortest or not hasattr(crop, "get") or not crop.get("height") or not crop.get("width"):
        return WHOLE
    scale = shortest / min(width, height)
    resized_height, resized_width = height * scale, width * scale
    top = max(0.0, (resized_height - crop["height"]) / 2 / resized_height)
    left = max(0.0, (resized_width - crop["width"]) / 2 / resized_width)
    return (top, left, 1 - top, 1 - left)


def kept_in(positions: torch.Tensor, kept_positions: torch.Tensor) -> list[int]:
    """Indices into `positions` (a view's tokens, row-major) of those in `kept_positions`."""
    return torch.isin(positions, kept_positions.to(positions.device)).nonzero().flatten().tolist()


def cell_coverage(mask, grid: tuple[int, int], region: Region = WHOLE) -> torch.Tensor:
    """Float [rows, cols]: the share of each cell covered by mask [H, W] when `region` of the picture is divided
    into a rows x cols grid. Cells may cut pixels: each pixel counts by the area it has inside the cell."""
    mask = torch.as_tensor(mask).float()
    height, width = mask.shape
    top, left, bottom, right = region
    down = _overlap(grid[0], top * height, bottom * height, height)  # [rows, H]
    across = _overlap(grid[1], left * width, right * width, width)  # [cols, W]
    return down @ mask @ across.T


def _overlap(cells: int, start: float, end: float, pixels: int) -> torch.Tensor:
    """[cells, pixels]: the share of each cell (of [start, end) cut into `cells` equal parts) that each pixel fills."""
    edges = torch.linspace(start, end, cells + 1, dtype=torch.float64)
    low, high = edges[:-1, None], edges[1:, None]
    pixel = torch.arange(pixels, dtype=torch.float64)[None, :]
    inside = (torch.minimum(high, pixel + 1) - torch.maximum(low, pixel)).clamp(min=0)
    return (inside / (high - low)).float()
