"""A run: the stream through the four phases (pipeline, instance_flow, phases, p4_turns), resume
and input checks, shard merging, and the statistics read back from the outputs."""
