"""The scheduler alone: no model, no device. Steps are "run" by telling the scheduler
they launched and landed, with made-up tokens."""

from sgljax.engine.buckets import BucketPlan
from sgljax.engine.kv_cache import PagePool
from sgljax.engine.prefix_cache import NoPrefixCache, RadixPrefixCache
from sgljax.engine.request import Sequence, Status
from sgljax.engine.sampling_params import SamplingParams
from sgljax.engine.scheduler import Scheduler, SchedulerConfig

PAGE = 4


def make(pages=64, policy="fcfs", max_running=8, chunk=32, new_per_prefill=8, cache=True,
         context=128):
    pool = PagePool(pages + 1)
    prefix = RadixPrefixCache(pool, PAGE) if cache else NoPrefixCache()
    plan = BucketPlan.plan(max_running=max_running, chunked_prefill_size=chunk,
                           max_pages_per_seq=context // PAGE, page_size=PAGE,
                           token_paddings=[4, 8, 16, 32])
    cfg = SchedulerConfig(page_size=PAGE, max_running_requests=max_running,
                          chunked_prefill_size=chunk, context_length=context,
                          schedule_policy=policy, new_seqs_per_prefill=new_per_prefill)
    return Scheduler(cfg, pool, prefix, plan), pool


def seq(ids, max_tokens=4, rid=None):
    s = Sequence(prompt_ids=list(ids), params=SamplingParams(max_tokens=max_tokens))
    if rid:
        s.rid = rid
    return s


def run_step(sched, token=7):
    """Schedule, launch and land one step; every sampled row gets ``token``."""
    batch = sched.schedule()
    if batch is None:
        return None
    sched.launched(batch)
    for _, s in sched.landed(batch):
        sched.append_token(s, token)
    return batch


def test_decodes_and_prompt_chunks_share_every_step():
    sched, _ = make(new_per_prefill=1, chunk=8)
    a = seq(range(1, 9), max_tokens=10, rid="a")
    b = seq(range(20, 32), max_tokens=10, rid="b")  # 12 tokens: chunks of 7 and 5
    sched.add(a)
    sched.add(b)
    rows = []
    for _ in range(4):
        batch = run_step(sched)
        rows.append(([s.rid for s in batch.seqs], batch.chunk_lens, batch.num_decodes))
        assert batch.num_tokens <= 8
    # One new prompt a step; a's decode is in every step after its prompt, first, and
    # b's prompt fills the rest of the budget.
    assert rows == [(["a"], [8], 0), (["a", "b"], [1, 7], 1), (["a", "b"], [1, 5], 1),
                    (["a", "b"], [1, 1], 2)]


def test_max_prefill_seqs_caps_the_chunks_of_a_step():
    sched, _ = make(new_per_prefill=8, chunk=32)
    sched.cfg.max_prefill_seqs = 2
    for i in range(4):
        sched.add(seq(range(10 * i + 1, 10 * i + 5), rid=f"r{i}"))
    assert [s.rid for s in sched.schedule().seqs] == ["r0", "r1"]


def test_chunked_prefill_respects_the_token_budget():
    sched, _ = make(chunk=16)
    long = seq(range(1, 41), rid="long")  # 40 tokens: chunks of 16, 16, 8
    sched.add(long)
    chunks = []
    while long.num_generated == 0:
        batch = run_step(sched)
        chunks.append(batch.chunk_lens[0])
        assert batch.num_tokens <= 16
    assert chunks == [16, 16, 8]
    assert long.output_ids == [7]


def test_budget_is_shared_and_running_prefills_go_first():
    sched, _ = make(chunk=16, new_per_prefill=8)
    first = seq(range(1, 25), rid="first")  # 24 tokens
    sched.add(first)
    run_step(sched)  # 16 of first
    for i in range(3):
        sched.add(seq(range(100 * (i + 1), 100 * (i + 1) + 5), rid=f"new{i}"))
    batch = sched.schedule()
    assert batch.seqs[0].rid == "first" and batch.chunk_lens[0] == 8  # its rest, first
    # New prompts fill what is left of the 16-token budget; the last one only in part.
    assert [s.rid for s in batch.seqs[1:]] == ["new0", "new1"]
    assert batch.chunk_lens == [8, 5, 3] and batch.num_tokens == 16
    assert [s.rid for s in sched.waiting] == ["new2"]


def test_max_running_requests_caps_admission():
    sched, _ = make(max_running=2)
    for i in range(4):
        sched.add(seq(range(10 * i + 1, 10 * i + 5), rid=f"r{i}"))
    batch = sched.schedule()
    assert [s.rid for s in batch.seqs] == ["r0", "r1"]
    assert [s.rid for s in sched.waiting] == ["r2", "r3"]


