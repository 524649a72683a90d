"""Pallas TPU kernels for the ragged paged attention contract (kernels/paged_attention.py).

``ragged_paged_attention_pallas`` runs one mixed step (decode tokens, prefill
chunks, prefix-cached starts) in one kernel; ``pallas_write_kv`` scatters this
step's keys/values into the paged cache in place. On a machine without a TPU both
run in Pallas' TPU interpret mode (``interpret=None`` picks it).

Attention design
----------------
* Queries are regrouped by the wrapper to ``(KV, T * group, D)``: the rows of one
  kv head are (token, query head of its group) pairs, so a block of ``q_block``
  tokens is one 2-D ``(q_block * group, D)`` tile and the GQA group shares every
  K/V tile it reads (one matmul per tile, no per-head loop). The output comes back
  in the same layout and is regrouped to ``(T, H, D)``.
* Grid ``(KV, S)``: kv head (``parallel``, disjoint output rows, so a megacore may
  split it) by sequence slot (``arbitrary``: in order). Slots at or past
  ``num_seqs`` and empty sequences do nothing.
* Scalar prefetch (SMEM): ``layer``, the flattened page table, ``cu_q_lens``,
  ``kv_lens``, ``num_seqs``. Layer is data, so the kernel runs inside a
  ``lax.scan`` over layers.
* q, the caches and the output stay in HBM (``pl.ANY``); the kernel moves them
  with its own DMAs. For each q block of its sequence it walks only the kv blocks
  that block sees (causal end, sliding-window start) and in each kv block DMAs only
  the pages in range, so pages after a sequence's last one (a padded page table)
  are never read. K/V blocks are double-buffered and the DMA queue never drains
  between blocks: while kv block ``b`` is in the online softmax, the next one is in
  flight, which is the next kv block of this q block, else the first of the next q
  block, else the first of the next sequence, i.e. of the next grid step (an SMEM
  scratch carries "in flight, in slot x" across steps; the sequence axis is
  sequential and innermost, so the next step runs on the same core). Online softmax
  in f32 (max, denominator, accumulator); products in the inputs' dtype, f32 sums.
* Ragged output: a q block is written back as a whole tile. The rows of the
  block past its sequence's end are written as zeros; they belong either to the
  next sequence (whose own blocks, written later in grid order, overwrite them) or
  to padding. The wrapper pads the token axis by one block so no DMA runs off the
  end, and zeroes rows at and past ``cu_q_lens[num_seqs]`` (padding tokens).

Token trees (``tree_bits``, kernels/paged_attention.py): the wrapper lays each token's
bits out per row, like q, and the kernel DMAs a block's bits beside its queries; a
key fewer than 32 positions before a row's query is visible only where its bit is set.

Block sizes come from ``block_sizes``: q tokens per block so that a block's rows
(``q_block * group``) fill about 128 MXU rows for prefill-shaped steps and stay
small for decode-shaped steps, rounded to the sublane tile of the dtype; kv pages
per block so a kv block is about 256 tokens (a multiple of 128 lanes when the page
size allows), no more than a sequence's page-table row, shrunk to a VMEM budget.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MASK_VALUE = -1e30
VMEM_BUDGET_BYTES = 8 * 1024 * 1024  # well inside the 16 MiB default scoped VMEM of v5e
MXU_ROWS = 128
KV_BLOCK_TOKENS = 256


def _use_interpret(interpret) -> bool:
    if interpret is None:
        return jax.default_backend() != "tpu"
    return bool(interpret)


def _interpret_arg(interpret) -> object:
    """None: interpret unless on a TPU; True/False; or a pltpu.InterpretParams to use as is."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if _use_interpret(interpret) else False


