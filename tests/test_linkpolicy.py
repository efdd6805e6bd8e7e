"""The link policy on its own (eembridge.core.linkpolicy): events in, actions out, a fake clock.

No device, no TAP, no thread: every decision the bridge carries out is checked here as
the actions the policy returns and the counters it keeps. The last test feeds it any
sequence of events and holds it to the module's invariants.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from eembridge.bridge import BRIDGE_COUNTERS, BridgeOptions
from eembridge.core.events import Echo, EchoResponse, Hint
from eembridge.core.linkpolicy import (
    DEVICE_ACTIONS,
    KEEPALIVE_MIN_TIMEOUT,
    POLICY_COUNTERS,
    ClearHalt,
    Connect,
    Disconnect,
    EchoAnswered,
    EchoRefused,
    EchoTimedOut,
    KeepaliveBack,
    KeepaliveLost,
    LinkPolicy,
    LinkState,
    Resume,
    SendEcho,
    SendEchoResponse,
    UnsolicitedEchoResponse,
)
from eembridge.core.protocol import MAX_ECHO_DATA
from eembridge.core.transport import Direction, Status

IN, OUT = Direction.IN, Direction.OUT
RECONNECT = BridgeOptions().reconnect_interval  # the bridge's retry interval


def claimed(now: float = 0.0, **options) -> LinkPolicy:
    """A policy that tried to connect and got the device."""
    policy = LinkPolicy(reconnect_interval=RECONNECT, **options)
    assert policy.tick(now) == [Connect()]
    assert policy.connected(now) == []
    return policy


def sent_echo(actions) -> bytes:
    [send] = [a for a in actions if isinstance(a, SendEcho)]
    return send.data


# -- the device's commands -------------------------------------------------------------


def test_the_devices_echo_is_answered_with_its_data_ahead_of_queued_data():
    policy = claimed()
    assert policy.command_received(1.0, Echo(b"are you there")) == [SendEchoResponse(b"are you there")]
    assert SendEchoResponse.ahead_of_data and SendEcho.ahead_of_data
    assert policy.counters["echo_answered"] == 1


def test_an_unsolicited_echo_response_is_counted_and_reported_never_acted_on():
    policy = claimed()
    actions = policy.command_received(1.0, EchoResponse(b"nobody asked"))
    assert actions == [UnsolicitedEchoResponse(12)]  # for the log; nothing goes to the device
    assert policy.counters["unsolicited_echo_responses"] == 1
    assert policy.counters["echo_matched"] == 0 and policy.echo_rtt_last is None


def test_a_hint_is_advisory():
    policy = claimed()
    assert policy.command_received(1.0, Hint(2, 0)) == []
    assert policy.counters == dict(claimed().counters)


def test_commands_without_a_device_are_ignored():
    policy = LinkPolicy(RECONNECT)
    assert policy.command_received(0.0, Echo(b"x")) == []
    assert policy.counters["echo_answered"] == 0


# -- our own Echo ------------------------------------------------------------------------


def test_our_echo_is_matched_to_its_request_and_other_data_is_not():
    policy = claimed()
    assert policy.echo_requested(10.0, b"ping", 2.0, token="a") == [SendEcho(b"ping")]
    assert policy.counters["echo_sent"] == 1
    # An answer with other data is not ours: counted as unsolicited, the request waits on.
    assert policy.command_received(10.1, EchoResponse(b"pong")) == [UnsolicitedEchoResponse(4)]
    assert policy.echoes_waiting == 1
    [answered] = policy.command_received(10.25, EchoResponse(b"ping"))
    assert answered == EchoAnswered("a", pytest.approx(0.25))
    assert policy.echo_rtt_last == pytest.approx(0.25)
    assert policy.counters["echo_matched"] == 1 and policy.echoes_waiting == 0
    # The same answer again is now one nobody asked for.
    assert policy.command_received(10.3, EchoResponse(b"ping")) == [UnsolicitedEchoResponse(4)]


def test_echo_without_data_gets_data_of_its_own_each_time_different():
    policy = claimed()
    first = sent_echo(policy.echo_requested(1.0, None, 2.0, token=1))
    second = sent_echo(policy.echo_requested(1.0, None, 2.0, token=2))
    assert first != second and len(first) <= MAX_ECHO_DATA
    assert policy.command_received(1.5, EchoResponse(second)) == [EchoAnswered(2, 0.5)]


def test_two_requests_with_the_same_data_are_both_settled_oldest_first():
    policy = claimed()
    policy.echo_requested(1.0, b"same", 5.0, token="first")
    policy.echo_requested(2.0, b"same", 5.0, token="second")
    assert policy.command_received(3.0, EchoResponse(b"same")) == [EchoAnswered("first", 2.0)]
    assert policy.tick(7.0) == [EchoTimedOut("second")]


def test_echo_times_out_at_its_deadline_and_not_before():
    policy = claimed()
    policy.echo_requested(1.0, b"ping", 2.0, token="t")
    assert policy.next_deadline() == 3.0
    assert policy.tick(2.999) == []
    assert policy.tick(3.0) == [EchoTimedOut("t")]
    assert policy.counters["echo_timeouts"] == 1 and policy.next_deadline() is None
    # A late answer is one nobody is waiting for any more.
    assert policy.command_received(3.5, EchoResponse(b"ping")) == [UnsolicitedEchoResponse(4)]


def test_echo_refused_without_a_device_or_with_too_much_data():
    policy = LinkPolicy(RECONNECT)
    assert policy.echo_requested(0.0, b"x", 1.0, token=1) == [
        EchoRefused(1, "not_connected", "no device connected")]
    policy = claimed()
    [refused] = policy.echo_requested(0.0, bytes(MAX_ECHO_DATA + 1), 1.0, token=2)
    assert isinstance(refused, EchoRefused) and refused.reason == "too_long"
    assert policy.echo_requested(0.0, bytes(MAX_ECHO_DATA), 1.0, token=3) == [
        SendEcho(bytes(MAX_ECHO_DATA))]
    assert policy.counters["echo_sent"] == 1


def test_a_pending_echo_outlives_an_unplug_and_times_out():
    policy = claimed()
    policy.echo_requested(1.0, b"ping", 2.0, token="t")
    policy.disconnected(1.5, "unplugged")
    assert policy.tick(3.0) == [EchoTimedOut("t"), Connect()]


# -- keepalive ---------------------------------------------------------------------------


def test_keepalive_is_sent_every_interval_from_the_connect():
    policy = claimed(now=100.0, keepalive=0.5)
    assert policy.next_deadline() == 100.5
    assert policy.tick(100.4) == []
    first = sent_echo(policy.tick(100.5))
    assert policy.next_deadline() == 101.0
    # Answered: nothing to report, it was not lost.
    assert policy.command_received(100.52, EchoResponse(first)) == []
    assert policy.echo_rtt_last == pytest.approx(0.02)
    # A late tick sends one, and the next is an interval after it, not a burst.
    sent_echo(policy.tick(102.3))
    assert policy.next_deadline() == pytest.approx(102.8)
    assert policy.counters["echo_sent"] == 2 and policy.counters["echo_matched"] == 1


def test_keepalive_lost_after_n_missed_and_back_on_the_next_answer():
    policy = claimed(keepalive=2.0, keepalive_misses=3)
    # Each waits max(KEEPALIVE_MIN_TIMEOUT, interval), 2 s: each tick here finds the one
    # before unanswered. The first two misses are quiet.
    for t in (2.0, 4.0, 6.0):
        sent_echo(policy.tick(t))
    assert policy.tick(6.5) == []
    actions = policy.tick(8.0)  # the third miss (sent at 6.0) and the next keepalive
    assert [a for a in actions if not isinstance(a, SendEcho)] == [KeepaliveLost()]
    assert policy.keepalive_lost and policy.counters["keepalives_lost"] == 1
    assert policy.counters["echo_timeouts"] == 3
    late = sent_echo(actions)
    assert policy.command_received(8.1, EchoResponse(late)) == [KeepaliveBack()]
    assert not policy.keepalive_lost and policy.counters["keepalives_lost"] == 1


def test_one_answer_resets_the_misses_and_lost_is_said_once():
    policy = claimed(keepalive=1.0, keepalive_misses=2)
    sent_echo(policy.tick(1.0))  # unanswered: times out at 2.0, one miss
    third = sent_echo(policy.tick(2.0))
    assert policy.command_received(2.5, EchoResponse(third)) == []  # misses back to 0
    actions = policy.tick(3.0)
    sent_echo(actions)  # unanswered: times out at 4.0
    assert KeepaliveLost() not in actions + policy.tick(4.0)  # one miss since the answer
    assert KeepaliveLost() in policy.tick(5.0)  # the second in a row
    assert KeepaliveLost() not in policy.tick(6.0) + policy.tick(7.0)  # said once
    assert policy.counters["keepalives_lost"] == 1


def test_the_keepalive_waits_at_least_the_minimum_timeout():
    policy = claimed(keepalive=0.1)
    sent_echo(policy.tick(0.1))
    assert KeepaliveLost() not in policy.tick(0.1 + KEEPALIVE_MIN_TIMEOUT - 0.01)
    assert KeepaliveLost() in policy.tick(0.1 + KEEPALIVE_MIN_TIMEOUT)


@pytest.mark.parametrize("keepalive", [0, 0.0, None])
def test_keepalive_off(keepalive):
    policy = claimed(keepalive=keepalive)
    assert policy.next_deadline() is None
    assert policy.tick(1e6) == [] and policy.counters["echo_sent"] == 0


def test_a_keepalive_from_before_an_unplug_is_not_reported_lost():
    policy = claimed(keepalive=1.0)
    sent_echo(policy.tick(1.0))
    policy.disconnected(1.5, "unplugged")
    assert policy.tick(1.6) == [Connect()]
    policy.connected(1.7)
    # Its timeout is counted, but the unplug already said the device went.
    assert KeepaliveLost() not in policy.tick(2.0)
    assert policy.counters["echo_timeouts"] == 1 and not policy.keepalive_lost


def test_no_keepalive_while_disconnected():
    policy = claimed(keepalive=1.0)
    policy.disconnected(0.5, "unplugged")
    assert policy.tick(0.5) == [Connect()]
    assert policy.connect_failed(0.5) == []
    assert [a for t in (1.0, 2.0, 3.0) for a in policy.tick(t) if isinstance(a, SendEcho)] == []


# -- failed transfers: the one OUT-failure policy ----------------------------------------


def test_out_stall_drops_the_transfer_counts_it_clears_the_halt_and_resumes():
    policy = claimed()
    assert policy.out_failed(Status.STALL, frames=5) == [ClearHalt(OUT), Resume(OUT)]
    assert policy.drop_reasons == {"stall": 5}
    c = policy.counters
    assert (c["tx_dropped"], c["out_errors"], c["out_stalls"]) == (5, 1, 1)


@pytest.mark.parametrize("status, reason", [(Status.TIMED_OUT, "timed_out"),
                                            (Status.COMPLETED, "short_write"),
                                            (Status.ERROR, "error"),
                                            (Status.OVERFLOW, "overflow")])
def test_other_out_failures_drop_and_count_never_resend(status, reason):
    policy = claimed()
    assert policy.out_failed(status, frames=3) == []  # nothing resent, no halt to clear
    assert policy.drop_reasons == {reason: 3}
    assert policy.counters["out_errors"] == 1 and policy.counters["out_stalls"] == 0


def test_a_failed_command_transfer_is_an_error_without_frames():
    policy = claimed()
    policy.out_failed(Status.TIMED_OUT, frames=0)
    assert policy.counters["out_errors"] == 1 and policy.drop_reasons == {}


def test_in_stall_clears_the_halt_and_resumes():
    policy = claimed()
    assert policy.in_failed(Status.STALL) == [ClearHalt(IN), Resume(IN)]
    assert policy.in_errors == {"stall": 1}
    assert policy.counters["in_stalls"] == 1 and policy.counters["in_errors"] == 1


def test_other_in_failures_are_counted_and_cancelled_ones_are_ours():
    policy = claimed()
    assert policy.in_failed(Status.TIMED_OUT) == []
    assert policy.in_failed(Status.OVERFLOW) == []
    assert policy.in_failed(Status.CANCELLED) == []
    assert policy.in_errors == {"timed_out": 1, "overflow": 1}
    assert policy.counters["in_errors"] == 2 and policy.counters["in_stalls"] == 0


def test_a_halt_the_transport_counted_is_only_cleared_and_resumed():
    policy = claimed()
    assert policy.halted(OUT) == [ClearHalt(OUT), Resume(OUT)]
    assert policy.halted(IN) == [ClearHalt(IN), Resume(IN)]
    assert policy.in_submit_refused() == [Resume(IN)]
    assert policy.counters == claimed().counters and policy.drop_reasons == {}


@pytest.mark.parametrize("report", [lambda p: p.in_failed(Status.NO_DEVICE),
                                    lambda p: p.out_failed(Status.NO_DEVICE, 4),
                                    lambda p: p.device_gone()])
def test_no_device_disconnects(report):
    policy = claimed()
    assert report(policy) == [Disconnect("unplugged")]
    assert policy.drop_reasons == {}  # the disconnect counts what was in flight
    policy.disconnected(1.0, "unplugged", frames_lost=4)
    assert policy.counters["unplugs"] == 1 and policy.drop_reasons == {"no_device": 4}
    assert policy.state is LinkState.DISCONNECTED
    assert report(policy) == []  # a late report of the device that went


def test_stopping_counts_its_frames_as_stopped_not_as_an_unplug():
    policy = claimed()
    policy.disconnected(1.0, "stopped", frames_lost=2)
    assert policy.drop_reasons == {"stopped": 2} and policy.counters["unplugs"] == 0


# -- reconnecting ------------------------------------------------------------------------


def test_connect_at_once_then_every_retry_interval_until_the_device_is_there():
    policy = LinkPolicy(reconnect_interval=RECONNECT)
    assert policy.next_deadline() == float("-inf")  # due now
    assert policy.tick(5.0) == [Connect()]
    assert policy.tick(5.0) == [] and policy.next_deadline() is None  # attempt under way
    policy.connect_failed(5.01)
    assert policy.next_deadline() == pytest.approx(5.01 + RECONNECT)
    assert policy.tick(5.01 + RECONNECT - 0.001) == []
    assert policy.tick(5.01 + RECONNECT) == [Connect()]
    policy.connected(5.3)
    assert policy.counters["connects"] == 1 and policy.counters["connect_failures"] == 1
    assert policy.tick(100.0) == []  # connected: nothing to retry


def test_after_an_unplug_the_first_attempt_is_at_once():
    policy = claimed()
    policy.disconnected(50.0, "unplugged")
    assert policy.next_deadline() == 50.0
    assert policy.tick(50.0) == [Connect()]
    policy.connected(50.1)
    assert policy.counters["connects"] == 2 and policy.counters["unplugs"] == 1


def test_gone_while_starting_then_failed_waits_the_interval():
    """The bridge's order when the device goes while its transfers start."""
    policy = LinkPolicy(reconnect_interval=RECONNECT)
    policy.tick(0.0)
    policy.disconnected(0.1, "gone while starting")
    policy.connect_failed(0.1)
    assert policy.next_deadline() == pytest.approx(0.1 + RECONNECT)
    assert policy.counters["unplugs"] == 0


