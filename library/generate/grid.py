"""An X/Y grid image: cells in rows and columns under a header row (x labels) beside a header column (y labels),
labels drawn with Pillow's default font and cut with an ellipsis to fit."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

HEADER_HEIGHT = 32  # pixels of the column-label row
HEADER_WIDTH = 128  # pixels of the row-label column
PADDING = 4
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to at most ``width`` pixels in ``font``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _lines(draw: ImageDraw.ImageDraw, text: str, font, width: int, count: int) -> list[str]:
    """``text`` wrapped at spaces into at most ``count`` lines of ``width`` pixels (the last one cut)."""
    words, lines = text.split(), []
    while words and len(lines) < count - 1:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:
        lines.append(" ".join(words))
    return [_fit(draw, line, font, width) for line in lines]


def grid_size(columns: int, rows: int, cell: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a grid of ``columns`` x ``rows`` cells of ``cell`` (width, height) pixels with headers."""
    return HEADER_WIDTH + columns * cell[0], HEADER_HEIGHT + rows * cell[1]


def make_grid(cells: Sequence[Sequence[Image.Image]], x_labels: Sequence[str], y_labels: Sequence[str]) -> Image.Image:
    """``cells[row][column]`` (all one size) pasted under ``x_labels`` and beside ``y_labels``."""
    width, height = cells[0][0].size
    grid = Image.new("RGB", grid_size(len(x_labels), len(y_labels), (width, height)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    line_height = max(1, int(sum(draw.textbbox((0, 0), "Ag", font=font)[1::2]) / 2 + 2))
    for column, label in enumerate(x_labels):
        left = HEADER_WIDTH + column * width
        lines = _lines(draw, label, font, width - 2 * PADDING, max(1, (HEADER_HEIGHT - PADDING) // line_height))
        for n, line in enumerate(lines):
            draw.text((left + PADDING, PADDING + n * line_height), line, fill=INK, font=font)
    for row, label in enumerate(y_labels):
        top = HEADER_HEIGHT + row * height
        lines = _lines(draw, label, font, HEADER_WIDTH - 2 * PADDING, max(1, (height - PADDING) // line_height))
        for n, line in enumerate(lines):
            draw.text((PADDING, top + PADDING + n * line_height), line, fill=INK, font=font)
        for column, image in enumerate(cells[row]):
            grid.paste(image.convert("RGB"), (HEADER_WIDTH + column * width, top))
    return grid
