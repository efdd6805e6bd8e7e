"""Sans-IO: EEM's protocol facts, the reference codec and offload, the link policy
(echo, keepalive, failed transfers, reconnect), options, config, events, errors and the
transport interface. No threads, no file descriptors."""
