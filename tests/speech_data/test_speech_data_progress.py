"""A real long stage (the synthetic speech build) shows progress lines when stderr is a pipe, not a bar."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("espeakng_loader")

BUILD = textwrap.dedent("""
    import logging, sys
    from kd_tasks.speech.synth import SynthConfig, build_synthetic_speech
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = SynthConfig(keywords=["yes", "no"], clips_per_keyword=2, unknown_clips=2, silence_clips=2,
                         asr_utterances=2, voices=["en-US"], variants=["m3"])
    build_synthetic_speech(config, sys.argv[1])
""")


def test_synthetic_speech_build_logs_progress_lines_on_a_pipe(tmp_path: Path) -> None:
    env = {**os.environ, "KD_PROGRESS_INTERVAL": "1e-9", "OMP_NUM_THREADS": "1"}
    env.pop("KD_PROGRESS", None)
    done = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("INFO kd.progress: synthetic speech")]
    assert any("augmenting clips: clip 1/" in line and " left" in line for line in lines), done.stderr[-2000:]
    assert any("augmenting clips: finished at clip" in line for line in lines)
    assert "\r" not in done.stderr  # no tqdm bar redraws in a log
