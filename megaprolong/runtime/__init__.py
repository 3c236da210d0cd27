"""Where the process runs: device selection, process groups, and megatron-core on CPU."""
