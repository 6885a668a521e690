"""espeak-ng through ctypes, run as a fresh worker process per synthesis batch.

The pip package ``espeakng-loader`` ships ``libespeak-ng.so`` and its voice data
(espeak-ng is GPL-3.0+; we run it as a tool and keep only the audio it makes).
We drive its C API with ctypes (``espeak_Initialize``, ``espeak_SetVoiceByName``,
``espeak_SetParameter``, ``espeak_Synth`` with a synchronous callback).

Why a separate process: espeak-ng keeps synthesis state between utterances
(wave-generator phase, flutter index, echo buffer) that ``espeak_Terminate`` /
``espeak_Initialize`` do not reset, and it draws breath noise from libc
``rand()`` and its own generator. Measured on espeak-ng 1.52: the same call
twice in one process gives different samples (even different lengths), while a
*fresh* process replaying the same call sequence, with both generators seeded
before every utterance, is byte-identical. So :func:`synthesize` runs this file
as a script in a new interpreter (stdlib + numpy only, no torch: starts in a
fraction of a second) and replays the whole request list in order.

Protocol: ``python espeak.py REQUESTS.json OUT.npz``. REQUESTS is a list of
``{"voice", "text", "rate", "pitch", "range", "seed"}``; OUT gets ``audio``
(all clips' int16 samples concatenated), ``offsets`` (n + 1 boundaries) and
``sample_rate``; stdout gets one JSON line ``{"espeak_version": ...}``. Exit
code 3 with ``{"error": "voice", "voice": NAME}`` when a voice is not found.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# espeak-ng C API constants (speak_lib.h).
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
CHARS_UTF8 = 1
PARAM_RATE = 1
PARAM_PITCH = 3
PARAM_RANGE = 4
EE_OK = 0
EXIT_BAD_VOICE = 3


@dataclass(frozen=True)
class SynthRequest:
    """One utterance for espeak-ng: voice name (``voice+variant``), text, rate (words/min), pitch and range (0-100)."""

    voice: str
    text: str
    rate: int
    pitch: int
    range: int
    seed: int


@dataclass(frozen=True)
class SynthBatch:
    """Output of one worker run: int16 clips at ``sample_rate`` and the library version."""

    clips: list[np.ndarray]
    sample_rate: int
    espeak_version: str


class EspeakVoiceError(ValueError):
    """espeak-ng has no voice of this name (``espeak_SetVoiceByName`` returned an error)."""

    def __init__(self, voice: str) -> None:
        super().__init__(voice)
        self.voice = voice


def synthesize(requests: Sequence[SynthRequest], timeout: float = 600.0) -> SynthBatch:
    """Synthesize ``requests`` in order in a fresh worker process (deterministic; see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="kd-espeak-") as temp:
        request_path, output_path = Path(temp) / "requests.json", Path(temp) / "audio.npz"
        request_path.write_text(json.dumps([asdict(r) for r in requests]), encoding="utf-8")
        # One thread is plenty for espeak; keep the worker from grabbing every core for numpy.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(request_path),
                                    str(output_path)], capture_output=True, text=True, timeout=timeout, env=env)
        last_line = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else "{}"
        if completed.returncode == EXIT_BAD_VOICE:
            raise EspeakVoiceError(json.loads(last_line)["voice"])
        if completed.returncode != 0:
            raise RuntimeError(f"espeak-ng worker failed (exit {completed.returncode}): {completed.stderr[-2000:]}")
        info = json.loads(last_line)
        with np.load(output_path) as data:
            audio, offsets, rate = data["audio"], data["offsets"], int(data["sample_rate"])
    clips = [audio[offsets[i]:offsets[i + 1]].copy() for i in range(len(offsets) - 1)]
    return SynthBatch(clips=clips, sample_rate=rate, espeak_version=info["espeak_version"])


class _Espeak:
    """The loaded library, initialised for synchronous synthesis into a Python buffer."""

    def __init__(self) -> None:
        import espeakng_loader  # the optional dependency kd[speech]; imported here so errors name it

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.libc = ctypes.CDLL(None)
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                 espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def on_samples(samples, count, _events):  # noqa: ANN001 - ctypes callback
            if count > 0:
                self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
            return 0  # 0 = continue synthesis

        self._callback = callback_type(on_samples)  # keep a reference: the library calls it later
        lib.espeak_SetSynthCallback(self._callback)

    def has_voice(self, voice: str) -> bool:
        # An unknown name returns an error and silently keeps the previous voice: always check.
        return self.lib.espeak_SetVoiceByName(voice.encode()) == EE_OK

    def say(self, request: SynthRequest) -> np.ndarray:
        if not self.has_voice(request.voice):
            raise EspeakVoiceError(request.voice)
        self.lib.espeak_SetParameter(PARAM_RATE, int(request.rate), 0)
        self.lib.espeak_SetParameter(PARAM_PITCH, int(request.pitch), 0)
        self.lib.espeak_SetParameter(PARAM_RANGE, int(request.range), 0)
        self.lib.espeak_ng_SetRandSeed(request.seed)
        self.libc.srand(ctypes.c_uint(request.seed & 0xFFFFFFFF))
        text = request.text.encode("utf-8") + b"\0"
        self._chunks = []
        status = self.lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if status != EE_OK:
            raise RuntimeError(f"espeak_Synth failed ({status}) for {request.text!r}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _worker(request_path: str, output_path: str) -> int:
    requests = [SynthRequest(**r) for r in json.loads(Path(request_path).read_text(encoding="utf-8"))]
    engine = _Espeak()
    for voice in sorted({r.voice for r in requests}):
        if not engine.has_voice(voice):
            print(json.dumps({"error": "voice", "voice": voice}))
            return EXIT_BAD_VOICE
    clips = [engine.say(r) for r in requests]
    offsets = np.zeros(len(clips) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in clips])
    audio = np.concatenate(clips) if clips else np.zeros(0, np.int16)
    np.savez(output_path, audio=audio.astype(np.int16), offsets=offsets, sample_rate=np.int64(engine.sample_rate))
    print(json.dumps({"espeak_version": engine.version}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
