"""The run directory: config, metrics, checkpoint and summary, written so none is ever torn.

Every file that is rewritten during a run goes to a temporary file in the same
folder, is flushed and fsynced, then renamed over the old one, so a crash
leaves either the old or the new version. Checkpoints hold tensors and plain
data only and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as config_lib
from .. import models
from ..config import Config
from ..errors import PyroVAEError
from ..registry import import_plugins

CHECKPOINT_FORMAT = "pyro-vae-checkpoint"
CHECKPOINT_VERSION = 1

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
SUMMARY_FILE = "summary.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=2) + "\n").encode())


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's metrics as a JSON line."""
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epochs of metrics.jsonl; a line torn by a crash mid-append is left out."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def check_run_dir(run_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a run folder that is a file, or exists and is not empty, unless ``overwrite``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PyroVAEError(f"run folder {run_dir} exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise PyroVAEError(
            f"run folder {run_dir} already exists; pass --overwrite to replace it "
            f"or choose another --out"
        )


def prepare_run_dir(run_dir: str | Path, overwrite: bool = False) -> Path:
    """Create an empty run folder; an existing non-empty one needs ``overwrite``."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, overwrite)
    if run_dir.is_dir():
        for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


PICTURES = (
    "reconstructions.png",
    "samples.png",
    "elbo.png",
    "conditional_samples.png",
    "analogies.png",
    "accuracy.png",
)


def discard_run_dir(run_dir: str | Path, remove_folder: bool) -> None:
    """Undo a run that failed before its first checkpoint: delete the files a run writes
    (and the folder, if ``remove_folder`` and nothing else is in it)."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE, *PICTURES):
        (run_dir / name).unlink(missing_ok=True)
    for torn in run_dir.glob(".*.tmp"):
        torn.unlink(missing_ok=True)
    if remove_folder and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def rng_state(data=None) -> dict[str, Any]:
    """torch, numpy and Python RNG states as tensors and plain data (weights_only-safe), and
    the data pipeline's own (an ``ImageBatches``' binarization noise) when given ``data``."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data is not None:
        state["data"] = data.rng_state()
    return state


def set_rng_state(state: dict[str, Any], data=None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if data is not None:
        # Checkpoints from before the data pipeline had a generator of its own: it drew
        # from NumPy's global one, whose state they hold.
        data.set_rng_state(state.get("data", state["numpy"]))


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> None:
    """Atomically write ``checkpoint.pt`` with the format header added."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, buffer)
    atomic_write(run_dir / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely; anything torn, foreign or carrying code is refused."""
    path = Path(path)
    if not path.is_file():
        raise PyroVAEError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise PyroVAEError(
            f"refusing checkpoint {path}: it holds more than tensors and plain data ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise PyroVAEError(f"checkpoint {path} is corrupt or truncated ({e})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise PyroVAEError(f"{path} is not a pyro-vae checkpoint")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise PyroVAEError(
            f"checkpoint {path} has version {checkpoint.get('version')}, "
            f"this pyro-vae reads version {CHECKPOINT_VERSION}"
        )
    return checkpoint


def checkpoint_payload(
    config: Config, model, epoch: int, optimizer, estimator=None, data=None
) -> dict:
    """Everything a run continues from: config, weights, optimizer, estimator and RNG states
    (``data``'s too)."""
    payload = {
        "config": config_lib.to_dict(config),
        "image_shape": list(model.image_shape),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.get_state(),
        "estimator": estimator.state_dict() if hasattr(estimator, "state_dict") else {},
        "rng": rng_state(data),
    }
    return {**payload, **model.checkpoint_extras()}


def _import_run_plugins(config: Config, given: bool) -> None:
    try:
        import_plugins(config.data.plugins)
        import_plugins(config.model.plugins)
    except PyroVAEError as e:
        if given:
            raise
        raise PyroVAEError(
            f"{e}; if the plugin has moved, give its new place with --plugin FILE"
        ) from None


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", plugins: list[str] | None = None
):
    """The trained model of a run directory, in eval mode, with its config as ``.config``.

    A run imports the plugins its config lists, by the absolute paths they had when it
    was trained; ``plugins`` (``--plugin`` of ``evaluate`` and ``sample``) replaces
    them, for a plugin file that has moved.
    """
    checkpoint = load_checkpoint(Path(run_dir) / CHECKPOINT_FILE, map_location=device)
    config = config_lib.saved_run_config(checkpoint["config"])
    if plugins is not None:
        config.model.plugins = config_lib.resolve_plugin_paths(plugins, Path.cwd())
    _import_run_plugins(config, plugins is not None)
    num_classes = checkpoint.get("num_classes", 10)
    model = models.build(config, tuple(checkpoint["image_shape"]), num_classes, checkpoint)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PyroVAEError(f"checkpoint in {run_dir} does not fit its config ({first})") from None
    model.config = config
    return model.to(device).eval()