def test_lpm_admits_the_longest_cached_prefix_first():
    sched, _ = make(policy="lpm", new_per_prefill=1)
    shared = list(range(1, 17))  # four full pages
    warm = seq(shared + [50], max_tokens=1, rid="warm")
    sched.add(warm)
    while not warm.finished:
        run_step(sched)
    sched.add(seq(range(200, 217), rid="cold"))
    sched.add(seq(shared + [60, 61], rid="hot"))
    batch = sched.schedule()
    assert [s.rid for s in batch.seqs] == ["hot"]
    assert batch.seqs[0].num_cached_prompt == 16
    assert batch.chunk_lens == [2]  # only the uncached tail is computed


def test_fcfs_keeps_arrival_order_despite_cache_hits():
    sched, _ = make(policy="fcfs", new_per_prefill=1)
    shared = list(range(1, 17))
    warm = seq(shared + [50], max_tokens=1)
    sched.add(warm)
    while not warm.finished:
        run_step(sched)
    sched.add(seq(range(200, 217), rid="cold"))
    sched.add(seq(shared + [60, 61], rid="hot"))
    assert [s.rid for s in sched.schedule().seqs] == ["cold"]


def test_preemption_takes_the_newest_running_sequence_and_recomputes_it():
    sched, pool = make(pages=6, cache=False, max_running=4)  # 24 tokens of KV in all
    # Each fits alone (7 + 12 tokens: 5 pages), both together do not.
    old, new = seq(range(1, 8), max_tokens=12, rid="old"), seq(range(30, 37), max_tokens=12,
                                                               rid="new")
    sched.add(old)
    sched.add(new)
    preempted_at = None
    for step in range(80):
        run_step(sched)
        if preempted_at is None and new.num_preemptions:
            preempted_at = step
            assert new.status is Status.WAITING and new.pages == [] and new.num_computed == 0
            assert old.status is Status.RUNNING  # the older one keeps its pages
        if old.finished and new.finished:
            break
    assert preempted_at is not None
    assert old.finish_reason == new.finish_reason == "length"
    assert len(old.output_ids) == len(new.output_ids) == 12
    assert pool.num_used == 0  # no cache: everything went back


def test_abort_frees_pages_and_finishing_caches_them():
    sched, pool = make()
    a, b = seq(range(1, 10), max_tokens=2, rid="a"), seq(range(40, 50), max_tokens=9, rid="b")
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)
    assert a.finished and a.finish_reason == "length"
    cached = pool.num_used - len(b.pages)
    assert cached > 0  # a's full pages stay in the prefix cache
    sched.abort("b")
    assert b.finish_reason == "abort" and b.pages == []
    assert pool.num_used == cached
    assert not sched.has_work()


def test_stop_token_and_stop_string_finish_a_sequence():
    sched, _ = make()
    s = seq(range(1, 6), max_tokens=10)
    s.stop_ids = frozenset({9})
    sched.add(s)
    run_step(sched, token=5)
    run_step(sched, token=9)
    assert s.finished and s.finish_reason == "stop" and s.matched_stop == 9
    t = seq(range(1, 6), max_tokens=10)
    sched.add(t)
    batch = sched.schedule()
    sched.launched(batch)
    (_, got), = sched.landed(batch)
    sched.append_token(got, 4, stop_string="END")
    assert t.finished and t.matched_stop == "END"


def test_a_token_landing_after_its_sequence_ended_is_dropped():
    """Overlap: step N+1 is launched before step N's tokens land; a sequence step N ends
    must not take step N+1's token."""
    sched, _ = make()
    s = seq(range(1, 6), max_tokens=10)
    s.stop_ids = frozenset({9})
    sched.add(s)
    run_step(sched, token=5)  # prefill samples the first token
    step_n = sched.schedule()
    sched.launched(step_n)
    step_n1 = sched.schedule()  # chosen while step N is in flight
    sched.launched(step_n1)
    assert s.num_pending == 2
    for _, got in sched.landed(step_n):
        sched.append_token(got, 9)  # step N ends it
    assert s.finished
    assert sched.landed(step_n1) == []  # step N+1's token is dropped
    assert s.output_ids == [5, 9] and s.num_pending == 0


def test_a_prompt_chunk_fills_the_bucket_beside_decodes():
    """15 decodes and a 256-token prompt would pad to a 512-token step: the prompt's chunk
    is cut to fill 256 exactly, and its rest goes in the next step."""
    pool = PagePool(1024)
    plan = BucketPlan.plan(max_running=16, chunked_prefill_size=512, max_pages_per_seq=128,
                           page_size=PAGE)
    cfg = SchedulerConfig(page_size=PAGE, max_running_requests=16, chunked_prefill_size=512,
                          context_length=512, new_seqs_per_prefill=1)
    sched = Scheduler(cfg, pool, NoPrefixCache(), plan)
    decoders = [seq([i + 1] * 3, max_tokens=50, rid=f"d{i}") for i in range(15)]
    for s in decoders:
        sched.add(s)
    while any(not s.output_ids for s in decoders):
        run_step(sched)
    sched.add(seq(range(1000, 1256), rid="long"))
    batch = run_step(sched)
    assert batch.num_decodes == 15 and batch.chunk_lens == [1] * 15 + [241]
    batch = run_step(sched)
    assert batch.chunk_lens == [1] * 15 + [15] and batch.samples[-1]
