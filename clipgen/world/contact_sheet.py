"""Contact sheet of a world: one labelled sample per (row, class), for a quick look at what the model will see.

Rows are the six domains plus the natural base corpus, columns the world classes (held-out classes marked with
'*'). Images are shown at their stored resolution, upscaled with nearest-neighbour so no smoothing hides what
downsampling did to thin lines.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_BG = (40, 40, 40)
_FG = (235, 235, 235)
_HELD = (255, 170, 60)


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def make_contact_sheet(path: Path, rows: list[str], classes: list[str], cells: dict[tuple[str, str], Path],
                       image_px: int, heldout: list[str] = (), cell_px: int | None = None) -> Path:
    """Write the sheet to ``path``. ``cells[(row, class)]`` is the image shown in that cell (missing = blank).

    Small images are upscaled by an integer factor so every stored pixel stays a crisp square; images larger than
    a cell (224 px worlds) are shrunk to it, so a 345-class sheet stays a few megapixels."""
    cell_px = cell_px or 64
    cell = image_px * max(1, cell_px // image_px) if image_px <= cell_px else cell_px
    gap = 4
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, r, font)[0] for r in rows) + 12
    names = [f"{c} *" if c in heldout else c for c in classes]
    header_h = max(_text_size(probe, n, font)[0] for n in names) + 12
    width = label_w + len(classes) * (cell + gap) + gap
    height = header_h + len(rows) * (cell + gap) + gap
    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)
    for j, (cls, text) in enumerate(zip(classes, names)):
        # Class names run vertically so 30+ columns stay narrow.
        tw, th = _text_size(probe, text, font)
        strip = Image.new("RGB", (tw + 4, th + 6), _BG)
        ImageDraw.Draw(strip).text((2, 0), text, font=font, fill=_HELD if cls in heldout else _FG)
        strip = strip.rotate(90, expand=True)
        x = label_w + gap + j * (cell + gap) + (cell - strip.width) // 2
        sheet.paste(strip, (x, header_h - strip.height - 4))
    for i, row in enumerate(rows):
        y = header_h + gap + i * (cell + gap)
        th = _text_size(probe, row, font)[1]
        draw.text((6, y + (cell - th) // 2), row, font=font, fill=_FG)
        for j, cls in enumerate(classes):
            src = cells.get((row, cls))
            if src is None or not Path(src).is_file():
                continue
            with Image.open(src) as im:
                tile = im.convert("RGB").resize((cell, cell), Image.NEAREST if cell >= im.width else Image.BOX)
            sheet.paste(tile, (label_w + gap + j * (cell + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        sheet.save(f, format="PNG", compress_level=6)
    return path
