"""The command line's data files: ``--calibration`` / ``--train-data`` samples (.npy, or .npz keyed
by ``forward``'s parameter names) and ``--train-targets``, checked against the example inputs and
cut into batches; and, before anything is traced, whether every pass gets the data it needs."""

from __future__ import annotations

import inspect as pyinspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import InputError
from .input_files import load_inputs, not_numpy
from .pipeline import Pipeline


class CliError(Exception):
    """A user mistake on the command line: printed as one line."""


def _input_names(model: Any, count: int) -> list[str]:
    """The names of ``model.forward``'s first ``count`` parameters (the keys of an ``.npz`` file)."""
    try:
        params = [p.name for p in pyinspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"input{i}" for i in range(count)]


def _load_samples(path: Path, option: str, model: Any, example: tuple[Any, ...]) -> tuple[Any, ...]:
    """Samples for every model input from ``path`` (.npy: one input; .npz: keyed by forward's parameter
    names), cast to the example inputs' dtypes and checked against their per-sample shapes."""
    names = _input_names(model, len(example))
    specs = [{"name": n, "dtype": str(x.dtype).replace("torch.", "")} for n, x in zip(names, example)]
    try:
        arrays = load_inputs(path, specs)
    except InputError as exc:
        raise CliError(f"{option}: {exc}") from exc
    for name, array, x in zip(names, arrays, example):
        if array.dim() != x.dim() or tuple(array.shape[1:]) != tuple(x.shape[1:]):
            raise CliError(f"{option} {path}: input '{name}' has samples of shape {tuple(array.shape[1:])} "
                           f"(array {tuple(array.shape)}), but the model takes {tuple(x.shape[1:])} per sample "
                           f"(example input {tuple(x.shape)}); the first axis counts samples")
    counts = {len(a) for a in arrays}
    if len(counts) != 1 or 0 in counts:
        raise CliError(f"{option} {path}: the inputs hold {sorted(counts)} samples; every input needs the same "
                       "number, at least one")
    return arrays


def _load_targets(path: Path, samples: int) -> Any:
    if not path.is_file():
        raise CliError(f"--train-targets {path}: no such file (save the targets with numpy.save)")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
        raise CliError(f"--train-targets {path}: not a .npy array ({type(exc).__name__}: {exc})") from exc
    if not isinstance(array, np.ndarray) or array.ndim == 0 or len(array) != samples:
        got = len(array) if isinstance(array, np.ndarray) and array.ndim else "no"
        raise CliError(f"--train-targets {path}: {got} targets for {samples} training samples; give one target "
                       "per sample (class indices, or float targets shaped like the model's output)")
    targets = torch.from_numpy(np.ascontiguousarray(array))
    if not targets.is_floating_point():
        return targets.long()
    return targets.float()


def _batches(columns: Sequence[Any], batch: int) -> list[tuple[Any, ...]]:
    """Consecutive batches of ``batch`` samples, each a tuple with one slice per column."""
    total = len(columns[0])
    return [tuple(c[i:i + batch] for c in columns) for i in range(0, total, batch)]


def compile_data(model: Any, example: tuple[Any, ...], calibration: Optional[Path], train_data: Optional[Path],
                  train_targets: Optional[Path], batch: int) -> tuple[Any, Any, list[str]]:
    """``(calibration, train_data, notes)`` for ``compile`` from the command line's .npy/.npz files."""
    if batch < 1:
        raise CliError(f"--batch {batch}: the batch size must be a positive integer")
    if train_targets is not None and train_data is None:
        raise CliError("--train-targets needs --train-data (the inputs the targets belong to)")
    notes: list[str] = []
    train = calib = None
    if train_data is not None:
        inputs = _load_samples(train_data, "--train-data", model, example)
        columns = list(inputs)
        if train_targets is not None:
            columns.append(_load_targets(train_targets, len(inputs[0])))
        train = _batches(columns, batch)
        notes.append(f"training data: {len(inputs[0])} samples from {train_data}, {len(train)} batch(es)")
    if calibration is not None:
        calib = _batches(_load_samples(calibration, "--calibration", model, example), batch)
        notes.append(f"calibration: {len(calib)} batch(es) from {calibration}")
    elif train is not None:
        calib = [b[:len(example)] for b in train]
        notes.append("calibration: the --train-data inputs (no --calibration given)")
    return calib, train, notes


#: what the command line gives for each capability a pass may require (see CONTEXT_CAPABILITIES)
CLI_CAPABILITIES: dict[str, str] = {
    "example-inputs": "give --input-shape, e.g. --input-shape 1x3x224x224",
    "calibration-data": "give --calibration samples.npy (or --train-data, whose inputs then calibrate)",
    "train-data": "give --train-data inputs.npy (and --train-targets targets.npy for a pass that trains on labels)",
    "train-labels": "give --train-targets targets.npy (one target per --train-data sample: class indices or float "
                    "targets), or use a pass that learns from the original model instead (distill)",
    "teacher": "compile provides the original model as the teacher",
}


def check_data_files(**files: Optional[Path]) -> None:
    """Before the model is built: each given data file (``calibration=``, ``train_data=``, ...: the
    flag's name) exists and is a numpy file."""
    for name, path in files.items():
        if path is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not path.is_file():
            raise CliError(f"{flag}: inputs file {path} does not exist; save the samples with numpy.save (.npy) "
                           "or numpy.savez (.npz)")
        problem = not_numpy(path)
        if problem:
            raise CliError(f"{flag}: {problem}")


def check_pipeline_data(passes: str, *, calibration: bool, train_data: bool, train_targets: bool) -> None:
    """Before anything is loaded or traced: every pass in ``passes`` gets the data it needs from the
    command line (the library would find out later, in its own terms)."""
    given = {"example-inputs": True, "calibration-data": calibration, "train-data": train_data,
             "train-labels": train_targets, "teacher": True}
    for p in Pipeline.parse(passes).leaves() if passes else ():
        for need in p.requires:
            if not given.get(need, True):
                raise CliError(f"pass '{p.name}' needs {need.replace('-', ' ')}: {CLI_CAPABILITIES[need]}")
