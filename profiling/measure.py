"""Counting the FLOPs of the ops that actually ran, split by part, cached per input shape.

Uses the per-op formulas of `torch.utils.flop_counter` (the ones FlopCounterMode applies:
matmul, conv, attention; forward *and* backward; 2 FLOPs per multiply-add) in a dispatch mode
of our own, with three fixes:

1. Attention kernels get one formula, ours. Stock FlopCounterMode counts CPU SDPA
   (`_scaled_dot_product_flash_attention_for_cpu`) as 0 FLOPs, silently, and counts causal
   attention as if every (query, key) pair were computed. Here `is_causal=True` counts the
   pairs the causal mask leaves (what flash kernels compute); an explicit mask counts every
   pair (the kernel computes them all, then masks). Backward is 2x forward (dQ, dK, dV, dP;
   a flash kernel's recompute of the scores is hardware work, not model work).
2. Matmuls torch's table lacks get one too: oneDNN's on a prepacked weight, which serving
   runs on the CPU (serve.layers.linear); so do custom kernels, which register themselves
   (`register_kernel`: serve.kernels' paged decode attention and half-weight linear).
3. FLOPs are attributed to parts (`profiling.parts`) from the module that ran each op, in
   backward too (by autograd sequence number: see `_ModuleSpans`).

Counting can run on fake tensors (`fake=True`): the same ops dispatch with shapes only, no
arithmetic, so counting DiT-XL or an 8k-token prefill costs milliseconds of CPU. A model
must then not cache tensors created inside forward (a fake tensor would leak into real runs).
`FlopMeter` caches counts per key, so a run counts each distinct shape once.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from profiling.parts import ATTENTION, PartRules, merge, part_of

aten = torch.ops.aten


def attention_pairs(q_len: int, k_len: int, causal: bool) -> int:
    """(query, key) pairs attention computes: all of them, or those a causal mask keeps.

    PyTorch's `is_causal` aligns the mask top-left: query i sees keys 0..i.
    """
    if not causal:
        return q_len * k_len
    full = min(q_len, k_len)
    return full * (full + 1) // 2 + max(0, q_len - k_len) * k_len


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, qk_dim: int, v_dim: int, causal: bool) -> int:
    """Forward FLOPs of QK^T plus AV for one attention call."""
    return 2 * batch * heads * attention_pairs(q_len, k_len, causal) * (qk_dim + v_dim)


def _bind(op: torch._ops.OpOverloadPacket, args: tuple, kwargs: dict) -> dict:
    """Map an aten call's args to its schema's argument names (defaults filled in)."""
    bound = {}
    for i, arg in enumerate(op.default._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _attention_formula(op: torch._ops.OpOverloadPacket, backward: bool) -> Callable[..., int]:
    def formula(*args, out_val=None, **kwargs) -> int:
        a = _bind(op, args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        has_mask = a.get("attn_mask") is not None or a.get("attn_bias") is not None
        causal = bool(a.get("is_causal", False)) and not has_mask
        b, h, sq, dq = q.shape
        flops = attention_flops(b, h, sq, k.shape[-2], dq, v.shape[-1], causal)
        return 2 * flops if backward else flops

    return formula


ATTENTION_FORMULAS: dict = {
    op: _attention_formula(op, backward=op._qualified_op_name.endswith("_backward"))
    for op in (
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_backward,
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_efficient_attention_backward,
        aten._scaled_dot_product_cudnn_attention,
        aten._scaled_dot_product_cudnn_attention_backward,
    )
}


def _packed_linear_flops(x: torch.Tensor, *args, out_val: torch.Tensor, **kwargs) -> int:
    """oneDNN's matmul on a prepacked weight (serve.layers.linear on the CPU): 2 x rows x in x
    out, as stock addmm/mm are counted (torch's table does not know this op)."""
    return 2 * x.numel() * out_val.shape[-1]


MATMUL_FORMULAS: dict = {torch.ops.mkldnn._linear_pointwise: _packed_linear_flops}
ATTENTION_OPS = set(ATTENTION_FORMULAS) | {
    aten._flash_attention_forward,
    aten._flash_attention_backward,
    aten._efficient_attention_forward,
    aten._efficient_attention_backward,
}


def register_kernel(op: torch._ops.OpOverloadPacket, formula: Callable[..., int], attention: bool) -> None:
    """Count a custom op (one loaded at run time, like serve.kernels'), with
    `formula(*args, out_val=..., **kwargs)` giving its FLOPs: as attention, or as a matmul of
    the module that ran it."""
    (ATTENTION_FORMULAS if attention else MATMUL_FORMULAS)[op] = formula
    if attention:
        ATTENTION_OPS.add(op)


@dataclass
class FlopCount:
    """FLOPs by part; `total` is their sum."""

    by_part: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_part.values())

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(merge([self.by_part, other.by_part]))

    def relabel(self, part: str) -> FlopCount:
        """All of it as one part, e.g. a frozen encoder's whole forward as FROZEN."""
        return FlopCount({part: self.total})


