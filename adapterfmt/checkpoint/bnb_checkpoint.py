"""A bitsandbytes-quantized transformers checkpoint (as ``save_pretrained`` writes it) read as float weights.

Each quantized weight is stored packed (4-bit: ``uint8`` codes plus ``.absmax``/``.quant_map``/
``.quant_state.bitsandbytes__nf4``...; LLM.int8: ``int8`` codes plus the module's ``.SCB``). Here it
appears under its own name, logical shape and the compute dtype, and is dequantized by bitsandbytes
one tensor at a time when read: dequantized straight into the compute dtype, as ``Linear4bit``'s
matmul does, so the weights are exactly the ones the quantized model computes with.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import torch

from ..errors import InputIOError, UsageError
from ..format.dtypes import DTYPE_FROM_NAME
from ..format.tensorio import TensorSpan, mapped_tensor, read_spans
from .safetensors_checkpoint import BaseCheckpoint

#: transformers' ``bnb_4bit_compute_dtype`` spellings -> safetensors dtype names.
COMPUTE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
QUANT_STATE_KEYS = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
#: LLM.int8 weights are dequantized into fp16, the dtype Linear8bitLt quantized them from.
INT8_DTYPE = "F16"


def is_bnb_quantized(config: dict) -> bool:
    """True when a transformers ``config.json`` says the weights are bitsandbytes-quantized.

    Example:
        >>> is_bnb_quantized({"quantization_config": {"quant_method": "bitsandbytes"}})
        True
    """
    quant = config.get("quantization_config") or {}
    return isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "bitsandbytes"


def refuse_foreign_quantization(checkpoint: BaseCheckpoint) -> None:
    """Refuse a base quantized by anything but bitsandbytes (GPTQ, AWQ, ...), naming the scheme.

    No GPTQ/AWQ dequantizer installs on a CPU-only machine (gptqmodel and autoawq ship sources that
    build CUDA kernels), so their packed weights cannot be read back exactly here.
    """
    quant = checkpoint.config.get("quantization_config") or {}
    if isinstance(quant, dict) and quant and not is_bnb_quantized(checkpoint.config):
        method = str(quant.get("quant_method") or "unnamed")
        raise UsageError(f"the base is quantized with {method!r} (config.json quantization_config.quant_method); "
                         "adapterfmt reads bitsandbytes-quantized bases only", path=checkpoint.path,
                         hint="give the unquantized base as --base")


@dataclass(frozen=True)
class PackedSpan(TensorSpan):
    """A quantized weight: where its packed codes lie (``start``/``end``) and its other parts.

    ``dtype``/``shape`` are those of the dequantized weight; it is never copied raw.
    """

    parts: dict = field(default_factory=dict, hash=False, compare=False)
    scheme: str = "nf4"
    codes: TensorSpan | None = None  # the packed codes as stored

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=DTYPE_FROM_NAME[self.dtype]).element_size()

    @contextlib.contextmanager
    def open(self) -> Iterator[torch.Tensor]:
        """The dequantized weight (read and decoded now, released after the block)."""
        yield dequantize(self)


def bnb_functional(why: str = "the base is bitsandbytes-quantized; reading it needs bitsandbytes",
                   hint: str = "pip install bitsandbytes"):
    """bitsandbytes.functional, imported quietly; ``why``/``hint`` make the one-line error when it is missing.

    Example:
        >>> bnb_functional().dequantize_4bit  # doctest: +SKIP
    """
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its CPU backend logs about optional kernels on import
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its own deprecation warnings are not the user's business
            import bitsandbytes.functional as functional
    except ImportError:
        raise UsageError(why, hint=hint) from None
    finally:
        logger.setLevel(level)
    return functional


def _read(span: TensorSpan) -> torch.Tensor:
    with mapped_tensor(span) as tensor:
        return tensor.clone()


def dequantize(span: PackedSpan) -> torch.Tensor:
    """One packed weight -> its float weight in ``span.dtype``, decoded by bitsandbytes.

    Example:
        >>> dequantize(checkpoint.spans["model.layers.0.self_attn.q_proj.weight"])  # doctest: +SKIP
    """
    functional = bnb_functional()
    codes = _read(span.codes)
    parts = {key: _read(part) for key, part in span.parts.items()}
    if span.scheme == "int8":
        return functional.int8_vectorwise_dequant(codes, parts["SCB"]).to(DTYPE_FROM_NAME[span.dtype])
    try:
        state = functional.QuantState.from_dict(parts, device=torch.device("cpu"))
    except (ValueError, KeyError, AssertionError) as exc:
        raise InputIOError(f"quantization state of {span.name!r} is not readable ({exc})", path=span.path,
                           hint="the checkpoint is damaged or from an unsupported bitsandbytes version") from None
    state.dtype = DTYPE_FROM_NAME[span.dtype]
    return functional.dequantize_4bit(codes, state)


class BnbCheckpoint(BaseCheckpoint):
    """A bitsandbytes-quantized checkpoint whose quantized weights read as dequantized float tensors.

    Example:
        >>> base = BnbCheckpoint("qlora-base-4bit")  # doctest: +SKIP
        >>> base.dtype_name("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
        'BF16'
    """

    def __init__(self, path):
        super().__init__(path)
        quant = self.config.get("quantization_config") or {}
        self.scheme = "int8" if quant.get("load_in_8bit") else str(quant.get("bnb_4bit_quant_type", "fp4"))
        compute = str(quant.get("bnb_4bit_compute_dtype") or "float32").replace("torch.", "")
        self.compute_dtype = INT8_DTYPE if self.scheme == "int8" else COMPUTE_DTYPES.get(compute, "F32")
        raw = {}
        for shard in self.shard_files:
            raw.update(read_spans(shard)[0])
        self._raw_spans = raw
        self._packed = self._group(raw)
        for name, span in self._packed.items():
            for part in span.parts.values():
                self._info.pop(part.name, None)
            self._info[name] = (span.dtype, list(span.shape))

    def _group(self, raw: dict[str, TensorSpan]) -> dict[str, PackedSpan]:
        packed = {}
        for name, span in raw.items():
            if self.scheme == "int8":
                scales = raw.get(name[: -len("weight")] + "SCB") if name.endswith(".weight") else None
                if scales is None or span.dtype != "I8":
                    continue
                parts = {"SCB": scales}
                extra = raw.get(name + "_format")
                shape = span.shape
                packed[name] = PackedSpan(name, self.compute_dtype, tuple(shape), span.path, span.start, span.end,
                                          parts=parts, scheme="int8", codes=span)
                if extra is not None:
                    self._info.pop(extra.name, None)
                continue
            state_key = next((f"{name}.{k}" for k in QUANT_STATE_KEYS if f"{name}.{k}" in raw), None)
            if state_key is None:
                continue
            parts = {key[len(name) + 1:]: part for key, part in raw.items() if key.startswith(name + ".")}
            shape = self._logical_shape(raw[state_key])
            packed[name] = PackedSpan(name, self.compute_dtype, shape, span.path, span.start, span.end,
                                      parts=parts, scheme=self.scheme, codes=span)
        return packed

    def _logical_shape(self, state_span: TensorSpan) -> tuple[int, ...]:
        from bitsandbytes.utils import unpack_tensor_to_dict
        try:
            return tuple(int(d) for d in unpack_tensor_to_dict(_read(state_span))["shape"])
        except Exception as exc:  # a damaged or foreign quant-state blob
            raise InputIOError(f"quantization state {state_span.name!r} is not readable ({type(exc).__name__})",
                               path=state_span.path, hint="the checkpoint is damaged") from None

    @cached_property
    def spans(self) -> dict[str, TensorSpan]:
        """Unquantized tensors as stored; quantized weights as :class:`PackedSpan`; their parts hidden."""
        return {name: self._packed.get(name, span) for name, span in self._raw_spans.items() if name in self._info}

    def get(self, name: str) -> torch.Tensor:
        span = self._packed.get(self.resolve(name))
        return dequantize(span) if span is not None else super().get(name)

    def fingerprint(self, name: str) -> str | None:
        """None for quantized weights: their values are not the float base's, so fingerprints cannot match."""
        return None if self.resolve(name) in self._packed else super().fingerprint(name)

    def quantized_names(self) -> list[str]:
        return list(self._packed)
