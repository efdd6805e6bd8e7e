"""A synthetic OTDR trace: what the demo's "measuring module" streams to the host.

An optical time-domain reflectometer sends light pulses down a fibre and records the
backscatter over distance: a slope falling with the fibre's attenuation, spikes at
connectors (Fresnel reflections), steps at splices, and noise that grows as the signal
fades. The bytes are float32 samples, deterministic for a seed, so a receiver can
check them by SHA-256.
"""

from __future__ import annotations

import numpy as np


def otdr_trace(nbytes: int, seed: int = 1) -> bytes:
    samples = max(1, nbytes // 4)
    rng = np.random.default_rng(seed)
    distance_km = np.linspace(0.0, 50.0, samples, dtype=np.float64)
    level_db = -0.2 * distance_km  # 0.2 dB/km at 1550 nm
    for km in rng.uniform(1.0, 49.0, 6):  # splices: small losses
        level_db[distance_km > km] -= rng.uniform(0.05, 0.3)
    noise = rng.normal(0.0, 0.02, samples) * np.exp(distance_km / 15.0)
    trace = level_db + noise
    for km in rng.uniform(1.0, 49.0, 4):  # connectors: reflections
        peak = int(km / 50.0 * samples)
        trace[peak : peak + 40] += 4.0 * np.exp(-np.arange(min(40, samples - peak)) / 6.0)
    data = trace.astype("<f4").tobytes()
    return (data + bytes(nbytes - len(data)))[:nbytes]
