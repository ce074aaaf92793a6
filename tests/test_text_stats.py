"""Text assembly (UTF-8 and stop strings across tokens) and the stats identity (pure)."""

from __future__ import annotations

from tandem.spec.stats import SpecStats
from tandem.spec.text import TextAssembler


def feed(asm: TextAssembler, pieces: list[bytes]) -> list[str]:
    return [asm.push(p) for p in pieces] + [asm.flush()]


def test_utf8_split_across_tokens():
    data = "héllo 🙂 wörld".encode()
    pieces = [data[i:i + 1] for i in range(len(data))]  # one byte per token
    out = feed(TextAssembler(), pieces)
    assert "".join(out) == "héllo 🙂 wörld"
    assert all("\ufffd" not in s for s in out)


def test_stop_string_split_across_tokens_is_held_back_and_removed():
    asm = TextAssembler(stop=["</end>"])
    out = feed(asm, [b"abc </", b"en", b"d> tail"])
    assert "".join(out) == "abc "
    assert asm.stopped
    assert out[0] == "abc "  # "</" held back, not shown


def test_false_alarm_prefix_is_released():
    asm = TextAssembler(stop=["STOP"])
    out = feed(asm, [b"ST", b"ART"])
    assert out[0] == "" and "".join(out) == "START" and not asm.stopped


def test_earliest_of_several_stop_strings_wins():
    asm = TextAssembler(stop=["zz", "b"])
    assert "".join(feed(asm, [b"aazzb"])) == "aa"


def test_stats_identity_and_positions():
    s = SpecStats()
    s.record_step(4, 2)
    s.record_step(2, 2)
    s.record_step(0, 0)
    s.unuse(1)
    assert (s.drafted, s.accepted, s.rejected, s.ignored) == (6, 3, 2, 1)
    assert s.identity_holds()
    assert s.drafted_by_position == [2, 2, 1, 1] and s.accepted_by_position == [2, 2, 0, 0]
    assert s.acceptance_by_position == [1.0, 1.0, 0.0, 0.0]
    assert (s.draft_steps, s.plain_steps) == (2, 1)
    d = s.to_dict()
    assert d["total_draft_tokens_count"] == d["accepted_draft_tokens_count"] + d["rejected_draft_tokens_count"] \
        + d["ignored_draft_tokens_count"]
