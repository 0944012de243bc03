"""Run a serialized engine on torch CUDA tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ...errors import ArtifactError, BackendUnavailable, InputError
from .runtime import _no_gpu_error, gpu_available, import_trt, trt_logger


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in table:
        raise BackendUnavailable(f"engine I/O type {name} has no torch equivalent in TrtRunner")
    return table[name]


class TrtRunner:
    """Runs a serialized engine on torch CUDA tensors via ``execute_async_v3`` (no pycuda).

    Inputs are taken positionally in the engine's input order (or by name); CPU tensors are moved
    to the GPU and results come back on the device of the first input. TensorRT-RTX compiles
    kernels on first use; ``runtime_cache`` (a file) keeps them across runs.
    """

    def __init__(self, engine_bytes: bytes, target: str = "tensorrt-rtx", *, device: int | str | None = None,
                 runtime_cache: str | None = None) -> None:
        if not gpu_available():
            raise _no_gpu_error()
        self.target = target
        self.trt = import_trt(target)
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None
                                   else torch.device(device).index or 0)
        self.runtime_cache_path = runtime_cache
        torch.cuda.init()
        with torch.cuda.device(self.device):
            self._load(engine_bytes, runtime_cache)

    def _load(self, engine_bytes: bytes, runtime_cache: str | None) -> None:
        trt = self.trt
        self._runtime = trt.Runtime(trt_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            detail = ""
            if hasattr(self._runtime, "get_engine_validity"):
                detail = f" (engine validity: {self._runtime.get_engine_validity(engine_bytes)})"
            raise BackendUnavailable(
                f"{trt.__name__} {trt.__version__} could not deserialize this engine{detail}: it was built "
                "by another TensorRT version or for another GPU; rebuild it with build_engine() for this "
                "machine")
        self._runtime_cache = None
        if runtime_cache is not None and hasattr(self.engine, "create_runtime_config"):
            self._runtime_config = config = self.engine.create_runtime_config()
            self._runtime_cache = config.create_runtime_cache()
            if Path(runtime_cache).is_file():
                self._runtime_cache.deserialize(Path(runtime_cache).read_bytes())
            config.set_runtime_cache(self._runtime_cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable(f"{trt.__name__} could not create an execution context "
                                     "(out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_names = [n for n, i in zip(names, is_input) if i]
        self.output_names = [n for n, i in zip(names, is_input) if not i]
        self._stream = torch.cuda.Stream(self.device)

    def _bind_inputs(self, args: Sequence[torch.Tensor],
                     kwargs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if args and kwargs:
            raise InputError("TrtRunner takes inputs either positionally or by name, not both")
        if kwargs:
            missing = [n for n in self.input_names if n not in kwargs]
            extra = [n for n in kwargs if n not in self.input_names]
            if missing or extra:
                raise InputError(f"engine inputs are {self.input_names}; missing {missing}, unknown {extra}")
            args = [kwargs[n] for n in self.input_names]
        if len(args) != len(self.input_names):
            raise InputError(f"the engine takes {len(self.input_names)} input(s) {self.input_names}; "
                             f"got {len(args)}")
        kept: list[torch.Tensor] = []
        for name, value in zip(self.input_names, args):
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input {name!r} must be a torch.Tensor; got {type(value).__name__}")
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            tensor = value.to(device=self.device, dtype=dtype).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                lo, opt, hi = (list(s) for s in self.engine.get_tensor_profile_shape(name, 0))
                raise InputError(f"input {name!r} has shape {list(tensor.shape)}, outside the engine's "
                                 f"optimization profile min={lo} opt={opt} max={hi}; rebuild with a wider "
                                 "profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
            kept.append(tensor)
        return kept

    def __call__(self, *args: torch.Tensor,
                 **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        first = next(iter([*args, *kwargs.values()]), None)
        home = first.device if isinstance(first, torch.Tensor) else self.device
        with torch.cuda.device(self.device):
            kept = self._bind_inputs(args, kwargs)
            outputs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BackendUnavailable(f"output {name!r} has a data-dependent shape {list(shape)}; "
                                             "TrtRunner does not implement an IOutputAllocator")
                out = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)),
                                  device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise BackendUnavailable(f"{self.trt.__name__} execute_async_v3 failed; see the "
                                         "fxcompress.tensorrt log")
            self._stream.synchronize()
            del kept
        results = tuple(o.to(home) for o in outputs)
        return results[0] if len(results) == 1 else results

    def save_runtime_cache(self) -> bool:
        """Write TensorRT-RTX's JIT kernel cache to ``runtime_cache`` (False when there is none)."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return False
        Path(self.runtime_cache_path).write_bytes(bytes(self._runtime_cache.serialize()))
        return True


def load_engine_bytes(path: str | Path) -> bytes:
    """Read a ``model.engine`` file, with a clear error when it is missing."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"engine file {p} is missing; rebuild it with build_engine() or re-save the "
                            "artifact")
    return p.read_bytes()
