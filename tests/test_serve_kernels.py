"""The C++ kernels (serve/kernels).

Paged decode attention against SDPA over the same contexts gathered by hand: scattered and
partial blocks, contexts longer than a work partition, every GQA group size, the vectorized
(head_dim % 64 == 0) and generic paths, reduced-precision caches, bad shapes refused, FLOPs
counted as attention. The half-weight linear against F.linear on the same rounded weights:
tiles and tails, the generic path, bias, FLOPs counted as its module's matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from profiling.measure import attention_flops, count_flops
from profiling.parts import ATTENTION, DENSE
from serve.kernels import load, op

attend = op("paged_decode_attention")
linear_half_weight = op("linear_half_weight")
pytestmark = pytest.mark.skipif(attend is None, reason="the paged decode kernel could not be built here")


def paged_case(
    lengths: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, dtype=torch.float32, seed: int = 0
):
    """A two-layer cache whose blocks are handed out in random order, queries, and the tables."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 3
    kv = torch.randn(2, 2, kv_heads, num_blocks * block_size, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(order[at : at + n])
        at += n
    width = max(needed)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lengths), heads, head_dim, generator=g).to(dtype)
    return kv[:, 1], q, tables, padded  # layer 1: a strided view, as the engine passes it


def reference(
    kv: torch.Tensor, q: torch.Tensor, tables: list[list[int]], lengths: list[int], block_size: int, window: int = 0
) -> torch.Tensor:
    """Each sequence's context (its last `window` tokens, if set) gathered from its blocks, then
    SDPA in float64."""
    rows = []
    kv_heads = kv.shape[1]
    for i, (table, n) in enumerate(zip(tables, lengths)):
        slots = (torch.tensor(table).unsqueeze(1) * block_size + torch.arange(block_size)).flatten()[:n]
        slots = slots[-window:] if window else slots
        k, v = (kv[j][:, slots].double() for j in (0, 1))
        queries = q[i].double().view(kv_heads, -1, q.shape[-1])
        rows.append(F.scaled_dot_product_attention(queries, k, v).reshape(q.shape[1], q.shape[2]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "lengths,heads,kv_heads,head_dim,block_size",
    [
        ([1, 5, 16, 17, 40], 9, 3, 64, 16),  # SmolLM2's shape: odd group, partial blocks
        ([1300, 513, 512, 2], 4, 4, 64, 16),  # past one 512-token partition: the merge; no GQA
        ([33, 100], 8, 2, 128, 16),  # Llama's head_dim, group of 4
        ([7, 60, 129], 7, 1, 64, 5),  # group of 7, a block size that does not divide anything
        ([9, 700], 6, 2, 48, 16),  # head_dim not a multiple of 64: the generic loops
    ],
)
def test_matches_sdpa_over_gathered_contexts(lengths, heads, kv_heads, head_dim, block_size):
    kv, q, tables, padded = paged_case(lengths, heads, kv_heads, head_dim, block_size)
    out = attend(q, kv, padded, torch.tensor(lengths, dtype=torch.int32), block_size, head_dim**-0.5)
    torch.testing.assert_close(out.double(), reference(kv, q, tables, lengths, block_size), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 600])
