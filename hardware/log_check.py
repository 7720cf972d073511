"""``rigfm logs check``: verify run logs, per-topic counts and sequence gaps, recover truncated files."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcap.records import Channel, Message, Schema
from mcap.writer import CompressionType, Writer

from hardware.foxglove_rules import schema_problems
from hardware.log_reader import MessageDecoder, ScanResult, scan_file
from hardware.log_schema import END_METADATA_NAME, RECOVERY_METADATA_NAME, REQUIRED, decode_metadata

SEQ_TOPICS = ("/state", "/command")
_MAX_GAPS_LISTED = 20


@dataclass
class SeqStats:
    """Sequence-number continuity of one topic: gaps are (last seq before, first seq after)."""

    first: int | None = None
    last: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)
    n_gaps: int = 0
    missing: int = 0
    resets: int = 0  # seq went backwards or repeated (device reboot, wrap)

    def add(self, seq: int) -> None:
        if self.last is not None:
            step = seq - self.last
            # the device counter is u16 (hardware.protocol), the host one unbounded: unwrap a wrap-around
            for modulus in (1 << 16, 1 << 32):
                if self.last < modulus and step < -(modulus // 2):
                    step += modulus
                    break
            if step > 1:
                self.n_gaps += 1
                self.missing += step - 1
                if len(self.gaps) < _MAX_GAPS_LISTED:
                    self.gaps.append((self.last, seq))
            elif step <= 0:
                self.resets += 1
        else:
            self.first = seq
        self.last = seq


@dataclass
class StateLoss:
    """Why /state seq numbers are missing, from the fields ``rx_index`` (host count of received STATE
    frames) and ``link_lost`` (cumulative link losses seen by the driver) of consecutive records:

    * ``not_logged``: frames the host received but that are not in the log (a lossy logger / loop);
    * ``link_lost``: frames lost on the serial link (a lossy link);
    * ``other_frames``: seq numbers taken by device frames that are not STATE (heartbeat echoes, ACKs):
      no loss at all (the device numbers all its frames with one counter).
    ``known`` is False for logs without these fields (log format v1): then a gap cannot be explained."""

    known: bool = True
    not_logged: int = 0
    link_lost: int = 0
    other_frames: int = 0
    _prev: tuple[int, int | None, int | None] | None = None

    def add(self, rec: dict[str, Any]) -> None:
        seq = int(rec["seq"])
        rx = rec.get("rx_index")
        link = rec.get("link_lost")
        if rx is None or link is None:
            self.known = False
        prev, self._prev = self._prev, (seq, rx, link)
        if prev is None:
            return
        step = (seq - prev[0]) % (1 << 16)
        missing = step - 1 if 0 < step < (1 << 15) else 0
        rx_missed = max(int(rx) - int(prev[1]) - 1, 0) if rx is not None and prev[1] is not None else 0
        link_d = max(int(link) - int(prev[2]), 0) if link is not None and prev[2] is not None else 0
        self.not_logged += rx_missed
        self.link_lost += link_d
        self.other_frames += max(missing - rx_missed - link_d, 0)

    def as_dict(self) -> dict[str, Any]:
        return {"known": self.known, "not_logged": self.not_logged, "link_lost": self.link_lost,
                "other_frames": self.other_frames}


@dataclass
class CheckReport:
    """Result of checking one file."""

    path: Path
    scan: ScanResult
    counts: dict[str, int]
    seq: dict[str, SeqStats]
    bad_messages: int
    first_bad: str | None
    time_range_ns: tuple[int, int] | None
    run: dict[str, Any]
    run_end: dict[str, Any]
    state_loss: StateLoss | None = None
    foxglove_problems: list[str] = field(default_factory=list)
    recovered_path: Path | None = None
    recovered_messages: int = 0

    @property
    def ok(self) -> bool:
        return self.scan.ok and self.bad_messages == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        s = self.scan
        return {
            "path": str(self.path),
            "ok": self.ok,
            "complete": s.complete,
            "errors": list(s.errors),
            "size": s.size,
            "readable_bytes": s.good_until,
            "chunks": s.chunks,
            "bad_chunks": s.bad_chunks,
            "messages": s.messages,
            "counts": dict(self.counts),
            "seq": {
                t: {"first": q.first, "last": q.last, "gaps": q.n_gaps, "missing": q.missing,
                    "resets": q.resets}
                for t, q in self.seq.items()
            },
            "bad_messages": self.bad_messages,
            "state_loss": self.state_loss.as_dict() if self.state_loss else None,
            "foxglove_problems": list(self.foxglove_problems),
            "log_format": self.run.get("log_format"),
            "run_id": self.run.get("run_id"),
            "part": self.run.get("part"),
            "logger": self.run_end,
            "recovered": str(self.recovered_path) if self.recovered_path else None,
        }

    def format(self) -> str:
        s = self.scan
        status = "OK" if self.ok else ("TRUNCATED" if not s.complete else "CORRUPT")
        lines = [f"{self.path}: {status}  ({s.size} bytes, {s.chunks} chunks, {s.messages} messages)"]
        if self.run:
            keys = ("run_id", "part", "rig", "controller", "firmware_version", "model_sha256", "git_revision")
            lines.append("  run: " + ", ".join(f"{k}={self.run[k]}" for k in keys if k in self.run))
        for err in s.errors:
            lines.append(f"  error: {err}")
        if not s.complete:
            lines.append(f"  readable up to byte {s.good_until}; {s.lost_bytes} trailing bytes unreadable")
        if self.bad_messages:
            lines.append(f"  {self.bad_messages} undecodable/incomplete message(s), first: {self.first_bad}")
        if self.time_range_ns:
            t0, t1 = self.time_range_ns
            lines.append(f"  duration {(t1 - t0) / 1e9:.3f} s")
        for topic, n in sorted(self.counts.items()):
            line = f"  {topic:<12} {n:>9}"
            st = self.seq.get(topic)
            if st is not None and st.first is not None:
                line += f"  seq {st.first}..{st.last}, {st.n_gaps} gap(s), {st.missing} missing"
                if st.resets:
                    line += f", {st.resets} reset(s)"
                if st.gaps:
                    shown = ", ".join(f"{a}->{b}" for a, b in st.gaps[:5])
                    line += f" [{shown}{', ...' if st.n_gaps > 5 else ''}]"
            lines.append(line)
        sl = self.state_loss
        if sl is not None and self.seq.get("/state") is not None:
            if sl.known:
                lines.append(
                    f"  /state gaps explained: {sl.not_logged} received but not logged (logger), "
                    f"{sl.link_lost} lost on the link, {sl.other_frames} other device frames (no loss)"
                )
            else:
                lines.append("  /state gaps: records without rx_index/link_lost (log format v1, or not "
                             "written through a StateFeed): logger and link losses cannot be told apart")
        if self.run_end:
            line = "  logger: written {w}, dropped {d}, write errors {e}".format(
                w=self.run_end.get("written_total", "?"),
                d=self.run_end.get("dropped_total", "?"),
                e=self.run_end.get("write_errors_total", "?"),
            )
            if self.run_end.get("error"):
                line += f"; LOGGING FAILED: {self.run_end['error']}"
            lines.append(line)
        for problem in self.foxglove_problems:
            lines.append(f"  foxglove: {problem}")
        if self.recovered_path is not None:
            lines.append(f"  recovered {self.recovered_messages} messages -> {self.recovered_path}")
        return "\n".join(lines)


def check_file(path: str | Path) -> CheckReport:
    """Verify one MCAP log: structure, CRCs, every message decodable with its required fields, seq gaps."""
    counts: dict[str, int] = {}
    seq = {t: SeqStats() for t in SEQ_TOPICS}
    loss = StateLoss()
    bad = [0, None]
    trange = [None, None]
    decoder = MessageDecoder()

    def on_message(ch: Channel, schema: Schema | None, msg: Message) -> None:
        topic = ch.topic
        counts[topic] = counts.get(topic, 0) + 1
        t = msg.log_time
        trange[0] = t if trange[0] is None else min(trange[0], t)
        trange[1] = t if trange[1] is None else max(trange[1], t)
        try:
            rec = decoder.decode(ch, schema, msg)
            missing = [k for k in REQUIRED.get(topic, ()) if k not in rec]
            if missing:
                raise ValueError(f"{topic}: missing field(s) {', '.join(missing)}")
        except ValueError as exc:
            bad[0] += 1
            bad[1] = bad[1] or str(exc)
            return
        if topic in seq:
            seq[topic].add(int(rec["seq"]))
        if topic == "/state":
            loss.add(rec)

    scan = scan_file(path, on_message)
    run_end: dict[str, Any] = {}
    for name, data in scan.metadata:
        if name == END_METADATA_NAME:
            run_end = decode_metadata(data)
    return CheckReport(
        path=Path(path),
        scan=scan,
        counts=counts,
        seq={t: s for t, s in seq.items() if s.first is not None},
        bad_messages=bad[0],
        first_bad=bad[1],
        time_range_ns=(trange[0], trange[1]) if trange[0] is not None else None,
        run=scan.run_metadata(),
        run_end=run_end,
        state_loss=loss if counts.get("/state") else None,
        foxglove_problems=foxglove_problems(scan),
    )


def foxglove_problems(scan: ScanResult) -> list[str]:
    """JSON schemas of the file that Foxglove's JSON-schema parser rejects (``hardware.foxglove_rules``)."""
    out = []
    for schema in scan.schemas.values():
        if schema.encoding != "jsonschema":
            continue
        try:
            parsed = json.loads(schema.data) if schema.data else None
        except ValueError as exc:
            out.append(f"schema {schema.name}: not JSON ({exc})")
            continue
        if parsed is None:
            continue
        problems = schema_problems(parsed, schema.name)
        if problems:
            out.append(f"schema {schema.name} does not load in Foxglove: " + "; ".join(problems))
    return out