def test_policy_counters_are_bridge_counters():
    assert set(POLICY_COUNTERS) <= set(BRIDGE_COUNTERS)


# -- any sequence of events --------------------------------------------------------------

STATUSES = list(Status)
TICK = st.tuples(st.just("tick"))
ANSWER = st.tuples(st.just("echo_response"), st.integers(0, 3))  # the n-th newest Echo we sent
REQUEST = st.tuples(st.just("echo_requested"),
                    st.one_of(st.none(), st.binary(max_size=3), st.just(bytes(MAX_ECHO_DATA + 1))),
                    st.sampled_from([0.0, 0.5, 2.0, 5.0]))
LIVE = [status for status in Status if status is not Status.NO_DEVICE]
# Ticks, answers and requests weigh more: they are what reaches the timers.
CALM = st.one_of(
    TICK, TICK, TICK, TICK, ANSWER, ANSWER, ANSWER, REQUEST, REQUEST,
    st.tuples(st.just("echo"), st.binary(max_size=4)),
    st.tuples(st.just("echo_response_other"), st.binary(max_size=4)),
    st.tuples(st.just("hint")),
    st.tuples(st.just("out_failed"), st.sampled_from(LIVE), st.integers(0, 40)),
    st.tuples(st.just("in_failed"), st.sampled_from(LIVE)),
    st.tuples(st.just("halted"), st.sampled_from([IN, OUT])),
    st.tuples(st.just("in_submit_refused")),
)
# The device going, and facts about the link out of turn (they also come as the bridge
# reports them: after Connect and Disconnect, below).
EVENTS = st.one_of(
    CALM, CALM, CALM,
    st.tuples(st.just("connected")),
    st.tuples(st.just("connect_failed")),
    st.tuples(st.just("disconnected"), st.sampled_from(["unplugged", "stopped", "gone while starting"]),
              st.integers(0, 50)),
    st.tuples(st.just("out_failed"), st.just(Status.NO_DEVICE), st.integers(0, 40)),
    st.tuples(st.just("in_failed"), st.just(Status.NO_DEVICE)),
    st.tuples(st.just("device_gone")),
)
ADVANCE = st.sampled_from([0.0, 0.001, 0.05, 0.3, 1.0, 2.5])
SETTLED = (EchoAnswered, EchoTimedOut, EchoRefused)