def test_sliding_window_attends_over_the_last_window_tokens(window):
    lengths = [1, 6, 7, 8, 40, 1300]  # shorter than, equal to and past the window; several partitions
    kv, q, tables, padded = paged_case(lengths, 9, 3, 64, 16, seed=2)
    lens = torch.tensor(lengths, dtype=torch.int32)
    out = attend(q, kv, padded, lens, 16, 0.125, window)
    torch.testing.assert_close(out.double(), reference(kv, q, tables, lengths, 16, window), atol=2e-6, rtol=1e-5)
    counted = count_flops(lambda: attend(q, kv, padded, lens, 16, 0.125, window))
    assert counted.total == attention_flops(1, 9, 1, sum(min(n, window) for n in lengths), 64, 64, causal=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lengths,heads,kv_heads,head_dim,block_size,window",
    [
        ([3, 200, 1100], 9, 3, 64, 16, 0),  # SmolLM2's shape, past a partition
        ([33, 100, 1], 8, 2, 128, 16, 0),  # Llama's head_dim, group of 4
        ([7, 60, 129], 7, 1, 64, 5, 0),  # group of 7, odd runs
        ([40, 1300], 9, 3, 64, 16, 7),  # a sliding window starting mid-block
        ([9, 700], 6, 2, 48, 16, 0),  # head_dim not a multiple of 64: the generic loops
    ],
)
def test_reduced_precision_caches_accumulate_in_float32(dtype, lengths, heads, kv_heads, head_dim, block_size, window):
    """16-bit caches widened to float32 in registers: within the dtype's rounding of float64
    math on the same inputs, for every shape the float32 cache is tested on."""
    kv, q, tables, padded = paged_case(lengths, heads, kv_heads, head_dim, block_size, dtype=dtype, seed=1)
    out = attend(q, kv, padded, torch.tensor(lengths, dtype=torch.int32), block_size, head_dim**-0.5, window)
    assert out.dtype == dtype
    expected = reference(kv, q, tables, lengths, block_size, window)
    torch.testing.assert_close(out.double(), expected, atol=8e-3, rtol=1e-2)


@pytest.mark.parametrize("cache", ["bfloat16", "float16", "int8"])
def test_a_compressed_cache_serves_a_float32_query(cache):
    """The cache's dtype apart from the query's: a float32 model over a 16-bit or int8 cache
    (codes with one float32 scale per token and head) equals float64 math on the cache's own
    values, and answers in the query's dtype."""
    lengths = [3, 200, 1100]
    kv, q, tables, padded = paged_case(lengths, 9, 3, 64, 16, seed=4)
    lens = torch.tensor(lengths, dtype=torch.int32)
    if cache == "int8":
        scale = kv.abs().amax(-1) / 127
        codes = torch.round(kv / scale.unsqueeze(-1)).to(torch.int8)
        out = attend(q, codes, padded, lens, 16, 0.125, 0, scale)
        stored = codes.double() * scale.double().unsqueeze(-1)
        with pytest.raises(RuntimeError, match="int8 kv_cache comes with its kv_scale"):
            attend(q, codes, padded, lens, 16, 0.125)
    else:
        stored = kv.to(getattr(torch, cache))
        out = attend(q, stored, padded, lens, 16, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(stored.double(), q, tables, lengths, 16), atol=2e-6, rtol=1e-5)


