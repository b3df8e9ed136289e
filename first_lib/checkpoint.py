"""Training checkpoints: written atomically, checked against their sha256 on load, resumed.

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler state (loaded
with `weights_only=True`), the CPU RNG state, the step and the losses so far. `first_lib.train`
writes one every `save_every` optimizer steps and resumes from the last after any kill.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from first_lib import fsio
from first_lib.errors import FirstError


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }


CHECKPOINT_FILES = ("trainable.safetensors", "optim.pt", "rng.safetensors")


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, losses_seen: list) -> None:
    """Write a checkpoint atomically: a temp folder (files and folder fsynced) renamed into place;
    the old one removed last. `state.json` records each file's size and sha256. A `.old` left by
    a kill after the second rename is removed first (the checkpoint next to it is complete), so a
    rotation never wedges on it."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        tmp / "optim.pt",
    )
    save_file({"cpu_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    files = {
        name: {"size": (tmp / name).stat().st_size, "sha256": fsio.file_sha256(tmp / name)}
        for name in CHECKPOINT_FILES
    }
    state = {"step": step, "losses": losses_seen, "files": files}
    (tmp / "state.json").write_text(json.dumps(state))
    for name in (*CHECKPOINT_FILES, "state.json"):
        fsio.fsync_file(tmp / name)
    fsio.fsync_dir(tmp)
    fsio.crash_point("checkpoint:tmp-written")
    old = path.with_name(path.name + ".old")
    if old.exists() and path.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
        fsio.crash_point("checkpoint:old-renamed")
    tmp.rename(path)
    fsio.fsync_dir(path.parent)
    fsio.crash_point("checkpoint:renamed")
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path: Path) -> None:
    """Repair what a kill during `save_checkpoint` leaves at `path`: a half-written `.tmp` is
    removed; a lone `.old` (killed between the two renames) is the last complete checkpoint and
    is renamed back; a `.old` next to `path` (killed before it was removed) is dropped, since
    `path` was renamed into place whole."""
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            old.rename(path)
        fsio.fsync_dir(path.parent)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[int, list]:
    """Restore a checkpoint written by `save_checkpoint`; returns (step, losses). Every file is
    read (and checked against the sizes and sha256s in state.json) before anything is restored,
    so a damaged checkpoint raises and leaves the model, optimizer and RNG untouched."""
    state = json.loads((path / "state.json").read_text())
    for name, want in state.get("files", {}).items():
        size = (path / name).stat().st_size
        if size != want["size"] or fsio.file_sha256(path / name) != want["sha256"]:
            raise FirstError(f"{name} does not match its recorded size and sha256")
    weights = load_file(str(path / "trainable.safetensors"))
    opt = torch.load(path / "optim.pt", weights_only=True)
    rng = load_file(str(path / "rng.safetensors"))["cpu_rng"]
    params = dict(model.named_parameters())
    if set(weights) - set(params):
        raise FirstError("its weights do not belong to this model")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    torch.set_rng_state(rng)
    return int(state["step"]), list(state["losses"])


def resume_checkpoint(path: Path, model, optimizer, scheduler, log=None) -> tuple[int, list]:
    """`load_checkpoint`, or (0, []) when there is none; a checkpoint that cannot be read is
    reported through `log` in one line, removed, and training starts from the beginning."""
    if not (path / "state.json").exists():
        return 0, []
    try:
        return load_checkpoint(path, model, optimizer, scheduler)
    except Exception as err:  # noqa: BLE001 - any damage (json, safetensors, torch.load, keys)
        why = " ".join(str(err).split())[:200] or type(err).__name__
        if log is not None:
            log(f"checkpoint {path} is unreadable ({why}); removed, training from the start")
        shutil.rmtree(path, ignore_errors=True)
        return 0, []
