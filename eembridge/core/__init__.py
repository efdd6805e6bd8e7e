"""Sans-IO: EEM's protocol facts, the reference codec and offload, options, config,
events, errors and the transport interface. No threads, no file descriptors."""
