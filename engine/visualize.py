"""Draw predicted and ground-truth boxes on an image and save it as PNG (PIL only).

Ground truth: thin white boxes with the class name below the top edge. Predictions: one colour per class,
the class name and the score above the box. Small images are enlarged (nearest neighbour) first so that the
text stays readable on the 128 px built-in images.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# Distinct colours for up to 10 classes, then they repeat.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def to_pil(image: Tensor) -> Image.Image:
    """float (3, H, W) in [0, 1] RGB -> PIL RGB image."""
    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(array)


def draw_boxes(image: Tensor | Image.Image, *, class_names: list[str], boxes: Tensor | None = None,
               labels: Tensor | None = None, scores: Tensor | None = None, gt_boxes: Tensor | None = None,
               gt_labels: Tensor | None = None, score_threshold: float = 0.3, min_size: int = 512) -> Image.Image:
    """Boxes drawn on a copy of the image.

    image: float (3, H, W) in [0, 1] or a PIL image; boxes / gt_boxes: (K, 4) xyxy pixels of that image;
    labels / gt_labels: (K,) int64 in 0..C-1; scores: (K,) in [0, 1], boxes below score_threshold are skipped.
    min_size: the image is enlarged by an integer factor until its short side is at least this many pixels.
    """
    pil = to_pil(image) if isinstance(image, Tensor) else image.convert("RGB")
    factor = max(1, -(-min_size // min(pil.size)))  # ceil division
    if factor > 1:
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()

    if gt_boxes is not None:
        for box, label in zip((gt_boxes * factor).tolist(), gt_labels.tolist()):
            draw.rectangle(box, outline=(255, 255, 255), width=1)
            draw.text((box[0] + 2, box[1] + 1), class_names[label], fill=(255, 255, 255), font=font)

    if boxes is not None:
        scores = scores if scores is not None else torch.ones(len(boxes))
        order = scores.argsort()  # draw the most confident last, on top
        for i in order.tolist():
            if scores[i] < score_threshold:
                continue
            box = (boxes[i] * factor).tolist()
            colour = PALETTE[int(labels[i]) % len(PALETTE)]
            draw.rectangle(box, outline=colour, width=2)
            text = f"{class_names[int(labels[i])]} {float(scores[i]):.2f}"
            left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
            y = max(0, box[1] - (bottom - top) - 2)
            draw.rectangle((box[0], y, box[0] + right - left + 2, y + bottom - top + 2), fill=colour)
            draw.text((box[0] + 1, y), text, fill=(0, 0, 0), font=font)
    return pil


def save_boxes(path: str | Path, image: Tensor | Image.Image, **kwargs) -> Path:
    """`draw_boxes(image, **kwargs)` written to a PNG file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_boxes(image, **kwargs).save(path)
    return path