class _ModuleSpans:
    """Which module ran each op, forward and backward.

    Forward: a stack kept by global module hooks. Backward: FlopCounterMode's own tracker
    guesses from gradient hooks and mis-assigns whenever a module's input needs no gradient
    (it never "exits"), so instead each module's forward records the range of autograd
    sequence numbers its ops were given; a backward op runs inside the autograd node of
    the forward op it differentiates, and that node's sequence number finds the module.
    """

    def __init__(self) -> None:
        self.names: dict[torch.nn.Module, str] = {}
        self.stack: list[str] = []
        self.spans: list[list] = []  # [start_seq, end_seq, name], in order of entry
        self._open: list[list] = []

    @staticmethod
    def _next_seq() -> int:
        with torch.enable_grad():
            return torch.zeros((), requires_grad=True).mul(1).grad_fn._sequence_nr()

    def _name(self, mod: torch.nn.Module) -> str:
        if mod not in self.names:
            self.names[mod] = type(mod).__name__
        name = self.names[mod]
        for child_name, child in mod.named_children():
            self.names.setdefault(child, f"{name}.{child_name}")
        return name

    def pre(self, mod: torch.nn.Module, *_) -> None:
        name = self._name(mod)
        self.stack.append(name)
        span = [self._next_seq(), None, name]
        self.spans.append(span)
        self._open.append(span)

    def post(self, mod: torch.nn.Module, *_) -> None:
        self.stack.pop()
        self._open.pop()[1] = self._next_seq()

    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def owner(self, seq: int) -> str:
        """The innermost module whose forward created the autograd node numbered `seq`."""
        i = bisect.bisect_left(self.spans, seq, key=lambda span: span[0]) - 1
        while i >= 0:
            start, end, name = self.spans[i]
            if end is not None and start < seq < end:
                return name
            i -= 1
        return ""

    def __enter__(self) -> _ModuleSpans:
        self._handles = [register_module_forward_pre_hook(self.pre), register_module_forward_hook(self.post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


class _CountingMode(TorchDispatchMode):
    """Adds up FLOPs per (module, op) for every op that has a formula."""

    def __init__(self, spans: _ModuleSpans) -> None:
        super().__init__()
        self.spans = spans
        self.formulas = {**flop_registry, **MATMUL_FORMULAS, **ATTENTION_FORMULAS}
        self.forward: dict[tuple[str, object], int] = defaultdict(int)
        self.backward: list[tuple[int, object, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            node = torch._C._current_autograd_node()
            if node is None:
                self.forward[(self.spans.current(), func._overloadpacket)] += flops
            else:
                self.backward.append((node._sequence_nr(), func._overloadpacket, flops))
        return out

    def by_module_op(self) -> dict[tuple[str, object], int]:
        counts = defaultdict(int, self.forward)
        for seq, op, flops in self.backward:
            counts[(self.spans.owner(seq), op)] += flops
        return counts


def count_flops(fn: Callable[[], object], rules: PartRules = (), fake: bool = False) -> FlopCount:
    """Run `fn()` and return the FLOPs of the ops it ran (forward and backward), by part.

    With `fake=True` it runs under FakeTensorMode: tensors `fn` creates are shape-only and real
    parameters are used without arithmetic. `fn` must then take gradients with
    `torch.autograd.grad` (never `.backward()`, which would store fake `.grad`s on real params).
    Count without activation checkpointing: its recompute is hardware work, not model FLOPs.
    """
    fake_mode: contextlib.AbstractContextManager = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode, _ModuleSpans() as spans, _CountingMode(spans) as mode:
        fn()
    by_part: dict[str, int] = defaultdict(int)
    for (module, op), flops in mode.by_module_op().items():
        by_part[ATTENTION if op in ATTENTION_OPS else part_of(module, rules)] += flops
    return FlopCount({part: n for part, n in by_part.items() if n})


def _main_tensor(out: object) -> torch.Tensor:
    """The prediction inside a model's output (a tensor, a diffusers/transformers output, a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("sample", "logits"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    return out[0]


def forward_backward(model: torch.nn.Module, *inputs: torch.Tensor, **kwargs) -> Callable[[], object]:
    """A closure running model(*inputs) and the gradients of a scalar of its output w.r.t. the
    trainable parameters, the way a training step does (fake-mode safe: no `.grad` writes)."""

    def step() -> object:
        out = model(*inputs, **kwargs)
        out = _main_tensor(out)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(out.float().pow(2).mean(), params, allow_unused=True)

    return step


class FlopMeter:
    """Counts FLOPs once per distinct key (typically the input shapes) and caches the result."""

    def __init__(self, rules: PartRules = (), fake: bool = True) -> None:
        self.rules, self.fake = rules, fake
        self._cache: dict[Hashable, FlopCount] = {}

    def count(self, key: Hashable, fn: Callable[[], object]) -> FlopCount:
        if key not in self._cache:
            self._cache[key] = count_flops(fn, self.rules, fake=self.fake)
        return self._cache[key]

    def __len__(self) -> int:
        return len(self._cache)


def deepspeed_forward_flops(model: torch.nn.Module, fn: Callable[[], object]) -> int:
    """DeepSpeed FlopsProfiler's count of `fn()` (forward only: DeepSpeed assumes backward = 2x).

    A cross-check where DeepSpeed runs. It also counts softmax, norms and activations, so it
    reads slightly above the matmul-only count. It misses SDPA if the model bound
    `scaled_dot_product_attention` by name before profiling started: call it as `F.<name>`.
    """
    from deepspeed.profiling.flops_profiler import FlopsProfiler

    prof = FlopsProfiler(model)
    prof.start_profile()
    try:
        with torch.no_grad():
            fn()
        return int(prof.get_total_flops())
    finally:
        prof.end_profile()