def check_run_continuity(reports: list[CheckReport]) -> list[str]:
    """Sequence continuity across the rotated parts of each run (lines to print; empty for one part)."""
    runs: dict[str, list[CheckReport]] = {}
    for rep in reports:
        if "run_id" in rep.run and ".recovered" not in rep.path.name:
            runs.setdefault(str(rep.run["run_id"]), []).append(rep)
    lines = []
    for run_id, reps in runs.items():
        if len(reps) < 2:
            continue
        reps.sort(key=lambda r: int(r.run.get("part", 0)))
        parts = [int(r.run.get("part", 0)) for r in reps]
        missing_parts = sorted(set(range(parts[0], parts[-1] + 1)) - set(parts))
        breaks = []
        for topic in SEQ_TOPICS:
            for a, b in zip(reps, reps[1:], strict=False):
                qa, qb = a.seq.get(topic), b.seq.get(topic)
                if qa and qb and qb.first != qa.last + 1 and (qa.last, qb.first) != (0xFFFF, 0):
                    breaks.append(
                        f"{topic} {qa.last}->{qb.first} between parts {a.run['part']} and {b.run['part']}"
                    )
        status = "continuous" if not breaks and not missing_parts else "DISCONTINUOUS"
        line = f"run {run_id}: parts {parts[0]}..{parts[-1]} {status}"
        if missing_parts:
            line += f"; missing parts {missing_parts}"
        if breaks:
            line += "; " + "; ".join(breaks)
        lines.append(line)
    return lines


