"""The engine: the loop thread that owns the device, the batcher, the runner, admitted jobs."""
