"""The write-ahead log on real files: framing, group commit, replay, damage, cleanup, the directory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffer import walformat as fmt
from buffer.wal import WriteAheadLog, describe, read_part, recover

KEY = ("events", "JSONEachRow")
OTHER = ("other", "CSV")


def row(i: int) -> bytes:
    return b'{"id":%d}\n' % i


async def opened(path: Path, **kw: object) -> WriteAheadLog:
    wal = WriteAheadLog(path, **kw)  # type: ignore[arg-type]
    wal.open()
    wal.start(asyncio.get_running_loop())
    return wal


async def test_what_is_appended_comes_back_in_order_with_the_pending_batch_and_its_token(tmp_path: Path) -> None:
    wal = await opened(tmp_path)
    lsns = [wal.append(KEY if i % 3 else OTHER, row(i), 1, durable=False)[0] for i in range(30)]
    batch = [lsn for lsn in lsns if lsn % 3 != 1][:10]
    token = wal.token(batch[0], batch[-1])
    await wal.log_batch(token, batch)  # durable: on disk once this returns
    settled = lsns[25:]
    wal.settle(settled)
    await wal.sync()
    wal.close()
    got = recover(tmp_path)
    assert got.instance == wal.instance and got.next_lsn == lsns[-1] + 1
    (pending,) = got.pending
    assert pending.token == token and [p.lsn for p in pending.parts] == batch
    rest = sorted(set(lsns) - set(batch) - set(settled))
    assert [p.lsn for p in got.unsettled] == rest
    for part in pending.parts + got.unsettled:
        i = lsns.index(part.lsn)
        assert read_part(tmp_path, part) == row(i) and part.key == (KEY if i % 3 else OTHER) and part.rows == 1


async def test_durable_writers_share_fsyncs_and_are_answered_after_them(tmp_path: Path) -> None:
    wal = await opened(tmp_path)
    futures = [wal.append(KEY, row(i), 1, durable=True)[1] for i in range(200)]
    await asyncio.wait_for(asyncio.gather(*futures), 10)  # type: ignore[arg-type]
    stats = wal.writer.stats
    assert stats.fsyncs < 200, "writers that arrive together share one fsync"
    assert max(stats.groups) > 1
    wal.close()
    assert len(recover(tmp_path).unsettled) == 200


async def test_buffered_rows_are_synced_within_the_interval_without_anyone_asking(tmp_path: Path) -> None:
    wal = await opened(tmp_path, sync_interval=0.05)
    wal.append(KEY, row(1), 1, durable=False)
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while wal.writer.stats.fsyncs == 0:
        assert loop.time() < end, "never synced"
        await asyncio.sleep(0.01)
    wal.close()



async def test_buffered_rows_arriving_a_moment_apart_share_a_wake_up_of_the_writer(tmp_path: Path) -> None:
    wal = await opened(tmp_path, sync_interval=1.0)
    for i in range(20):  # 2 ms apart: an idle writer woken by each would write 20 groups
        wal.append(KEY, row(i), 1, durable=False)
        await asyncio.sleep(0.002)
    await wal.sync()
    groups = list(wal.writer.stats.groups)
    wal.close()
    assert sum(groups) == 21 and len(groups) < 15, groups  # 20 requests and the sync
    assert len(recover(tmp_path).unsettled) == 20

async def test_settled_segments_are_deleted_oldest_first_and_a_missing_one_is_tolerated(tmp_path: Path) -> None:
    wal = await opened(tmp_path, segment_bytes=4096)
    lsns = []
    for _ in range(40):  # one by one: a segment is rotated after the group that fills it
        lsn, fut = wal.append(KEY, b"x" * 500 + b"\n", 1, durable=True)
        await fut  # type: ignore[misc]
        lsns.append(lsn)
    segments = fmt.segment_numbers(tmp_path)
    assert len(segments) > 3
    await wal.settle(lsns[20:], durable=True)  # type: ignore[misc]
    assert set(segments) <= set(fmt.segment_numbers(tmp_path)), "the oldest holds unsettled rows: none may go"
    await wal.settle(lsns[:20], durable=True)  # type: ignore[misc]
    left = fmt.segment_numbers(tmp_path)
    assert left == segments[-1:] or len(left) <= 2, left
    wal.close()
    assert recover(tmp_path).unsettled == []
    # A crash between an unlink and the next start leaves a gap: that is fine.
    again = await opened(tmp_path, segment_bytes=4096)
    for _ in range(20):
        await again.append(KEY, b"y" * 500 + b"\n", 1, durable=True)[1]  # type: ignore[misc]
    again.close()
    numbers = fmt.segment_numbers(tmp_path)
    (tmp_path / fmt.segment_name(numbers[0])).unlink()
    got = recover(tmp_path)
    assert got.unsettled and all(p.lsn > lsns[-1] for p in got.unsettled)


def _written_log(path: Path, n: int = 12) -> dict[int, bytes]:
    async def write() -> dict[int, bytes]:
        wal = await opened(path, segment_bytes=1 << 20)
        out = {}
        for i in range(n):
            lsn, fut = wal.append(KEY if i % 2 else OTHER, row(i) * (i + 1), i + 1, durable=True)
            out[lsn] = row(i) * (i + 1)
            await fut  # type: ignore[misc]
        wal.close()
        return out

    return asyncio.run(write())


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, bytes]]:
    path = tmp_path_factory.mktemp("golden")
    return path, _written_log(path)


def _copy(golden: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(golden, dest, ignore=shutil.ignore_patterns(fmt.LOCK_NAME))
    return dest


def _segment(path: Path) -> Path:
    (number,) = fmt.segment_numbers(path)
    return path / fmt.segment_name(number)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1))
def test_any_prefix_replays_to_a_prefix_of_the_records(golden: tuple[Path, dict[int, bytes]], tmp_path: Path,
                                                       cut: float) -> None:
    path = _copy(golden[0], tmp_path / "log")
    seg = _segment(path)
    data = seg.read_bytes()
    seg.write_bytes(data[:int(len(data) * cut)])
    got = recover(path)
    lsns = [p.lsn for p in got.unsettled]
    assert lsns == sorted(golden[1])[:len(lsns)], "a prefix, in order"
    assert all(read_part(path, p) == golden[1][p.lsn] for p in got.unsettled)
    assert got.damage.corrupt_bytes == 0, "a cut tail is torn, not corrupt"
    assert seg.stat().st_size + got.damage.torn_bytes == int(len(data) * cut), "the torn tail is cut off"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 0.9999), bit=st.integers(0, 7))
def test_a_flipped_bit_never_crashes_replay_nor_invents_a_record(golden: tuple[Path, dict[int, bytes]],
                                                                 tmp_path: Path, where: float, bit: int) -> None:
    path = _copy(golden[0], tmp_path / "log")
    seg = _segment(path)
    data = bytearray(seg.read_bytes())
    at = int(len(data) * where)
    data[at] ^= 1 << bit
    seg.write_bytes(bytes(data))
    got = recover(path)
    for p in got.unsettled:
        assert read_part(path, p) == golden[1][p.lsn], "every record replayed is one that was written"
    lost = len(golden[1]) - len(got.unsettled)
    assert lost <= 1 or got.damage.corrupt_records + (got.damage.torn_bytes > 0) >= 1
    assert lost == 0 or got.damage.corrupt_bytes + got.damage.torn_bytes > 0, "what is lost is counted"


async def test_every_crash_point_keeps_what_was_not_settled(tmp_path: Path) -> None:
    """After each step the directory is copied, as a crash would leave it once the step was synced;
    each copy must replay every request not settled by then (and may replay more)."""
    live = tmp_path / "live"
    wal = await opened(live, segment_bytes=2048)
    unsettled: set[int] = set()
    snapshots: list[tuple[Path, set[int]]] = []
    for step in range(30):
        lsns = []
        for i in range(3):
            lsn, fut = wal.append(KEY, b"r%d-%d\n" % (step, i) * 40, 40, durable=True)
            lsns.append(lsn)
            await fut  # type: ignore[misc]
        unsettled |= set(lsns)
        if step % 2:
            done = sorted(unsettled)[: len(unsettled) // 2]
            await wal.settle(done, durable=True)  # type: ignore[misc]
            unsettled -= set(done)
        snap = _copy(live, tmp_path / f"snap-{step}")
        snapshots.append((snap, set(unsettled)))
    wal.close()
    for snap, expected in snapshots:
        got = {p.lsn for p in recover(snap).unsettled}
        assert expected <= got, f"{snap.name}: lost {sorted(expected - got)[:5]}"


def test_a_newer_format_a_foreign_directory_and_a_second_process_are_refused(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fmt.open_meta(log, create=True)
    (log / fmt.META_NAME).write_text(json.dumps({"format": 99, "instance": "x"}))
    with pytest.raises(fmt.LogError, match="format 99, newer than this build reads"):
        recover(log)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(fmt.LogError, match=r"is not a write-ahead log .* give --wal-dir a directory of its own"):
        WriteAheadLog(foreign).open()
    first = WriteAheadLog(tmp_path / "shared")
    first.open()
    with pytest.raises(fmt.LogError, match="another process is using the write-ahead log"):
        WriteAheadLog(tmp_path / "shared").open()
    first.lock.release()
    WriteAheadLog(tmp_path / "shared").open()  # free again once the first lets go


async def test_rows_kept_for_one_database_are_never_replayed_into_another(tmp_path: Path) -> None:
    wal = await opened(tmp_path, database="a")
    lsn, _ = wal.append(KEY, row(1), 1, durable=False)
    await wal.sync()
    wal.close()
    with pytest.raises(fmt.LogError, match=r"holds 1 rows for database 'a', and this buffer writes to 'b': start "
                                           r"it with --database a"):
        WriteAheadLog(tmp_path, database="b").open()
    again = await opened(tmp_path, database="a")  # the refusal left the log as it was, and unlocked
    assert again.recovered is not None and [p.lsn for p in again.recovered.unsettled] == [lsn]
    again.settle([lsn])
    await again.sync()
    again.close()
    moved = WriteAheadLog(tmp_path, database="b")  # nothing unsettled: the log now serves the new one
    assert moved.open().database == "b"
    moved.close()
    assert json.loads((tmp_path / fmt.META_NAME).read_text())["database"] == "b"


async def test_a_full_disk_fails_durable_writers_and_the_log_recovers_once_there_is_room(tmp_path: Path) -> None:
    wal = await opened(tmp_path)
    fd = wal.writer._fd
    wal.writer._fd = os.open(os.devnull, os.O_RDONLY)  # every write now fails (EBADF), as a full disk would
    _, fut = wal.append(KEY, row(1), 1, durable=True)
    with pytest.raises(OSError, match="cannot be written"):
        await asyncio.wait_for(fut, 5)  # type: ignore[arg-type]
    assert wal.error is not None and str(tmp_path) in str(wal.error)
    os.close(wal.writer._fd)
    wal.writer._fd = fd
    _, fut = wal.append(KEY, row(2), 1, durable=True)
    await asyncio.wait_for(fut, 5)  # type: ignore[arg-type]
    assert wal.error is None
    wal.close()
    assert [read_part(tmp_path, p) for p in recover(tmp_path).unsettled] == [row(2)], "no half record left behind"


async def test_describe_says_what_the_log_holds_without_changing_it(tmp_path: Path) -> None:
    wal = await opened(tmp_path)
    for i in range(5):
        await wal.append(KEY, row(i), 1, durable=True)[1]  # type: ignore[misc]
    wal.close()
    seg = _segment_last(tmp_path)
    seg.write_bytes(seg.read_bytes() + b"IBW1\x00\x00")  # a torn tail
    before = seg.read_bytes()
    info = describe(tmp_path)
    assert info["unsettled"]["rows"] == 5 and info["unsettled"]["tables"] == {
        "events (JSONEachRow)": {"requests": 5, "rows": 5, "bytes": sum(len(row(i)) for i in range(5))}}
    assert info["damage"]["torn_bytes"] == 6 and seg.read_bytes() == before, "inspect repairs nothing"


def _segment_last(path: Path) -> Path:
    return path / fmt.segment_name(fmt.segment_numbers(path)[-1])


def test_wal_check_exits_0_when_whole_1_when_damaged_2_when_no_log(golden: tuple[Path, dict[int, bytes]],
                                                                  tmp_path: Path) -> None:
    import subprocess
    import sys

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "buffer", "wal", "check", str(path)], capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])

    path = _copy(golden[0], tmp_path / "log")
    whole = check(path)
    assert whole.returncode == 0 and json.loads(whole.stdout)["unsettled"]["rows"] == sum(range(1, 13))
    seg = _segment(path)
    data = bytearray(seg.read_bytes())
    data[40] ^= 0xFF
    seg.write_bytes(bytes(data))
    damaged = check(path)
    assert damaged.returncode == 1 and "corrupt places" in damaged.stderr
    assert check(tmp_path / "nothing").returncode == 2


# ----- regressions found by review, each failing before its fix ---------------------------------

def _rig(wal: WriteAheadLog, sink: object = None, **policy: object) -> tuple[object, object, object]:
    from buffer.flusher import Flusher, FlushPolicy
    from buffer.lifecycle import Lifecycle
    from buffer.ring import Ring, WhenFull
    from tests.fakes import MemorySink

    p = FlushPolicy(**{"max_rows": 1000, "max_bytes": 1 << 20, "max_age": 0.05, **policy})  # type: ignore[arg-type]
    ring = Ring(10_000_000, 1_000_000, WhenFull.REJECT, batch_rows=p.max_rows, batch_bytes=p.max_bytes)
    flusher = Flusher(ring, sink or MemorySink(), p, Lifecycle("gateway", 30.0), instance="x", wal=wal)
    return ring, flusher, sink


async def _until(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_requests_joined_into_one_entry_are_all_settled_and_their_segments_go(tmp_path: Path) -> None:
    wal = await opened(tmp_path, segment_bytes=2048)
    ring, flusher, _ = _rig(wal)
    task = asyncio.create_task(flusher.run())  # type: ignore[attr-defined]
    for i in range(100):
        lsn = wal.reserve()
        if not ring.try_append(KEY, row(i), 1, lsn):  # type: ignore[attr-defined]
            from buffer.ring import Entry

            ring.offer(Entry(KEY, row(i), 1, lsn=lsn))  # type: ignore[attr-defined]
        wal.put_rows(KEY, lsn, 1, row(i), False)
    await _until(lambda: ring.outstanding == 0)  # type: ignore[attr-defined]
    await wal.sync()
    flusher.lifecycle.shutdown()  # type: ignore[attr-defined]
    await flusher.stop()  # type: ignore[attr-defined]
    await task
    wal.close()
    got = recover(tmp_path)
    assert not got.pending and not got.unsettled, "every joined request was settled"
    assert len(fmt.segment_numbers(tmp_path)) <= 2, "and the settled segments were deleted"


async def test_a_resent_batch_takes_no_new_rows_and_is_never_dropped(tmp_path: Path) -> None:
    from buffer.ring import Entry, Ring, WhenFull

    ring = Ring(300, 1000, WhenFull.DROP_OLDEST)
    batch = [Entry(KEY, b"x" * 99 + b"\n", 1, lsn=lsn, replay_token="tok") for lsn in (1, 2)]
    batch[0].replay_count = 2
    ring.readmit(batch)
    assert not ring.try_append(KEY, row(9), 1, 3), "new rows never join a batch resent under its token"
    with pytest.raises(Exception, match="buffer full"):
        ring.offer(Entry(OTHER, b"y" * 150 + b"\n", 1))  # no room, and the resent batch may not be dropped
    assert ring.take(KEY, 1, 1) == batch, "it goes out whole, whatever the batch sizes"


async def test_a_committed_batch_across_a_deleted_segment_is_not_resent_and_settling_counts_once(
        tmp_path: Path) -> None:
    wal = await opened(tmp_path, segment_bytes=250)
    for i in (1, 2, 3, 4):
        await wal.append(KEY, b"%d" % i * 100 + b"\n", 1, durable=True)[1]  # type: ignore[misc]
    await wal.settle([1], durable=True)  # type: ignore[misc]
    await wal.log_batch("tok-B", [2, 3])  # lsn 2 in the first segment, 3 in the second
    await wal.settle([2, 3], durable=True)  # type: ignore[misc]
    await wal.settle([3], durable=True)  # type: ignore[misc]  # a second settle of the same lsn counts once
    wal.close()
    got = recover(tmp_path)
    assert not got.pending, "B committed: its DONE is gone with the first segment, but it is not resent"
    assert [p.lsn for p in got.unsettled] == [4]
    assert any(s.requests > s.settled for s in got.segments), "the segment holding lsn 4 is still there"


async def test_a_durable_request_is_not_flushed_before_its_fsync_and_is_taken_back_when_it_fails(
        tmp_path: Path) -> None:
    from buffer.ring import Entry, Ring, State, WhenFull

    ring = Ring(10_000, 1000, WhenFull.REJECT)
    entry = Entry(KEY, row(1), 1, lsn=1, syncing=True)
    ring.offer(entry)
    assert ring.take(KEY, 10, 10_000) == [], "not while its fsync is out"
    assert not ring.try_append(KEY, row(2), 1, 2), "and nothing joins it"
    assert ring.withdraw(entry) and entry.state is State.FAILED and ring.ledger.accepted_rows == 0


async def test_the_writer_comes_back_by_itself_after_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    import errno

    import buffer.wal as walmod

    wal = await opened(tmp_path)
    monkeypatch.setattr(walmod, "FAULT_RETRY", 0.05)
    real = os.writev
    failing = [True]

    def writev(fd: int, buffers: list[bytes]) -> int:
        if failing[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers)

    monkeypatch.setattr(walmod.os, "writev", writev)
    lsn, _ = wal.append(KEY, row(1), 1, durable=False)  # acknowledged BUFFERED: kept, written later
    _, durable = wal.append(KEY, row(2), 1, durable=True)
    with pytest.raises(OSError):
        await asyncio.wait_for(durable, 5)  # type: ignore[arg-type]
    assert wal.error is not None
    failing[0] = False  # room again: no write from outside is needed for the log to notice
    await _until(lambda: wal.error is None)
    wal.close()
    assert [p.lsn for p in recover(tmp_path).unsettled] == [lsn], "the BUFFERED row was written once it could"


def test_a_frame_forged_without_the_logs_salt_is_never_read_as_a_record(golden: tuple[Path, dict[int, bytes]],
                                                                       tmp_path: Path) -> None:
    path = _copy(golden[0], tmp_path / "log")
    seg = _segment(path)
    forged = b"".join(fmt.done_record([(1, 12)], 0))  # what a client could put in a payload
    data = bytearray(seg.read_bytes())
    data[5] ^= 0xFF  # damage at the start: the reader looks for the next record
    seg.write_bytes(bytes(data[:20]) + forged + bytes(data[20:]))
    got = recover(path)
    assert all(lsn in {p.lsn for p in got.unsettled} for lsn in list(golden[1])[1:]), "nothing settled by the fake"


def test_a_damaged_meta_file_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fmt.open_meta(log, create=True)
    meta = json.loads((log / fmt.META_NAME).read_text())
    del meta["instance"]
    (log / fmt.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(fmt.LogError, match="is damaged"):
        recover(log)