def _sublanes(dtype) -> int:
    """Rows of a native (sublane, 128) VMEM tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_sizes(num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int,
                head_dim: int, page_size: int, pages_per_seq: int,
                dtype=jnp.bfloat16) -> tuple[int, int]:
    """(q_block tokens, kv_pages per block) for one static shape of the step.

    * q block: rows are ``q_block * group``. An average sequence of the shape has
      ``num_tokens / num_seqs`` queries (1 for a decode-shaped batch), and a block
      much larger than that only computes padding rows, so q_block is that average
      rounded up to a power of two, capped where the rows reach ``MXU_ROWS``,
      then rounded up so the rows are a whole number of sublane tiles.
    * kv block: about ``KV_BLOCK_TOKENS`` tokens (``KV_BLOCK_TOKENS / page_size``
      pages, so 128-lane multiples whenever page_size divides 256), at most the
      page-table row, then halved while the double-buffered K/V blocks, the q/out
      tiles and the f32 scores/accumulator outgrow ``VMEM_BUDGET_BYTES``.
    """
    group = max(1, num_q_heads // num_kv_heads)
    sub = _sublanes(dtype)
    unit = sub // math.gcd(group, sub)  # q tokens per whole number of sublane tiles
    avg = max(1, -(-num_tokens // max(1, num_seqs)))
    q_block = min(_next_pow2(avg), max(1, MXU_ROWS // group))
    q_block = -(-q_block // unit) * unit
    q_block = max(1, min(q_block, -(-num_tokens // unit) * unit))

    kv_pages = max(1, min(KV_BLOCK_TOKENS // page_size, pages_per_seq))
    item = jnp.dtype(dtype).itemsize
    rows = q_block * group

    def vmem(pages):
        kv_tok = pages * page_size
        return (2 * 2 * kv_tok * head_dim * item  # K and V, two slots each
                + 2 * rows * head_dim * item  # q and out tiles
                + rows * kv_tok * 4 + rows * head_dim * 4)  # f32 scores and accumulator

    while kv_pages > 1 and vmem(kv_pages) > VMEM_BUDGET_BYTES:
        kv_pages //= 2
    return q_block, kv_pages


def _attention_kernel(layer_ref, table_ref, cu_ref, kv_lens_ref, num_seqs_ref,  # SMEM
                      q_hbm, k_hbm, v_hbm, *refs,  # HBM inputs (bits_hbm with trees)
                      q_block, kv_pages, page_size, group, num_slots, pages_per_seq,
                      sliding_window, scale, compute_dtype, tree):
    if tree:
        bits_hbm, o_hbm, q_buf, o_buf, k_buf, v_buf, k_sem, v_sem, io_sem, carry_ref, \
            bits_buf = refs
    else:
        o_hbm, q_buf, o_buf, k_buf, v_buf, k_sem, v_sem, io_sem, carry_ref = refs
    head = pl.program_id(0)
    s = pl.program_id(1)
    rows = q_block * group
    kv_tokens = kv_pages * page_size
    layer = layer_ref[0]

    def q_len_of(seq):
        return cu_ref[seq + 1] - cu_ref[seq]

    def live(seq):  # a sequence slot with queries to answer
        return (seq < num_seqs_ref[0]) & (q_len_of(seq) > 0)

    def plan(seq, i):
        """Scalars of q block i of sequence seq: its rows and the keys/pages/kv blocks it sees."""
        q_len = q_len_of(seq)
        first_pos = kv_lens_ref[seq] - q_len + i * q_block  # the block's first query position
        n_real = jnp.minimum(q_block, q_len - i * q_block)  # real queries in the block
        last_pos = first_pos + n_real - 1
        lo_pos = (jnp.int32(0) if sliding_window is None
                  else jnp.maximum(first_pos - sliding_window + 1, 0))
        return dict(seq=seq, row0=(cu_ref[seq] + i * q_block) * group, first_pos=first_pos,
                    n_real=n_real, last_pos=last_pos, lo_pos=lo_pos,
                    first_page=lo_pos // page_size, last_page=last_pos // page_size,
                    lo_blk=lo_pos // kv_tokens, hi_blk=last_pos // kv_tokens + 1)

    def page_copies(p, b, slot, fn):
        """fn(copy) for the K and V DMAs of the pages of kv block b that plan p reads."""
        lo = jnp.maximum(p["first_page"] - b * kv_pages, 0)
        hi = jnp.minimum(p["last_page"] - b * kv_pages + 1, kv_pages)
        base = p["seq"] * pages_per_seq + b * kv_pages

        def one(j, carry):
            page = table_ref[base + j]
            dst = pl.ds(j * page_size, page_size)
            fn(pltpu.make_async_copy(k_hbm.at[layer, page, head], k_buf.at[slot, dst],
                                     k_sem.at[slot]))
            fn(pltpu.make_async_copy(v_hbm.at[layer, page, head], v_buf.at[slot, dst],
                                     v_sem.at[slot]))
            return carry

        jax.lax.fori_loop(lo, hi, one, 0)

    def start(p, b, slot):
        page_copies(p, b, slot, lambda c: c.start())

    # carry_ref (SMEM, kept across grid steps): [first kv block of this step already in
    # flight?, its slot]. Written by the previous step of the same core, which is (head, s-1):
    # the sequence axis is sequential and innermost. Step s = 0 never finds one in flight.
    in_flight = jnp.where(s > 0, carry_ref[0], 0)
    first_slot = jnp.where(in_flight > 0, carry_ref[1], 0)
    carry_ref[0] = 0
    num_q_blocks = pl.cdiv(q_len_of(s), q_block)
    next_seq = jnp.minimum(s + 1, num_slots - 1)
    next_live = (s + 1 < num_slots) & live(next_seq)

    def q_block_body(i, slot):
        p = plan(s, i)
        q_copy = pltpu.make_async_copy(q_hbm.at[head, pl.ds(p["row0"], rows)], q_buf,
                                       io_sem.at[0])
        q_copy.start()
        if tree:
            bits_copy = pltpu.make_async_copy(bits_hbm.at[pl.ds(p["row0"], rows)], bits_buf,
                                              io_sem.at[1])
            bits_copy.start()
            bits_copy.wait()
        q_copy.wait()
        qv = q_buf[...].astype(compute_dtype)
        row = jax.lax.broadcasted_iota(jnp.int32, (rows, kv_tokens), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (rows, kv_tokens), 1)
        key_col = jax.lax.broadcasted_iota(jnp.int32, (kv_tokens, 1), 0)
        lo_blk, hi_blk = p["lo_blk"], p["hi_blk"]

        def kv_block_body(b, state):
            m, l, acc, slot = state
            nxt = 1 - slot
            last = b + 1 == hi_blk

            # Keep the DMA engine busy: the next kv block of this q block, else the first of
            # the next q block, else the first of the next sequence (the next grid step).
            @pl.when(~last)
            def _():
                start(p, b + 1, nxt)

            @pl.when(last & (i + 1 < num_q_blocks))
            def _():
                pn = plan(s, i + 1)
                start(pn, pn["lo_blk"], nxt)

            @pl.when(last & (i + 1 == num_q_blocks) & next_live)
            def _():
                pn = plan(next_seq, 0)
                start(pn, pn["lo_blk"], nxt)
                carry_ref[0] = 1
                carry_ref[1] = nxt

            page_copies(p, b, slot, lambda c: c.wait())
            key0 = b * kv_tokens
            # Rows are (token, head) pairs: token = row // group. Key k is visible to the
            # row's query iff first_pos + row // group >= k (and < k + window); multiplied
            # out by group, so no vector division is needed.
            rel = key0 + col - p["first_pos"]
            seen = rel * group <= row
            if sliding_window is not None:
                seen &= row < (rel + sliding_window) * group
            if tree:  # keys under 32 back: where the row's token has their bit
                back = row // group - rel
                bit = jax.lax.shift_right_arithmetic(
                    bits_buf[...], jnp.clip(back, 0, 31)) & 1
                seen &= (back >= 32) | (bit == 1)
            key_pos = key0 + key_col
            in_range = (key_pos >= p["lo_pos"]) & (key_pos <= p["last_pos"])  # rows DMA'd
            k = k_buf[slot].astype(compute_dtype)
            v = jnp.where(in_range, v_buf[slot], 0).astype(compute_dtype)  # unread rows: 0
            scores = jax.lax.dot_general(qv, k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * scale
            scores = jnp.where(seen, scores, MASK_VALUE)
            m_new = jnp.maximum(m, scores.max(axis=1, keepdims=True))
            probs = jnp.where(seen, jnp.exp(scores - m_new), 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + probs.sum(axis=1, keepdims=True)
            acc = alpha * acc + jax.lax.dot_general(
                probs.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32)
            return m_new, l, acc, nxt

        init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32),
                jnp.zeros((rows, 1), jnp.float32),
                jnp.zeros((rows, q_buf.shape[1]), jnp.float32), slot)
        _, l, acc, slot = jax.lax.fori_loop(lo_blk, hi_blk, kv_block_body, init)
        out_row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        out = jnp.where(out_row < p["n_real"] * group, acc / jnp.maximum(l, 1e-30), 0.0)
        o_buf[...] = out.astype(o_buf.dtype)
        o_copy = pltpu.make_async_copy(o_buf, o_hbm.at[head, pl.ds(p["row0"], rows)],
                                       io_sem.at[1])
        o_copy.start()
        o_copy.wait()
        return slot

    @pl.when(live(s))
    def _():
        @pl.when(in_flight == 0)
        def _():
            p = plan(s, 0)
            start(p, p["lo_blk"], first_slot)

        jax.lax.fori_loop(0, num_q_blocks, q_block_body, first_slot)


def ragged_paged_attention_pallas(
    q: jax.Array,  # (T, H, D)
    k_cache: jax.Array,  # (L, num_pages, KV, page_size, D)
    v_cache: jax.Array,
    layer: jax.Array,  # () int32
    page_table: jax.Array,  # (S, P) int32
    cu_q_lens: jax.Array,  # (S + 1,) int32
    kv_lens: jax.Array,  # (S,) int32
    num_seqs: jax.Array,  # () int32
    *,
    sliding_window: int | None = None,
    interpret=None,
    q_block: int | None = None,
    kv_pages: int | None = None,
    tree_bits: jax.Array | None = None,  # (T,) int32: token trees
) -> jax.Array:
    """(T, H, D) attention in q's dtype; padding tokens give zeros. See the module doc."""
    T, H, D = q.shape
    _, _, KV, page_size, _ = k_cache.shape
    S, P = page_table.shape
    group = H // KV
    compute_dtype = jnp.promote_types(q.dtype, k_cache.dtype)
    auto_q, auto_kv = block_sizes(T, S, H, KV, D, page_size, P, compute_dtype)
    q_block = q_block or auto_q
    kv_pages = kv_pages or auto_kv
    rows = q_block * group

    # (T, H, D) -> (KV, (T + q_block) * group, D): a kv head's rows are contiguous per
    # sequence; one block of padding so the last block's DMA stays in bounds.
    qr = q.reshape(T, KV, group, D).transpose(1, 0, 2, 3)
    qr = jnp.pad(qr, ((0, 0), (0, q_block), (0, 0), (0, 0))).reshape(KV, (T + q_block) * group, D)

    kernel = functools.partial(
        _attention_kernel, q_block=q_block, kv_pages=kv_pages, page_size=page_size,
        group=group, num_slots=S, pages_per_seq=P, sliding_window=sliding_window,
        scale=1.0 / math.sqrt(D), compute_dtype=compute_dtype, tree=tree_bits is not None)
    tree_inputs, tree_scratch = (), []
    if tree_bits is not None:  # per row of qr's layout: token t's bits on its group rows
        bits = jnp.repeat(jnp.pad(jnp.asarray(tree_bits, jnp.int32), (0, q_block),
                                  constant_values=-1), group)
        tree_inputs, tree_scratch = (bits[:, None],), [pltpu.VMEM((rows, 1), jnp.int32)]
    kv_tokens = kv_pages * page_size
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(KV, S),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * (3 + len(tree_inputs)),
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[
            pltpu.VMEM((rows, D), q.dtype),
            pltpu.VMEM((rows, D), q.dtype),
            pltpu.VMEM((2, kv_tokens, D), k_cache.dtype),
            pltpu.VMEM((2, kv_tokens, D), v_cache.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SMEM((2,), jnp.int32),
            *tree_scratch,
        ],
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="ragged_paged_attention",
    )(
        jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        jnp.asarray(page_table, jnp.int32).reshape(-1),
        jnp.asarray(cu_q_lens, jnp.int32),
        jnp.asarray(kv_lens, jnp.int32),
        jnp.reshape(jnp.asarray(num_seqs, jnp.int32), (1,)),
        qr, k_cache, v_cache, *tree_inputs,
    )
    out = out[:, : T * group].reshape(KV, T, group, D).transpose(1, 0, 2, 3).reshape(T, H, D)
    real = jnp.arange(T, dtype=jnp.int32) < jnp.asarray(cu_q_lens, jnp.int32)[num_seqs]
    return jnp.where(real[:, None, None], out, jnp.zeros((), q.dtype))


