"""The step clock: when the server's engine thread chooses the next step."""

from sgljax.engine.step_clock import SLACK, StepClock


def run_step(clock, shape, start, duration, prepare=0.002):
    """Dispatch a step at ``start`` on an idle device; it lands after ``duration``."""
    clock.launched(shape, start - prepare, now=start)
    clock.landed(now=start + duration)


def test_no_wait_until_a_shape_has_been_timed():
    clock = StepClock()
    assert clock.launch_delay(now=0.0) == 0.0  # nothing in flight
    clock.launched((16, 1), 0.0, now=0.001)
    assert clock.launch_delay(now=0.002) == 0.0  # never seen this shape run
    clock.landed(now=0.060)
    # The first run of a shape (cold after warmup) is not counted.
    clock.launched((16, 1), 0.1, now=0.1)
    assert clock.launch_delay(now=0.1) == 0.0


def test_waits_until_the_step_in_flight_is_nearly_done():
    clock = StepClock()
    for i in range(4):
        run_step(clock, (16, 1), start=i, duration=0.050)
    clock.launched((16, 1), 10.0 - 0.002, now=10.0)
    delay = clock.launch_delay(now=10.0)
    margin = 2 * clock.host_time + 0.001 + SLACK * 0.050
    assert abs(delay - (0.050 - margin)) < 1e-9
    assert 0.035 < delay < 0.050
    # Later, less is left; past the estimate, none.
    assert abs(clock.launch_delay(now=10.02) - (delay - 0.02)) < 1e-9
    assert clock.launch_delay(now=10.06) == 0.0


def test_estimate_is_the_shortest_recent_run_and_shapes_are_apart():
    clock = StepClock()
    for i, d in enumerate([0.2, 0.08, 0.3, 0.1]):
        run_step(clock, (1, 64), start=i, duration=d)
    run_step(clock, (16, 1), start=5, duration=0.05)
    run_step(clock, (16, 1), start=6, duration=0.05)
    clock.launched((1, 64), 9.998, now=10.0)
    assert 0.06 < clock.launch_delay(now=10.0) < 0.08  # from 0.08, not 0.05 or the mean


def test_a_queued_step_starts_when_the_one_before_lands():
    clock = StepClock()
    for i in range(3):
        run_step(clock, (16, 1), start=i, duration=0.050)
    clock.launched((16, 1), 9.998, now=10.0)  # N runs
    clock.launched((16, 1), 10.005, now=10.006)  # N+1 waits behind it (overlap schedule)
    assert clock.launch_delay(now=10.006) == 0.0  # two in flight: choose nothing yet
    clock.landed(now=10.050)  # N ends: N+1 starts now
    assert clock.queue[0].started_at == 10.050
    assert 0.035 < clock.launch_delay(now=10.050) < 0.050


def test_a_too_long_estimate_shrinks_when_the_host_finds_steps_done():
    clock = StepClock()
    run_step(clock, (16, 1), start=0, duration=0.5)  # cold, not counted
    run_step(clock, (16, 1), start=1, duration=0.5)  # a slow outlier
    delays = []
    t = 10.0
    for _ in range(40):  # the steps really take 50 ms
        clock.launched((16, 1), t - 0.002, now=t)
        delay = clock.launch_delay(now=t)
        delays.append(delay)
        t += max(delay, 0.050)  # the host looks after its wait, or when the step is done
        clock.landed(now=t)
        t += 0.001
    assert delays[0] > 0.4
    assert delays[-1] < 0.050  # back on time: wakes before the step ends