class Feeder:
    """Feeds the policy one event and holds what it returns to the invariants."""

    def __init__(self, policy: LinkPolicy) -> None:
        self.policy = policy
        self.now = 0.0
        self.sent: list[bytes] = []  # data of every Echo the policy sent
        self.unsettled: set[int] = set()
        self.tokens = 0
        self.lost = False

    def __call__(self, name: str, *args):
        policy, now = self.policy, self.now
        before, due = policy.state, policy.next_deadline()
        if name == "tick":
            actions = policy.tick(now)
        elif name in ("connected", "connect_failed"):
            actions = getattr(policy, name)(now)
        elif name == "disconnected":
            actions = policy.disconnected(now, *args)
        elif name == "echo":
            actions = policy.command_received(now, Echo(args[0]))
        elif name == "echo_response":
            data = self.sent[-1 - args[0] % len(self.sent)] if self.sent else b""
            actions = policy.command_received(now, EchoResponse(data))
        elif name == "echo_response_other":
            actions = policy.command_received(now, EchoResponse(args[0]))
        elif name == "hint":
            actions = policy.command_received(now, Hint(1, 3))
        elif name == "echo_requested":
            self.tokens += 1
            self.unsettled.add(self.tokens)
            actions = policy.echo_requested(now, args[0], args[1], self.tokens)
        else:
            actions = getattr(policy, name)(*args)
        for action in actions:
            event(type(action).__name__)  # --hypothesis-show-statistics: what was reached
            if isinstance(action, DEVICE_ACTIONS):
                assert before is LinkState.CONNECTED, (name, action, before)
            if isinstance(action, Connect):
                assert name == "tick" and before is LinkState.DISCONNECTED and due <= now
            if isinstance(action, SendEcho):
                self.sent.append(action.data)
            if isinstance(action, SETTLED):
                assert action.token in self.unsettled, action  # settled exactly once
                self.unsettled.discard(action.token)
            if isinstance(action, (KeepaliveLost, KeepaliveBack)):
                assert self.lost == isinstance(action, KeepaliveBack), action  # they alternate
                self.lost = not self.lost
        assert actions.count(Connect()) <= 1
        if name == "tick":
            after = policy.next_deadline()
            assert after is None or after > now, (after, now)
        c = policy.counters
        assert min(c.values()) >= 0
        assert c["tx_dropped"] == sum(policy.drop_reasons.values())
        assert c["in_errors"] == sum(policy.in_errors.values())
        assert c["echo_sent"] == len(self.sent)
        assert c["echo_matched"] + c["echo_timeouts"] + policy.echoes_waiting == len(self.sent)
        assert policy.keepalive_lost == self.lost
        if not policy.keepalive:
            assert not self.lost
        return actions