def _write_kernel(layer_ref, slots_ref, k_in, v_in, k_new, v_new, k_out, v_out, sem,
                  *, tokens_per_step, num_tokens, page_size):
    del k_in, v_in  # aliased to k_out / v_out
    i = pl.program_id(0)
    layer = layer_ref[0]
    start = i * tokens_per_step
    count = jnp.minimum(tokens_per_step, num_tokens - start)

    def copies(t):
        slot = slots_ref[t]
        page, offset = slot // page_size, slot % page_size
        dst = pl.ds(offset, 1)
        return (pltpu.make_async_copy(k_new.at[t], k_out.at[layer, page, :, dst], sem.at[0]),
                pltpu.make_async_copy(v_new.at[t], v_out.at[layer, page, :, dst], sem.at[1]))

    def start_one(j, carry):
        for c in copies(start + j):
            c.start()
        return carry

    def wait_one(j, carry):
        for c in copies(start + j):
            c.wait()
        return carry

    jax.lax.fori_loop(0, count, start_one, 0)
    jax.lax.fori_loop(0, count, wait_one, 0)


def pallas_write_kv(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, slots: jax.Array,
                    k_new: jax.Array, v_new: jax.Array, *, interpret=None,
                    tokens_per_step: int = 64) -> tuple[jax.Array, jax.Array]:
    """Scatter k_new/v_new (T, KV, D) into slots (T,) of ``layer``, in place (aliased).

    Same semantics as ``write_kv``: slot = page * page_size + offset, padding tokens
    write into the sink page 0. Each token is one HBM->HBM DMA per cache (its KV heads
    are a strided (KV, 1, D) window of the page); a grid step issues up to
    ``tokens_per_step`` of them before waiting on any."""
    T, KV, D = k_new.shape
    page_size = k_cache.shape[3]
    tokens_per_step = max(1, min(tokens_per_step, T))
    k_new = k_new.astype(k_cache.dtype).reshape(T, KV, 1, D)
    v_new = v_new.astype(v_cache.dtype).reshape(T, KV, 1, D)
    kernel = functools.partial(_write_kernel, tokens_per_step=tokens_per_step, num_tokens=T,
                               page_size=page_size)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(pl.cdiv(T, tokens_per_step),),
        in_specs=[any_spec] * 4,
        out_specs=[any_spec, any_spec],
        scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
    )
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        grid_spec=grid_spec,
        input_output_aliases={2: 0, 3: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=_interpret_arg(interpret),
        name="write_kv",
    )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), jnp.asarray(slots, jnp.int32),
      k_cache, v_cache, k_new, v_new)