def recovered_path_for(path: str | Path) -> Path:
    """``run_0000.mcap`` -> ``run_0000.recovered.mcap``."""
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".mcap") else path.name
    return path.with_name(stem + ".recovered.mcap")


def recover_file(path: str | Path, out: str | Path | None = None) -> tuple[Path, int]:
    """Rewrite everything readable of ``path`` (schemas, channels, metadata, messages of good chunks) into a
    valid, finished MCAP file. Returns (output path, messages written)."""
    path = Path(path)
    out = Path(out) if out is not None else recovered_path_for(path)
    tmp = out.with_name(out.name + ".tmp")
    n = [0]
    try:
        _write_recovered(path, tmp, n)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out, n[0]


def _write_recovered(path: Path, tmp: Path, n: list[int]) -> None:
    with open(tmp, "wb") as f:
        writer = Writer(f, compression=CompressionType.ZSTD, enable_data_crcs=True)
        writer.start(profile="", library="rigfm-logs-recover")
        schema_ids: dict[int, int] = {}
        channel_ids: dict[int, int] = {}

        def on_message(ch: Channel, schema: Schema | None, msg: Message) -> None:
            cid = channel_ids.get(ch.id)
            if cid is None:
                sid = 0
                if schema is not None:
                    sid = schema_ids.get(schema.id) or writer.register_schema(
                        schema.name, schema.encoding, schema.data
                    )
                    schema_ids[schema.id] = sid
                cid = channel_ids[ch.id] = writer.register_channel(
                    ch.topic, ch.message_encoding, sid, dict(ch.metadata)
                )
            writer.add_message(cid, msg.log_time, msg.data, msg.publish_time, msg.sequence)
            n[0] += 1

        scan = scan_file(path, on_message)
        for name, data in scan.metadata:
            writer.add_metadata(name, data)
        writer.add_metadata(
            RECOVERY_METADATA_NAME,
            {
                "source": str(path),
                "source_bytes": str(scan.size),
                "readable_bytes": str(scan.good_until),
                "messages_recovered": str(n[0]),
                "errors": " | ".join(scan.errors)[:4000],
                "recovered_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        writer.finish()