@settings(max_examples=500, deadline=None)
@given(keepalive=st.sampled_from([None, 0, 0.05, 1.0, 3.0]), misses=st.integers(1, 3),
       steps=st.integers(0, 120), calm=st.booleans(), data=st.data())
def test_any_sequence_of_events_keeps_the_invariants(keepalive, misses, steps, calm, data):
    """Never raises; device actions only while connected; Connect only when due; every
    echo request settled exactly once; the counters agree with each other; after a tick
    nothing is overdue (the thread never spins)."""
    feed = Feeder(LinkPolicy(keepalive=keepalive, reconnect_interval=RECONNECT,
                             keepalive_misses=misses))
    for _ in range(steps):
        feed.now += data.draw(ADVANCE)
        pending = [data.draw(CALM if calm else EVENTS)]
        while pending:
            actions = feed(*pending.pop(0))
            # What the bridge reports back once it carried them out.
            for action in actions:
                if isinstance(action, Connect):
                    found = data.draw(st.sampled_from([True, True, True, False]))
                    pending.append(("connected",) if found else ("connect_failed",))
                elif isinstance(action, Disconnect):
                    pending.append(("disconnected", action.reason, data.draw(st.integers(0, 9))))
    # Given time, every request is settled (what waits is the keepalive just sent).
    feed.now += 10
    actions = feed("tick")
    assert not feed.unsettled
    assert feed.policy.echoes_waiting == len([a for a in actions if isinstance(a, SendEcho)]) <= 1


@pytest.mark.parametrize("options", [{"reconnect_interval": 0}, {"keepalive": -1},
                                     {"keepalive_misses": 0}])
def test_settings_that_would_spin_or_never_report_are_refused(options):
    with pytest.raises(ValueError):
        LinkPolicy(**{"reconnect_interval": RECONNECT, **options})
