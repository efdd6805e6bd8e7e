"""Watching a running bridge: the control socket, Prometheus metrics, logging,
live captures of the TAP and recordings of the USB transfers."""
