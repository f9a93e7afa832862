"""`python predict.py ckpt_path=PATH images=X.npy` (or `images=DIR`): the class predictions of a saved model for new
images, `predictions.csv` in the prediction's own run folder (`logs/predict/runs/<date>_<time>/`).

The checkpoint alone rebuilds the model (`torch.load(weights_only=True)`: its hyperparameters and weights, the
standardization among its buffers), so new images are standardized as the run's were. Images come from a `.npy` of
shape (N,H,W) or (N,C,H,W), memory-mapped and read a batch at a time, or from a folder of image files decoded as
`data=folder` decodes them and resized to the checkpoint's input shape. Images of another shape are refused, naming
both shapes. It never trains nor reads the run's data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from descent import CONF_DIR
from descent.config import ConfigError, exit_on_config_error, validate_predict
from descent.trainer import quiet_lightning, set_threads, unset_empty_variables

log = logging.getLogger("descent")
PREDICTIONS = "predictions.csv"


def load_checkpoint(ckpt_path: str) -> Any:
    """The Classifier of a checkpoint written by train.py, its weights and buffers loaded, in eval mode."""
    from descent.model import Classifier

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError("ckpt_path", ckpt_path, "expected an existing checkpoint file (.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = Classifier(**checkpoint["hyper_parameters"])
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as error:  # a file that is not our checkpoint can fail in many ways; each is one line
        allowed = f"expected a checkpoint written by train.py, e.g. <run>/checkpoints/best.ckpt ({error})"
        raise ConfigError("ckpt_path", ckpt_path, allowed.replace("\n", " ")) from None
    return model.eval()


def without_channel(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A grey image's shape with its channel of 1 dropped: (1, H, W) and (H, W) hold the same pixels."""
    return shape[1:] if len(shape) == 3 and shape[0] == 1 else shape


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, by name; hidden files and sub-folders are not read."""
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


def read_folder(folder: Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, list[str]]:
    """The folder's images decoded to the checkpoint's shape (grey for (H, W) or (1, H, W), RGB for (3, H, W)), and
    their file names."""
    from PIL import UnidentifiedImageError

    from descent.data.sources import decode_image

    if len(input_shape) == 3 and input_shape[0] not in (1, 3):
        allowed = (
            f"the checkpoint takes images of shape {input_shape}: give them as a .npy (a folder holds grey or RGB)"
        )
        raise ConfigError("images", str(folder), allowed)
    files = image_files(folder)
    if not files:
        raise ConfigError("images", str(folder), "expected a folder holding image files, or a .npy of images")
    grey = len(without_channel(input_shape)) == 2
    height, width = input_shape[-2:]
    images = np.empty((len(files), *input_shape), dtype=np.uint8)
    for index, path in enumerate(files):
        try:
            images[index] = decode_image(path, grey, height, width).reshape(input_shape)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ConfigError("images", str(folder), f"cannot read the image {path} ({error}); remove it") from None
    return images, [path.name for path in files]


def read_images(images: str, input_shape: tuple[int, ...]) -> tuple[np.ndarray, list[str] | None]:
    """The images to predict, (N, *input_shape), and their file names when read from a folder."""
    from descent.data.sources import open_npy

    path = Path(images).expanduser()
    if path.is_dir():
        return read_folder(path, input_shape)
    array = open_npy("images", images)
    if array.ndim not in (3, 4) or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        allowed = f"expected numbers of shape (N,H,W) or (N,C,H,W), got {array.dtype} of shape {array.shape}"
        raise ConfigError("images", images, allowed)
    if without_channel(array.shape[1:]) != without_channel(input_shape):
        allowed = (
            f"it holds images of shape {array.shape[1:]} but the checkpoint takes {input_shape}: expected an array "
            f"of shape (N, {', '.join(map(str, input_shape))})"
        )
        raise ConfigError("images", images, allowed)
    if len(array) == 0:
        raise ConfigError("images", images, "expected at least one image")
    return array, None


def predictions_table(probabilities: np.ndarray, names: list[str] | None, class_names: list[str] | None) -> Any:
    """One row per image: its `index` (or `file`), its `prediction` (the class name when the run knew them) and one
    probability column per class, `p_<class>`."""
    import pandas as pd

    classes = class_names or [str(k) for k in range(probabilities.shape[1])]
    table = pd.DataFrame({"file": names} if names is not None else {"index": np.arange(len(probabilities))})
    predicted = probabilities.argmax(axis=1)
    table["prediction"] = [classes[k] for k in predicted] if class_names else predicted
    for k, name in enumerate(classes):
        table[f"p_{name}"] = probabilities[:, k]
    return table


def predict(cfg: DictConfig, out_dir: Path) -> Path:
    """Predict the classes of `cfg.images` with the checkpoint and write out_dir/predictions.csv."""
    from hydra.utils import instantiate

    from descent.data.streaming import StreamingBatches

    validate_predict(cfg)
    model = load_checkpoint(cfg.ckpt_path)
    input_shape = tuple(model.hparams.input_shape)
    images, names = read_images(cfg.images, input_shape)
    set_threads(cfg.threads, cfg.batch_size, model, list(input_shape))
    # read a batch at a time, in order, by a background thread; the labels are placeholders predict_step ignores
    batches = StreamingBatches(images, np.zeros(len(images), dtype=np.int64), cfg.batch_size, shuffle=False)
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False
    )
    probabilities = torch.cat(trainer.predict(model, dataloaders=batches)).float().cpu().numpy()
    path = out_dir / PREDICTIONS
    predictions_table(probabilities, names, model.hparams.get("class_names")).to_csv(path, index=False)
    log.info("%d images of %s predicted by %s -> %s", len(probabilities), cfg.images, cfg.ckpt_path, path)
    return path


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    """Write predictions.csv in the prediction's own run folder."""
    unset_empty_variables()
    quiet_lightning()
    predict(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
