"""Rank 0's step channel to its workers (replicas.parallel.step_channel): messages arrive whole and
in order at every worker, a connection without the group's token takes no worker's place, a
closed rank 0 ends the workers' reading, and writing to a worker that is gone raises."""
import socket
import threading

import numpy as np
import pytest

from replicas.parallel.messages import EmbedMessage, StepMessage
from replicas.parallel.step_channel import StepReceiver, StepSender

TOKEN = b"raylm-tp-0123456789ab"


def _step(i: int) -> StepMessage:
    return StepMessage((i, 1, 1, 0, 1, 40), np.arange(i, i + 3000, dtype=np.int64), np.array([0, 2, 1, i]), 8, [])


def test_messages_reach_every_worker_in_order_and_impostors_are_dropped():
    sender = StepSender("127.0.0.1", TOKEN)
    impostor = socket.create_connection(("127.0.0.1", sender.address.port))
    impostor.sendall(b"x" * len(TOKEN) + (1).to_bytes(4, "little"))  # a wrong token, a real rank
    receivers = [StepReceiver(sender.address, rank, 10) for rank in (2, 1)]  # connect out of rank order
    sender.accept(2, 10)
    got = {1: [], 2: []}

    def read(rank, receiver):
        while (msg := receiver.receive()) is not None:
            got[rank].append(msg)

    threads = [threading.Thread(target=read, args=(r, rec)) for r, rec in zip((2, 1), receivers)]
    for t in threads:
        t.start()
    for i in range(50):
        sender.send(_step(i))
    sender.send(EmbedMessage(7))
    sender.close()  # rank 0 gone: every reader sees the end
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    for rank in (1, 2):
        steps, last = got[rank][:-1], got[rank][-1]
        assert [m.counts[0] for m in steps] == list(range(50))
        assert all(np.array_equal(m.regions, np.arange(i, i + 3000)) for i, m in enumerate(steps))
        assert last == EmbedMessage(7)
    assert impostor.recv(1) == b""  # dropped, and sent nothing
    impostor.close()


def test_sending_to_a_worker_that_is_gone_raises():
    sender = StepSender("127.0.0.1", TOKEN)
    receiver = StepReceiver(sender.address, 1, 10)
    sender.accept(1, 10)
    receiver.close()
    with pytest.raises(OSError):
        for i in range(1000):  # the first writes may land in the socket's buffer
            sender.send(_step(i))
    sender.close()


def test_a_worker_that_never_connects_times_out():
    sender = StepSender("127.0.0.1", TOKEN)
    with pytest.raises(TimeoutError):
        sender.accept(1, 0.5)
    sender.close()


def test_a_write_cut_short_by_a_signal_still_sends_whole_frames():
    """A blocking write that a signal interrupts after part of a frame returns short; the rest
    must follow, or every later frame is misread. A large message to a reader that starts late,
    with a timer signal firing meanwhile, makes the cut likely."""
    import signal
    import time

    sender = StepSender("127.0.0.1", TOKEN)
    receiver = StepReceiver(sender.address, 1, 10)
    sender.accept(1, 10)
    big = np.arange(4_000_000, dtype=np.int64)  # 32 MB: far past the sockets' buffers
    got = []

    def read():
        time.sleep(0.3)  # the sender blocks with part of the frame written
        while (msg := receiver.receive()) is not None:
            got.append(msg)

    reader = threading.Thread(target=read)
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.05)
    try:
        reader.start()
        for i in range(3):
            sender.send(StepMessage((i, 1, 1, 0, 1, 40), big, np.array([i]), 8, []))
        sender.send(EmbedMessage(9))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    sender.close()
    reader.join(30)
    assert fired  # the signal did arrive during the writes
    assert [m.counts[0] for m in got[:-1]] == [0, 1, 2] and got[-1] == EmbedMessage(9)
    assert all(np.array_equal(m.regions, big) for m in got[:-1])
