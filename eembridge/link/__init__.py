"""The host's side of the bridge: the TAP device, network namespaces,
NetworkManager, privileges."""
