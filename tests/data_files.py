"""Small data sets the tests write: arrays with label, sex and subject columns, and folders of PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def labelled_people(n_subjects: int = 300, per_subject: int = 10, seed: int = 0) -> pd.DataFrame:
    """`label` (3 classes, unbalanced), `sex` (F/M, its share depending on the label) and `subject` columns; each
    subject has one sex and `per_subject` images of mixed labels."""
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(n_subjects), per_subject)
    sex = np.where(rng.random(n_subjects) < 0.4, "F", "M")[subject]
    label = rng.choice(3, size=len(subject), p=[0.5, 0.3, 0.2])
    label = np.where((sex == "F") & (rng.random(len(subject)) < 0.3), 2, label)
    return pd.DataFrame({"label": label, "sex": sex, "subject": [f"s{i:03d}" for i in subject]})


def write_arrays(folder: Path, table: pd.DataFrame, shape: tuple[int, ...] = (6, 6), seed: int = 0) -> dict[str, Path]:
    """images.npy (uint8, each label a brighter pixel block so that it is learnable), labels.npy, metadata.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = table["label"].to_numpy().astype(np.int64)
    images = rng.integers(0, 100, size=(len(labels), *shape), dtype=np.uint8)
    images.reshape(len(labels), -1)[np.arange(len(labels)), labels] += 150
    paths = {"images": folder / "images.npy", "labels": folder / "labels.npy", "metadata": folder / "metadata.csv"}
    np.save(paths["images"], images)
    np.save(paths["labels"], labels)
    table.drop(columns="label").to_csv(paths["metadata"], index=False)
    return paths


def write_png_folder(root: Path, per_class: int = 12, size: int = 10, rgb_class: str | None = None) -> Path:
    """root/<class>/<i>.png for classes `dark` and `light` (grey), of varied sizes; `rgb_class` is saved as RGB."""
    rng = np.random.default_rng(0)
    for name, base in (("dark", 40), ("light", 200)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = size + i % 3
            pixels = np.clip(base + rng.integers(-30, 30, size=(side, side)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            image.convert("RGB" if name == rgb_class else "L").save(root / name / f"{i}.png")
    return root