def test_bad_inputs_are_refused():
    lengths = [20, 5]
    kv, q, _, padded = paged_case(lengths, 9, 3, 64, 16)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        attend(q, kv, padded, torch.tensor([40, 5], dtype=torch.int32), 16, 0.125)
    with pytest.raises(RuntimeError, match="context length 0"):
        attend(q, kv, padded, torch.tensor([0, 5], dtype=torch.int32), 16, 0.125)
    with pytest.raises(RuntimeError, match="must be int32"):
        attend(q, kv, padded.long(), torch.tensor(lengths, dtype=torch.int32), 16, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        attend(q[:, :8], kv, padded, torch.tensor(lengths, dtype=torch.int32), 16, 0.125)


def test_flops_are_counted_as_attention_over_each_own_context():
    lengths = [10, 300, 41]
    kv, q, _, padded = paged_case(lengths, 9, 3, 64, 16)
    lens = torch.tensor(lengths, dtype=torch.int32)
    counted = count_flops(lambda: attend(q, kv, padded, lens, 16, 0.125))
    assert counted.by_part == {ATTENTION: attention_flops(1, 9, 1, sum(lengths), 64, 64, causal=False)}


def test_the_kernels_can_be_switched_off(monkeypatch):
    """MINISTACK_NO_KERNELS=1: nothing is built or loaded (the engine then runs the torch paths).
    Calls the undecorated loader: the process's loaded library stays as it is."""
    monkeypatch.setenv("MINISTACK_NO_KERNELS", "1")
    assert load.__wrapped__() is False


@pytest.mark.parametrize(
    "rows,features,outputs", [(1, 576, 960), (2, 64, 7), (17, 1536, 576), (300, 64, 130), (3, 12, 5)]
)
def test_half_weight_linear_equals_float32_math_on_the_rounded_weight(rows, features, outputs):
    """Tiles of four outputs and pairs of rows with their tails, K % 8 != 0 (generic loops), bias."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, features, generator=g)
    w = torch.randn(outputs, features, generator=g).half()
    b = torch.randn(outputs, generator=g)
    expected = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(linear_half_weight(x, w, b).double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(linear_half_weight(x, w, None).double(), expected - b.double(), atol=1e-4, rtol=1e-5)


def test_half_weight_linear_refuses_a_float32_weight_and_is_counted_as_a_matmul():
    x, w = torch.randn(3, 64), torch.randn(10, 64)
    with pytest.raises(RuntimeError, match="float16"):
        linear_half_weight(x, w, None)
    counted = count_flops(lambda: linear_half_weight(x, w.half(), None))
    assert counted.by_part == {DENSE: 2 * 3 * 64 * 10}  # a matmul of the module that ran it, not attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_rms_norm_and_rotary_equal_their_torch_definitions(dtype):
    """float32 to rounding; in 16 bits the same bits as the torch expressions the model falls
    back to (transformers' RMSNorm rounds the normalized row before the weight multiplies it)."""
    from serve.models.llama import RMSNorm

    exact = dict(atol=0, rtol=0) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 576, generator=g).to(dtype), torch.randn(576, generator=g).to(dtype)
    expected = (
        F.rms_norm(x, (576,), w, 1e-5)
        if dtype == torch.float32
        else w * F.rms_norm(x.float(), (576,), eps=1e-5).to(dtype)
    )
    torch.testing.assert_close(op("rms_norm")(x, w, 1e-5), expected, **exact)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data.copy_(w)
    torch.testing.assert_close(norm(x), expected, **exact)  # the model takes the kernel
    # the residual stream's add fused in: the sum rounded as `residual + x` rounds it, then normed
    residual = torch.randn(7, 576, generator=g).to(dtype)
    total = residual + x
    expected = (
        F.rms_norm(total, (576,), w, 1e-5)
        if dtype == torch.float32
        else w * F.rms_norm(total.float(), (576,), eps=1e-5).to(dtype)
    )
    for normed, new_residual in (op("add_rms_norm")(x, residual, w, 1e-5), norm(x, residual)):
        assert torch.equal(new_residual, total)
        torch.testing.assert_close(normed, expected, **exact)
    qkv = torch.randn(5, 15 * 64, generator=g).to(dtype)
    k = qkv[:, 9 * 64 : 12 * 64].view(5, 3, 64)  # a strided view, as the engine passes q and k
    for rot in (64, 32):  # full and partial rotary
        angles = torch.randn(5, 1, rot // 2, generator=g)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        x1, x2, rest = k[..., : rot // 2], k[..., rot // 2 : rot], k[..., rot:]
        expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
        torch.testing.assert_close(
            op("rotary")(k, cos, sin), expected, **(exact if dtype != torch.float32 else dict(atol=1e-6, rtol=1e-6))
        )
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op("rms_norm")(x.double(), w.double(), 1e-5)
    # SiLU-and-multiply of a stacked gate/up row (odd widths reach the scalar tails); silu's
    # exponential is not torch's, so 16-bit results may be one unit in the last place off
    gate_up = (4 * torch.randn(6, 2 * 37, generator=g)).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    ulp = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(op("silu_and_mul")(gate_up), F.silu(gate) * up, **ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_linear_equals_f_linear_and_is_counted(dtype):
    """oneDNN's packed layout (serve.layers.linear), float32 and, where the CPU has bf16
    instructions, bfloat16: the same products as F.linear to the dtype's rounding, at decode
    and prefill row counts, counted as the same matmul."""
    from serve.layers.linear import Linear, can_pack

    if not can_pack(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN packs no {dtype} on this CPU")
    torch.manual_seed(0)
    layer = Linear(576, 960, bias=False).to(dtype)
    dense = layer.weight.detach().clone()
    layer.pack(release=True)
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    for rows in (1, 16, 512):
        x = torch.randn(rows, 576).to(dtype)
        torch.testing.assert_close(layer(x).float(), F.linear(x.float(), dense.float()), **tolerance)
    assert count_flops(lambda: layer(x)).by_part == {DENSE: 2 * 512 * 576 * 960}


@pytest.mark.parametrize("rows,features,outputs", [(1, 576, 960), (9, 320, 100), (17, 64, 5)])
def test_bf16_pairs_linear_is_float32_math_rounded_once_and_batch_invariant(rows, features, outputs):
    """serve.kernels' AVX-512 BF16 linear on the pairs layout: the float32 sum of exact bf16
    products plus the bias, rounded to bf16 once (within one bf16 rounding of float64 math), at
    one tile of rows and several (K in several L1 chunks), outputs that end mid-block; each row
    the same bits alone as inside the batch; counted as a matmul of its real outputs."""
    from serve.layers.linear import pack_pairs

    op("rms_norm")  # loads the library
    if not torch.ops.ministack.bf16_linear_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(rows)
    x, w, b = (
        torch.randn(rows, features, generator=g).bfloat16(),
        torch.randn(outputs, features, generator=g).bfloat16(),
        torch.randn(outputs, generator=g).bfloat16(),
    )
    packed = pack_pairs(w)
    got = op("linear_bf16")(x, packed, outputs, b)
    expected = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(got.double(), expected, atol=1e-2, rtol=2**-8)
    torch.testing.assert_close(
        op("linear_bf16")(x, packed, outputs, None).double(), expected - b.double(), atol=2e-2, rtol=2**-8
    )
    for r in range(rows):
        assert torch.equal(op("linear_bf16")(x[r : r + 1], packed, outputs, b), got[r : r + 1])
    assert count_flops(lambda: op("linear_bf16")(x, packed, outputs, b)).by_part == {
        DENSE: 2 * rows * features * outputs
    }
    with pytest.raises(ValueError, match="even"):
        pack_pairs(w[:, :-1])
    with pytest.raises(RuntimeError, match="bfloat16"):
        op("linear_bf16")(x.float(), packed, outputs, None)


def test_bf16_prefill_attention_equals_causal_sdpa_and_is_counted_as_attention():
    """serve.kernels' AVX-512 BF16 prefill attention: causal, grouped-query, on strided views of
    a fused qkv row, equal to SDPA to bf16 rounding (probabilities rounded to bf16 as torch's
    flash attention rounds them), at lengths that end mid-block and mid-tile."""
    op("rms_norm")  # loads the library
    if not torch.ops.ministack.prefill_attention_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(5)
    for n, heads, kv_heads, dim in [(1, 9, 3, 64), (7, 9, 3, 64), (37, 4, 4, 64), (300, 9, 3, 64), (45, 8, 2, 128)]:
        qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g).bfloat16()
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        q, k, v = q.view(n, heads, dim), k.view(n, kv_heads, dim), v.view(n, kv_heads, dim)
        rep = heads // kv_heads
        expected = F.scaled_dot_product_attention(
            q.transpose(0, 1).float(),
            k.transpose(0, 1).repeat_interleave(rep, 0).float(),
            v.transpose(0, 1).repeat_interleave(rep, 0).float(),
            is_causal=True,
        ).transpose(0, 1)
        got = op("prefill_attention")(q, k, v, dim**-0.5)
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    counted = count_flops(lambda: op("prefill_attention")(q, k, v, dim**-0.5))
    assert counted.by_part == {ATTENTION: attention_flops(1, 8, 45, 45, 128, 128, causal=True)}
    # after a cached past: query i sits at position past + i (the mask aligned bottom-right)
    for past, n in [(3, 5), (500, 37), (62, 9), (190, 70), (16, 1)]:  # tiles straddling 64-key softmax blocks too
        k, v = (torch.randn(past + n, 3, 64, generator=g).bfloat16() for _ in range(2))
        q = torch.randn(n, 9, 64, generator=g).bfloat16()
        visible = torch.arange(past + n) <= past + torch.arange(n).unsqueeze(1)
        expected = F.scaled_dot_product_attention(
            q.transpose(0, 1).float(),
            k.transpose(0, 1).repeat_interleave(3, 0).float(),
            v.transpose(0, 1).repeat_interleave(3, 0).float(),
            attn_mask=visible,
        ).transpose(0, 1)
        torch.testing.assert_close(op("prefill_attention")(q, k, v, 0.125).float(), expected, atol=2e-2, rtol=2e-2)
    counted = count_flops(lambda: op("prefill_attention")(q, k, v, 0.125))  # the last case: 16 past keys, 1 query
    assert counted.by_part == {
        ATTENTION: attention_flops(1, 9, 1, 1, 64, 64, causal=True) + attention_flops(1, 9, 1, 16, 64, 64, causal=False)
    }
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        op("prefill_attention")(q.float(), k.float(), v.float(), 1.0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_store_kv_writes_the_bytes_the_torch_path_writes(x_dtype, cache_dtype, monkeypatch):
    """serve.kernels' store_kv against PagedAttention's torch path (the kernels switched off):
    the same cache bytes and int8 scales, from strided views of a fused qkv row, slots in any
    order; nothing else in the cache touched."""
    from serve.layers.attention import PagedAttention

    g = torch.Generator().manual_seed(3)
    tokens, kv_heads, dim, slots_total = 7, 3, 64, 40
    qkv = (torch.randn(tokens, 5 * kv_heads * dim, generator=g) * 3).to(x_dtype)
    k = qkv[:, 3 * kv_heads * dim : 4 * kv_heads * dim].view(tokens, kv_heads, dim)
    v = qkv[:, 4 * kv_heads * dim :].view(tokens, kv_heads, dim)
    k[0, 1] = 0  # an all-zero row: the int8 scale's clamp
    slots = torch.tensor([5, 0, 39, 17, 18, 2, 30])
    layers = []
    for _ in range(2):
        attn = PagedAttention(3 * kv_heads, kv_heads, dim)
        attn.kv_cache = torch.full((2, kv_heads, slots_total, dim), 7).to(cache_dtype)
        attn.kv_scale = torch.full((2, kv_heads, slots_total), 0.5) if cache_dtype == torch.int8 else None
        layers.append(attn)
    layers[0]._store(k, v, slots)  # the kernel
    monkeypatch.setattr("serve.layers.attention.op", lambda name: None)
    layers[1]._store(k, v, slots)  # torch
    assert torch.equal(layers[0].kv_cache, layers[1].kv_cache)
    if cache_dtype == torch.int8:
        assert torch.equal(layers[0].kv_scale, layers[1].kv_scale)
        assert layers[0].kv_scale[0, 1, 5] == 1e-30 / 127
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert (layers[0].kv_cache[:, :, untouched] == 7).all()


def test_store_kv_refuses_what_it_cannot_store():
    k = torch.zeros(2, 3, 64)
    cache = torch.zeros(2, 3, 8, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        op("store_kv")(k, k, cache, None, torch.tensor([1, 8]))
    with pytest.raises(RuntimeError, match="kv_scale"):
        op("store_kv")(k, k, cache.to(torch.int8), None, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="int64"):
        op("store_kv")(k, k, cache, None, torch.tensor([1, 2], dtype=torch.int32))


def test_argmax_rows_picks_what_torch_argmax_picks():
    """serve.kernels' argmax_rows (the greedy sampler's): the first maximum on ties, the first
    NaN where a row has one, all -inf rows, any row length (vector tails)."""
    g = torch.Generator().manual_seed(11)
    for n in (1, 7, 33, 49152, 1001):
        x = torch.randn(6, n, generator=g)
        x[1] = torch.round(x[1])  # ties everywhere
        x[2, n // 2 :] = x[2].max() + 1  # a tie of the maximum from the middle on
        x[3] = float("-inf")
        x[4, n // 3] = float("nan")
        if n > 5:
            x[4, n - 1] = float("nan")
            x[5, [2, n - 2]] = float("inf")
        assert op("argmax_rows")(x).tolist() == torch.argmax(x, -1).tolist(), n
    with pytest.raises(RuntimeError, match="float32"):
        op("argmax_rows")(x.bfloat16())
