"""Export progress: a tqdm bar on a terminal, plain periodic lines elsewhere (bytes done / total, rate, ETA, the weight
being written), nothing with -q, and one closing line (size, wall time, peak RSS)."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest

from builder import graph, progress
from builder.cli import main
from builder.export import export
from builder.progress import MiB, Progress

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny-qwen3"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _follow(p: Progress, path: Path, total: int):
    path.write_bytes(b"")
    p.begin_weights(total, path)
    p._stop.set()  # drive the ticks by hand
    p._ticker.join()


def test_plain_lines_give_bytes_total_rate_eta_and_the_weight(tmp_path):
    stream = io.StringIO()
    p = Progress(stream=stream, interval=0.0)
    data = tmp_path / "model.onnx.data"
    _follow(p, data, 10 * MiB)
    p.tensor_started("layers.3.mlp.down.weight", 2 * MiB, 4 * MiB)
    p._weights_start = time.monotonic() - 2.0  # 3 MiB in 2 s
    with open(data, "wb") as f:
        f.truncate(3 * MiB)
    p._tick(p.done_bytes())
    line = stream.getvalue().splitlines()[-1]
    assert re.search(r"weights 3\.0/10\.0 MiB \(30%\), 1\.5 MiB/s, ETA 5s: layers\.3\.mlp\.down\.weight$", line), line
    with open(data, "wb") as f:
        f.truncate(9 * MiB)  # past the weight being written: bounded by it (the writer may have seeked ahead)
    assert p.done_bytes() == 6 * MiB
    p.end_weights()


def test_lines_are_spaced_by_the_interval(tmp_path):
    stream = io.StringIO()
    p = Progress(stream=stream, interval=3600.0)
    _follow(p, tmp_path / "d", MiB)
    p.tensor_started("w", 0, MiB)
    p._tick(MiB // 2)
    p.end_weights()
    assert "weights 0.5/1.0" not in stream.getvalue()


def test_a_terminal_gets_a_tqdm_bar(tmp_path):
    stream = Terminal()
    p = Progress(stream=stream)
    data = tmp_path / "d"
    _follow(p, data, 8 * MiB)
    p.tensor_started("embed.weight", 0, 8 * MiB)
    with open(data, "wb") as f:
        f.truncate(2 * MiB)
    p._tick(p.done_bytes())
    p._bar.refresh()
    text = stream.getvalue()
    assert "weights:  25%" in text and "2.00M/8.00M" in text and "embed.weight" in text
    p.end_weights()
    assert "100%" in stream.getvalue() and "8.00M/8.00M" in stream.getvalue()


def test_a_real_export_reports_each_weight_while_it_is_written(monkeypatch, tmp_path):
    """The writer's callback names the weight and the data file's size moves the bar (slowed here so ticks land)."""
    monkeypatch.setattr(progress, "TICK_S", 0.005)
    tofile = graph.StreamedTensor.tofile

    def slow_tofile(self, file):
        time.sleep(0.05)
        tofile(self, file)

    monkeypatch.setattr(graph.StreamedTensor, "tofile", slow_tofile)
    stream = io.StringIO()
    out = export(str(TINY), tmp_path / "out", "fp32", "cpu", progress=Progress(stream=stream, interval=0.0))
    lines = stream.getvalue().splitlines()
    weights = [line for line in lines if "] weights " in line]
    assert len(weights) >= 5, lines
    named = {line.rsplit(": ", 1)[1] for line in weights}
    assert len(named) >= 3 and any(".weight" in name or "embed" in name for name in named)
    total = (out / "model.onnx.data").stat().st_size / MiB
    assert all(f"/{total:.1f} MiB" in line for line in weights)
    assert re.search(r"done: .+: [\d.]+ MiB in [\d.]+ s, peak RSS \d+ MiB; weights written: \d+ float tensors",
                     lines[-1]), lines[-1]


def test_quiet_prints_nothing(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["-i", str(TINY), "-o", str(tmp_path / "out"), "-p", "int4", "-q"])
    assert exc.value.code == 0
    assert capsys.readouterr() == ("", "")


def test_peak_rss_is_this_process(tmp_path):
    assert 20 * MiB < progress.peak_rss_bytes() < 64 * 2**30
